//! The library side of `ringvm-blk`: the vhost-user session that drives
//! ringvm's virtio-blk device ([`backend`]), serving one front-end
//! connection ([`serve_connection`]), and a replayer that feeds raw bytes
//! to that code path as a front-end would ([`replay`]; used by the fuzz
//! target and the tests).

pub mod backend;
pub mod replay;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::ShutdownHandle;
use virtio::blk::BlockDevice;

use backend::Session;

/// Accepts one front-end on `listener` and serves it until it disconnects
/// (or its connection is shut down through the handle given to
/// `connected`), then stops the device. A front-end that fails to connect
/// or sends a malformed message ends its own connection, not the caller:
/// only a failure to create the handler is an error.
pub fn serve_connection(
    listener: &mut Listener,
    device: &Arc<Mutex<BlockDevice>>,
    connected: impl FnOnce(Option<ShutdownHandle>),
) -> Result<()> {
    let session = Session::new(device.clone());
    let mut daemon = session
        .new_daemon("vhost-user-blk")
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("creating the vhost-user handler")?;
    if let Err(e) = daemon.start(listener) {
        log::warn!("accepting a front-end: {e}");
        session.disconnect();
        return Ok(());
    }
    log::info!("front-end connected");
    connected(daemon.shutdown_handle());
    match daemon.wait() {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => log::info!("front-end disconnected"),
        // A malformed message ends the connection, not the daemon.
        Err(e) => log::warn!("front-end connection ended: {e}"),
    }
    drop(daemon);
    session.disconnect();
    Ok(())
}
