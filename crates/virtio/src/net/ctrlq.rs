//! The control queue: each chain is one command (class, command, data)
//! followed by a device-writable ack byte.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uring_backend::executor::{EventFdReader, Executor};
use vm_memory::{Address, Bytes};

use super::ctrl::{handle, CtrlFeatures, Effect, VIRTIO_NET_ERR, VIRTIO_NET_OK};
use super::device::{NetShared, PairCtx};
use crate::vq::{drain, schedule_notify, serve_kicks, Chain, SharedQueue};

/// Largest command we read (a MAC table of a few thousand entries).
const MAX_COMMAND: u64 = 64 << 10;

/// Serves the control queue until the device stops.
pub(super) async fn serve_ctrl(ex: Rc<Executor>, ctx: PairCtx) {
    let _guard = ctx.guard;
    let shared = ctx.shared;
    let q = ctx.q.into_served(shared.log.clone());
    let features = ctx.ctrl;
    let kick = EventFdReader::new(Arc::new(ctx.kick));
    serve_kicks(&ex, &kick, &shared.stop, &q, || {
        drain(
            &q,
            |chain| answer(&ex, &q, &shared, features, chain),
            || false,
        )
    })
    .await;
    q.borrow().hand_back(&ctx.returned, 0);
}

/// Carries out one command and acks it.
fn answer(
    ex: &Executor,
    q: &SharedQueue,
    shared: &NetShared,
    features: CtrlFeatures,
    chain: Chain,
) {
    let head = chain.head_index();
    let mem = q.borrow().mem.clone();
    // Readable part: the command; last writable byte: the ack.
    let mut command = Vec::new();
    let mut ack = None;
    let mut malformed = false;
    let mut seen_writable = false;
    for desc in chain {
        if desc.is_write_only() {
            seen_writable = true;
            if desc.len() > 0 {
                ack = Some(desc.addr().unchecked_add(u64::from(desc.len()) - 1));
            }
        } else if seen_writable || command.len() as u64 + u64::from(desc.len()) > MAX_COMMAND {
            malformed = true;
        } else {
            let start = command.len();
            command.resize(start + desc.len() as usize, 0);
            if mem.read_slice(&mut command[start..], desc.addr()).is_err() {
                malformed = true;
            }
        }
    }
    let status = if malformed {
        Err("malformed chain".to_string())
    } else {
        let mut filter = shared.filter.lock().unwrap_or_else(|e| e.into_inner());
        let r = handle(&command, features, &mut filter);
        shared.filter_open.store(filter.promisc, Ordering::SeqCst);
        drop(filter);
        match r {
            Ok(Effect::None) => Ok(()),
            Ok(Effect::QueuePairs(n)) => shared
                .set_active_pairs(n)
                .map_err(|e| format!("setting {n} queue pairs: {e}")),
            Err(e) => Err(e.to_string()),
        }
    };
    let code = match status {
        Ok(()) => VIRTIO_NET_OK,
        Err(why) => {
            shared.stats.ctrl_errors.fetch_add(1, Ordering::Relaxed);
            shared
                .log
                .warn(format_args!("control command refused: {why}"));
            VIRTIO_NET_ERR
        }
    };
    let written = match ack {
        Some(addr) if mem.write_obj(code, addr).is_ok() => 1,
        _ => 0,
    };
    q.borrow_mut().complete(head, written);
    schedule_notify(ex, q);
}
