//! `shardmq-bench`: an MQTT load generator with emqtt-bench's flags, open-loop rates,
//! end-to-end latency histograms and a JSON summary. See `benches/README.md`.

mod args;
mod engine;

use args::{Args, Mode, Scenario};
use engine::{plan, run_thread, Shared};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a live struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn nofile() -> u64 {
    // SAFETY: getrlimit with a live struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

/// Messages each publish turns into at the subscribers, for the completion check.
fn fan_factor(a: &Args, subs: usize) -> u64 {
    match (a.mode, a.scenario) {
        (Mode::PubSub, Scenario::FanOut) => subs as u64,
        (Mode::PubSub, _) => 1,
        _ => 0,
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = match args::parse(&argv) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    raise_nofile();
    let specs = plan(&a);
    if specs.len() as u64 + 64 > nofile() {
        eprintln!(
            "{} clients need more open files than RLIMIT_NOFILE allows ({}); raise it (see docs/tuning.md)",
            specs.len(),
            nofile()
        );
        std::process::exit(1);
    }
    // SAFETY: installs an async-signal-safe handler that only stores an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let subs = specs
        .iter()
        .filter(|s| matches!(s.role, engine::Role::Sub(_)))
        .count();
    let threads = a.threads.min(specs.len().max(1));
    let shared = Arc::new(Shared::new());
    let started = Instant::now();
    let a = Arc::new(a);
    let mut per_thread: Vec<Vec<engine::Spec>> = vec![Vec::new(); threads];
    for (i, s) in specs.into_iter().enumerate() {
        per_thread[i % threads].push(s);
    }
    let handles: Vec<_> = per_thread
        .into_iter()
        .enumerate()
        .map(|(t, specs)| {
            let (a, shared) = (a.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || run_thread(t, threads, a, specs, shared, started))
                .expect("spawn bench thread")
        })
        .collect();

    let total_clients = per_thread_total(&a, subs);
    let mut last = (0u64, 0u64);
    let mut last_tick = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = started.elapsed();
        let sent = shared.sent.load(Ordering::Relaxed);
        let recv = shared.received.load(Ordering::Relaxed);
        let acked = shared.acked.load(Ordering::Relaxed);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            let dt = last_tick.elapsed().as_secs_f64();
            last_tick = Instant::now();
            if !a.quiet {
                let p99 = shared
                    .latency_us
                    .lock()
                    .map(|h| h.value_at_quantile(0.99))
                    .unwrap_or(0);
                eprintln!(
                    "[{:>6.1}s] connected {}/{} sent {:.0}/s recv {:.0}/s p99 {}us behind {} errors {}",
                    elapsed.as_secs_f64(),
                    shared.connected.load(Ordering::Relaxed),
                    total_clients,
                    (sent - last.0) as f64 / dt,
                    (recv - last.1) as f64 / dt,
                    p99,
                    shared.behind.load(Ordering::Relaxed),
                    shared.errors.load(Ordering::Relaxed),
                );
            }
            last = (sent, recv);
        }
        let mut done = INTERRUPTED.load(Ordering::Relaxed) || shared.stop.load(Ordering::Relaxed);
        if let Some(d) = a.duration {
            done |= elapsed >= d;
        }
        if a.limit > 0 && sent >= a.limit {
            let expected = a.limit * fan_factor(&a, subs);
            let complete = match a.mode {
                Mode::Pub => a.qos == 0 || acked >= a.limit,
                Mode::PubSub => recv >= expected && (a.qos == 0 || acked >= a.limit),
                _ => false,
            };
            // Without progress for 2 s the rest is lost: finish and report it.
            let progressing = recv != last.1 || acked != sent;
            if !progressing || complete {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                done |= complete || since.elapsed() > Duration::from_secs(2);
            } else {
                quiet_since = None;
            }
        }
        if done {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    print_summary(&a, &shared, elapsed, total_clients);
}

fn per_thread_total(a: &Args, subs: usize) -> usize {
    match a.mode {
        Mode::PubSub => plan(a).len().max(subs),
        _ => a.count,
    }
}

fn print_summary(a: &Args, shared: &Shared, elapsed: f64, clients: usize) {
    let sent = shared.sent.load(Ordering::Relaxed);
    let recv = shared.received.load(Ordering::Relaxed);
    let connected = shared.connected.load(Ordering::Relaxed);
    let connect_s = shared.last_connack_us.load(Ordering::Relaxed) as f64 / 1e6;
    let h = shared.latency_us.lock().expect("histogram lock");
    let q = |v: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(v)
        }
    };
    let (p50, p90, p99, p999, max) = (
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        if h.is_empty() { 0 } else { h.max() },
    );
    let connect_rate = if connect_s > 0.0 {
        connected as f64 / connect_s
    } else {
        0.0
    };
    println!(
        "summary: {:?} clients {clients} connected {connected} ({connect_rate:.0}/s) sent {sent} ({:.0}/s) received {recv} ({:.0}/s) in {elapsed:.2}s",
        a.mode,
        sent as f64 / elapsed,
        recv as f64 / elapsed
    );
    println!("latency us: p50 {p50} p90 {p90} p99 {p99} p99.9 {p999} max {max}; errors {}, connect failures {}, schedule misses {}",
        shared.errors.load(Ordering::Relaxed),
        shared.connect_failures.load(Ordering::Relaxed),
        shared.behind.load(Ordering::Relaxed));
    if let Some(path) = &a.json {
        let json = format!(
            "{{\"mode\":\"{:?}\",\"clients\":{clients},\"connected\":{connected},\"connect_rate\":{connect_rate:.1},\"sent\":{sent},\"received\":{recv},\"duration_s\":{elapsed:.3},\"send_rate\":{:.1},\"recv_rate\":{:.1},\"latency_us\":{{\"p50\":{p50},\"p90\":{p90},\"p99\":{p99},\"p999\":{p999},\"max\":{max}}},\"errors\":{},\"connect_failures\":{},\"schedule_misses\":{}}}\n",
            a.mode,
            sent as f64 / elapsed,
            recv as f64 / elapsed,
            shared.errors.load(Ordering::Relaxed),
            shared.connect_failures.load(Ordering::Relaxed),
            shared.behind.load(Ordering::Relaxed),
        );
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("cannot write {path}: {e}");
        }
    }
}
