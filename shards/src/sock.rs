//! A socket as the broker core holds it: an opaque value that only a driver looks into.
//!
//! The core (connections, data links, handoffs between shards, links the cluster thread hands
//! to a shard) stores and moves sockets but never calls the OS on them; it asks its driver to
//! read, write, shut down or close. The ring driver and the cluster thread's poll loop use
//! [`Sock::Os`]; the deterministic simulator uses [`Sock::Sim`], a connection id in its
//! virtual network.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A connected socket. Dropping an `Os` socket closes it (as an `OwnedFd` does).
#[derive(Debug)]
pub enum Sock {
    /// A socket of the operating system.
    Os(OwnedFd),
    /// One end of a connection in the simulator's network.
    Sim(u64),
}

impl Sock {
    /// The descriptor of an OS socket (drivers only); `None` for a simulated one.
    pub fn raw_fd(&self) -> Option<RawFd> {
        match self {
            Sock::Os(fd) => Some(fd.as_raw_fd()),
            Sock::Sim(_) => None,
        }
    }

    /// The simulator's id of a simulated socket; `None` for an OS one.
    pub fn sim_id(&self) -> Option<u64> {
        match self {
            Sock::Os(_) => None,
            Sock::Sim(id) => Some(*id),
        }
    }
}

impl From<OwnedFd> for Sock {
    fn from(fd: OwnedFd) -> Sock {
        Sock::Os(fd)
    }
}
