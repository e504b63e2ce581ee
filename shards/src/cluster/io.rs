//! Everything the cluster core asks of the world: sockets (accept, dial, read, write, close),
//! name resolution, handshake nonces, the wall clock and the saved member list.
//!
//! The core ([`Cluster`](super::Cluster)) holds its links as opaque [`Sock`]s and calls the OS only through
//! a [`ClusterIo`]; time on the node's clock comes in as an argument to [`Cluster::turn`](super::Cluster::turn).
//! The cluster thread implements it with real sockets, the OS random source and the data
//! dir (`poll_driver`); the deterministic simulator with its in-memory network, a seeded
//! random source and a virtual clock.

use crate::sock::Sock;
use shardmq_net::cluster::Nonce;
use std::io::IoSlice;
use std::net::IpAddr;

/// The cluster core's window on the world. Every call returns at once: sockets are
/// non-blocking, and "nothing yet" is `WouldBlock` (or `None` from [`ClusterIo::accept`]).
pub trait ClusterIo {
    /// A connection that arrived at the cluster listener, if any: the socket, the peer's
    /// address as shown in logs, and its IP (checked against the node name it claims).
    /// Never called on a node without a listener.
    fn accept(&mut self) -> Option<(Sock, String, Option<IpAddr>)>;

    /// Starts connecting to `addr` (`host:port`, a host name is resolved here) without
    /// waiting: writes before the connection is up fail with `WouldBlock`, and a connection
    /// that fails shows as an error on read or write. Returns the socket and the IP dialled.
    fn dial(&mut self, addr: &str) -> std::io::Result<(Sock, Option<IpAddr>)>;

    /// The addresses `addr` (`host:port`) resolves to; none when it does not. Used to check
    /// an authenticated peer's node name against the address its link comes from.
    fn resolve(&mut self, addr: &str) -> Vec<IpAddr>;

    /// Reads what has arrived into `buf`: `Ok(0)` when the peer closed the connection,
    /// `WouldBlock` when nothing is there.
    fn read(&mut self, sock: &Sock, buf: &mut [u8]) -> std::io::Result<usize>;

    /// Writes from `bufs` in order, as much as fits (`writev` semantics): the bytes taken,
    /// or `WouldBlock` when none fit.
    fn write(&mut self, sock: &Sock, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;

    /// Shuts the connection down both ways and releases it (the peer sees it closed).
    fn close(&mut self, sock: Sock);

    /// A fresh handshake nonce: unpredictable to anyone but this node (the simulator's may
    /// be seeded). An error refuses the link that asked for it.
    fn nonce(&mut self) -> Result<Nonce, String>;

    /// Wall-clock time in Unix ms: told to peers in `Hello` and used to bound a peer's
    /// takeover time; never used for a deadline (those are on the node's clock).
    fn unix_ms(&self) -> u64;

    /// The member list saved by [`ClusterIo::save_members`], if there is one (hostile input:
    /// the core checks every line).
    fn load_members(&mut self) -> Option<String>;

    /// Saves the member list (one `name addr` line each) for the next start; a failure is
    /// the implementation's to report.
    fn save_members(&mut self, text: &str);
}
