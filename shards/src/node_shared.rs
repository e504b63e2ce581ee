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

/// FNV-1a, 64 bits: a stable hash, identical on every thread, node and run (unlike a seeded
/// hasher), so anything placed by it (home shards, hashed shared-subscription picks) stays put.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, &b| (h ^ b as u64).wrapping_mul(PRIME))
}

/// The home shard of a client id: [`fnv1a`] of its bytes modulo the shard count.
pub fn home_shard(client_id: &str, shards: usize) -> usize {
    (fnv1a(client_id.as_bytes()) % shards as u64) as usize
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
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn home_shards_do_not_move_between_versions() {
        // Pinned values (FNV-1a 64): a change here moves every client's home shard.
        assert_eq!(home_shard("", 8), 5);
        assert_eq!(home_shard("a", 8), 4);
        assert_eq!(home_shard("client-1", 8), 0);
        assert_eq!(home_shard("sensor/42/temp", 8), 5);
        assert_eq!(home_shard("sensor/42/temp", 3), 0);
        assert_eq!(home_shard("a", 3), 1);
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
