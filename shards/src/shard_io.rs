//! The boundary between the shard core and the outside world: what the core asks of its
//! driver ([`ShardIo`]) and what the driver tells the core ([`ShardEvent`]).
//!
//! The core (`shard.rs` and its child modules, `conn.rs`, `link.rs`) never calls the OS: it
//! holds opaque [`Sock`]s, asks for receives, writes and shutdowns through a `ShardIo`, and
//! is handed each completion as a `ShardEvent` with io-agnostic results ([`IoError`], no
//! errno constants). Two drivers implement it: `ring_driver` (io_uring and the syscalls the
//! ring does not cover, one OS thread per shard) and the deterministic simulator (an
//! in-memory network on a virtual clock, many shards on one thread).
//!
//! Every operation a driver starts is tagged with a [`Token`]; its completion comes back
//! with the same token, so one that arrives after its connection was closed and its slot
//! reused is recognised by generation and ignored.

use crate::sock::Sock;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Shutdown};

pub use crate::ring::Token;

/// Everything the shard core asks of the outside world. Calls return at once: operations
/// that complete later (accept, receive, writability) report through a [`ShardEvent`]
/// carrying the token they were started with.
pub trait ShardIo {
    /// Arms accepting on this shard's listener (multishot): every new connection comes as
    /// an event with [`Token::Accept`] and [`Done::Accepted`]; when one comes with
    /// `more == false` the core arms it again (or waits after [`IoError::NoDescriptors`]).
    fn accept(&mut self);

    /// Arms a receive on `sock`, completing with `token`: one completion (`multishot ==
    /// false`) or one per arrival until it ends (`more == false` on the last).
    fn recv(&mut self, sock: &Sock, token: Token, multishot: bool);

    /// Cancels the pending operation started with `token`; its completion then reports
    /// [`IoError::Cancelled`] (after any data it had already received).
    fn cancel(&mut self, token: Token);

    /// Asks for one completion with `token` when `sock` can take more output.
    fn poll_writable(&mut self, sock: &Sock, token: Token);

    /// Writes the buffers in order as one `writev` would: returns the bytes taken (possibly
    /// fewer than offered), or `ErrorKind::WouldBlock` when the socket takes none now.
    fn write(&mut self, sock: &Sock, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Shuts down one or both directions of `sock`; a pending receive on it then ends.
    fn shutdown(&mut self, sock: &Sock, how: Shutdown);

    /// Lets go of a socket the core is done with (the OS driver closes it).
    fn close(&mut self, sock: Sock);

    /// Reads what has arrived on `sock` without waiting (draining a lingering socket):
    /// `Ok(0)` at end of stream, `ErrorKind::WouldBlock` when nothing is there.
    fn read_now(&mut self, sock: &Sock, buf: &mut [u8]) -> io::Result<usize>;

    /// The address of the peer of `sock`, if it can be read.
    fn peer_ip(&self, sock: &Sock) -> Option<IpAddr>;

    /// Wall-clock time in Unix ms (when a connection arrived, to settle racing takeovers
    /// across nodes); the core's own time is the `now_ms` it is handed.
    fn unix_ms(&self) -> u64;
}

/// Why an operation failed, in the cases the core tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// A receive found no free buffer in the pool; it ended and is armed again.
    NoBuffers,
    /// Cancelled by [`ShardIo::cancel`].
    Cancelled,
    /// An accept failed for lack of descriptors or kernel memory: try again later.
    NoDescriptors,
    /// Any other failure, by its OS error number (logged; the socket is closed).
    Other(i32),
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::NoBuffers => f.write_str("no receive buffer free"),
            IoError::Cancelled => f.write_str("cancelled"),
            IoError::NoDescriptors => f.write_str("out of descriptors"),
            IoError::Other(errno) => io::Error::from_raw_os_error(*errno).fmt(f),
        }
    }
}

/// What a successful operation produced.
#[derive(Debug)]
pub enum Done<'a> {
    /// An accept: the new connection, now the core's.
    Accepted(Sock),
    /// A receive: the bytes that arrived; empty at end of stream (the peer closed).
    Data(&'a [u8]),
    /// A writability poll fired.
    Ready,
}

/// One completion, as the driver hands it to [`Shard::on_event`](crate::shard::Shard::on_event).
#[derive(Debug)]
pub struct ShardEvent<'a> {
    /// The token the operation was started with.
    pub token: Token,
    pub result: Result<Done<'a>, IoError>,
    /// A multishot operation goes on (false: it ended and must be armed again to go on).
    pub more: bool,
}

#[cfg(test)]
mod tests;
