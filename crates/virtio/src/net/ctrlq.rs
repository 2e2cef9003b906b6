//! The control queue: each chain is one command (class, command, data)
//! followed by a device-writable ack byte.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uring_backend::executor::{yield_now, Executor};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes};

use super::ctrl::{handle, Effect, VIRTIO_NET_ERR, VIRTIO_NET_OK};
use super::device::PairCtx;
use super::queue::schedule_notify;

/// Largest command we read (a MAC table of a few thousand entries).
const MAX_COMMAND: u64 = 64 << 10;

/// Serves the control queue until the device stops.
pub(super) async fn serve_ctrl(ex: Rc<Executor>, ctx: PairCtx) {
    let _guard = ctx.guard;
    let shared = ctx.shared;
    let kick = Arc::new(ctx.kick);
    let q = ctx.q.into_net_queue(shared.log.clone());
    let features = ctx.ctrl;
    let returned = ctx.returned;
    'serve: loop {
        if ex.read_eventfd(kick.clone()).await.is_err() {
            break;
        }
        let mut budget = usize::from(q.borrow().queue.size()).max(1);
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                break 'serve;
            }
            q.borrow_mut().disable_notification();
            loop {
                let popped = q.borrow_mut().pop();
                let Some(chain) = popped else {
                    break;
                };
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
                    } else if seen_writable
                        || command.len() as u64 + u64::from(desc.len()) > MAX_COMMAND
                    {
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
                schedule_notify(&ex, &q);
                budget = budget.saturating_sub(1);
                if budget == 0 {
                    break;
                }
            }
            if budget == 0 {
                budget = usize::from(q.borrow().queue.size()).max(1);
                yield_now().await;
                continue;
            }
            if !q.borrow_mut().enable_notification() {
                break;
            }
        }
    }
    q.borrow().hand_back(&returned, 0);
}
