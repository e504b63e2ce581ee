//! Node-wide counters, written by shards with relaxed atomics and read by `$SYS` and the API.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

/// Counters shared by all shards of a node; each is a plain relaxed atomic.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Live client connections (also enforces `max_connections`).
    pub connections: AtomicUsize,
    /// Connections ever accepted.
    pub connections_total: AtomicU64,
    /// PUBLISH packets received from clients.
    pub messages_received: AtomicU64,
    /// PUBLISH packets sent to clients.
    pub messages_sent: AtomicU64,
    /// Messages dropped: full queues, too large for a client, QoS 0 to a congested client.
    pub messages_dropped: AtomicU64,
    /// Bytes read from client sockets.
    pub bytes_received: AtomicU64,
    /// Bytes written to client sockets.
    pub bytes_sent: AtomicU64,
    /// Connections closed for a protocol violation or malformed packet.
    pub protocol_errors: AtomicU64,
    /// Client connections closed, for any reason.
    pub disconnects_total: AtomicU64,
    /// Subscriptions held by all sessions (a gauge).
    pub subscriptions: AtomicI64,
    /// Connections refused for a limit (max connections, quota).
    pub refused: AtomicU64,
    /// Messages forwarded to other nodes.
    pub cluster_forwarded: AtomicU64,
    /// `writev` calls on cluster links (forwarded / this = messages per link write).
    pub cluster_link_writes: AtomicU64,
    /// Forwarded QoS 0 messages dropped because a link to a peer was full.
    pub cluster_dropped: AtomicU64,
    /// Times a shard paused reading its clients because a link to a peer was full.
    pub cluster_backpressure: AtomicU64,
    /// Shards currently paused by cluster backpressure (a gauge).
    pub cluster_paused_shards: AtomicI64,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
