//! The settings a shard runs with, already validated by the binary's config loader.

use crate::shared::Strategy;
use std::net::SocketAddr;

/// What a full session queue gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPolicy {
    /// Drop the oldest queued message to make room (keeps the freshest data).
    DropOldest,
    /// Refuse the new message (keeps what was queued first).
    DropNewest,
}

/// Node-wide broker settings; every limit carries its unit in its name.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// `name@host`, shown in logs and `$SYS`.
    pub node_name: String,
    /// Number of shards; resolved from "0 = online cores" by the caller.
    pub shards: usize,
    /// MQTT/TCP listener address, bound once per shard with SO_REUSEPORT.
    pub bind: SocketAddr,
    /// Listen backlog.
    pub backlog: i32,
    /// Connections this node accepts at once.
    pub max_connections: usize,
    /// Largest packet accepted or sent, in bytes.
    pub max_packet_size: u32,
    /// Largest packet accepted before CONNECT is complete (the CONNECT itself, will
    /// included), in bytes.
    pub max_connect_packet_size: u32,
    /// Longest client id, in bytes.
    pub max_clientid_len: usize,
    /// Persistent sessions created from one source address (IPv4 address or IPv6 /64) and
    /// still alive, per node (0 = unlimited); enforced per shard as ceil(total / shards).
    pub max_sessions_per_ip: usize,
    /// Deepest topic name or filter, in levels (0 = unlimited).
    pub max_topic_levels: usize,
    /// Unacknowledged QoS 1/2 messages per client.
    pub max_inflight: u16,
    /// QoS 2 ids a 3.x client may leave awaiting PUBREL (0 = unlimited); v5 clients are
    /// bounded by `max_inflight`, our Receive Maximum.
    pub max_awaiting_rel: usize,
    /// Messages queued per session beyond the in-flight window.
    pub max_queued_messages: usize,
    /// What a full queue drops.
    pub queue_drop_policy: DropPolicy,
    /// Whether QoS 0 messages are queued for offline persistent sessions.
    pub queue_qos0: bool,
    /// Subscriptions per client (0 = unlimited).
    pub max_subscriptions: usize,
    /// Filters accepted in one SUBSCRIBE packet; the rest get 0x97 (0 = unlimited).
    pub max_subscribe_filters: usize,
    /// Time allowed to complete CONNECT, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest time an offline persistent session is kept, in seconds.
    pub session_expiry_interval_s: u32,
    /// Whether retained messages are stored.
    pub retain_available: bool,
    /// Retained messages kept per node (0 = unlimited).
    pub max_retained_messages: usize,
    /// Topic + payload bytes of the retained messages kept per node (0 = unlimited).
    pub max_retained_bytes: usize,
    /// Whether `$share/` and `$queue/` subscriptions are accepted.
    pub shared_subscription: bool,
    /// How a shared group picks a member.
    pub shared_strategy: Strategy,
    /// Interval of `$SYS` publications in seconds (0 = none).
    pub sys_interval_s: u64,
    /// Keep-alive imposed on v5 clients in seconds (0 = the client's own).
    pub server_keepalive_s: u16,
    /// Topic aliases a v5 client may define (0 = none).
    pub max_topic_alias: u16,
    /// Topic bytes (plus a per-entry overhead) held by one connection's aliases, per
    /// direction.
    pub max_topic_alias_bytes: usize,
    /// Memory of control packets queued to a client that does not read, in bytes, beyond
    /// which it is disconnected.
    pub max_conn_output_bytes: usize,
    /// Response Information sent to v5 clients that ask for it (empty = none).
    pub response_information: String,
    /// Cluster membership and links.
    pub cluster: crate::cluster::ClusterConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_name: "shardmq@127.0.0.1".into(),
            shards: 1,
            bind: "127.0.0.1:1883".parse().expect("literal address"),
            backlog: 4096,
            max_connections: 1_000_000,
            max_packet_size: 1 << 20,
            max_connect_packet_size: 65536,
            max_clientid_len: 65535,
            max_sessions_per_ip: 10_000,
            max_topic_levels: 128,
            max_inflight: 32,
            max_awaiting_rel: 100,
            max_queued_messages: 1000,
            queue_drop_policy: DropPolicy::DropOldest,
            queue_qos0: true,
            max_subscriptions: 0,
            max_subscribe_filters: 10_000,
            connect_timeout_ms: 15_000,
            session_expiry_interval_s: 7200,
            retain_available: true,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 1 << 30,
            shared_subscription: true,
            shared_strategy: Strategy::RoundRobin,
            sys_interval_s: 60,
            server_keepalive_s: 0,
            max_topic_alias: 65535,
            max_topic_alias_bytes: 256 * 1024,
            max_conn_output_bytes: 4 << 20,
            response_information: String::new(),
            cluster: crate::cluster::ClusterConfig::default(),
        }
    }
}
