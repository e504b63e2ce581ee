//! The management HTTP API and the Prometheus endpoint, on one thread outside the shards.
//!
//! - `server.rs`: HTTP/1.1 (hyper) on a current-thread tokio runtime owned by the management
//!   thread; the limits every request meets (head and body size, read deadline, connection cap)
//!   and the order of work (guards, whole body, then the action).
//! - `guard.rs`: the cross-site request (CSRF) rule for state-changing requests.
//! - `routes.rs`: which request gets which answer (JSON and Prometheus text), asking the
//!   cluster thread where the answer spans nodes.
//!
//! Nothing here runs on a shard thread, and the shards crate does not link tokio.

mod guard;
mod routes;
mod server;

use shardmq_shards::NodeShared;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

/// Binds the API (so a taken port fails the start-up) and serves it on a background thread.
pub fn start(bind: SocketAddr, shared: Arc<NodeShared>) -> std::io::Result<()> {
    let listener = TcpListener::bind(bind)?;
    std::thread::Builder::new()
        .name("mgmt-api".into())
        .spawn(move || {
            if let Err(e) = server::run(listener, shared) {
                log::error!("management API stopped: {e}");
            }
        })?;
    Ok(())
}
