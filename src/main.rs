//! `shardmq`: the broker binary. `shardmq start [-c FILE]` runs a node in the foreground until
//! SIGTERM or SIGINT; configuration comes from the embedded default, the file and
//! `SHARDMQ_*` environment variables (see docs/configuration.md).

mod api;
mod config;
mod logger;

use std::process::ExitCode;

const USAGE: &str = "usage:
  shardmq start [-c|--config FILE]   run a node in the foreground
  shardmq config                     print the embedded default configuration
  shardmq --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("start") => start(&args[1..]),
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
