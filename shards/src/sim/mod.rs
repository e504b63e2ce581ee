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
mod net;
mod rng;
