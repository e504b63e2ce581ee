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
    /// Messages dropped, for any reason: the sum of the `dropped_*` counters below.
    pub messages_dropped: AtomicU64,
    /// Per reason, see [`DropReason`].
    pub dropped_queue_full: AtomicU64,
    pub dropped_qos0_offline: AtomicU64,
    pub dropped_congested: AtomicU64,
    pub dropped_link_full: AtomicU64,
    pub dropped_expired: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_no_subscribers: AtomicU64,
    /// Bytes read from client sockets.
    pub bytes_received: AtomicU64,
    /// Bytes written to client sockets.
    pub bytes_sent: AtomicU64,
    /// Connections closed for a protocol violation or malformed packet.
    pub protocol_errors: AtomicU64,
    /// Client connections closed, for any reason.
    pub disconnects_total: AtomicU64,
    /// Clients closed for not reading: responses past `mqtt.max_conn_output_bytes`.
    pub disconnects_output_overflow: AtomicU64,
    /// Accepts that failed for lack of descriptors or memory (EMFILE, ENFILE, ...).
    pub accept_errors_no_fd: AtomicU64,
    /// Subscriptions held by all sessions (a gauge).
    pub subscriptions: AtomicI64,
    /// Connections refused for a limit (max connections, quota).
    pub refused: AtomicU64,
    /// Retained messages not stored because the store was full (`mqtt.max_retained_*`);
    /// each is still delivered to the subscribers of its topic.
    pub retained_refused: AtomicU64,
    /// Messages forwarded to other nodes.
    pub cluster_forwarded: AtomicU64,
    /// `writev` calls on cluster links (forwarded / this = messages per link write).
    pub cluster_link_writes: AtomicU64,
    /// Forwarded QoS 0 messages dropped because a link to a peer was full.
    pub cluster_dropped: AtomicU64,
    /// Times a shard paused reading its clients because a link to a peer was full.
    pub cluster_backpressure: AtomicU64,
    /// Times a shard paused reading its clients because messages for another shard backed up.
    pub mesh_backpressure: AtomicU64,
    /// Shards currently paused by backpressure, a full cluster link or a mesh backlog (a gauge).
    pub cluster_paused_shards: AtomicI64,
}

/// Why a message was dropped. Each reason has its own counter, and every drop also counts in
/// `messages_dropped`, so the reasons always sum to the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A session queue was full (`mqtt.max_queued_messages`); which message went depends on
    /// `mqtt.queue_drop_policy`. QoS 1/2 messages dropped here were acknowledged to their
    /// publisher.
    QueueFull,
    /// QoS 0 for an offline session with `mqtt.queue_qos0 = false`.
    Qos0Offline,
    /// QoS 0 towards a shard whose mesh queue is backed up.
    Congested,
    /// QoS 0 forwarded to a peer node whose data link is full (also `cluster_dropped`).
    LinkFull,
    /// The v5 Message Expiry Interval ran out before delivery (MQTT-3.3.2-5).
    Expired,
    /// Larger than the Maximum Packet Size of the receiving client (MQTT-3.1.2-24).
    TooLarge,
    /// Nobody was subscribed: no matching route for a client's PUBLISH, or a shared group
    /// whose last member left.
    NoSubscribers,
}

/// One exported figure: name (without prefix), help text, value, counter (true) or gauge.
pub type Figure = (&'static str, &'static str, i64, bool);

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one dropped message, in the total and under its reason.
    pub fn dropped(&self, why: DropReason) {
        Self::add(&self.messages_dropped, 1);
        Self::add(self.drop_counter(why), 1);
    }

    fn drop_counter(&self, why: DropReason) -> &AtomicU64 {
        match why {
            DropReason::QueueFull => &self.dropped_queue_full,
            DropReason::Qos0Offline => &self.dropped_qos0_offline,
            DropReason::Congested => &self.dropped_congested,
            DropReason::LinkFull => &self.dropped_link_full,
            DropReason::Expired => &self.dropped_expired,
            DropReason::TooLarge => &self.dropped_too_large,
            DropReason::NoSubscribers => &self.dropped_no_subscribers,
        }
    }

    /// Every figure, in export order: the one list behind `/metrics`, the JSON API and the
    /// cluster-wide totals, so they cannot disagree.
    pub fn figures(&self) -> Vec<Figure> {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
        vec![
            (
                "connections",
                "Live client connections",
                self.connections.load(Ordering::Relaxed) as i64,
                false,
            ),
            (
                "subscriptions",
                "Subscriptions held by all sessions",
                self.subscriptions.load(Ordering::Relaxed),
                false,
            ),
            (
                "connections_total",
                "Connections accepted since start",
                c(&self.connections_total),
                true,
            ),
            (
                "disconnects_total",
                "Connections closed since start",
                c(&self.disconnects_total),
                true,
            ),
            (
                "disconnects_output_overflow_total",
                "Clients closed for leaving too many responses unread",
                c(&self.disconnects_output_overflow),
                true,
            ),
            (
                "accept_errors_no_fd_total",
                "Accepts failed for lack of file descriptors or memory",
                c(&self.accept_errors_no_fd),
                true,
            ),
            (
                "messages_received_total",
                "PUBLISH packets received",
                c(&self.messages_received),
                true,
            ),
            (
                "messages_sent_total",
                "PUBLISH packets sent",
                c(&self.messages_sent),
                true,
            ),
            (
                "messages_dropped_total",
                "Messages dropped, all reasons (the messages_dropped_*_total sum to it)",
                c(&self.messages_dropped),
                true,
            ),
            (
                "messages_dropped_queue_full_total",
                "Messages dropped by a full session queue (QoS 1/2 ones were acknowledged)",
                c(&self.dropped_queue_full),
                true,
            ),
            (
                "messages_dropped_qos0_offline_total",
                "QoS 0 messages not queued for offline sessions",
                c(&self.dropped_qos0_offline),
                true,
            ),
            (
                "messages_dropped_congested_total",
                "QoS 0 messages dropped towards a backed-up shard",
                c(&self.dropped_congested),
                true,
            ),
            (
                "messages_dropped_link_full_total",
                "QoS 0 messages dropped on a full link to a peer node",
                c(&self.dropped_link_full),
                true,
            ),
            (
                "messages_dropped_expired_total",
                "Messages whose expiry interval ran out before delivery",
                c(&self.dropped_expired),
                true,
            ),
            (
                "messages_dropped_too_large_total",
                "Messages larger than the receiving client's maximum packet size",
                c(&self.dropped_too_large),
                true,
            ),
            (
                "messages_dropped_no_subscribers_total",
                "Messages published where nobody was subscribed",
                c(&self.dropped_no_subscribers),
                true,
            ),
            (
                "bytes_received_total",
                "Bytes read from clients",
                c(&self.bytes_received),
                true,
            ),
            (
                "bytes_sent_total",
                "Bytes written to clients",
                c(&self.bytes_sent),
                true,
            ),
            (
                "protocol_errors_total",
                "Connections closed for bad input",
                c(&self.protocol_errors),
                true,
            ),
            (
                "refused_total",
                "Connections refused by a limit",
                c(&self.refused),
                true,
            ),
            (
                "retained_refused_total",
                "Retained messages not stored: the retained store was full",
                c(&self.retained_refused),
                true,
            ),
            (
                "cluster_forwarded_total",
                "Messages forwarded to other nodes",
                c(&self.cluster_forwarded),
                true,
            ),
            (
                "cluster_link_writes_total",
                "writev calls on cluster links",
                c(&self.cluster_link_writes),
                true,
            ),
            (
                "cluster_dropped_total",
                "Forwarded QoS 0 messages dropped on a full link",
                c(&self.cluster_dropped),
                true,
            ),
            (
                "cluster_backpressure_total",
                "Times a shard paused its clients for a full link",
                c(&self.cluster_backpressure),
                true,
            ),
            (
                "mesh_backpressure_total",
                "Times a shard paused its clients for a mesh backlog",
                c(&self.mesh_backpressure),
                true,
            ),
            (
                "cluster_paused_shards",
                "Shards paused by backpressure (full link or mesh backlog)",
                self.cluster_paused_shards.load(Ordering::Relaxed),
                false,
            ),
        ]
    }

    /// This node's figures as one flat JSON object with its name.
    pub fn json(&self, node: &str) -> String {
        let fields: Vec<String> = self
            .figures()
            .iter()
            .map(|(n, _, v, _)| format!("\"{n}\":{v}"))
            .collect();
        format!(
            "{{\"node\":{},{}}}",
            crate::json::json_str(node),
            fields.join(",")
        )
    }
}

/// Reads back the `(node, figures)` of a [`Metrics::json`] object; `None` if it is not one.
pub fn parse_json(row: &str) -> Option<(String, Vec<(String, i64)>)> {
    let body = row.trim().strip_prefix("{\"node\":\"")?.strip_suffix('}')?;
    let (node, rest) = body.split_once("\",")?;
    // Rows come from peers: a name that needs escaping is not one a node can have, and
    // would otherwise reach Prometheus labels as is.
    if !crate::cluster::valid_node_name(node) {
        return None;
    }
    let mut figures = Vec::new();
    for field in rest.split(',') {
        let (k, v) = field.split_once(':')?;
        let k = k.strip_prefix('"')?.strip_suffix('"')?;
        figures.push((k.to_string(), v.parse().ok()?));
    }
    Some((node.to_string(), figures))
}

/// Cluster-wide totals of several nodes' [`Metrics::json`] rows, in the order of the first;
/// `nodes` says how many answered.
pub fn aggregate(rows: &[String]) -> (usize, Vec<(String, i64)>) {
    let mut totals: Vec<(String, i64)> = Vec::new();
    let mut nodes = 0;
    for (_, figures) in rows.iter().filter_map(|r| parse_json(r)) {
        nodes += 1;
        for (k, v) in figures {
            match totals.iter_mut().find(|(n, _)| *n == k) {
                Some((_, t)) => *t += v,
                None => totals.push((k, v)),
            }
        }
    }
    (nodes, totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_rows_sum_to_cluster_totals() {
        let a = Metrics::default();
        a.connections.store(3, Ordering::Relaxed);
        Metrics::add(&a.messages_received, 10);
        let b = Metrics::default();
        b.connections.store(4, Ordering::Relaxed);
        Metrics::add(&b.messages_received, 5);
        b.subscriptions.store(-1, Ordering::Relaxed);
        let rows = vec![a.json("n1@h"), b.json("n2@h"), "garbage".to_string()];
        assert_eq!(parse_json(&rows[0]).unwrap().0, "n1@h");
        let (nodes, totals) = aggregate(&rows);
        assert_eq!(nodes, 2);
        let get = |k: &str| totals.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("connections"), 7);
        assert_eq!(get("messages_received_total"), 15);
        assert_eq!(get("subscriptions"), -1);
        assert_eq!(totals.len(), a.figures().len());
    }

    #[test]
    fn drop_reasons_sum_to_the_total() {
        let m = Metrics::default();
        let reasons = [
            DropReason::QueueFull,
            DropReason::Qos0Offline,
            DropReason::Congested,
            DropReason::LinkFull,
            DropReason::Expired,
            DropReason::TooLarge,
            DropReason::NoSubscribers,
        ];
        for (i, r) in reasons.iter().enumerate() {
            for _ in 0..=i {
                m.dropped(*r);
            }
        }
        let figures = m.figures();
        let get = |k: &str| figures.iter().find(|f| f.0 == k).unwrap().2;
        let per_reason: i64 = figures
            .iter()
            .filter(|f| f.0.starts_with("messages_dropped_") && f.0 != "messages_dropped_total")
            .map(|f| f.2)
            .sum();
        assert_eq!(get("messages_dropped_total"), 28);
        assert_eq!(per_reason, 28);
        assert_eq!(get("messages_dropped_queue_full_total"), 1);
        assert_eq!(get("messages_dropped_no_subscribers_total"), 7);
    }
}
