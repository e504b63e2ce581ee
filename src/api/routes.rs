//! The routes of the management API: which request gets which answer. Synchronous code that
//! may wait (bounded) on the cluster thread; the server (`server.rs`) runs it off its event loop
//! and only once the whole request, body included, has arrived and passed the guards.
//!
//! Routes: `GET /api/v5/nodes`, `GET /api/v5/metrics[?aggregate=true|false]`, `GET /api/v5/stats`,
//! `GET /metrics[?mode=all_nodes_aggregated|all_nodes_unaggregated]`, the cluster commands and
//! listings.

use shardmq_shards::metrics::{self, Figure};
use shardmq_shards::node_shared::{ControlCmd, QueryKind};
use shardmq_shards::NodeShared;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

/// Longest wait for the cluster thread's answer to one command.
const CLUSTER_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

const JSON: &str = "application/json";

/// An answer: HTTP status, content type, body.
pub type Reply = (u16, &'static str, String);

/// Answers one request (`query` is the part after `?`, possibly empty).
pub fn answer(shared: &NodeShared, method: &str, path: &str, query: &str) -> Reply {
    let query = query_pairs(query);
    match (method, path) {
        ("GET", "/metrics") => match prometheus(shared, param(&query, "mode")) {
            Ok(text) => (200, "text/plain; version=0.0.4", text),
            Err(e) => reply(Err(e)),
        },
        ("GET", "/api/v5/metrics") => reply(metrics_json(shared, param(&query, "aggregate"))),
        ("GET", "/api/v5/stats") => (200, JSON, stats_json(shared)),
        ("GET", "/api/v5/nodes") | ("GET", "/api/v5/cluster") => {
            reply(cluster_cmd(shared, ControlCmd::Status))
        }
        ("POST", "/api/v5/cluster/join") => match query.iter().find(|(k, _)| k == "node") {
            Some((_, node)) => {
                let node = node.clone();
                reply(cluster_cmd(shared, move |tx| ControlCmd::Join(node, tx)))
            }
            None => (
                400,
                JSON,
                r#"{"code":"BAD_REQUEST","message":"node=NAME@HOST is required"}"#.into(),
            ),
        },
        ("POST", "/api/v5/cluster/leave") => reply(cluster_cmd(shared, ControlCmd::Leave)),
        // Cluster-wide listings: every node's shards answer through the cluster thread.
        ("GET", "/api/v5/clients") => reply(cluster_cmd(shared, |tx| {
            ControlCmd::Query(QueryKind::Clients, tx)
        })),
        ("GET", "/api/v5/subscriptions") => reply(cluster_cmd(shared, |tx| {
            ControlCmd::Query(QueryKind::Subscriptions, tx)
        })),
        ("GET", "/api/v5/routes") => reply(cluster_cmd(shared, |tx| {
            ControlCmd::Query(QueryKind::Routes, tx)
        })),
        (
            _,
            "/metrics" | "/api/v5/metrics" | "/api/v5/stats" | "/api/v5/nodes" | "/api/v5/cluster",
        ) => (405, JSON, r#"{"code":"METHOD_NOT_ALLOWED"}"#.to_string()),
        _ => (404, JSON, r#"{"code":"NOT_FOUND"}"#.to_string()),
    }
}

/// `k=v` pairs of a query string; `%40` and `%3A` decoded (all that a node name needs).
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    if q.is_empty() {
        return Vec::new();
    }
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("%40", "@")
                    .replace("%3A", ":")
                    .replace("%3a", ":"),
            )
        })
        .collect()
}

fn param<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn reply(r: Result<String, String>) -> Reply {
    match r {
        Ok(body) => (200, JSON, body),
        Err(message) => (
            400,
            JSON,
            format!("{{\"code\":\"BAD_REQUEST\",\"message\":{:?}}}", message),
        ),
    }
}

/// Sends a command to the cluster thread and waits (bounded) for its answer.
fn cluster_cmd(
    shared: &NodeShared,
    make: impl FnOnce(mpsc::Sender<Result<String, String>>) -> ControlCmd,
) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    match shared.cluster.queue.lock() {
        Ok(mut q) => q.push_back(make(tx)),
        Err(_) => return Err("cluster thread unavailable".into()),
    }
    shared.cluster_bell.ring();
    rx.recv_timeout(CLUSTER_ANSWER_TIMEOUT)
        .unwrap_or_else(|_| Err("cluster thread did not answer".into()))
}

/// Figures of one node (`Some(name)`) or the cluster's totals (`None`).
type NodeFigures = (Option<String>, Vec<(String, i64)>);

/// Prometheus text for figures of one node (`node` label) or of the whole cluster (none).
fn prometheus_text(rows: &[NodeFigures], help: &[Figure]) -> String {
    let mut out = String::new();
    for (name, text, _, counter) in help {
        let kind = if *counter { "counter" } else { "gauge" };
        out.push_str(&format!(
            "# HELP shardmq_{name} {text}\n# TYPE shardmq_{name} {kind}\n"
        ));
        for (node, figures) in rows {
            let Some((_, v)) = figures.iter().find(|(n, _)| n == name) else {
                continue;
            };
            match node {
                Some(node) => out.push_str(&format!("shardmq_{name}{{node=\"{node}\"}} {v}\n")),
                None => out.push_str(&format!("shardmq_{name} {v}\n")),
            }
        }
    }
    out
}

/// `GET /metrics`: this node by default; with `mode=all_nodes_aggregated` the cluster's
/// totals, with `mode=all_nodes_unaggregated` every node (as EMQX's Prometheus modes).
fn prometheus(shared: &NodeShared, mode: Option<&str>) -> Result<String, String> {
    let help = shared.metrics.figures();
    let own = || {
        let figures = help
            .iter()
            .map(|(n, _, v, _)| (n.to_string(), *v))
            .collect();
        vec![(Some(shared.cfg.node_name.clone()), figures)]
    };
    let rows = match mode {
        None | Some("node") => own(),
        Some("all_nodes_aggregated") => vec![(None, metrics::aggregate(&node_rows(shared)?).1)],
        Some("all_nodes_unaggregated") => node_rows(shared)?
            .iter()
            .filter_map(|r| metrics::parse_json(r))
            .map(|(node, figures)| (Some(node), figures))
            .collect(),
        Some(other) => return Err(format!("unknown mode {other:?}")),
    };
    Ok(prometheus_text(&rows, &help))
}

/// Every node's figures (one JSON object per node), gathered through the cluster thread.
fn node_rows(shared: &NodeShared) -> Result<Vec<String>, String> {
    let list = cluster_cmd(shared, |tx| ControlCmd::Query(QueryKind::Metrics, tx))?;
    Ok(split_rows(&list))
}

/// Splits the flat JSON objects of a `[{..},{..}]` answer (objects hold no nested braces).
fn split_rows(list: &str) -> Vec<String> {
    list.split_inclusive('}')
        .map(|r| r.trim_start_matches([',', '[', ' ']).to_string())
        .filter(|r| r.starts_with('{'))
        .collect()
}

/// `GET /api/v5/metrics`: this node; `aggregate=true` sums every node's figures, and
/// `aggregate=false` lists every node's (as EMQX's API).
fn metrics_json(shared: &NodeShared, aggregate: Option<&str>) -> Result<String, String> {
    match aggregate {
        None => Ok(shared.metrics.json(&shared.cfg.node_name)),
        Some("true") => {
            let (nodes, totals) = metrics::aggregate(&node_rows(shared)?);
            let fields: Vec<String> = totals.iter().map(|(n, v)| format!("\"{n}\":{v}")).collect();
            Ok(format!("{{\"nodes\":{nodes},{}}}", fields.join(",")))
        }
        Some("false") => Ok(format!("[{}]", node_rows(shared)?.join(","))),
        Some(other) => Err(format!("aggregate must be true or false, not {other:?}")),
    }
}

fn stats_json(shared: &NodeShared) -> String {
    let m = &shared.metrics;
    format!(
        "{{\"node\":\"{}\",\"connections.count\":{},\"subscriptions.count\":{}}}",
        shared.cfg.node_name,
        m.connections.load(Ordering::Relaxed),
        m.subscriptions.load(Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn query_pairs_decode_a_node_name() {
        assert_eq!(
            query_pairs("node=n1%40127.0.0.1%3A4370&x"),
            vec![("node".to_string(), "n1@127.0.0.1:4370".to_string())]
        );
        assert!(query_pairs("").is_empty());
    }

    proptest! {
        /// Any query string: no panic, and every pair comes from a `k=v` piece.
        #[test]
        fn query_pairs_never_panic(q in ".{0,200}") {
            let pairs = query_pairs(&q);
            prop_assert!(pairs.len() <= q.matches('=').count());
        }
    }
}
