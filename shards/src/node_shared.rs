//! What every thread of a node shares: the configuration, the metrics, the shutdown flag and
//! the cluster thread's control queue ([`NodeShared`]), the management commands that go on
//! that queue ([`ControlCmd`]), and the placement of a client id on its home shard
//! ([`home_shard`]). The shards, the cluster thread and the management API all use it; it
//! uses none of them.

use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{mpsc, Arc, Mutex};

/// State shared by every shard of the node.
pub struct NodeShared {
    pub cfg: BrokerConfig,
    pub metrics: Metrics,
    /// Set once to stop every shard.
    pub shutdown: AtomicBool,
    /// The cluster thread's control queue and peer count.
    pub cluster: Arc<ClusterControl>,
    /// Rings the cluster thread after a control command was queued.
    pub cluster_bell: Arc<crate::mesh::Doorbell>,
    /// The node's monotonic clock, read by the drivers only.
    pub clock: crate::clock::NodeClock,
}

/// What a management query lists. Its wire value is the `kind` byte of a cluster
/// `Frame::Query`; a peer's unknown value is refused by [`QueryKind::from_wire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind {
    /// Every client session of every node (one JSON row each).
    Clients = 1,
    /// Every subscription of every node.
    Subscriptions = 2,
    /// The cluster thread's route table (this node's and its peers', answered locally).
    Routes = 3,
    /// Every node's figures (one [`crate::metrics::Metrics::json`] row per node).
    Metrics = 4,
}

impl QueryKind {
    /// The kind a peer asked for; `None` for a value no version of shardmq sends.
    pub fn from_wire(b: u8) -> Option<QueryKind> {
        match b {
            1 => Some(QueryKind::Clients),
            2 => Some(QueryKind::Subscriptions),
            3 => Some(QueryKind::Routes),
            4 => Some(QueryKind::Metrics),
            _ => None,
        }
    }

    /// The byte sent in `Frame::Query`.
    pub fn wire(self) -> u8 {
        self as u8
    }
}

/// A management request to the cluster thread; the answer (JSON) goes back on `reply`.
pub enum ControlCmd {
    Join(String, mpsc::Sender<Result<String, String>>),
    Leave(mpsc::Sender<Result<String, String>>),
    Status(mpsc::Sender<Result<String, String>>),
    /// Cluster-wide listing of one [`QueryKind`] (a JSON array).
    Query(QueryKind, mpsc::Sender<Result<String, String>>),
}

/// What the management API shares with the cluster thread.
#[derive(Default)]
pub struct ClusterControl {
    pub queue: Mutex<VecDeque<ControlCmd>>,
    /// Live peers; shards skip cluster work while it is 0.
    pub peers_up: AtomicUsize,
    /// Set when the node has a cluster listener.
    pub enabled: AtomicBool,
}

/// Stable hash of a client id choosing its home shard (FNV-1a: identical on every thread and
/// every run, unlike a seeded hasher).
pub fn home_shard(client_id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in client_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_shard_is_stable_and_spreads() {
        assert_eq!(home_shard("client-1", 8), home_shard("client-1", 8));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[home_shard(&format!("c{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn query_kinds_round_trip_and_unknown_bytes_are_refused() {
        for k in [
            QueryKind::Clients,
            QueryKind::Subscriptions,
            QueryKind::Routes,
            QueryKind::Metrics,
        ] {
            assert_eq!(QueryKind::from_wire(k.wire()), Some(k));
        }
        assert_eq!(QueryKind::from_wire(0), None);
        assert_eq!(QueryKind::from_wire(5), None);
    }
}
