//! `shardmq`: the broker binary. `shardmq start [-c FILE]` runs a node in the foreground until
//! SIGTERM or SIGINT; configuration comes from the embedded default, the file and
//! `SHARDMQ_*` environment variables (see docs/configuration.md).

mod api;
mod config;
mod logger;

use std::process::ExitCode;

const USAGE: &str = "usage:
  shardmq start [-c|--config FILE]   run a node in the foreground
  shardmq ctl [--api HOST:PORT] [-c FILE] COMMAND
      cluster join NAME@HOST[:PORT]  join this node to the cluster of another node
      cluster leave                  leave the cluster
      cluster status                 members, their state, uptime, connections, routes
      nodes | metrics | stats        cluster members / this node's counters
      metrics --cluster | --nodes    counters summed over every node / of every node
      clients | subscriptions | routes   cluster-wide listings (every node answers)
      (--api defaults to management.bind of the configuration)
  shardmq config                     print the embedded default configuration
  shardmq --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("start") => start(&args[1..]),
        Some("ctl") => ctl(&args[1..]),
        Some("config") => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Some("--version") | Some("-V") | Some("version") => {
            println!("shardmq {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn start(args: &[String]) -> ExitCode {
    let mut file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--config" => match it.next() {
                Some(f) => file = Some(f.clone()),
                None => {
                    eprintln!("error: {a} needs a file\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("error: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    logger::init(log::LevelFilter::Info);
    // A panicking shard would leave its clients, sessions and mesh queues dead while the
    // process looks alive; stop the whole node instead so a supervisor restarts it cleanly.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        log::error!("fatal: {info}; stopping the node");
        std::process::abort();
    }));
    let settings = match config::load(file.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("configuration error: {e}");
            return ExitCode::from(78);
        }
    };
    logger::init(settings.log_level);
    // Block the stop signals before shards start so they inherit the mask and only this
    // thread receives them, via sigwait.
    let signals = stop_signals();
    // SAFETY: blocks signals for this thread (inherited by threads spawned after).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if let Err(e) = std::fs::create_dir_all(&settings.data_dir) {
        log::error!("cannot create node.data_dir {:?}: {e}", settings.data_dir);
        return ExitCode::from(73);
    }
    let cfg = settings.broker.clone();
    let node = match shardmq_shards::Node::start(settings.broker) {
        Ok(n) => n,
        Err(e) => {
            log::error!("cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    log::info!(
        "shardmq {} node {} listening on {} (mqtt/tcp) with {} shards",
        env!("CARGO_PKG_VERSION"),
        cfg.node_name,
        cfg.bind,
        node.shards()
    );
    if let Some(bind) = settings.management_bind {
        match api::start(bind, node.shared()) {
            Ok(()) => log::info!("management API on http://{bind}"),
            Err(e) => {
                log::error!("cannot start the management API on {bind}: {e}");
                node.shutdown();
                return ExitCode::from(1);
            }
        }
    }
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe { libc::sigwait(&signals, &mut sig) };
    log::info!("signal {sig} received; shutting down");
    node.shutdown();
    log::info!("stopped");
    ExitCode::SUCCESS
}

/// `shardmq ctl`: one request to a node's management API, answer printed as JSON.
fn ctl(args: &[String]) -> ExitCode {
    let mut api = None;
    let mut file = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--api" => api = it.next().cloned(),
            "-c" | "--config" => file = it.next().cloned(),
            _ => rest.push(a.as_str()),
        }
    }
    let api = match api {
        Some(a) => a,
        None => match config::load(file.as_deref(), std::env::vars()) {
            Ok(s) => match s.management_bind {
                Some(b) => b.to_string(),
                None => {
                    eprintln!("error: management.bind is empty; pass --api HOST:PORT");
                    return ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!("configuration error: {e}");
                return ExitCode::from(78);
            }
        },
    };
    let (method, path) = match rest.as_slice() {
        ["cluster", "join", node] => ("POST", format!("/api/v5/cluster/join?node={node}")),
        ["cluster", "leave"] => ("POST", "/api/v5/cluster/leave".to_string()),
        ["cluster", "status"] | ["nodes"] => ("GET", "/api/v5/cluster".to_string()),
        ["metrics"] => ("GET", "/api/v5/metrics".to_string()),
        ["metrics", "--cluster"] => ("GET", "/api/v5/metrics?aggregate=true".to_string()),
        ["metrics", "--nodes"] => ("GET", "/api/v5/metrics?aggregate=false".to_string()),
        ["clients"] => ("GET", "/api/v5/clients".to_string()),
        ["subscriptions"] => ("GET", "/api/v5/subscriptions".to_string()),
        ["routes"] => ("GET", "/api/v5/routes".to_string()),
        ["stats"] => ("GET", "/api/v5/stats".to_string()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match http(&api, method, &path) {
        Ok((200, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("error: HTTP {code}: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: cannot reach the management API at {api}: {e}");
            ExitCode::from(1)
        }
    }
}

/// A minimal HTTP/1.1 request (the API closes the connection after each answer).
fn http(addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}
