//! The management HTTP API and the Prometheus endpoint, on one plain thread outside the shards.
//!
//! Requests are rare and small, so a blocking HTTP/1.1 server (one request per connection,
//! bounded header size and read timeout) is enough and keeps an HTTP stack off the shards.
//! Routes: `GET /api/v5/nodes`, `GET /api/v5/metrics`, `GET /api/v5/stats`, `GET /metrics`.

use shardmq_shards::cluster::ControlCmd;
use shardmq_shards::NodeShared;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request head accepted, bytes.
const HEAD_MAX_BYTES: usize = 16 * 1024;

/// Binds the API and serves it on a background thread.
pub fn start(bind: SocketAddr, shared: Arc<NodeShared>) -> std::io::Result<()> {
    let listener = TcpListener::bind(bind)?;
    let started = Instant::now();
    std::thread::Builder::new()
        .name("mgmt-api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve(stream, &shared, started) {
                    log::debug!("management API request failed: {e}");
                }
            }
        })?;
    Ok(())
}

fn serve(stream: TcpStream, shared: &NodeShared, started: Instant) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head = request_line.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        head += n;
        if n == 0 || line == "\r\n" || line == "\n" || head > HEAD_MAX_BYTES {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let query = parts_query(&request_line);
    let _ = started;
    let json = "application/json";
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", prometheus(shared)),
        ("GET", "/api/v5/metrics") => ("200 OK", json, metrics_json(shared)),
        ("GET", "/api/v5/stats") => ("200 OK", json, stats_json(shared)),
        ("GET", "/api/v5/nodes") | ("GET", "/api/v5/cluster") => {
            reply(cluster_cmd(shared, ControlCmd::Status))
        }
        ("POST", "/api/v5/cluster/join") => match query.iter().find(|(k, _)| k == "node") {
            Some((_, node)) => {
                let node = node.clone();
                reply(cluster_cmd(shared, move |tx| ControlCmd::Join(node, tx)))
            }
            None => (
                "400 Bad Request",
                json,
                r#"{"code":"BAD_REQUEST","message":"node=NAME@HOST is required"}"#.into(),
            ),
        },
        ("POST", "/api/v5/cluster/leave") => reply(cluster_cmd(shared, ControlCmd::Leave)),
        // Cluster-wide listings: every node's shards answer through the cluster thread.
        ("GET", "/api/v5/clients") => reply(cluster_cmd(shared, |tx| ControlCmd::Query(1, tx))),
        ("GET", "/api/v5/subscriptions") => {
            reply(cluster_cmd(shared, |tx| ControlCmd::Query(2, tx)))
        }
        ("GET", "/api/v5/routes") => reply(cluster_cmd(shared, |tx| ControlCmd::Query(3, tx))),
        (
            _,
            "/metrics" | "/api/v5/metrics" | "/api/v5/stats" | "/api/v5/nodes" | "/api/v5/cluster",
        ) => (
            "405 Method Not Allowed",
            json,
            r#"{"code":"METHOD_NOT_ALLOWED"}"#.to_string(),
        ),
        _ => ("404 Not Found", json, r#"{"code":"NOT_FOUND"}"#.to_string()),
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn parts_query(request_line: &str) -> Vec<(String, String)> {
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let Some((_, q)) = target.split_once('?') else {
        return Vec::new();
    };
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

fn reply(r: Result<String, String>) -> (&'static str, &'static str, String) {
    match r {
        Ok(body) => ("200 OK", "application/json", body),
        Err(message) => (
            "400 Bad Request",
            "application/json",
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
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| Err("cluster thread did not answer".into()))
}

/// (name, help, value, is_counter) for every node counter.
fn counters(shared: &NodeShared) -> Vec<(&'static str, &'static str, i64, bool)> {
    let m = &shared.metrics;
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
    vec![
        (
            "connections",
            "Live client connections",
            m.connections.load(Ordering::Relaxed) as i64,
            false,
        ),
        (
            "subscriptions",
            "Subscriptions held by all sessions",
            m.subscriptions.load(Ordering::Relaxed),
            false,
        ),
        (
            "connections_total",
            "Connections accepted since start",
            c(&m.connections_total),
            true,
        ),
        (
            "disconnects_total",
            "Connections closed since start",
            c(&m.disconnects_total),
            true,
        ),
        (
            "messages_received_total",
            "PUBLISH packets received",
            c(&m.messages_received),
            true,
        ),
        (
            "messages_sent_total",
            "PUBLISH packets sent",
            c(&m.messages_sent),
            true,
        ),
        (
            "messages_dropped_total",
            "Messages dropped (full queue, too large, expired)",
            c(&m.messages_dropped),
            true,
        ),
        (
            "bytes_received_total",
            "Bytes read from clients",
            c(&m.bytes_received),
            true,
        ),
        (
            "bytes_sent_total",
            "Bytes written to clients",
            c(&m.bytes_sent),
            true,
        ),
        (
            "protocol_errors_total",
            "Connections closed for bad input",
            c(&m.protocol_errors),
            true,
        ),
        (
            "refused_total",
            "Connections refused by a limit",
            c(&m.refused),
            true,
        ),
        (
            "cluster_forwarded_total",
            "Messages forwarded to other nodes",
            c(&m.cluster_forwarded),
            true,
        ),
        (
            "cluster_link_writes_total",
            "writev calls on cluster links",
            c(&m.cluster_link_writes),
            true,
        ),
        (
            "cluster_dropped_total",
            "Forwarded QoS 0 messages dropped on a full link",
            c(&m.cluster_dropped),
            true,
        ),
        (
            "cluster_backpressure_total",
            "Times a shard paused its clients for a full link",
            c(&m.cluster_backpressure),
            true,
        ),
        (
            "cluster_paused_shards",
            "Shards paused by cluster backpressure",
            m.cluster_paused_shards.load(Ordering::Relaxed),
            false,
        ),
    ]
}

fn prometheus(shared: &NodeShared) -> String {
    let node = &shared.cfg.node_name;
    let mut out = String::new();
    for (name, help, value, counter) in counters(shared) {
        let kind = if counter { "counter" } else { "gauge" };
        out.push_str(&format!(
            "# HELP shardmq_{name} {help}\n# TYPE shardmq_{name} {kind}\nshardmq_{name}{{node=\"{node}\"}} {value}\n"
        ));
    }
    out
}

fn metrics_json(shared: &NodeShared) -> String {
    let fields: Vec<String> = counters(shared)
        .iter()
        .map(|(n, _, v, _)| format!("\"{n}\":{v}"))
        .collect();
    format!(
        "{{\"node\":\"{}\",{}}}",
        shared.cfg.node_name,
        fields.join(",")
    )
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
