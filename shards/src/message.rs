//! An application message as it travels between shards: decoded once, shared by reference.

use bytes::Bytes;
use shardmq_net::{Properties, QoS};
use std::sync::Arc;

/// A published message. Fanned out as `Arc<Message>`, so ten shards and a thousand sessions
/// share one topic string and one payload buffer.
#[derive(Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// QoS the publisher used; each delivery is capped by its subscription's QoS.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// v5 properties forwarded to subscribers (topic alias and subscription ids removed).
    pub properties: Option<Box<Properties>>,
    /// Client id of the publisher, for the v5 no-local option.
    pub publisher: Arc<str>,
    /// When the v5 Message Expiry Interval runs out (ms on the node's clock, see
    /// [`crate::clock`]); queued copies are dropped after it.
    pub expires_at: Option<u64>,
    /// Cluster-wide id of a client's publish or will (0 for others): a session that moves
    /// between nodes can get one both directly and in its old node's tail, and keeps one.
    pub id: u64,
}
