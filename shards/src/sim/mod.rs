//! The deterministic simulator: several nodes of the real broker core (every shard and the
//! cluster thread of each) in one thread, on a virtual clock, over an in-memory network,
//! with clients and faults drawn from one seed. See `docs/testing.md` for how to run and
//! replay it.
//!
//! - [`rng`]: the seeded generator every choice comes from.
//! - [`net`]: TCP-like connections, partitions, resets and crashes.
//! - [`client`]: MQTT clients with persistent sessions that roam between nodes.
//! - [`check`]: the ledger of what was published and received, and the checks.

mod check;
mod client;
mod io;
mod net;
mod rng;
mod world;

use world::{Shape, World};

/// Seeds that once failed, replayed first on every run (each was a bug, now fixed).
const REGRESSION_SEEDS: &[u64] = &[];

/// Runs one seed; on a violation, panics with the seed, the violations, the end of the trace
/// and the command that replays it.
fn run_seed(seed: u64, shape: &Shape) -> (usize, usize) {
    let out = World::new(seed, shape.clone()).run();
    if !out.violations.is_empty() {
        let shown: Vec<&String> = out.violations.iter().take(20).collect();
        let keep = if std::env::var_os("SHARDMQ_SIM_TRACE").is_some() {
            usize::MAX
        } else {
            40
        };
        let trace: Vec<&String> = out.trace.iter().rev().take(keep).rev().collect();
        panic!(
            "simulation seed {seed} failed ({} violations):\n{}\n-- trace (last 40):\n{}\n\
             replay: SHARDMQ_SIM_SEED={seed} cargo test -p shardmq-shards --lib sim::seeds -- --nocapture",
            out.violations.len(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
            trace.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
        );
    }
    (out.published, out.delivered)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The simulator's CI entry: the regression seeds, then seeds from `SHARDMQ_SIM_START`
/// (default 1) until `SHARDMQ_SIM_SEEDS` seeds ran or `SHARDMQ_SIM_SECS` (default 60) passed.
/// `SHARDMQ_SIM_SEED=n` runs seed `n` alone.
#[test]
fn seeds() {
    let shape = Shape {
        link_faults: env_u64("SHARDMQ_SIM_FAULTS").unwrap_or(1) != 0,
        roam_gap_ms: env_u64("SHARDMQ_SIM_GAP").unwrap_or(0),
        ..Shape::default()
    };
    if let Some(seed) = env_u64("SHARDMQ_SIM_SEED") {
        let (p, d) = run_seed(seed, &shape);
        eprintln!("seed {seed}: {p} messages published, {d} copies delivered");
        return;
    }
    for &seed in REGRESSION_SEEDS {
        run_seed(seed, &shape);
    }
    let start = env_u64("SHARDMQ_SIM_START").unwrap_or(1);
    let count = env_u64("SHARDMQ_SIM_SEEDS").unwrap_or(u64::MAX);
    let budget = std::time::Duration::from_secs(env_u64("SHARDMQ_SIM_SECS").unwrap_or(60));
    let began = std::time::Instant::now();
    let (mut ran, mut published, mut delivered) = (0u64, 0, 0);
    while ran < count && (ran == 0 || began.elapsed() < budget) {
        let (p, d) = run_seed(start + ran, &shape);
        published += p;
        delivered += d;
        ran += 1;
    }
    eprintln!(
        "simulation: {ran} seeds from {start} passed ({published} messages published, \
         {delivered} copies delivered) in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn a_run_replays_exactly_from_its_seed() {
    let shape = Shape {
        nodes: 2,
        subscribers: 2,
        publishers: 2,
        ..Shape::default()
    };
    let a = World::new(99, shape.clone()).run();
    let b = World::new(99, shape).run();
    assert!(a.published > 0 && a.delivered > 0, "the workload ran");
    assert_eq!((a.published, a.delivered), (b.published, b.delivered));
    assert_eq!(a.trace, b.trace);
}
