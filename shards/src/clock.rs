//! Time as the broker core sees it: milliseconds on the node's monotonic clock, handed in by
//! a driver (the shard loop, the cluster thread, or the simulator's virtual clock). Only the
//! drivers read the OS clocks, through [`NodeClock`] and [`unix_ms`].

use std::time::Instant;

/// The node's monotonic clock: every thread of a node counts milliseconds from the same
/// start, so a deadline set on one shard (a message's expiry) means the same on another.
#[derive(Clone, Copy, Debug)]
pub struct NodeClock {
    epoch: Instant,
}

impl NodeClock {
    /// A clock whose zero is now.
    pub fn start() -> NodeClock {
        NodeClock {
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the node started.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Wall-clock time (Unix ms), for what is compared across nodes (connect times).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
