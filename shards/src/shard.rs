//! One shard: the broker core of one thread, which owns its connections, the sessions homed
//! on it, its subscription slice, its route replica and its retained replica.
//!
//! Nothing here is shared with another thread except through [`MeshMsg`] and the relaxed
//! counters in [`Metrics`]. The shard is sans-IO: it calls the outside world only through
//! its driver's [`ShardIo`] and is driven by it. A turn: [`Shard::begin_turn`] takes mesh
//! messages, [`Shard::on_event`] takes each completion, [`Shard::end_turn`] fires due timers,
//! writes every connection that has output (one `writev` each) and pushes mesh overflow; then
//! the driver sleeps until a completion, the doorbell or the next timer tick (`ring_driver`
//! on the shard's ring; the simulator on its virtual clock).
//!
//! Sessions live on the *home shard* of their client id (a hash of it): a socket whose CONNECT
//! arrives on another shard is handed over with its bytes, so a client id is only ever looked
//! up, taken over or resumed on one thread and takeover needs no cross-shard protocol.
//!
//! This file holds the shard's state, its turn and the event dispatch; the handlers live
//! in child modules, one per concern (`input`, `connect`, `packets`, `subscribe`, `routes`,
//! `share`, `deliver`, `mesh_in`, `timers`, `output`, `links`; map in docs/architecture.md).

use crate::alias::{AliasUse, OutboundAliases};
use crate::config::BrokerConfig;
use crate::conn::write_queue;
use crate::conn::{Conn, ConnSlab, ConnState};
use crate::hash::Map;
use crate::link::{Links, LINK_IOV_MAX};
use crate::mesh::{Handoff, LinkAttach, MeshEndpoint, MeshMsg, SessionExport};
use crate::message::Message;
use crate::metrics::{DropReason, Metrics};
use crate::node_shared::{home_shard, NodeShared, QueryKind};
use crate::session::{Delivery, Enqueued, InflightState, Session, Subscription};
use crate::shard_io::{Done, IoError, ShardEvent, ShardIo, Token};
use crate::shard_set::ShardSet;
use crate::shared::{self, Group, Member};
use crate::sock::Sock;
use crate::timer::{TimerWheel, TICK_MS};
use crate::topic;
use crate::topic_index::TopicIndex;
use crate::wire::{from_wire, to_wire};
use bytes::{Bytes, BytesMut};
use shardmq_net::cluster::{encode_publish_head, Frame};
use shardmq_net::{
    decode, encode, encode_publish_header_parts, ConnAck, Connect, DecodeError, Disconnect, Packet,
    Properties, Protocol, PubResp, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use smallvec::SmallVec;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;

mod connect;
mod deliver;
mod input;
#[cfg(test)]
mod inspect;
mod links;
mod mesh_in;
mod output;
mod packets;
mod routes;
mod share;
mod subscribe;
mod timers;

/// Output queued on a connection beyond which new messages wait in the session queue instead.
const OUT_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Mesh messages handled per turn before looking at sockets again.
const MESH_BUDGET: usize = 4096;
/// Mesh overflow towards one shard beyond which QoS 0 messages to it are dropped (counted), so
/// a flood from sources that are not paused (data links, mesh traffic) cannot grow memory
/// without bound; QoS 1/2 are still carried.
const MESH_QOS0_DROP_BACKLOG: usize = 65_536;
/// Messages waiting in local overflow towards one shard past which this shard stops reading
/// its clients (QoS 1/2 are never dropped on the mesh, so this is their bound) ...
const MESH_BACKLOG_PAUSE: usize = 32_768;
/// ... and at or below which it reads them again.
const MESH_BACKLOG_RESUME: usize = 8_192;
/// Connections beyond `max_connections` held open only to send the refusal.
const OVER_QUOTA_SLACK: usize = 1024;
/// What a timer of the shard's wheel is for (the wheel only says "look at it now"; the
/// object's own deadline decides). An enum, not bit flags over a connection's `gen << 32 |
/// slot`: a generation past 2^27 would have set a flag bit and lost that connection's timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerToken {
    /// A connection's CONNECT or keep-alive deadline.
    Conn { slot: u32, gen: u32 },
    /// An offline session's expiry, or the end of its move to another node.
    Session(u32),
    /// A delayed will of an offline session.
    Will(u32),
    /// The `$SYS` publication (shard 0 only).
    Sys,
    /// Accepting again after the process ran out of descriptors.
    Accept,
    /// Draining lingering sockets.
    Linger,
}
/// Pause before accepting again after EMFILE/ENFILE (the failed connection waits in the
/// listen backlog), in ms; re-arming at once spins the shard on the same error.
const ACCEPT_BACKOFF_MS: u64 = 100;
/// At most one log line per shard about failing accepts in this interval, in ms.
const ACCEPT_LOG_INTERVAL_MS: u64 = 1_000;
/// How long a socket closed with a reason (DISCONNECT, CONNACK refusal) is half-closed and
/// drained before it is closed, in ms, so that the client reads the reason instead of a
/// reset (unread input at close makes the kernel send RST).
const LINGER_MS: u64 = 2_000;
/// Bytes drained from one lingering socket at most; past it the socket is closed.
const LINGER_DRAIN_BYTES_MAX: usize = 1 << 20;
/// Lingering sockets per shard at most; past it, the oldest is closed at once.
const LINGER_SOCKETS_MAX: usize = 1024;
/// How long a session exported to another node is kept here at most, queuing what peers still
/// route here, if that node never says it routes the session itself (`TakeoverEnd`).
const MOVE_GRACE_MS: u64 = 5_000;
/// How long a moved session lingers after the new node said it routes it: a peer that
/// learns the new routes later than the old node learns the end still sends here meanwhile
/// (the new node keeps one copy of what it gets both ways).
const MOVE_LINGER_MS: u64 = 1_000;

/// A session slot: the session, where it is in its life ([`SessionPhase`]) and what it
/// carries besides.
struct SessionEntry {
    session: Session,
    /// Online, offline or moving away to another node.
    phase: SessionPhase,
    /// When the current connection arrived (Unix ms), to settle racing takeovers.
    connected_at_ms: u64,
    /// A v5 will waiting for its delay (or the session's end) to pass.
    pending_will: Option<Box<PendingWill>>,
    /// Moved here from another node: ids of the messages it got since, so that one arriving
    /// both directly and in the old node's tail is delivered once. Independent of the phase:
    /// a session that just moved here may be online, offline or already moving on.
    seen: Option<Box<SeenIds>>,
    /// Source address key (see `origin_key`) this persistent session is counted under for
    /// `mqtt.max_sessions_per_ip`; 0 = not counted. 32 bits fit the entry's padding.
    origin: u32,
}

/// A v5 will of an offline session, published at `due_ms` (node clock) unless the session
/// resumes first, or when the session ends if sooner (MQTT-3.1.3-9).
struct PendingWill {
    will: Will,
    protocol: Protocol,
    due_ms: u64,
}

/// Where a session is in its life. Each phase holds the one deadline it means, so an expiry
/// interval cannot be read as a time, nor a connection kept by a session that moved away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionPhase {
    /// Bound to connection `conn` (a slot of the shard's slab); `expiry_ms` is how long the
    /// session outlives it (0: it ends with it).
    Online { conn: u32, expiry_ms: u64 },
    /// No connection; the session ends at `expires_at_ms` (node clock) unless one comes.
    Offline { expires_at_ms: u64 },
    /// Exported to node `to`, whose routes for it may not have reached every node yet: kept
    /// until `until_ms`, queuing what still arrives here for it (its tail). `ended`: `to`
    /// said it routes the session, so what still arrives goes to it during a short linger.
    MovingAway { to: u8, ended: bool, until_ms: u64 },
}

impl SessionEntry {
    /// The connection the session is bound to, if online.
    fn conn(&self) -> Option<u32> {
        match self.phase {
            SessionPhase::Online { conn, .. } => Some(conn),
            SessionPhase::Offline { .. } | SessionPhase::MovingAway { .. } => None,
        }
    }

    fn is_moving_away(&self) -> bool {
        matches!(self.phase, SessionPhase::MovingAway { .. })
    }
}

/// A socket closed with a reason, half-closed and drained until EOF or its deadline.
struct Lingering {
    sock: Sock,
    until_ms: u64,
    drained: usize,
}

/// Message ids a moved session has been given, until `until_ms`.
struct SeenIds {
    ids: crate::hash::Set<u64>,
    until_ms: u64,
}

/// How long after its tail a moved session still looks for copies (a direct copy can trail
/// the tail when the publisher's node is slower to reach).
const TAIL_OVERLAP_MS: u64 = 2_000;
/// Most ids a moved session remembers; past it, it stops looking (a duplicate can get out).
const SEEN_IDS_MAX: usize = 100_000;

/// A connection by slot and generation (a slot reused by a later connection has another
/// generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConnRef {
    slot: u32,
    gen: u32,
}

/// A CONNECT waiting for the other nodes' sessions (its connection is in `Resuming`).
struct Resuming {
    conn: ConnRef,
    connect: Box<Connect>,
    /// The client id was assigned by this node (v5 says so in the CONNACK).
    assigned: bool,
}

/// A session moved here whose new routes are not yet acknowledged by every other shard.
struct PendingEnd {
    client_id: Arc<str>,
    /// The node it moved from, told `TakeoverEnd` once `acks_awaited` reaches 0.
    from: u8,
    acks_awaited: usize,
}

/// A local subscriber of one filter.
#[derive(Clone, Copy)]
struct Subscriber {
    session: u32,
    options: SubscriptionOptions,
    id: Option<std::num::NonZeroU32>,
}

/// One filter on this shard: which local shards and other nodes have subscribers (the route
/// replica) and, when this shard has some, who they are (the subscription slice). One entry
/// serves both so a subscription costs one key and one hash slot per shard, not two.
#[derive(Default)]
struct Route {
    shards: ShardSet,
    /// Bit `i` = cluster node index `i`.
    nodes: u64,
    /// This shard's subscribers of the filter (non-empty exactly when `shards` has this shard).
    subs: SmallVec<[Subscriber; 1]>,
}

impl Route {
    fn is_empty(&self) -> bool {
        self.shards.is_empty() && self.nodes == 0 && self.subs.is_empty()
    }
}

/// A shared group with members on some shards, as seen in every shard's route replica.
struct ShareRoute {
    key: Arc<str>,
    shards: ShardSet,
    nodes: u64,
}

/// Why a connection is closed, which decides the will and the v5 DISCONNECT sent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// Client sent DISCONNECT: no will.
    Graceful,
    /// Socket error or EOF without DISCONNECT: publish the will.
    Abnormal,
    /// Broker-side decision with a reason; the will is published (the client did not leave).
    Error(ReasonCode),
    /// Another connection took the client id: no will, session kept.
    TakenOver,
    /// The client let responses pile up past `mqtt.max_conn_output_bytes` without reading:
    /// closed without a DISCONNECT (it would not read it), will published.
    OutputOverflow,
    /// Node shutting down.
    Shutdown,
}

/// Result of handling one packet: keep reading this connection or stop.
enum Flow {
    Continue,
    Stop,
}

/// The shard itself; created and driven on its own thread by `ring_driver`, or by the
/// simulator.
pub struct Shard {
    id: usize,
    shared: Arc<NodeShared>,
    /// The driver: every socket operation, the listener and the wall clock.
    io: Box<dyn ShardIo>,
    mesh: MeshEndpoint,
    /// Mesh messages taken this turn (kept to reuse its buffer).
    mesh_inbox: Vec<MeshMsg>,
    /// Timers fired this turn (kept to reuse its buffer).
    fired: Vec<TimerToken>,
    conns: ConnSlab,
    sessions: Vec<Option<SessionEntry>>,
    free_sessions: Vec<u32>,
    by_client: Map<Arc<str>, u32>,
    routes: TopicIndex<Route>,
    retained: crate::retained::RetainedStore,
    /// Shared groups whose owner is this shard (key = the full `$share/g/f` filter).
    groups: Map<Arc<str>, Group>,
    /// Local members per shared group key.
    share_local: Map<Arc<str>, usize>,
    /// Route replica of shared groups: real filter → groups with members somewhere.
    share_routes: TopicIndex<SmallVec<[ShareRoute; 1]>>,
    /// Turn counter for picking the node of a shared group with no local member.
    share_rr: u64,
    /// CONNECTs waiting for other nodes' sessions, by takeover token.
    resuming: Map<u64, Resuming>,
    timers: TimerWheel<TimerToken>,
    /// SUBSCRIBE/UNSUBSCRIBE packets being worked through in slices (`shard/subscribe.rs`).
    sub_jobs: subscribe::SubJobs,
    /// Sessions moved here, waiting for their new routes to reach every shard before the
    /// exporting node is told to let go, by the token of their route updates.
    pending_ends: Map<u64, PendingEnd>,
    next_token: u64,
    next_client_seq: u64,
    /// Upper half: random per shard and process; lower half: a counter. See `Message::id`.
    next_message_id: u64,
    flush_list: Vec<u32>,
    /// Data links to and from other nodes.
    links: Links,
    /// Reading clients is paused because a link to a peer is full (backpressure).
    paused: bool,
    /// Connections whose reading was paused, to resume when the links drain.
    parked: Vec<ConnRef>,
    scratch: BytesMut,
    /// Accepts failed for lack of descriptors since the last log line, and when that was.
    accept_failures: u64,
    accept_logged_ms: Option<u64>,
    /// Sockets closed with a reason, drained before they are closed (oldest first).
    lingering: std::collections::VecDeque<Lingering>,
    /// Persistent sessions on this shard per source address key (`origin_key`).
    sessions_by_origin: Map<u32, u32>,
    /// Now, on the node's clock (ms), as the driver last read it.
    now_ms: u64,
}

impl Shard {
    /// Builds shard `mesh.id` driven by `io`. `id_seed` makes this shard's message ids
    /// (see `Message::id`) unique per process: random for a real node, from the run's seed in
    /// the simulator.
    pub fn new(
        shared: Arc<NodeShared>,
        mesh: MeshEndpoint,
        io: Box<dyn ShardIo>,
        id_seed: u64,
    ) -> Shard {
        let mesh_id = mesh.id;
        Shard {
            id: mesh.id,
            shared,
            io,
            mesh,
            mesh_inbox: Vec::with_capacity(1024),
            fired: Vec::new(),
            conns: ConnSlab::default(),
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            by_client: Map::default(),
            routes: TopicIndex::default(),
            retained: Default::default(),
            groups: Map::default(),
            share_local: Map::default(),
            share_routes: TopicIndex::default(),
            share_rr: 0,
            resuming: Map::default(),
            timers: TimerWheel::new(0),
            sub_jobs: Default::default(),
            pending_ends: Map::default(),
            // Tokens go to the cluster thread, which keys takeovers by them: unique per node,
            // not only per shard (two shards' CONNECTs with the same token had their session
            // imports swapped: one client was given another's session; found by the
            // simulator).
            next_token: token_base(mesh_id),
            next_client_seq: 0,
            next_message_id: id_base(id_seed),
            flush_list: Vec::new(),
            links: Links::default(),
            paused: false,
            parked: Vec::new(),
            scratch: BytesMut::with_capacity(64 * 1024),
            accept_failures: 0,
            accept_logged_ms: None,
            lingering: std::collections::VecDeque::new(),
            sessions_by_origin: Map::default(),
            now_ms: 0,
        }
    }

    fn cfg(&self) -> &BrokerConfig {
        &self.shared.cfg
    }

    /// This shard's index on its node.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Starts serving: arms accepting and, on shard 0, the `$SYS` timer. Called once, before
    /// the first turn.
    pub fn start(&mut self) {
        self.io.accept();
        let sys_interval_ms = self.cfg().sys_interval_s * 1000;
        if self.id == 0 && sys_interval_ms > 0 {
            self.timers.schedule(sys_interval_ms, TimerToken::Sys);
        }
    }

    /// Begins a turn at `now_ms` (the node's clock): takes up to `MESH_BUDGET` mesh
    /// messages and handles them. Returns true when there were any. The driver then hands
    /// over this turn's completions ([`Shard::on_event`]) and ends it ([`Shard::end_turn`]).
    pub fn begin_turn(&mut self, now_ms: u64) -> bool {
        debug_assert!(now_ms >= self.now_ms, "the node's clock does not go back");
        self.now_ms = now_ms;
        let mut inbox = std::mem::take(&mut self.mesh_inbox);
        self.mesh.recv(MESH_BUDGET, &mut inbox);
        let any = !inbox.is_empty();
        for m in inbox.drain(..) {
            self.on_mesh(m);
        }
        self.mesh_inbox = inbox;
        any
    }

    /// Ends a turn: fires due timers, works on SUBSCRIBE jobs, writes every connection and
    /// link with output, pushes mesh overflow and applies backpressure. Returns true when
    /// work is pending, so the driver must not sleep.
    pub fn end_turn(&mut self) -> bool {
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.advance(self.now_ms, &mut fired);
        for t in fired.drain(..) {
            self.on_timer(t);
        }
        self.fired = fired;
        self.run_sub_jobs();
        self.flush_conns();
        self.flush_links();
        let backlog = self.mesh.flush();
        self.apply_backpressure();
        backlog
            || self.sub_jobs.has_work()
            || !self.flush_list.is_empty()
            || !self.links.dirty.is_empty()
    }

    /// Tells the mesh this shard is about to sleep, so that senders ring its doorbell; false
    /// when a message arrived meanwhile (do not sleep). [`Shard::wake`] after the sleep.
    pub fn try_sleep(&mut self) -> bool {
        self.mesh.park()
    }

    /// The shard is awake again after [`Shard::try_sleep`] returned true.
    pub fn wake(&mut self) {
        self.mesh.unpark();
    }

    // ---------------------------------------------------------------- events

    /// Handles one completion of an operation started through the driver.
    pub fn on_event(&mut self, ev: ShardEvent<'_>) {
        let ShardEvent {
            token,
            result,
            more,
        } = ev;
        match token {
            Token::Accept => self.on_accept(result, more),
            Token::Recv { slot, gen } => self.on_recv(slot, gen, result, more),
            Token::Writable { slot, gen } => {
                if let Some(conn) = self.conns.get_mut(slot, gen) {
                    conn.write_blocked = false;
                    self.mark_dirty(slot);
                }
            }
            Token::LinkRecv { slot, gen } => self.on_link_recv(slot, gen, result, more),
            Token::LinkWritable { slot, gen } => {
                if let Some(link) = self.links.get_mut(slot, gen) {
                    link.write_blocked = false;
                    self.links.dirty.push(slot);
                }
            }
            // The driver's own (mesh doorbell, cancellations): never started by the core.
            Token::Doorbell | Token::Ignore => {}
        }
    }

    /// Stops the shard: every connection is closed with "server shutting down".
    pub fn shutdown(&mut self) {
        if self.paused {
            self.shared
                .metrics
                .cluster_paused_shards
                .fetch_sub(1, Ordering::Relaxed);
        }
        for slot in self.conns.live_slots() {
            self.close(slot, Close::Shutdown);
        }
        log::debug!("shard {} stopped", self.id);
    }
}

/// The first token of shard `id`: the shard in the upper 16 bits, a counter below.
fn token_base(id: usize) -> u64 {
    ((id as u64) << 48) | 1
}

/// Reason code of a PUBREL/PUBCOMP: whether the packet id was known (MQTT-4.3.3).
fn found(known: bool) -> ReasonCode {
    if known {
        ReasonCode::Success
    } else {
        ReasonCode::PacketIdentifierNotFound
    }
}

/// Human-readable text for a reason code, sent as the v5 Reason String.
fn reason_text(r: ReasonCode) -> &'static str {
    match r {
        ReasonCode::MalformedPacket => "malformed packet",
        ReasonCode::ProtocolError => "protocol error",
        ReasonCode::PacketTooLarge => "packet larger than the maximum packet size",
        ReasonCode::TopicNameInvalid => "invalid topic name",
        ReasonCode::TopicFilterInvalid => "invalid topic filter",
        ReasonCode::TopicAliasInvalid => "topic alias out of range or unknown",
        ReasonCode::ReceiveMaximumExceeded => {
            "more unacknowledged QoS 2 messages than Receive Maximum"
        }
        ReasonCode::KeepAliveTimeout => "no packet within 1.5 x keep-alive",
        ReasonCode::SessionTakenOver => "another connection took this client id",
        ReasonCode::ServerShuttingDown => "server shutting down",
        ReasonCode::QuotaExceeded => "quota exceeded",
        ReasonCode::MaximumConnectTime => "CONNECT not completed in time",
        ReasonCode::SharedSubscriptionsNotSupported => "shared subscriptions are disabled",
        ReasonCode::BadAuthenticationMethod => "authentication method not supported",
        ReasonCode::UnsupportedProtocolVersion => "unsupported protocol version",
        ReasonCode::ClientIdentifierNotValid => "client identifier not valid",
        ReasonCode::ServerUnavailable => "server unavailable",
        _ => "refused",
    }
}

/// Closes a socket now; the shutdown first ends any receive the driver still has on it (the
/// ring holds the file until that completes).
fn close_now(io: &mut dyn ShardIo, sock: Sock) {
    io.shutdown(&sock, std::net::Shutdown::Both);
    io.close(sock);
}

/// The key a client's source address is counted under for `mqtt.max_sessions_per_ip`: an
/// IPv4 address (also when IPv4-mapped), or an IPv6 /64 (one subscriber's usual allocation)
/// folded to 32 bits (two prefixes may share a quota); 0 when the address cannot be read.
fn origin_key(ip: Option<std::net::IpAddr>) -> u32 {
    let Some(ip) = ip else {
        return 0;
    };
    let key = match ip {
        std::net::IpAddr::V4(ip) => u32::from(ip),
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip) => u32::from(ip),
            None => {
                let prefix = (u128::from(ip) >> 64) as u64;
                (prefix ^ (prefix >> 32)) as u32
            }
        },
    };
    key.max(1)
}

fn conn_token(slot: u32, gen: u32) -> u64 {
    ((gen as u64) << 32) | slot as u64
}

/// The upper half of this shard's message ids from the driver's seed (all 64 bits count),
/// never zero (0 means "no id").
fn id_base(seed: u64) -> u64 {
    let high = (seed ^ (seed >> 32)) as u32;
    (high.max(1) as u64) << 32
}

/// How long (s) the session of this CONNECT outlives its connection, within the broker's
/// maximum: v5 asks with Session Expiry Interval, earlier versions with clean session = 0.
fn session_expiry_s(connect: &Connect, max_s: u32) -> u32 {
    match connect.protocol {
        Protocol::V5 => connect
            .properties
            .session_expiry_interval
            .unwrap_or(0)
            .min(max_s),
        _ if connect.clean_start => 0,
        _ => max_s,
    }
}

/// A message that moved with its session from another node, which had already capped its
/// QoS to the subscription's: delivered as it came.
fn moved_delivery(msg: Arc<Message>) -> Delivery {
    Delivery {
        qos: msg.qos,
        retain: false,
        sub_ids: SmallVec::new(),
        share: None,
        msg,
    }
}

/// A delivery as another node gets it: the message at the QoS it was to be delivered with.
fn exported(d: Delivery) -> Arc<Message> {
    if d.qos == d.msg.qos {
        return d.msg;
    }
    Arc::new(Message {
        topic: d.msg.topic.clone(),
        payload: d.msg.payload.clone(),
        qos: d.qos,
        retain: d.msg.retain,
        properties: d.msg.properties.clone(),
        publisher: d.msg.publisher.clone(),
        expires_at: d.msg.expires_at,
        id: d.msg.id,
    })
}

fn message_from(p: Publish, publisher: Arc<str>, id: u64, now_ms: u64) -> Message {
    let properties = if p.properties.is_empty() {
        None
    } else {
        let mut props = p.properties;
        // Per-hop properties are not forwarded (MQTT-3.3.2-8, 3.3.4-6).
        props.topic_alias = None;
        props.subscription_identifiers.clear();
        (!props.is_empty()).then(|| Box::new(props))
    };
    let expires_at = properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .map(|s| now_ms + s as u64 * 1000);
    Message {
        topic: p.topic.into(),
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties,
        publisher,
        expires_at,
        id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_token_fits_its_memory_budget() {
        // One per connection and per offline session sits in the wheel.
        assert!(std::mem::size_of::<TimerToken>() <= 12);
    }

    #[test]
    fn session_phase_fits_its_memory_budget() {
        // A connection slot or a node index, a flag and one deadline: no more than the
        // `conn` and `expires_at_ms` fields it replaced.
        assert!(std::mem::size_of::<SessionPhase>() <= 16);
    }

    #[test]
    fn session_entry_fits_its_memory_budget() {
        let size = std::mem::size_of::<Option<SessionEntry>>();
        // 200: the subscription list's index pointer (8 bytes) keeps SUBSCRIBE linear.
        assert!(size <= 200, "SessionEntry grew to {size} bytes");
    }
}
