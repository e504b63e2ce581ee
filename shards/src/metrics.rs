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

/// One exported figure: name (without prefix), help text, value, counter (true) or gauge.
pub type Figure = (&'static str, &'static str, i64, bool);

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
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
                "Messages dropped (full queue, too large, expired)",
                c(&self.messages_dropped),
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
                "cluster_paused_shards",
                "Shards paused by cluster backpressure",
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
            crate::cluster::json_str(node),
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
}
