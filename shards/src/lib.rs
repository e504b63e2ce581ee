//! shardmq-shards: the per-core broker.
//!
//! Table of contents, in the order a message meets them:
//! - [`node`]: binds listeners and starts one [`shard`] per core.
//! - [`ring`]: the shard's io_uring (accept, multishot recv into a shared buffer pool, doorbell).
//! - [`conn`]: compact per-socket state and the vectored write path; [`alias`]: its topic aliases.
//! - [`shard`]: the sans-IO core: a turn, its events and the MQTT semantics (connect, publish,
//!   subscribe, takeover); [`shard_io`]: what it asks of its driver and the events it takes;
//!   [`ring_driver`]: the real driver (io_uring, the shard's loop).
//! - [`session`]: per-client state (in-flight window, bounded queue, QoS 2 ids), sans-IO.
//! - [`topic`], [`topic_index`], [`shard_set`]: filters, the route replica and the slice.
//! - [`shared`]: shared subscription groups and member picking.
//! - [`mesh`]: the only way shards talk to each other.
//! - [`cluster`]: the node's control links to other nodes (membership, routes, takeover).
//! - [`link`]: a shard's data links to other nodes (batched forwarding, backpressure).
//! - [`node_shared`]: what every thread of a node shares, and a client id's home shard.
//! - [`wire`]: a forwarded message on the wire; [`peer_input`]: checks on a peer's filters
//!   and topics; [`json`]: the management API's hand-built JSON.
//! - [`sock`]: a socket as the core holds it (opaque; drivers do the I/O).
//! - [`clock`]: the node's clock, read by drivers and handed to the core as `now`.
//! - [`timer`], [`metrics`], [`message`], [`config`]: supporting pieces.

pub mod alias;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod hash;
pub mod json;
pub mod link;
pub mod mesh;
pub mod message;
pub mod metrics;
pub mod node;
pub mod node_shared;
pub mod peer_input;
pub mod retained;
pub mod ring;
pub mod ring_driver;
pub mod session;
pub mod shard;
pub mod shard_io;
pub mod shard_set;
pub mod shared;
#[cfg(test)]
mod sim;
pub mod sock;
pub mod subscription_list;
pub mod timer;
pub mod topic;
pub mod topic_index;
pub mod wire;

pub use config::{BrokerConfig, DropPolicy};
pub use metrics::Metrics;
pub use node::{Node, StartError};
pub use node_shared::NodeShared;
