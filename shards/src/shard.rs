//! One shard: a pinned thread that owns its listener, its io_uring, its connections, the
//! sessions homed on it, its subscription slice, its route replica and its retained replica.
//!
//! Nothing here is shared with another thread except through [`MeshMsg`] and the relaxed
//! counters in [`Metrics`]. A turn of the loop: take mesh messages, take ring completions,
//! fire due timers, write every connection that has output (one `writev` each), push mesh
//! overflow, then sleep in the ring until a completion, the doorbell or the next timer tick.
//!
//! Sessions live on the *home shard* of their client id (a hash of it): a socket whose CONNECT
//! arrives on another shard is handed over with its bytes, so a client id is only ever looked
//! up, taken over or resumed on one thread and takeover needs no cross-shard protocol.

use crate::alias::{AliasUse, OutboundAliases};
use crate::config::BrokerConfig;
use crate::conn::write_queue;
use crate::conn::{Conn, ConnSlab, ConnState};
use crate::link::{Links, LINK_IOV_MAX};
use crate::mesh::{Handoff, LinkAttach, MeshEndpoint, MeshMsg, SessionExport};
use crate::message::Message;
use crate::metrics::{DropReason, Metrics};
use crate::node_shared::{home_shard, NodeShared};
use crate::ring::{Completion, Ring, Token};
use crate::session::{Delivery, Enqueued, InflightState, Session, Subscription};
use crate::shard_set::ShardSet;
use crate::shared::{self, Group, Member};
use crate::timer::{TimerWheel, TICK_MS};
use crate::topic;
use crate::topic_index::TopicIndex;
use crate::wire::{from_wire, to_wire};
use ahash::AHashMap;
use bytes::{Bytes, BytesMut};
use shardmq_net::cluster::{encode_publish_head, Frame};
use shardmq_net::{
    decode, encode, encode_publish_header_parts, ConnAck, Connect, DecodeError, Disconnect, Packet,
    Properties, Protocol, PubResp, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use smallvec::SmallVec;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod subscribe;

/// Output queued on a connection beyond which new messages wait in the session queue instead.
const OUT_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Submission queue entries of a shard's ring.
const RING_ENTRIES: u32 = 4096;
/// Receive buffers in a shard's pool: enough for one turn of completions; every buffer the
/// kernel ever fills stays resident, so the pool is kept small (2 MiB per shard).
const RECV_BUFFERS: u16 = 512;
/// Size of one receive buffer; larger packets are assembled across several.
const RECV_BUFFER_BYTES: usize = 4096;
/// Mesh messages handled per turn before looking at sockets again.
const MESH_BUDGET: usize = 4096;
/// Mesh overflow towards one shard beyond which QoS 0 messages to it are dropped (counted), so
/// a publisher flood cannot grow memory without bound; QoS 1/2 are still carried.
const MESH_QOS0_DROP_BACKLOG: usize = 65_536;
/// Connections beyond `max_connections` held open only to send the refusal.
const OVER_QUOTA_SLACK: usize = 1024;
/// Timer tokens for sessions have this bit set; connection tokens are `gen << 32 | slot`.
const TIMER_SESSION: u64 = 1 << 63;
/// Timer token of the `$SYS` publication (shard 0 only).
const TIMER_SYS: u64 = 1 << 62;
/// Timer tokens of delayed wills have this bit set (with the session index).
const TIMER_WILL: u64 = 1 << 61;
/// Timer token that re-arms accepting after the process ran out of descriptors.
const TIMER_ACCEPT: u64 = 1 << 60;
/// Timer token that drains lingering sockets.
const TIMER_LINGER: u64 = 1 << 59;
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

/// A session slot: the session, its connection (if online) and when it expires (if offline).
struct SessionEntry {
    session: Session,
    conn: Option<u32>,
    /// While online: the expiry interval in ms; while offline: the absolute expiry time.
    expires_at_ms: u64,
    /// When the current connection arrived (Unix ms), to settle racing takeovers.
    connected_at_ms: u64,
    /// A v5 will waiting for its delay (or the session's end) to pass.
    pending_will: Option<Box<(Will, Protocol, u64)>>,
    /// Exported to this node, whose routes for it may not have reached every node yet: kept
    /// until it says they have, queuing what still arrives here for it (its tail).
    moving_to: Option<u8>,
    /// The new node said it routes the session: what still arrives goes to it when the
    /// linger is over.
    move_ended: bool,
    /// Moved here from another node: ids of the messages it got since, so that one arriving
    /// both directly and in the old node's tail is delivered once.
    seen: Option<Box<SeenIds>>,
    /// Source address key (see `origin_key`) this persistent session is counted under for
    /// `mqtt.max_sessions_per_ip`; 0 = not counted. 32 bits fit the entry's padding.
    origin: u32,
}

/// A socket closed with a reason, half-closed and drained until EOF or its deadline.
struct Lingering {
    fd: OwnedFd,
    until_ms: u64,
    drained: usize,
}

/// Message ids a moved session has been given, until `until_ms`.
struct SeenIds {
    ids: ahash::AHashSet<u64>,
    until_ms: u64,
}

/// How long after its tail a moved session still looks for copies (a direct copy can trail
/// the tail when the publisher's node is slower to reach).
const TAIL_OVERLAP_MS: u64 = 2_000;
/// Most ids a moved session remembers; past it, it stops looking (a duplicate can get out).
const SEEN_IDS_MAX: usize = 100_000;

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

/// The shard itself; created and run on its own thread by `node`.
pub struct Shard {
    id: usize,
    shared: Arc<NodeShared>,
    ring: Ring,
    listener: OwnedFd,
    mesh: MeshEndpoint,
    conns: ConnSlab,
    sessions: Vec<Option<SessionEntry>>,
    free_sessions: Vec<u32>,
    by_client: AHashMap<Arc<str>, u32>,
    routes: TopicIndex<Route>,
    retained: crate::retained::RetainedStore,
    /// Shared groups whose owner is this shard (key = the full `$share/g/f` filter).
    groups: AHashMap<Arc<str>, Group>,
    /// Local members per shared group key.
    share_local: AHashMap<Arc<str>, usize>,
    /// Route replica of shared groups: real filter → groups with members somewhere.
    share_routes: TopicIndex<SmallVec<[ShareRoute; 1]>>,
    /// Turn counter for picking the node of a shared group with no local member.
    share_rr: u64,
    /// CONNECTs waiting for other nodes' sessions, by takeover token.
    resuming: AHashMap<u64, (u32, u32, Box<Connect>, bool)>,
    timers: TimerWheel,
    /// SUBSCRIBE/UNSUBSCRIBE packets being worked through in slices (`shard/subscribe.rs`).
    sub_jobs: subscribe::SubJobs,
    /// Sessions moved here, waiting for their new routes to reach every shard before the
    /// exporting node is told to let go: token → (client id, exporting node, acks awaited).
    pending_ends: AHashMap<u64, (Arc<str>, u8, usize)>,
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
    parked: Vec<(u32, u32)>,
    scratch: BytesMut,
    /// Accepts failed for lack of descriptors since the last log line, and when that was.
    accept_failures: u64,
    accept_logged_ms: Option<u64>,
    /// Sockets closed with a reason, drained before they are closed (oldest first).
    lingering: std::collections::VecDeque<Lingering>,
    /// Persistent sessions on this shard per source address key (`origin_key`).
    sessions_by_origin: AHashMap<u32, u32>,
    doorbell_counter: Box<u64>,
    epoch: Instant,
    now_ms: u64,
}

impl Shard {
    /// Builds shard `id` on the calling thread (the ring is bound to it).
    pub fn new(
        shared: Arc<NodeShared>,
        mesh: MeshEndpoint,
        listener: OwnedFd,
    ) -> std::io::Result<Shard> {
        let ring = Ring::new(RING_ENTRIES, RECV_BUFFERS, RECV_BUFFER_BYTES)?;
        let epoch = Instant::now();
        Ok(Shard {
            id: mesh.id,
            shared,
            ring,
            listener,
            mesh,
            conns: ConnSlab::default(),
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            by_client: AHashMap::default(),
            routes: TopicIndex::default(),
            retained: Default::default(),
            groups: AHashMap::default(),
            share_local: AHashMap::default(),
            share_routes: TopicIndex::default(),
            share_rr: 0,
            resuming: AHashMap::default(),
            timers: TimerWheel::new(0),
            sub_jobs: Default::default(),
            pending_ends: AHashMap::default(),
            next_token: 1,
            next_client_seq: 0,
            next_message_id: random_id_base(),
            flush_list: Vec::new(),
            links: Links::default(),
            paused: false,
            parked: Vec::new(),
            scratch: BytesMut::with_capacity(64 * 1024),
            accept_failures: 0,
            accept_logged_ms: None,
            lingering: std::collections::VecDeque::new(),
            sessions_by_origin: AHashMap::default(),
            doorbell_counter: Box::new(0),
            epoch,
            now_ms: 0,
        })
    }

    fn cfg(&self) -> &BrokerConfig {
        &self.shared.cfg
    }

    /// Runs the shard until the node shuts down.
    pub fn run(mut self) -> std::io::Result<()> {
        self.ring.accept_multi(self.listener.as_raw_fd());
        self.arm_doorbell();
        let sys_interval_ms = self.cfg().sys_interval_s * 1000;
        if self.id == 0 && sys_interval_ms > 0 {
            self.timers.schedule(sys_interval_ms, TIMER_SYS);
        }
        let mut completions = Vec::with_capacity(1024);
        let mut mesh_msgs = Vec::with_capacity(1024);
        let mut fired = Vec::new();
        loop {
            self.now_ms = self.epoch.elapsed().as_millis() as u64;
            if self.shared.shutdown.load(Ordering::Relaxed) {
                self.shutdown();
                return Ok(());
            }
            self.mesh.recv(MESH_BUDGET, &mut mesh_msgs);
            let busy = !mesh_msgs.is_empty() || !completions.is_empty();
            for m in mesh_msgs.drain(..) {
                self.on_mesh(m);
            }
            for c in completions.drain(..) {
                self.on_completion(c);
            }
            self.timers.advance(self.now_ms, &mut fired);
            for t in fired.drain(..) {
                self.on_timer(t);
            }
            self.run_sub_jobs();
            self.flush_conns();
            self.flush_links();
            let backlog = self.mesh.flush();
            let wait = !busy
                && !backlog
                && !self.sub_jobs.has_work()
                && self.flush_list.is_empty()
                && self.links.dirty.is_empty()
                && self.mesh.park();
            self.ring
                .submit_and_collect(wait, Duration::from_millis(TICK_MS), &mut completions)?;
            if wait {
                self.mesh.unpark();
            }
        }
    }

    fn arm_doorbell(&mut self) {
        let fd = self.mesh.doorbell().raw_fd();
        let counter: *mut u64 = &mut *self.doorbell_counter;
        // SAFETY: the counter is boxed and owned by the shard, which outlives the ring's use.
        unsafe { self.ring.read_doorbell(fd, counter) };
    }

    // ---------------------------------------------------------------- completions

    fn on_completion(&mut self, c: Completion) {
        match c.token {
            Token::Accept => self.on_accept(c),
            Token::Recv { slot, gen } => self.on_recv(slot, gen, c),
            Token::Writable { slot, gen } => {
                if let Some(conn) = self.conns.get_mut(slot, gen) {
                    conn.write_blocked = false;
                    self.mark_dirty(slot);
                }
            }
            Token::Doorbell => self.arm_doorbell(),
            Token::LinkRecv { slot, gen } => self.on_link_recv(slot, gen, c),
            Token::LinkWritable { slot, gen } => {
                if let Some(link) = self.links.get_mut(slot, gen) {
                    link.write_blocked = false;
                    self.links.dirty.push(slot);
                }
            }
            Token::Ignore => {}
        }
    }

    fn on_accept(&mut self, c: Completion) {
        if c.result < 0 && is_resource_shortage(-c.result) {
            // Out of descriptors (or memory): the connection stays in the backlog. Accepting
            // again at once fails again at once, so wait, count, and log once per interval.
            Metrics::add(&self.shared.metrics.accept_errors_no_fd, 1);
            self.accept_failures += 1;
            let now = self.now_ms;
            if self
                .accept_logged_ms
                .is_none_or(|t| now >= t + ACCEPT_LOG_INTERVAL_MS)
            {
                log::warn!(
                    "shard {}: accept failed {} time(s): {}; retrying every {ACCEPT_BACKOFF_MS} ms",
                    self.id,
                    self.accept_failures,
                    std::io::Error::from_raw_os_error(-c.result)
                );
                self.accept_failures = 0;
                self.accept_logged_ms = Some(now);
            }
            if !c.more() {
                self.timers.schedule(now + ACCEPT_BACKOFF_MS, TIMER_ACCEPT);
            }
            return;
        }
        if !c.more() {
            self.ring.accept_multi(self.listener.as_raw_fd());
        }
        if c.result < 0 {
            if c.result != -libc::ECANCELED {
                log::warn!(
                    "shard {}: accept failed: {}",
                    self.id,
                    std::io::Error::from_raw_os_error(-c.result)
                );
            }
            return;
        }
        // SAFETY: a successful accept returns a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
        let m = &self.shared.metrics;
        let max = self.cfg().max_connections;
        let live = m.connections.fetch_add(1, Ordering::Relaxed);
        // Up to OVER_QUOTA_SLACK connections past the limit are kept long enough to be told
        // why (CONNACK 0x97 / 0x03); beyond that they are closed at once.
        if live >= max.saturating_add(OVER_QUOTA_SLACK) {
            m.connections.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&m.refused, 1);
            log::warn!(
                "shard {}: closing new connection: max_connections reached",
                self.id
            );
            return;
        }
        Metrics::add(&m.connections_total, 1);
        let deadline = self.now_ms + self.cfg().connect_timeout_ms;
        let mut conn = Conn::new(fd, deadline);
        conn.over_quota = live >= max;
        conn.timer_ms = deadline;
        let (slot, gen) = self.conns.insert(conn);
        let raw = self
            .conns
            .get_mut(slot, gen)
            .map(|c| c.raw_fd())
            .unwrap_or(-1);
        self.ring.recv_once(raw, slot, gen);
        self.timers.schedule(deadline, conn_token(slot, gen));
    }

    fn on_recv(&mut self, slot: u32, gen: u32, mut c: Completion) {
        // Owned here and given back to the pool when dropped, on every path below (a buffer
        // on a completion without data included).
        let buf = c.take_buffer();
        let live = self.conns.get_mut(slot, gen).is_some();
        if !live {
            return;
        }
        if c.result > 0 && self.paused && self.park(slot, gen, c.more()) {
            // Cluster backpressure: keep what already arrived, read no more.
            let len = c.result as usize;
            Metrics::add(&self.shared.metrics.bytes_received, len as u64);
            if let Some(buf) = &buf {
                if let Some(conn) = self.conns.get_mut(slot, gen) {
                    conn.partial.extend_from_slice(buf.bytes());
                    if conn.keepalive_ms > 0 {
                        conn.deadline_ms = self.now_ms + conn.keepalive_ms;
                    }
                }
            }
            return;
        }
        if c.result > 0 {
            let len = c.result as usize;
            Metrics::add(&self.shared.metrics.bytes_received, len as u64);
            if let Some(buf) = &buf {
                // Decoded straight from the pool buffer, which `buf` owns until it is dropped.
                self.on_bytes(slot, gen, buf.bytes());
            }
        } else if c.result == 0 {
            if self.sub_jobs.holds(slot, gen) {
                self.sub_jobs.eof_while_held(slot, gen);
                return;
            }
            if self.conns.get_mut(slot, gen).is_some_and(|c| c.parked) {
                // What a paused client sent before it closed still counts (a DISCONNECT
                // among it keeps its will from being published).
                self.on_bytes(slot, gen, &[]);
            }
            self.close(slot, Close::Abnormal);
            return;
        } else if c.result != -libc::ENOBUFS && c.result != -libc::ECANCELED {
            log::debug!(
                "shard {}: recv on {slot}: {}",
                self.id,
                std::io::Error::from_raw_os_error(-c.result)
            );
            self.close(slot, Close::Abnormal);
            return;
        }
        // A cancelled receive was cancelled by `park`; `resume` arms a new one.
        if !c.more() && c.result != -libc::ECANCELED {
            if let Some(conn) = self.conns.get_mut(slot, gen).filter(|c| !c.parked) {
                let fd = conn.raw_fd();
                match conn.state {
                    ConnState::Connecting | ConnState::Resuming => {
                        self.ring.recv_once(fd, slot, gen)
                    }
                    ConnState::Active => self.ring.recv_multi(fd, slot, gen),
                }
            }
        }
    }

    /// Decodes and handles every complete packet in `data` (after any partial packet kept).
    fn on_bytes(&mut self, slot: u32, gen: u32, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        if conn.state == ConnState::Active && conn.keepalive_ms > 0 {
            conn.deadline_ms = self.now_ms + conn.keepalive_ms;
        }
        if conn.state == ConnState::Resuming {
            // Kept until the session arrives; bounded like any partial packet by the
            // connect timeout and the maximum packet size of what follows.
            if conn.partial.len() + data.len() > self.shared.cfg.max_packet_size as usize * 2 {
                self.protocol_error(slot, ReasonCode::PacketTooLarge);
                return;
            }
            conn.partial.extend_from_slice(data);
            return;
        }
        if self.sub_jobs.holds(slot, gen) {
            // A SUBSCRIBE of this client is still being worked through: what follows it
            // waits (its receive is cancelled, so only what was in flight arrives here).
            conn.partial.extend_from_slice(data);
            self.stop_reading(slot, gen);
            return;
        }
        let mut partial = std::mem::take(&mut conn.partial);
        let buf: &[u8] = if partial.is_empty() {
            data
        } else {
            partial.extend_from_slice(data);
            &partial
        };
        let mut off = 0;
        let max = self.cfg().max_packet_size;
        // Before CONNECT completes only a CONNECT may come, which needs a few KiB unless it
        // carries a large will: a smaller limit keeps unauthenticated partial packets small.
        let max_connecting = max.min(self.cfg().max_connect_packet_size);
        loop {
            let Some(conn) = self.conns.get_mut(slot, gen) else {
                return;
            };
            let protocol = conn.protocol;
            let connecting = conn.state == ConnState::Connecting;
            let limit = if connecting { max_connecting } else { max };
            match decode(&buf[off..], protocol, limit) {
                Ok(Some((packet, used))) => {
                    off += used;
                    let flow = if connecting {
                        match packet {
                            Packet::Connect(connect) => {
                                self.on_connect(slot, gen, connect, &buf[off..])
                            }
                            _ => {
                                // MQTT-3.1.0-1: the first packet must be CONNECT.
                                log::info!(
                                    "shard {}: first packet is not CONNECT; closing",
                                    self.id
                                );
                                self.protocol_error(slot, ReasonCode::ProtocolError);
                                Flow::Stop
                            }
                        }
                    } else {
                        self.on_packet(slot, gen, packet)
                    };
                    if let Flow::Stop = flow {
                        return;
                    }
                    let held = self.sub_jobs.holds(slot, gen);
                    if let Some(c) = self.conns.get_mut(slot, gen) {
                        if c.state == ConnState::Resuming || held {
                            c.partial = buf[off..].to_vec();
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.on_decode_error(slot, connecting, protocol, e);
                    return;
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            if off < buf.len() {
                if partial.is_empty() {
                    conn.partial = buf[off..].to_vec();
                } else {
                    partial.drain(..off);
                    conn.partial = partial;
                }
            }
        }
    }

    fn on_decode_error(&mut self, slot: u32, connecting: bool, protocol: Protocol, e: DecodeError) {
        log::info!("shard {}: closing connection: {e}", self.id);
        if connecting {
            if let DecodeError::UnsupportedProtocol { level, .. } = e {
                // MQTT-3.1.2-2: answer in the form the client can read, then close.
                let (proto, reason) = if level >= 5 {
                    (Protocol::V5, ReasonCode::UnsupportedProtocolVersion)
                } else {
                    (Protocol::V311, ReasonCode::UnsupportedProtocolVersion)
                };
                self.send_packet(
                    slot,
                    proto,
                    &Packet::ConnAck(ConnAck {
                        reason,
                        ..Default::default()
                    }),
                );
            }
            Metrics::add(&self.shared.metrics.protocol_errors, 1);
            self.close(slot, Close::Error(e.reason_code()));
            return;
        }
        let _ = protocol;
        self.protocol_error(slot, e.reason_code());
    }

    /// Closes a connection for a protocol violation, telling a v5 client why (MQTT-4.13.1).
    fn protocol_error(&mut self, slot: u32, reason: ReasonCode) {
        Metrics::add(&self.shared.metrics.protocol_errors, 1);
        self.close(slot, Close::Error(reason));
    }

    // ---------------------------------------------------------------- CONNECT

    fn on_connect(
        &mut self,
        slot: u32,
        gen: u32,
        mut connect: Box<Connect>,
        leftover: &[u8],
    ) -> Flow {
        let protocol = connect.protocol;
        let reject = |this: &mut Shard, reason: ReasonCode| {
            this.send_packet(
                slot,
                protocol,
                &Packet::ConnAck(ConnAck {
                    reason,
                    ..Default::default()
                }),
            );
            Metrics::add(&this.shared.metrics.protocol_errors, 1);
            this.close(slot, Close::Error(reason));
            Flow::Stop
        };
        if self.conns.get_mut(slot, gen).is_none_or(|c| c.over_quota) {
            // Over listeners.tcp.default.max_connections: refused with the spec's code.
            Metrics::add(&self.shared.metrics.refused, 1);
            let reason = if protocol == Protocol::V5 {
                ReasonCode::QuotaExceeded
            } else {
                ReasonCode::ServerUnavailable
            };
            return reject(self, reason);
        }
        if connect.properties.authentication_method.is_some() {
            // MQTT-3.1.2 (4.12): no enhanced authentication method is supported; EMQX answers
            // the same way rather than ignoring the method.
            return reject(self, ReasonCode::BadAuthenticationMethod);
        }
        let mut assigned = false;
        if connect.client_id.is_empty() {
            // MQTT-3.1.3-7/8: an empty id needs clean session in 3.1.1; 3.1 requires an id.
            if protocol == Protocol::V31 || (protocol == Protocol::V311 && !connect.clean_start) {
                return reject(self, ReasonCode::ClientIdentifierNotValid);
            }
            self.next_client_seq += 1;
            connect.client_id = format!(
                "shardmq-{}-{}-{}",
                self.id,
                self.epoch.elapsed().as_nanos(),
                self.next_client_seq
            );
            assigned = true;
        }
        if connect.client_id.len() > self.cfg().max_clientid_len {
            return reject(self, ReasonCode::ClientIdentifierNotValid);
        }
        if let Some(will) = &connect.will {
            if topic::validate_name(&will.topic, self.cfg().max_topic_levels).is_err()
                || will.topic.starts_with('$')
            {
                return reject(self, ReasonCode::TopicNameInvalid);
            }
        }
        let home = home_shard(&connect.client_id, self.mesh.shards());
        if home != self.id {
            let Some(conn) = self.conns.remove(slot) else {
                return Flow::Stop;
            };
            let handoff = Handoff {
                fd: conn.fd,
                connect,
                leftover: leftover.to_vec(),
                assigned,
            };
            self.mesh.send(home, MeshMsg::Handoff(Box::new(handoff)));
            return Flow::Stop;
        }
        self.attach(slot, gen, connect, assigned);
        Flow::Continue
    }

    fn on_handoff(&mut self, h: Handoff) {
        let Handoff {
            fd,
            connect,
            leftover,
            assigned,
        } = h;
        let deadline = self.now_ms + self.cfg().connect_timeout_ms;
        let mut conn = Conn::new(fd, deadline);
        conn.timer_ms = deadline;
        let (slot, gen) = self.conns.insert(conn);
        self.timers.schedule(deadline, conn_token(slot, gen));
        self.attach(slot, gen, connect, assigned);
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            let fd = conn.raw_fd();
            self.ring.recv_multi(fd, slot, gen);
            if !leftover.is_empty() {
                self.on_bytes(slot, gen, &leftover);
            }
        }
    }

    /// Binds a connection whose CONNECT is valid to its session on this (home) shard.
    /// Binds a connection whose CONNECT is valid to its session. In a cluster, the client id
    /// is first taken from every other node; a CONNECT that wants to resume a session this
    /// node does not have waits (state `Resuming`) for the other nodes to send theirs.
    fn attach(&mut self, slot: u32, gen: u32, connect: Box<Connect>, assigned: bool) {
        if self.shared.cluster.peers_up.load(Ordering::Relaxed) > 0 {
            let token = self.next_token;
            self.next_token += 1;
            let stub = self.by_client.get(connect.client_id.as_str()).copied();
            if let Some(sidx) = stub.filter(|&s| self.session(s).moving_to.is_some()) {
                // Back here while moving away: the node it moved to has the session now.
                self.destroy_session(sidx);
            }
            let local = self.by_client.contains_key(connect.client_id.as_str());
            let want_session = !connect.clean_start && !local;
            let cluster = self.mesh.cluster();
            let msg = MeshMsg::ClusterTakeover {
                client_id: connect.client_id.as_str().into(),
                want_session,
                token,
                shard: self.id as u16,
                at_ms: unix_ms(),
            };
            self.mesh.send(cluster, msg);
            if want_session {
                if let Some(conn) = self.conns.get_mut(slot, gen) {
                    conn.state = ConnState::Resuming;
                    self.resuming.insert(token, (slot, gen, connect, assigned));
                }
                return;
            }
        }
        self.attach_local(slot, gen, connect, assigned);
    }

    /// Another node's answer for a CONNECT in `Resuming`: import its session, then attach.
    fn on_session_import(&mut self, e: SessionExport) {
        let Some((slot, gen, connect, assigned)) = self.resuming.remove(&e.token) else {
            return;
        };
        // A client gone while its session was on the way still has that session (offline)
        // for as long as its CONNECT asked, as if it had connected and dropped.
        let gone = self.conns.get_mut(slot, gen).is_none();
        let keep_ms =
            session_expiry_s(&connect, self.cfg().session_expiry_interval_s) as u64 * 1000;
        if gone && (!e.found || keep_ms == 0) {
            return;
        }
        let mut imported = None;
        if e.found && !self.by_client.contains_key(&*e.client_id) {
            log::info!(
                "shard {}: session {:?} moved here from another node",
                self.id,
                e.client_id
            );
            let sidx = self.new_session(e.client_id.clone(), false);
            imported = Some(sidx);
            let until_ms = self.now_ms + MOVE_GRACE_MS + TAIL_OVERLAP_MS;
            self.session_mut(sidx).seen = Some(Box::new(SeenIds {
                ids: Default::default(),
                until_ms,
            }));
            let token = self.next_token;
            self.next_token += 1;
            let mut new_routes = 0;
            for (filter, options, id) in e.subscriptions {
                let options = options_from_byte(options);
                let id = NonZeroU32::new(id);
                if shared::is_shared(&filter) {
                    let s = &mut self.session_mut(sidx).session;
                    s.subscriptions.push(Subscription {
                        filter: filter.clone(),
                        options,
                        id,
                    });
                    self.shared
                        .metrics
                        .subscriptions
                        .fetch_add(1, Ordering::Relaxed);
                    new_routes += self.share_join(sidx, filter, token) as usize;
                } else {
                    new_routes += self.subscribe_one(sidx, filter, options, id, token) as usize;
                }
            }
            let waiting = new_routes * (self.mesh.shards() - 1);
            if waiting == 0 {
                self.takeover_end(e.client_id.clone(), e.node);
            } else {
                self.pending_ends
                    .insert(token, (e.client_id.clone(), e.node, waiting));
            }
            for pid in e.pubrel {
                self.session_mut(sidx).session.restore_released(pid);
            }
            let (max_queued, policy) =
                (self.cfg().max_queued_messages, self.cfg().queue_drop_policy);
            for (i, msg) in e.messages.into_iter().enumerate() {
                let d = moved_delivery(msg);
                let session = &mut self.session_mut(sidx).session;
                match e.sent_ids.get(i) {
                    // In flight there: again, as a DUP under its packet id (MQTT-4.4.0-1).
                    Some(&pid) if d.qos != QoS::AtMostOnce => session.restore_inflight(pid, d),
                    _ => {
                        session.enqueue(d, max_queued, policy);
                    }
                }
            }
        } else if e.found {
            // A session of this id appeared here meanwhile; it gets the tail.
            self.takeover_end(e.client_id.clone(), e.node);
        }
        if gone {
            if let Some(sidx) = imported {
                let at = self.now_ms + keep_ms;
                self.session_mut(sidx).expires_at_ms = at;
                self.timers.schedule(at, TIMER_SESSION | sidx as u64);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            conn.state = ConnState::Connecting;
        }
        self.attach_local(slot, gen, connect, assigned);
        if self
            .conns
            .get_mut(slot, gen)
            .is_some_and(|c| !c.partial.is_empty())
        {
            self.on_bytes(slot, gen, &[]);
        }
    }

    /// Another node took `client_id`: close it here and hand over or drop its session.
    fn on_remote_takeover(
        &mut self,
        client_id: Arc<str>,
        want_session: bool,
        token: u64,
        node: u8,
        at_ms: u64,
    ) {
        let mut export = SessionExport {
            token,
            node,
            client_id: client_id.clone(),
            found: false,
            subscriptions: Vec::new(),
            messages: Vec::new(),
            pubrel: Vec::new(),
            sent_ids: Vec::new(),
        };
        let newer_here = self.by_client.get(&client_id).is_some_and(|&s| {
            self.session(s).conn.is_some() && self.session(s).connected_at_ms > at_ms
        });
        if newer_here {
            // Two nodes took the same id at nearly the same time: the newest connection wins.
            log::info!(
                "shard {}: ignoring an older takeover of {client_id:?}",
                self.id
            );
        } else if let Some(sidx) = self.by_client.get(&client_id).copied() {
            log::info!(
                "shard {}: client {client_id:?} taken over by another node",
                self.id
            );
            if let Some(slot) = self.session(sidx).conn {
                self.close(slot, Close::TakenOver);
            }
            if let Some(sidx) = self.by_client.get(&client_id).copied() {
                let entry = self.session_mut(sidx);
                entry.pending_will = None;
                if want_session && !entry.session.ephemeral {
                    export.found = true;
                    export.subscriptions = entry
                        .session
                        .subscriptions
                        .iter()
                        .map(|s| {
                            (
                                s.filter.clone(),
                                options_to_byte(s.options),
                                s.id.map_or(0, NonZeroU32::get),
                            )
                        })
                        .collect();
                    export.pubrel = self.session(sidx).session.released_ids();
                    export.sent_ids = self.session(sidx).session.sent_ids();
                    export.messages = self.take_for_export(sidx);
                }
                if export.found {
                    // First phase of the move: kept, queuing, until `node` routes it.
                    let at = self.now_ms + MOVE_GRACE_MS;
                    let entry = self.session_mut(sidx);
                    entry.moving_to = Some(node);
                    entry.expires_at_ms = at;
                    self.timers.schedule(at, TIMER_SESSION | sidx as u64);
                } else {
                    self.destroy_session(sidx);
                }
            }
        }
        if want_session {
            let cluster = self.mesh.cluster();
            self.mesh
                .send(cluster, MeshMsg::ClusterSessionExport(Box::new(export)));
        }
    }

    fn next_message_id(&mut self) -> u64 {
        let id = self.next_message_id;
        // The counter wraps within the lower half; the upper half stays.
        self.next_message_id = (id & !0xFFFF_FFFF) | ((id + 1) & 0xFFFF_FFFF);
        id
    }

    /// Takes a session's unacknowledged and queued messages, each at the QoS it was to be
    /// delivered with, to be sent to the node it moves to.
    fn take_for_export(&mut self, sidx: u32) -> Vec<Arc<Message>> {
        self.session_mut(sidx)
            .session
            .take_messages()
            .into_iter()
            .map(exported)
            .collect()
    }

    /// A session moved here from `node` is routed by every shard here: tell `node`.
    fn takeover_end(&mut self, client_id: Arc<str>, node: u8) {
        let cluster = self.mesh.cluster();
        self.mesh
            .send(cluster, MeshMsg::ClusterTakeoverEnd { client_id, node });
    }

    /// Second phase of a move away: `node` routes the session now; send it the tail.
    fn on_remote_takeover_end(&mut self, client_id: Arc<str>, node: u8) {
        let Some(sidx) = self.by_client.get(&client_id).copied() else {
            return;
        };
        if self.session(sidx).moving_to != Some(node) || self.session(sidx).move_ended {
            return;
        }
        self.send_tail(sidx, client_id, node);
        let at = self.now_ms + MOVE_LINGER_MS;
        let entry = self.session_mut(sidx);
        entry.move_ended = true;
        entry.expires_at_ms = at;
        self.timers.schedule(at, TIMER_SESSION | sidx as u64);
    }

    /// Sends what a moving session queued to the node it moved to.
    fn send_tail(&mut self, sidx: u32, client_id: Arc<str>, node: u8) {
        let messages = self.take_for_export(sidx);
        if messages.is_empty() {
            return;
        }
        let cluster = self.mesh.cluster();
        self.mesh.send(
            cluster,
            MeshMsg::ClusterSessionTail {
                client_id,
                node,
                messages,
            },
        );
    }

    /// What the exporting node queued for a session that moved here, after the move began.
    fn on_session_tail(&mut self, client_id: Arc<str>, messages: Vec<Arc<Message>>) {
        let Some(sidx) = self.by_client.get(&client_id).copied() else {
            log::info!(
                "shard {}: {} late messages for {client_id:?}, which is gone",
                self.id,
                messages.len()
            );
            return;
        };
        let until_ms = self.now_ms + TAIL_OVERLAP_MS;
        if let Some(seen) = self.session_mut(sidx).seen.as_mut() {
            seen.until_ms = until_ms;
        }
        for msg in messages {
            if self.first_copy(sidx, msg.id) {
                self.deliver(sidx, moved_delivery(msg));
            }
        }
    }

    /// False if a session that moved here recently was already given message `id`.
    fn first_copy(&mut self, sidx: u32, id: u64) -> bool {
        let now = self.now_ms;
        let entry = self.session_mut(sidx);
        let Some(seen) = entry.seen.as_mut() else {
            return true;
        };
        if now > seen.until_ms || seen.ids.len() >= SEEN_IDS_MAX {
            entry.seen = None;
            return true;
        }
        id == 0 || seen.ids.insert(id)
    }

    fn attach_local(&mut self, slot: u32, gen: u32, connect: Box<Connect>, assigned: bool) {
        let cfg = &self.shared.cfg;
        let (cfg_inflight, cfg_expiry, max_packet) = (
            cfg.max_inflight,
            cfg.session_expiry_interval_s,
            cfg.max_packet_size,
        );
        let (retain_available, shared_available) = (cfg.retain_available, cfg.shared_subscription);
        let (server_keepalive, max_alias) = (cfg.server_keepalive_s, cfg.max_topic_alias);
        let response_information = cfg.response_information.clone();
        let expiry_s = session_expiry_s(&connect, cfg_expiry);
        let Connect {
            protocol,
            clean_start,
            keep_alive,
            client_id,
            will,
            properties,
            ..
        } = *connect;
        let client_id: Arc<str> = client_id.into();
        let v5 = protocol == Protocol::V5;
        let ephemeral = expiry_s == 0;

        // Persistent sessions outlive their connection: bound how many one source address
        // creates (the node has no authentication to tell clients apart otherwise).
        let existing = self.by_client.get(&client_id).copied();
        let mut origin = 0;
        if !ephemeral && self.cfg().max_sessions_per_ip > 0 {
            origin = self
                .conns
                .get_mut(slot, gen)
                .map_or(0, |c| origin_key(c.raw_fd()));
            let creates = match existing {
                None => true,
                Some(sidx) => clean_start || self.session(sidx).session.ephemeral,
            };
            let cap = self.cfg().max_sessions_per_ip.div_ceil(self.mesh.shards());
            let held = self.sessions_by_origin.get(&origin).copied().unwrap_or(0);
            if creates && origin != 0 && held as usize >= cap {
                log::info!(
                    "shard {}: refusing session {client_id:?}: {held} persistent sessions from its address",
                    self.id
                );
                let reason = if v5 {
                    ReasonCode::QuotaExceeded
                } else {
                    ReasonCode::ServerUnavailable
                };
                self.send_packet(
                    slot,
                    protocol,
                    &Packet::ConnAck(ConnAck {
                        reason,
                        ..Default::default()
                    }),
                );
                Metrics::add(&self.shared.metrics.refused, 1);
                self.close(slot, Close::Error(reason));
                return;
            }
        }

        // Takeover (MQTT-3.1.4-3): the old connection of this client id is closed.
        if let Some(sidx) = existing {
            if let Some(old_slot) = self.session(sidx).conn {
                if old_slot != slot {
                    log::info!("shard {}: client {client_id:?} taken over", self.id);
                    self.close(old_slot, Close::TakenOver);
                }
            }
        }
        let mut session_present = false;
        let sidx = match self.by_client.get(&client_id).copied() {
            Some(sidx) if !clean_start => {
                session_present = true;
                sidx
            }
            Some(sidx) => {
                self.destroy_session(sidx);
                self.new_session(client_id.clone(), ephemeral)
            }
            None => self.new_session(client_id.clone(), ephemeral),
        };
        {
            let entry = self.session_mut(sidx);
            entry.conn = Some(slot);
            entry.session.ephemeral = ephemeral;
            entry.expires_at_ms = expiry_s as u64 * 1000;
            // A session resumed before its will delay ran out keeps its will unsent
            // (MQTT-3.1.3-9).
            entry.pending_will = None;
            entry.connected_at_ms = unix_ms();
            // Resumed here (no peer was up to take it): it is not moving any more.
            entry.moving_to = None;
        }
        if !ephemeral && origin != 0 && self.session(sidx).origin == 0 {
            self.session_mut(sidx).origin = origin;
            *self.sessions_by_origin.entry(origin).or_insert(0) += 1;
        }
        let keep_alive = if v5 && server_keepalive > 0 {
            server_keepalive
        } else {
            keep_alive
        };
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        conn.state = ConnState::Active;
        conn.protocol = protocol;
        conn.session = sidx;
        conn.will = will.map(Box::new);
        conn.keepalive_ms = keep_alive as u64 * 1500;
        conn.deadline_ms = if keep_alive > 0 {
            self.now_ms + conn.keepalive_ms
        } else {
            u64::MAX
        };
        // The wheel holds the connect-timeout token; bring it forward to the keep-alive
        // deadline when that is sooner (MQTT-3.1.2-24: 1.5 x keep-alive).
        if conn.deadline_ms < conn.timer_ms {
            conn.timer_ms = conn.deadline_ms;
            self.timers
                .schedule(conn.deadline_ms, conn_token(slot, gen));
        }
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        if v5 {
            conn.receive_max = properties.receive_maximum.unwrap_or(u16::MAX).max(1);
            conn.max_packet_out = properties.maximum_packet_size.unwrap_or(u32::MAX);
            conn.client_alias_max = properties.topic_alias_maximum.unwrap_or(0);
            conn.problem_info = properties.request_problem_information != Some(0);
        }
        let mut ack = ConnAck {
            session_present,
            reason: ReasonCode::Success,
            properties: Properties::default(),
        };
        if v5 {
            let p = &mut ack.properties;
            if assigned {
                p.assigned_client_identifier = Some(client_id.to_string());
            }
            p.receive_maximum = Some(cfg_inflight);
            p.maximum_packet_size = Some(max_packet);
            p.retain_available = Some(retain_available as u8);
            p.shared_subscription_available = Some(shared_available as u8);
            p.topic_alias_maximum = Some(max_alias);
            if server_keepalive > 0 {
                p.server_keep_alive = Some(server_keepalive);
            }
            if properties.session_expiry_interval.unwrap_or(0) > expiry_s {
                p.session_expiry_interval = Some(expiry_s);
            }
            if properties.request_response_information == Some(1)
                && !response_information.is_empty()
            {
                p.response_information = Some(response_information);
            }
        }
        self.send_packet(slot, protocol, &Packet::ConnAck(ack));
        if session_present {
            self.resend_inflight(slot, sidx);
        }
        self.pump(sidx);
    }

    fn new_session(&mut self, client_id: Arc<str>, ephemeral: bool) -> u32 {
        let entry = SessionEntry {
            session: Session::new(client_id.clone(), ephemeral),
            conn: None,
            expires_at_ms: 0,
            connected_at_ms: 0,
            pending_will: None,
            moving_to: None,
            move_ended: false,
            seen: None,
            origin: 0,
        };
        let idx = match self.free_sessions.pop() {
            Some(i) => {
                self.sessions[i as usize] = Some(entry);
                i
            }
            None => {
                self.sessions.push(Some(entry));
                (self.sessions.len() - 1) as u32
            }
        };
        self.by_client.insert(client_id, idx);
        idx
    }

    fn session(&self, idx: u32) -> &SessionEntry {
        self.sessions[idx as usize]
            .as_ref()
            .expect("live session index")
    }

    fn session_mut(&mut self, idx: u32) -> &mut SessionEntry {
        self.sessions[idx as usize]
            .as_mut()
            .expect("live session index")
    }

    /// Ends a session: its subscriptions leave the slice (and routes), its messages are lost.
    fn destroy_session(&mut self, idx: u32) {
        let Some(mut entry) = self.sessions[idx as usize].take() else {
            return;
        };
        if let Some(pending) = entry.pending_will.take() {
            // The session ends before the will delay: the will goes now (MQTT-3.1.3-9).
            let (will, protocol, _) = *pending;
            self.sessions[idx as usize] = Some(entry);
            self.publish_will(idx, will, protocol);
            entry = self.sessions[idx as usize].take().expect("just put back");
        }
        debug_assert!(entry.conn.is_none(), "a session is detached before it ends");
        if entry.origin != 0 {
            if let Some(n) = self.sessions_by_origin.get_mut(&entry.origin) {
                *n -= 1;
                if *n == 0 {
                    self.sessions_by_origin.remove(&entry.origin);
                }
            }
        }
        let subs = entry.session.subscriptions.len() as i64;
        self.shared
            .metrics
            .subscriptions
            .fetch_sub(subs, Ordering::Relaxed);
        for sub in &entry.session.subscriptions {
            if shared::is_shared(&sub.filter) {
                self.share_leave(idx, &sub.filter);
            } else {
                self.slice_remove(&sub.filter, idx);
            }
        }
        if self.by_client.get(&entry.session.client_id) == Some(&idx) {
            self.by_client.remove(&entry.session.client_id);
        }
        self.free_sessions.push(idx);
    }

    fn resend_inflight(&mut self, slot: u32, sidx: u32) {
        // MQTT-4.4.0-1: unacknowledged PUBLISH again with DUP, PUBREL again.
        let items: Vec<(u16, InflightState, Delivery)> = self
            .session(sidx)
            .session
            .inflight()
            .map(|i| (i.packet_id, i.state, i.delivery.clone()))
            .collect();
        for (pid, state, d) in items {
            match state {
                InflightState::AwaitPubComp => {
                    let p = self.conn_protocol(slot);
                    self.send_packet(
                        slot,
                        p,
                        &Packet::PubRel(PubResp {
                            packet_id: pid,
                            ..Default::default()
                        }),
                    );
                }
                _ => self.send_publish(slot, pid, &d, true),
            }
        }
    }

    // ---------------------------------------------------------------- packets of active clients

    fn on_packet(&mut self, slot: u32, gen: u32, packet: Packet) -> Flow {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return Flow::Stop;
        };
        let sidx = conn.session;
        let protocol = conn.protocol;
        match packet {
            Packet::Publish(p) => return self.on_publish(slot, sidx, protocol, p),
            Packet::PubAck(a) => {
                self.session_mut(sidx).session.on_puback(a.packet_id);
                self.pump(sidx);
            }
            Packet::PubRec(a) => {
                let reason = found(self.session_mut(sidx).session.on_pubrec(a.packet_id));
                if a.reason.is_error() {
                    // v5: an error PUBREC ends the exchange (MQTT-4.3.3-4 family); forget it.
                    self.session_mut(sidx).session.on_pubcomp(a.packet_id);
                    self.pump(sidx);
                } else {
                    self.send_packet(
                        slot,
                        protocol,
                        &Packet::PubRel(PubResp::new(a.packet_id, reason)),
                    );
                }
            }
            Packet::PubRel(a) => {
                let reason = found(self.session_mut(sidx).session.release_qos2(a.packet_id));
                self.send_packet(
                    slot,
                    protocol,
                    &Packet::PubComp(PubResp::new(a.packet_id, reason)),
                );
            }
            Packet::PubComp(a) => {
                self.session_mut(sidx).session.on_pubcomp(a.packet_id);
                self.pump(sidx);
            }
            Packet::Subscribe(s) => self.on_subscribe(slot, gen, sidx, protocol, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(slot, gen, sidx, protocol, u),
            Packet::PingReq => self.send_packet(slot, protocol, &Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    let cap = self.cfg().session_expiry_interval_s;
                    let entry = self.session_mut(sidx);
                    if entry.session.ephemeral && expiry > 0 {
                        // MQTT-3.14.2-2: expiry 0 at CONNECT cannot be raised at DISCONNECT.
                        self.protocol_error(slot, ReasonCode::ProtocolError);
                        return Flow::Stop;
                    }
                    let expiry = expiry.min(cap);
                    entry.expires_at_ms = expiry as u64 * 1000;
                    entry.session.ephemeral = expiry == 0;
                }
                // MQTT-3.14.4-3: a normal DISCONNECT discards the will, except v5 0x04.
                if d.reason != ReasonCode::DisconnectWithWillMessage {
                    if let Some(conn) = self.conns.get_mut(slot, gen) {
                        conn.will = None;
                    }
                }
                self.close(slot, Close::Graceful);
                return Flow::Stop;
            }
            Packet::Connect(_) => {
                // MQTT-3.1.0-2: a second CONNECT is a protocol violation.
                log::info!("shard {}: second CONNECT; closing", self.id);
                self.protocol_error(slot, ReasonCode::ProtocolError);
                return Flow::Stop;
            }
            Packet::Auth(_) => {
                self.protocol_error(slot, ReasonCode::BadAuthenticationMethod);
                return Flow::Stop;
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error(slot, ReasonCode::ProtocolError);
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn on_publish(&mut self, slot: u32, sidx: u32, protocol: Protocol, mut p: Publish) -> Flow {
        Metrics::add(&self.shared.metrics.messages_received, 1);
        if let Some(alias) = p.properties.topic_alias {
            // MQTT-3.3.2-9/10: aliases are 1..=our Topic Alias Maximum.
            if alias == 0 || alias > self.cfg().max_topic_alias {
                self.protocol_error(slot, ReasonCode::TopicAliasInvalid);
                return Flow::Stop;
            }
            let Some(conn) = self.conns.get_slot(slot) else {
                return Flow::Stop;
            };
            let aliases = conn.aliases.get_or_insert_with(Default::default);
            if p.topic.is_empty() {
                match aliases.inbound.get(alias) {
                    Some(t) => p.topic = t.to_string(),
                    None => {
                        // MQTT-3.3.4: an alias must be defined before it is used alone.
                        self.protocol_error(slot, ReasonCode::ProtocolError);
                        return Flow::Stop;
                    }
                }
            } else if aliases
                .inbound
                .define(alias, &p.topic, self.shared.cfg.max_topic_alias_bytes)
                .is_err()
            {
                // Aliases in range but too many topic bytes pinned: our limit, not a
                // protocol error, hence Quota exceeded rather than Topic Alias invalid.
                log::info!("shard {}: topic aliases over their byte budget", self.id);
                self.protocol_error(slot, ReasonCode::QuotaExceeded);
                return Flow::Stop;
            }
        }
        if let Err(e) = topic::validate_name(&p.topic, self.cfg().max_topic_levels) {
            // MQTT-3.3.2-2: wildcards are not allowed in a topic name.
            log::info!(
                "shard {}: invalid PUBLISH topic {:?}: {e:?}",
                self.id,
                p.topic
            );
            self.protocol_error(slot, ReasonCode::TopicNameInvalid);
            return Flow::Stop;
        }
        let (qos, packet_id) = (p.qos, p.packet_id);
        if qos == QoS::ExactlyOnce && !self.session(sidx).session.awaits_pubrel(packet_id) {
            let awaiting = self.session(sidx).session.incoming_qos2_len();
            if protocol == Protocol::V5 && awaiting >= self.cfg().max_inflight as usize {
                // MQTT-3.3.4-9: more unacknowledged QoS 2 than our Receive Maximum.
                self.protocol_error(slot, ReasonCode::ReceiveMaximumExceeded);
                return Flow::Stop;
            }
            let max_rel = self.cfg().max_awaiting_rel;
            if protocol != Protocol::V5 && max_rel > 0 && awaiting >= max_rel {
                // 3.x has no Receive Maximum: past mqtt.max_awaiting_rel ids awaiting
                // PUBREL the connection is closed (EMQX max_awaiting_rel).
                log::info!(
                    "shard {}: {awaiting} QoS 2 messages await PUBREL; closing",
                    self.id
                );
                self.protocol_error(slot, ReasonCode::QuotaExceeded);
                return Flow::Stop;
            }
        }
        let route = match qos {
            QoS::AtMostOnce | QoS::AtLeastOnce => true,
            QoS::ExactlyOnce => self.session_mut(sidx).session.incoming_qos2(packet_id),
        };
        let mut matched = true;
        // Clients may not publish into $SYS (EMQX ignores such messages too).
        if route && !p.topic.starts_with("$SYS") {
            let publisher = self.session(sidx).session.client_id.clone();
            let id = self.next_message_id();
            let msg = Arc::new(message_from(p, publisher, id));
            if msg.retain && self.cfg().retain_available {
                self.set_retained(&msg);
            }
            matched = self.route(msg);
        }
        let mut ack = PubResp {
            packet_id,
            ..Default::default()
        };
        if !matched {
            self.shared.metrics.dropped(DropReason::NoSubscribers);
        }
        if !matched && protocol == Protocol::V5 {
            // As EMQX: tell v5 publishers nobody was subscribed (0x10 is a success code).
            ack.reason = ReasonCode::NoMatchingSubscribers;
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send_packet(slot, protocol, &Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send_packet(slot, protocol, &Packet::PubRec(ack)),
        }
        Flow::Continue
    }

    /// Subscribes to a shared group; retained messages are never sent for these
    /// (MQTT-4.8.2-... / EMQX). Returns the SUBACK reason.
    fn subscribe_shared(
        &mut self,
        sidx: u32,
        filter: String,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
        token: u64,
        new_routes: &mut usize,
    ) -> ReasonCode {
        if !self.cfg().shared_subscription {
            return ReasonCode::SharedSubscriptionsNotSupported;
        }
        let Some((_, real)) = shared::parse_shared(&filter) else {
            return ReasonCode::TopicFilterInvalid;
        };
        if topic::validate_filter(real, self.cfg().max_topic_levels).is_err() {
            return ReasonCode::TopicFilterInvalid;
        }
        let max_subs = self.cfg().max_subscriptions;
        let key: Arc<str> = filter.as_str().into();
        let session = &mut self.session_mut(sidx).session;
        let count = session.subscriptions.len();
        match session.subscriptions.get_mut(&key) {
            Some(existing) => {
                existing.options = options;
                existing.id = id;
                return ReasonCode::granted(options.qos);
            }
            None if max_subs > 0 && count >= max_subs => {
                return ReasonCode::QuotaExceeded;
            }
            None => {
                session.subscriptions.push(Subscription {
                    filter: key.clone(),
                    options,
                    id,
                });
                self.shared
                    .metrics
                    .subscriptions
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.share_join(sidx, key, token) {
            *new_routes += 1;
        }
        ReasonCode::granted(options.qos)
    }

    /// Adds a local member to group `key`: tells the owner, and announces this shard in the
    /// share routes if it is the first local member. True when a route change went out.
    fn share_join(&mut self, sidx: u32, key: Arc<str>, token: u64) -> bool {
        let shards = self.mesh.shards();
        let owner = home_shard(&key, shards);
        let member = Member {
            shard: self.id as u16,
            session: sidx,
            client_id: self.session(sidx).session.client_id.clone(),
        };
        if owner == self.id {
            self.group_join(key.clone(), member);
        } else {
            self.mesh.send(
                owner,
                MeshMsg::ShareJoin {
                    key: key.clone(),
                    member,
                },
            );
        }
        let count = self.share_local.entry(key.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return false;
        }
        let real: Arc<str> = shared::parse_shared(&key)
            .map(|(_, f)| f)
            .unwrap_or_default()
            .into();
        self.share_route_add(&real, &key, self.id);
        for to in 0..shards {
            if to != self.id {
                let msg = MeshMsg::ShareRouteAdd {
                    filter: real.clone(),
                    key: key.clone(),
                    shard: self.id as u16,
                    ack: token,
                };
                self.mesh.send(to, msg);
            }
        }
        true
    }

    /// Removes a local member from group `key` (unsubscribe or session end).
    fn share_leave(&mut self, sidx: u32, key: &Arc<str>) {
        let shards = self.mesh.shards();
        let owner = home_shard(key, shards);
        if owner == self.id {
            self.group_leave(key, self.id as u16, sidx);
        } else {
            let msg = MeshMsg::ShareLeave {
                key: key.clone(),
                shard: self.id as u16,
                session: sidx,
            };
            self.mesh.send(owner, msg);
        }
        let Some(count) = self.share_local.get_mut(key) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.share_local.remove(key);
        let real: Arc<str> = shared::parse_shared(key)
            .map(|(_, f)| f)
            .unwrap_or_default()
            .into();
        self.share_route_del(&real, key, self.id);
        for to in 0..shards {
            if to != self.id {
                let msg = MeshMsg::ShareRouteDel {
                    filter: real.clone(),
                    key: key.clone(),
                    shard: self.id as u16,
                };
                self.mesh.send(to, msg);
            }
        }
    }

    /// On the group's owner shard: adds a member; the node announces the group to the
    /// cluster when it gets its first member here.
    fn group_join(&mut self, key: Arc<str>, member: Member) {
        let group = self.groups.entry(key.clone()).or_default();
        let first = group.members.is_empty();
        group.join(member);
        if first {
            self.node_route_changed(&key, true);
        }
    }

    fn group_leave(&mut self, key: &Arc<str>, shard: u16, session: u32) {
        if let Some(g) = self.groups.get_mut(key) {
            if g.leave(shard, session) {
                self.groups.remove(key);
                self.node_route_changed(key, false);
            }
        }
    }

    fn share_route_add(&mut self, filter: &str, key: &Arc<str>, shard: usize) {
        let list = self.share_routes.get_or_insert_with(filter, SmallVec::new);
        match list.iter_mut().find(|r| r.key == *key) {
            Some(r) => {
                r.shards.insert(shard);
            }
            None => {
                let mut shards = ShardSet::default();
                shards.insert(shard);
                list.push(ShareRoute {
                    key: key.clone(),
                    shards,
                    nodes: 0,
                });
            }
        }
    }

    fn share_route_del(&mut self, filter: &str, key: &Arc<str>, shard: usize) {
        let Some(list) = self.share_routes.get_mut(filter) else {
            return;
        };
        for r in list.iter_mut() {
            if r.key == *key {
                r.shards.remove(shard);
            }
        }
        list.retain(|r| !r.shards.is_empty() || r.nodes != 0);
        if list.is_empty() {
            self.share_routes.remove(filter);
        }
    }

    /// On the owner: picks a member for `msg` and sends it there. When every member refused,
    /// the first one still present queues it anyway (`force`); with no member it is dropped.
    fn shared_dispatch(&mut self, key: Arc<str>, msg: Arc<Message>, tried: Vec<(u16, u32)>) {
        let strategy = self.cfg().shared_strategy;
        let Some(group) = self.groups.get_mut(&key) else {
            self.shared.metrics.dropped(DropReason::NoSubscribers);
            return;
        };
        let (member, force) = match group.pick(strategy, &msg, &tried) {
            Some(m) => (m, false),
            None => match group.members.first() {
                Some(m) if tried.len() <= group.members.len() => (m.clone(), true),
                _ => {
                    self.shared.metrics.dropped(DropReason::NoSubscribers);
                    return;
                }
            },
        };
        if member.shard as usize == self.id {
            self.shared_deliver(key, msg, member, tried, force);
        } else {
            let to = member.shard as usize;
            let m = MeshMsg::SharedDeliver {
                key,
                msg,
                member,
                tried,
                force,
            };
            self.mesh.send(to, m);
        }
    }

    /// On the member's shard: deliver, or refuse back to the owner.
    fn shared_deliver(
        &mut self,
        key: Arc<str>,
        msg: Arc<Message>,
        member: Member,
        mut tried: Vec<(u16, u32)>,
        force: bool,
    ) {
        let max_queued = self.cfg().max_queued_messages;
        let sidx = member.session;
        let options = match self.sessions.get(sidx as usize) {
            Some(Some(e)) if e.session.client_id == member.client_id => {
                e.session.subscriptions.get(&key).map(|s| {
                    (
                        s.options,
                        s.id,
                        e.conn.is_some() && e.session.queue_len() < max_queued,
                    )
                })
            }
            _ => None,
        };
        match options {
            Some((options, id, available)) if available || force => {
                let d = Delivery {
                    qos: msg.qos.min(options.qos),
                    retain: false,
                    sub_ids: id.map(NonZeroU32::get).into_iter().collect(),
                    share: Some(key),
                    msg,
                };
                self.deliver(sidx, d);
            }
            _ if force => self.shared.metrics.dropped(DropReason::NoSubscribers),
            _ => {
                tried.push((self.id as u16, sidx));
                self.shared_publish(key, msg, tried);
            }
        }
    }

    /// Sends a message to the owner of shared group `key` (or dispatches it here).
    fn shared_publish(&mut self, key: Arc<str>, msg: Arc<Message>, tried: Vec<(u16, u32)>) {
        let owner = home_shard(&key, self.mesh.shards());
        if owner == self.id {
            self.shared_dispatch(key, msg, tried);
        } else {
            self.mesh
                .send(owner, MeshMsg::SharedPublish { key, msg, tried });
        }
    }

    /// Hands a leaving member's unacknowledged shared messages to other members (EMQX's
    /// redispatch).
    fn redispatch_shared(&mut self, sidx: u32) {
        let taken = self.session_mut(sidx).session.take_shared();
        for d in taken {
            if let Some(key) = d.share {
                self.shared_publish(key, d.msg, vec![(self.id as u16, sidx)]);
            }
        }
    }

    /// Adds one subscription; returns true if the filter is new on this shard and a route
    /// change went out to the other shards carrying `token`.
    fn subscribe_one(
        &mut self,
        sidx: u32,
        filter: Arc<str>,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
        token: u64,
    ) -> bool {
        let session = &mut self.session_mut(sidx).session;
        match session.subscriptions.get_mut(&filter) {
            Some(existing) => {
                existing.options = options;
                existing.id = id;
            }
            None => {
                session.subscriptions.push(Subscription {
                    filter: filter.clone(),
                    options,
                    id,
                });
                self.shared
                    .metrics
                    .subscriptions
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let list = &mut self
            .routes
            .get_or_insert_shared(&filter, Route::default)
            .subs;
        let fresh = list.is_empty();
        match list.iter_mut().find(|s| s.session == sidx) {
            Some(s) => {
                s.options = options;
                s.id = id;
            }
            None => list.push(Subscriber {
                session: sidx,
                options,
                id,
            }),
        }
        if !fresh {
            return false;
        }
        self.route_add_local(&filter, self.id);
        for to in 0..self.mesh.shards() {
            if to != self.id {
                let msg = MeshMsg::RouteAdd {
                    filter: filter.clone(),
                    shard: self.id as u16,
                    ack: token,
                };
                self.mesh.send(to, msg);
            }
        }
        true
    }

    /// Removes one session from a filter's subscriber list; withdraws the route if it was the
    /// last subscriber of that filter on this shard.
    fn slice_remove(&mut self, filter: &str, sidx: u32) {
        let Some(entry) = self.routes.get_mut(filter) else {
            return;
        };
        entry.subs.retain(|s| s.session != sidx);
        if !entry.subs.is_empty() {
            return;
        }
        self.route_del(filter, self.id);
        let filter: Arc<str> = filter.into();
        for to in 0..self.mesh.shards() {
            if to != self.id {
                self.mesh.send(
                    to,
                    MeshMsg::RouteDel {
                        filter: filter.clone(),
                        shard: self.id as u16,
                    },
                );
            }
        }
    }

    fn route_add_local(&mut self, filter: &Arc<str>, shard: usize) {
        let r = self.routes.get_or_insert_shared(filter, Route::default);
        let was_empty = r.shards.is_empty();
        r.shards.insert(shard);
        if was_empty {
            self.node_route_changed(filter, true);
        }
    }

    fn route_del(&mut self, filter: &str, shard: usize) {
        let Some(r) = self.routes.get_mut(filter) else {
            return;
        };
        let had = !r.shards.is_empty();
        r.shards.remove(shard);
        let gone = had && r.shards.is_empty();
        if r.is_empty() {
            self.routes.remove(filter);
        }
        if gone {
            self.node_route_changed(filter, false);
        }
    }

    /// Tells the cluster that this node gained or lost its last subscriber of `filter`. Only
    /// the filter's home shard speaks for the node, so the changes it reports are ordered.
    fn node_route_changed(&mut self, filter: &str, add: bool) {
        if !self.shared.cluster.enabled.load(Ordering::Relaxed)
            || home_shard(filter, self.mesh.shards()) != self.id
        {
            return;
        }
        let cluster = self.mesh.cluster();
        self.mesh.send(
            cluster,
            MeshMsg::ClusterRoute {
                filter: filter.into(),
                add,
            },
        );
    }

    /// Applies another node's route change to this shard's replica.
    fn node_route(&mut self, filter: &str, node: u8, add: bool) {
        let bit = 1u64 << node;
        if let Some((_, real)) = shared::parse_shared(filter) {
            let key: Arc<str> = filter.into();
            let list = self.share_routes.get_or_insert_with(real, SmallVec::new);
            match list.iter_mut().find(|r| r.key == key) {
                Some(r) if add => r.nodes |= bit,
                Some(r) => r.nodes &= !bit,
                None if add => list.push(ShareRoute {
                    key,
                    shards: ShardSet::default(),
                    nodes: bit,
                }),
                None => {}
            }
            list.retain(|r| !r.shards.is_empty() || r.nodes != 0);
            if list.is_empty() {
                self.share_routes.remove(real);
            }
            return;
        }
        if add {
            self.routes.get_or_insert_with(filter, Route::default).nodes |= bit;
        } else if let Some(r) = self.routes.get_mut(filter) {
            r.nodes &= !bit;
            if r.is_empty() {
                self.routes.remove(filter);
            }
        }
    }

    /// Forgets every route of a node that went down or left.
    fn node_down(&mut self, node: u8) {
        let mut filters = Vec::new();
        self.routes.for_each(|f, r| {
            if r.nodes & (1u64 << node) != 0 {
                filters.push(f.to_string());
            }
        });
        self.share_routes.for_each(|_, list| {
            for r in list.iter() {
                if r.nodes & (1u64 << node) != 0 {
                    filters.push(r.key.to_string());
                }
            }
        });
        for f in filters {
            self.node_route(&f, node, false);
        }
    }

    // ---------------------------------------------------------------- routing and delivery

    /// Sends a message to every shard and node with a matching route (this one included).
    /// Returns whether anything matched.
    fn route(&mut self, msg: Arc<Message>) -> bool {
        self.route_with(msg, true, None)
    }

    /// Routes `msg` on this node: to local shards when `normal`, to the shared groups in
    /// `only_groups` (or all matching groups when `None`). Messages that came from another
    /// node are routed with `from_node = true` semantics by the caller passing
    /// `Some(groups)`: they are never forwarded again.
    fn route_with(
        &mut self,
        msg: Arc<Message>,
        normal: bool,
        only_groups: Option<Vec<Arc<str>>>,
    ) -> bool {
        let remote = only_groups.is_some();
        let mut targets = ShardSet::default();
        let mut nodes = 0u64;
        if normal {
            self.routes.for_each_match(&msg.topic, |r| {
                targets.union_with(&r.shards);
                nodes |= r.nodes;
            });
        }
        if remote {
            nodes = 0;
        }
        for shard in targets.iter() {
            if shard == self.id {
                continue;
            }
            if msg.qos == QoS::AtMostOnce && self.mesh.backlog(shard) > MESH_QOS0_DROP_BACKLOG {
                self.shared.metrics.dropped(DropReason::Congested);
                continue;
            }
            self.mesh.send(shard, MeshMsg::Publish(msg.clone()));
        }
        if targets.contains(self.id) {
            self.deliver_local(&msg);
        }
        let mut matched = !targets.is_empty() || nodes != 0;
        let mut remote_groups: Vec<(Arc<str>, u8)> = Vec::new();
        if let Some(keys) = only_groups {
            matched |= !keys.is_empty();
            for key in keys {
                self.shared_publish(key, msg.clone(), Vec::new());
            }
        } else if !self.share_routes.is_empty() {
            let mut groups: SmallVec<[(Arc<str>, bool, u64); 2]> = SmallVec::new();
            self.share_routes.for_each_match(&msg.topic, |list| {
                groups.extend(
                    list.iter()
                        .map(|r| (r.key.clone(), !r.shards.is_empty(), r.nodes)),
                )
            });
            groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            groups.dedup_by(|a, b| {
                if a.0 == b.0 {
                    b.1 |= a.1;
                    b.2 |= a.2;
                    true
                } else {
                    false
                }
            });
            matched |= !groups.is_empty();
            for (key, local, group_nodes) in groups {
                // One member per group cluster-wide: this node's members when it has any,
                // else one node that has members, in turn.
                if local {
                    self.shared_publish(key, msg.clone(), Vec::new());
                } else if group_nodes != 0 {
                    self.share_rr = self.share_rr.wrapping_add(1);
                    let n = group_nodes.count_ones() as u64;
                    let pick = self.share_rr % n;
                    let node = (0..64u8)
                        .filter(|b| group_nodes & (1u64 << b) != 0)
                        .nth(pick as usize)
                        .unwrap_or(0);
                    remote_groups.push((key, node));
                }
            }
        }
        if nodes != 0 || !remote_groups.is_empty() {
            self.forward(&msg, nodes, &remote_groups);
        }
        matched
    }

    /// Appends one `Publish` frame per node in `nodes` or picked for a group in `groups` to
    /// this shard's link to that node: the frame head, then the payload as its own buffer.
    fn forward(&mut self, msg: &Arc<Message>, nodes: u64, groups: &[(Arc<str>, u8)]) {
        let wire = to_wire(msg);
        let limit = self.cfg().cluster.link_buffer_bytes;
        let mut targets = nodes;
        for (_, n) in groups {
            targets |= 1u64 << n;
        }
        while targets != 0 {
            let node = targets.trailing_zeros() as u8;
            targets &= targets - 1;
            if msg.qos == QoS::AtMostOnce && self.links.backlog(node) > limit {
                Metrics::add(&self.shared.metrics.cluster_dropped, 1);
                self.shared.metrics.dropped(DropReason::LinkFull);
                continue;
            }
            let keys: Vec<String> = groups
                .iter()
                .filter(|(_, n)| *n == node)
                .map(|(k, _)| k.to_string())
                .collect();
            let normal = nodes & (1u64 << node) != 0;
            encode_publish_head(&wire, normal, &keys, &mut self.scratch);
            let head = self.scratch.split().freeze();
            self.links.queue(node, head);
            if !wire.payload.is_empty() {
                self.links.queue(node, wire.payload.clone());
            }
            Metrics::add(&self.shared.metrics.cluster_forwarded, 1);
        }
    }

    /// Delivers to this shard's matching sessions: one copy per session at the highest QoS of
    /// its matching subscriptions, with all their subscription ids (MQTT-3.3.4-2/3).
    fn deliver_local(&mut self, msg: &Arc<Message>) {
        let mut matched: SmallVec<[Subscriber; 8]> = SmallVec::new();
        self.routes
            .for_each_match(&msg.topic, |r| matched.extend(r.subs.iter().copied()));
        if matched.is_empty() {
            return;
        }
        matched.sort_unstable_by_key(|s| s.session);
        let mut i = 0;
        while i < matched.len() {
            let sidx = matched[i].session;
            let mut qos = QoS::AtMostOnce;
            let mut retain_as_published = false;
            let mut sub_ids: SmallVec<[u32; 1]> = SmallVec::new();
            let mut any = false;
            while i < matched.len() && matched[i].session == sidx {
                let s = matched[i];
                i += 1;
                if s.options.no_local && *self.session(sidx).session.client_id == *msg.publisher {
                    continue;
                }
                any = true;
                qos = qos.max(s.options.qos);
                retain_as_published |= s.options.retain_as_published;
                if let Some(id) = s.id {
                    sub_ids.push(id.get());
                }
            }
            if !any {
                continue;
            }
            if !self.first_copy(sidx, msg.id) {
                continue;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos: msg.qos.min(qos),
                // MQTT-3.3.1-9: live messages go out with retain 0 unless retain-as-published.
                retain: retain_as_published && msg.retain,
                sub_ids,
                share: None,
            };
            self.deliver(sidx, d);
        }
    }

    /// Sends a delivery now if the session's connection and window allow, else queues it.
    fn deliver(&mut self, sidx: u32, d: Delivery) {
        let (max_queued, policy, queue_qos0) = {
            let c = self.cfg();
            (c.max_queued_messages, c.queue_drop_policy, c.queue_qos0)
        };
        let entry = self.session_mut(sidx);
        if let Some(node) = entry.moving_to {
            // Its tail: bounded by the move's grace time, not the queue limit, since dropping
            // any of it loses what no other node has.
            entry.session.enqueue(d, usize::MAX, policy);
            if entry.move_ended {
                // Lingering: straight on to the node it moved to (which keeps one copy).
                let client_id = entry.session.client_id.clone();
                self.send_tail(sidx, client_id, node);
            }
            return;
        }
        let window = self.window(sidx);
        let entry = self.session_mut(sidx);
        let conn_slot = entry.conn;
        if conn_slot.is_none() && d.qos == QoS::AtMostOnce && !queue_qos0 {
            self.shared.metrics.dropped(DropReason::Qos0Offline);
            return;
        }
        let out_ok = match conn_slot {
            Some(slot) => self
                .conns
                .get_slot(slot)
                .map(|c| c.out_bytes < OUT_HIGH_WATER_BYTES)
                .unwrap_or(false),
            None => false,
        };
        let entry = self.session_mut(sidx);
        if let (Some(slot), true) = (
            conn_slot,
            out_ok && entry.session.can_send_now(d.qos, window),
        ) {
            let pid = if d.qos == QoS::AtMostOnce {
                0
            } else {
                entry.session.start_inflight(d.clone())
            };
            self.send_publish(slot, pid, &d, false);
            return;
        }
        if entry.session.enqueue(d, max_queued, policy) != Enqueued::Queued {
            self.shared.metrics.dropped(DropReason::QueueFull);
        }
    }

    /// The in-flight window of a session's current connection.
    fn window(&mut self, sidx: u32) -> usize {
        let cfg = self.cfg().max_inflight as usize;
        match self.session(sidx).conn {
            Some(slot) => self
                .conns
                .get_slot(slot)
                .map(|c| cfg.min(c.receive_max as usize))
                .unwrap_or(cfg),
            None => cfg,
        }
    }

    /// Moves queued messages to the connection while window and socket allow.
    fn pump(&mut self, sidx: u32) {
        let Some(slot) = self.session(sidx).conn else {
            return;
        };
        let window = self.window(sidx);
        loop {
            let full = self
                .conns
                .get_slot(slot)
                .map(|c| c.out_bytes >= OUT_HIGH_WATER_BYTES)
                .unwrap_or(true);
            if full {
                return;
            }
            let Some((pid, d)) = self.session_mut(sidx).session.next_to_send(window) else {
                return;
            };
            self.send_publish(slot, pid, &d, false);
        }
    }

    fn send_publish(&mut self, slot: u32, packet_id: u16, d: &Delivery, dup: bool) {
        let Some(conn) = self.conns.get_slot(slot) else {
            return;
        };
        let (protocol, max_out, alias_max) =
            (conn.protocol, conn.max_packet_out, conn.client_alias_max);
        let v5 = protocol == Protocol::V5;
        if d.msg.expires_at.is_some_and(|t| t <= Instant::now()) {
            // MQTT-3.3.2-5: an expired message is not sent.
            self.drop_delivery(slot, packet_id, DropReason::Expired);
            return;
        }
        // Only v5 deliveries that carry properties pay for building a property block; the
        // common case encodes straight from the shared topic and payload.
        let mut properties = None;
        if v5 && (d.msg.properties.is_some() || !d.sub_ids.is_empty() || d.msg.expires_at.is_some())
        {
            let mut p = d.msg.properties.as_deref().cloned().unwrap_or_default();
            p.subscription_identifiers = d.sub_ids.to_vec();
            if let Some(expires_at) = d.msg.expires_at {
                // MQTT-3.3.2-6: forward the remaining lifetime.
                let left = expires_at.saturating_duration_since(Instant::now());
                p.message_expiry_interval = Some(left.as_secs_f64().ceil() as u32);
            }
            properties = Some(p);
        }
        let empty = Properties::default();
        let props_ref = if v5 {
            Some(properties.as_ref().unwrap_or(&empty))
        } else {
            None
        };
        let dup = dup && d.qos != QoS::AtMostOnce;
        let topic: &str = &d.msg.topic;
        let payload_len = d.msg.payload.len();
        let header_len = encode_publish_header_parts(
            topic,
            d.qos,
            dup,
            d.retain,
            packet_id,
            props_ref,
            payload_len,
            &mut self.scratch,
        );
        // An alias definition adds 3 bytes to the header: keep room for it.
        if (header_len + payload_len + 3) as u64 > max_out as u64 {
            // MQTT-3.1.2-24: never send a packet larger than the client's maximum.
            self.scratch.clear();
            self.drop_delivery(slot, packet_id, DropReason::TooLarge);
            return;
        }
        if alias_max > 0 {
            // Topic aliases towards the client (MQTT-3.3.2.3.4): the first message on a topic
            // carries topic + alias, later ones only the alias; see `alias` for the bounds.
            let budget = self.shared.cfg.max_topic_alias_bytes;
            let Some(conn) = self.conns.get_slot(slot) else {
                return;
            };
            let aliases = conn.aliases.get_or_insert_with(Default::default);
            let table = aliases
                .outbound
                .get_or_insert_with(|| OutboundAliases::new(alias_max, budget));
            let (alias, topic) = match table.resolve(&d.msg.topic) {
                AliasUse::Known(a) => (Some(a), ""),
                AliasUse::Assign(a) => (Some(a), topic),
                AliasUse::None => (None, topic),
            };
            if let Some(alias) = alias {
                let mut p = properties.unwrap_or_default();
                p.topic_alias = Some(alias);
                self.scratch.clear();
                encode_publish_header_parts(
                    topic,
                    d.qos,
                    dup,
                    d.retain,
                    packet_id,
                    Some(&p),
                    payload_len,
                    &mut self.scratch,
                );
            }
        }
        let header = self.scratch.split().freeze();
        let Some(conn) = self.conns.get_slot(slot) else {
            return;
        };
        conn.push(header);
        conn.push(d.msg.payload.clone());
        Metrics::add(&self.shared.metrics.messages_sent, 1);
        self.mark_dirty(slot);
    }

    /// Gives up one delivery (expired, or too large for the client), counted as dropped.
    fn drop_delivery(&mut self, slot: u32, packet_id: u16, why: DropReason) {
        self.shared.metrics.dropped(why);
        if packet_id != 0 {
            if let Some(sidx) = self.conns.get_slot(slot).map(|c| c.session) {
                self.session_mut(sidx).session.abandon(packet_id);
            }
        }
    }

    fn set_retained(&mut self, msg: &Arc<Message>) {
        let value = if msg.payload.is_empty() {
            None
        } else {
            Some(msg.clone())
        };
        if !self.apply_retained(msg.topic.clone(), value.clone()) {
            // Counted and logged by the shard the PUBLISH arrived on (every replica refuses).
            let n = self
                .shared
                .metrics
                .retained_refused
                .fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                log::warn!(
                    "shard {}: retained store full ({} messages, {} bytes; \
                     mqtt.max_retained_messages / max_retained_bytes): not retaining {:?} \
                     ({} refused so far)",
                    self.id,
                    self.retained.len(),
                    self.retained.bytes(),
                    msg.topic,
                    n + 1
                );
            }
            return;
        }
        if self.shared.cluster.enabled.load(Ordering::Relaxed) {
            let cluster = self.mesh.cluster();
            self.mesh
                .send(cluster, MeshMsg::ClusterRetain { msg: msg.clone() });
        }
        for to in 0..self.mesh.shards() {
            if to != self.id {
                self.mesh.send(
                    to,
                    MeshMsg::Retain {
                        topic: msg.topic.clone(),
                        msg: value.clone(),
                    },
                );
            }
        }
    }

    /// Applies a retained message (or its removal) to this shard's replica; false when the
    /// store is full (`mqtt.max_retained_*`) and the message was not retained. Each replica
    /// applies the limit itself, so at the limit replicas may differ by the messages that
    /// raced for the last room.
    fn apply_retained(&mut self, topic: Arc<str>, msg: Option<Arc<Message>>) -> bool {
        match msg {
            Some(m) => {
                let (count, bytes) = (
                    self.cfg().max_retained_messages,
                    self.cfg().max_retained_bytes,
                );
                if !self.retained.fits(&topic, &m, count, bytes) {
                    return false;
                }
                self.retained.insert(topic, m);
            }
            None => {
                self.retained.remove(&topic);
            }
        }
        true
    }

    // ---------------------------------------------------------------- mesh

    fn on_mesh(&mut self, m: MeshMsg) {
        match m {
            MeshMsg::Publish(msg) => self.deliver_local(&msg),
            MeshMsg::RouteAdd { filter, shard, ack } => {
                self.route_add_local(&filter, shard as usize);
                self.mesh
                    .send(shard as usize, MeshMsg::RouteAck { token: ack });
            }
            MeshMsg::RouteAck { token } => self.on_route_ack(token),
            MeshMsg::RouteDel { filter, shard } => self.route_del(&filter, shard as usize),
            MeshMsg::Retain { topic, msg } => {
                self.apply_retained(topic, msg);
            }
            MeshMsg::Handoff(h) => self.on_handoff(*h),
            MeshMsg::ShareJoin { key, member } => self.group_join(key, member),
            MeshMsg::LinkAttach(a) => self.on_link_attach(*a),
            MeshMsg::NodeRoute { filter, node, add } => self.node_route(&filter, node, add),
            MeshMsg::NodeDown { node } => {
                self.node_down(node);
                for slot in self.links.of_node(node) {
                    self.links.remove(slot);
                }
            }
            MeshMsg::RemoteTakeover {
                client_id,
                want_session,
                token,
                node,
                at_ms,
            } => self.on_remote_takeover(client_id, want_session, token, node, at_ms),
            MeshMsg::SessionImport(e) => self.on_session_import(*e),
            MeshMsg::RemoteTakeoverEnd { client_id, node } => {
                self.on_remote_takeover_end(client_id, node)
            }
            MeshMsg::SessionTail {
                client_id,
                messages,
            } => self.on_session_tail(client_id, messages),
            MeshMsg::Query { token, kind } => {
                let rows = self.query_rows(kind);
                let cluster = self.mesh.cluster();
                self.mesh.send(cluster, MeshMsg::QueryReply { token, rows });
            }
            MeshMsg::ClusterRoute { .. }
            | MeshMsg::ClusterLinkLost { .. }
            | MeshMsg::ClusterRetain { .. }
            | MeshMsg::ClusterTakeover { .. }
            | MeshMsg::ClusterSessionExport(_)
            | MeshMsg::ClusterTakeoverEnd { .. }
            | MeshMsg::ClusterSessionTail { .. }
            | MeshMsg::QueryReply { .. } => {
                debug_assert!(false, "cluster-bound message delivered to a shard");
            }
            MeshMsg::ShareLeave {
                key,
                shard,
                session,
            } => self.group_leave(&key, shard, session),
            MeshMsg::ShareRouteAdd {
                filter,
                key,
                shard,
                ack,
            } => {
                self.share_route_add(&filter, &key, shard as usize);
                self.mesh
                    .send(shard as usize, MeshMsg::RouteAck { token: ack });
            }
            MeshMsg::ShareRouteDel { filter, key, shard } => {
                self.share_route_del(&filter, &key, shard as usize)
            }
            MeshMsg::SharedPublish { key, msg, tried } => self.shared_dispatch(key, msg, tried),
            MeshMsg::SharedDeliver {
                key,
                msg,
                member,
                tried,
                force,
            } => self.shared_deliver(key, msg, member, tried, force),
            MeshMsg::Shutdown => self.shared.shutdown.store(true, Ordering::Relaxed),
        }
    }

    fn on_route_ack(&mut self, token: u64) {
        if let Some(end) = self.pending_ends.get_mut(&token) {
            end.2 -= 1;
            if end.2 == 0 {
                let (client_id, node, _) = self.pending_ends.remove(&token).expect("present");
                self.takeover_end(client_id, node);
            }
            return;
        }
        self.sub_job_ack(token);
    }

    // ---------------------------------------------------------------- timers

    fn on_timer(&mut self, token: u64) {
        if token == TIMER_ACCEPT {
            self.ring.accept_multi(self.listener.as_raw_fd());
            return;
        }
        if token == TIMER_LINGER {
            self.drain_lingering();
            return;
        }
        if token & TIMER_WILL != 0 && token & TIMER_SESSION == 0 {
            let sidx = (token & !TIMER_WILL) as u32;
            let now = self.now_ms;
            let Some(Some(entry)) = self.sessions.get_mut(sidx as usize) else {
                return;
            };
            if entry.conn.is_some() {
                return;
            }
            let due = entry.pending_will.as_ref().map(|p| p.2);
            match due {
                Some(at) if at <= now => {
                    let (will, protocol, _) = *entry.pending_will.take().expect("checked above");
                    self.publish_will(sidx, will, protocol);
                }
                Some(at) => self.timers.schedule(at, token),
                None => {}
            }
            return;
        }
        if token == TIMER_SYS {
            self.publish_sys();
            let at = self.now_ms + self.cfg().sys_interval_s * 1000;
            self.timers.schedule(at, TIMER_SYS);
            return;
        }
        if token & TIMER_SESSION != 0 {
            let sidx = (token & !TIMER_SESSION) as u32;
            let Some(Some(entry)) = self.sessions.get(sidx as usize) else {
                return;
            };
            if entry.conn.is_some() {
                return;
            }
            if entry.expires_at_ms <= self.now_ms {
                if let (Some(node), true) = (entry.moving_to, entry.move_ended) {
                    let client_id = entry.session.client_id.clone();
                    self.send_tail(sidx, client_id, node);
                } else if entry.moving_to.is_some() {
                    log::info!(
                        "shard {}: session {:?} moved away, but its new node never said it \
                         routes it; dropping what was queued since",
                        self.id,
                        entry.session.client_id
                    );
                } else {
                    log::debug!(
                        "shard {}: session {:?} expired",
                        self.id,
                        entry.session.client_id
                    );
                }
                self.destroy_session(sidx);
            } else {
                let at = entry.expires_at_ms;
                self.timers.schedule(at, token);
            }
            return;
        }
        let (slot, gen) = (token as u32, (token >> 32) as u32);
        let now = self.now_ms;
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        // The wheel fires a token anywhere within its tick, possibly a little before the time
        // it was scheduled for: a token of this tick is the one `timer_ms` stands for.
        if conn.timer_ms / TICK_MS <= now / TICK_MS {
            conn.timer_ms = u64::MAX;
        }
        if conn.deadline_ms == u64::MAX {
            return;
        }
        if conn.parked {
            // Not read while paused: its keep-alive counts from when reading resumes.
            conn.deadline_ms = now + conn.keepalive_ms.max(TICK_MS);
        }
        if conn.deadline_ms > now {
            let at = conn.deadline_ms;
            if at < conn.timer_ms {
                conn.timer_ms = at;
                self.timers.schedule(at, token);
            }
            return;
        }
        let reason = match conn.state {
            ConnState::Connecting | ConnState::Resuming => {
                log::info!("shard {}: CONNECT not completed in time; closing", self.id);
                ReasonCode::MaximumConnectTime
            }
            ConnState::Active => {
                log::info!("shard {}: keep-alive expired; closing", self.id);
                ReasonCode::KeepAliveTimeout
            }
        };
        self.close(slot, Close::Error(reason));
    }

    /// Rows for the management API: this shard's clients (`kind` 1) or subscriptions (2), each
    /// a JSON object naming the node.
    fn query_rows(&mut self, kind: u8) -> Vec<String> {
        use crate::json::json_str;
        let node = json_str(&self.shared.cfg.node_name);
        let mut rows = Vec::new();
        for entry in self.sessions.iter().flatten() {
            let s = &entry.session;
            let id = json_str(&s.client_id);
            match kind {
                1 => rows.push(format!(
                    "{{\"clientid\":{id},\"node\":{node},\"connected\":{},\"subscriptions\":{},\"inflight\":{},\"queued\":{},\"dropped\":{}}}",
                    entry.conn.is_some(),
                    s.subscriptions.len(),
                    s.inflight_len(),
                    s.queue_len(),
                    s.dropped
                )),
                _ => {
                    for sub in &s.subscriptions {
                        rows.push(format!(
                            "{{\"clientid\":{id},\"topic\":{},\"qos\":{},\"node\":{node}}}",
                            json_str(&sub.filter),
                            sub.options.qos as u8
                        ));
                    }
                }
            }
        }
        rows
    }

    /// Publishes the node's counters under `$SYS/brokers/<node>/` (as EMQX does, not retained).
    fn publish_sys(&mut self) {
        let m = &self.shared.metrics;
        let r = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).to_string();
        let items: [(&str, String); 12] = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("uptime", (self.now_ms / 1000).to_string()),
            (
                "clients/connected",
                m.connections.load(Ordering::Relaxed).to_string(),
            ),
            ("clients/disconnected", r(&m.disconnects_total)),
            ("clients/total", r(&m.connections_total)),
            ("messages/received", r(&m.messages_received)),
            ("messages/sent", r(&m.messages_sent)),
            ("messages/dropped", r(&m.messages_dropped)),
            ("bytes/received", r(&m.bytes_received)),
            ("bytes/sent", r(&m.bytes_sent)),
            (
                "subscriptions/count",
                m.subscriptions.load(Ordering::Relaxed).max(0).to_string(),
            ),
            ("retained/count", self.retained.len().to_string()),
        ];
        // Drops per reason: messages/dropped/queue_full, ... (the figure names, shortened).
        let reasons: Vec<(String, String)> = m
            .figures()
            .into_iter()
            .filter_map(|(name, _, value, _)| {
                let reason = name
                    .strip_prefix("messages_dropped_")?
                    .strip_suffix("_total")?;
                Some((format!("messages/dropped/{reason}"), value.to_string()))
            })
            .collect();
        let prefix = format!("$SYS/brokers/{}/", self.cfg().node_name);
        let publisher: Arc<str> = "$SYS".into();
        let items = items
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .chain(reasons);
        for (name, value) in items {
            let msg = Message {
                topic: format!("{prefix}{name}").into(),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: None,
                publisher: publisher.clone(),
                expires_at: None,
                id: 0,
            };
            self.route(Arc::new(msg));
        }
    }

    // ---------------------------------------------------------------- output and closing

    fn conn_protocol(&mut self, slot: u32) -> Protocol {
        self.conns
            .get_slot(slot)
            .map(|c| c.protocol)
            .unwrap_or(Protocol::V311)
    }

    fn send_packet(&mut self, slot: u32, protocol: Protocol, packet: &Packet) {
        encode(packet, protocol, &mut self.scratch);
        let bytes: Bytes = self.scratch.split().freeze();
        if let Some(conn) = self.conns.get_slot(slot) {
            conn.push_ctrl(bytes);
            self.mark_dirty(slot);
        }
    }

    fn mark_dirty(&mut self, slot: u32) {
        if let Some(conn) = self.conns.get_slot(slot) {
            if !conn.dirty {
                conn.dirty = true;
                self.flush_list.push(slot);
            }
        }
    }

    fn flush_conns(&mut self) {
        let list = std::mem::take(&mut self.flush_list);
        for &slot in &list {
            let gen = self.conns.gen(slot);
            let Some(conn) = self.conns.get_mut(slot, gen) else {
                continue;
            };
            conn.dirty = false;
            if conn.ctrl_bytes > self.shared.cfg.max_conn_output_bytes {
                // A client that keeps provoking responses and never reads them (EMQX's
                // force_shutdown): cut it rather than hold its output without bound.
                log::info!(
                    "shard {}: closing a client that does not read: {} B of responses queued",
                    self.id,
                    conn.ctrl_bytes
                );
                Metrics::add(&self.shared.metrics.disconnects_output_overflow, 1);
                self.close(slot, Close::OutputOverflow);
                continue;
            }
            if conn.write_blocked {
                continue;
            }
            let before = conn.out_bytes;
            match conn.flush() {
                Ok(done) => {
                    let written = before - conn.out_bytes;
                    Metrics::add(&self.shared.metrics.bytes_sent, written as u64);
                    if !done {
                        conn.write_blocked = true;
                        let fd = conn.raw_fd();
                        self.ring.poll_writable(fd, slot, gen);
                    } else if conn.state == ConnState::Active {
                        // The socket drained: let queued messages follow.
                        let sidx = conn.session;
                        if self.session(sidx).session.queue_len() > 0 {
                            self.pump(sidx);
                        }
                    }
                }
                Err(e) => {
                    log::debug!("shard {}: write failed: {e}", self.id);
                    self.close(slot, Close::Abnormal);
                }
            }
        }
        let mut list = list;
        list.clear();
        if self.flush_list.is_empty() {
            self.flush_list = list;
        }
    }

    /// Closes a connection: sends what the reason calls for, publishes the will if due, and
    /// detaches (or ends) its session.
    fn close(&mut self, slot: u32, why: Close) {
        let Some(conn) = self.conns.get_slot(slot) else {
            return;
        };
        let protocol = conn.protocol;
        let active = conn.state == ConnState::Active;
        let problem_info = conn.problem_info;
        if active && protocol == Protocol::V5 {
            let reason = match why {
                Close::Error(r) => Some(r),
                Close::TakenOver => Some(ReasonCode::SessionTakenOver),
                Close::Shutdown => Some(ReasonCode::ServerShuttingDown),
                Close::Graceful | Close::Abnormal | Close::OutputOverflow => None,
            };
            if let Some(reason) = reason {
                // MQTT-3.14.2.2.3: a reason string only when the client did not opt out.
                let properties = Properties {
                    reason_string: problem_info.then(|| reason_text(reason).to_string()),
                    ..Default::default()
                };
                self.send_packet(
                    slot,
                    protocol,
                    &Packet::Disconnect(Disconnect { reason, properties }),
                );
            }
        }
        let Some(mut conn) = self.conns.remove(slot) else {
            return;
        };
        // Best effort: the last packets (CONNACK refusal, DISCONNECT) before the FIN.
        let _ = conn.flush();
        let will = match why {
            Close::Abnormal | Close::Error(_) | Close::OutputOverflow => conn.will.take(),
            Close::Graceful => conn.will.take(), // only kept for v5 reason 0x04
            Close::TakenOver | Close::Shutdown => None,
        };
        let sidx = conn.session;
        let Conn { fd, .. } = conn;
        if matches!(why, Close::Error(_)) {
            // A reason was sent: let the client read it (see LINGER_MS).
            self.linger(fd);
        } else {
            // SAFETY: shutdown on a descriptor we own; it ends any pending receive on the
            // ring, whose completion is then ignored by generation.
            unsafe {
                libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        Metrics::add(&self.shared.metrics.disconnects_total, 1);
        if !active {
            return;
        }
        let now = self.now_ms;
        let entry = self.session_mut(sidx);
        if entry.conn != Some(slot) {
            return;
        }
        entry.conn = None;
        let ephemeral = entry.session.ephemeral;
        if let Some(will) = will {
            let delay_s = will.properties.will_delay_interval.unwrap_or(0) as u64;
            if protocol == Protocol::V5 && delay_s > 0 && !ephemeral {
                // MQTT-3.1.3-9: the will waits for its delay or the session's end, whichever
                // comes first, and is dropped if the session resumes before.
                let at = now + (delay_s * 1000).min(entry.expires_at_ms);
                entry.pending_will = Some(Box::new((*will, protocol, at)));
                self.timers.schedule(at, TIMER_WILL | sidx as u64);
            } else {
                self.publish_will(sidx, *will, protocol);
            }
        }
        self.redispatch_shared(sidx);
        if ephemeral {
            self.destroy_session(sidx);
        } else {
            let entry = self.session_mut(sidx);
            let at = now + entry.expires_at_ms;
            entry.expires_at_ms = at;
            self.timers.schedule(at, TIMER_SESSION | sidx as u64);
        }
    }

    /// Half-closes a socket that was just told why it is closed and keeps it, drained, until
    /// the client closes too or `LINGER_MS` pass: closing with its input unread would make
    /// the kernel reset the connection, and the client would never read the reason.
    fn linger(&mut self, fd: OwnedFd) {
        // SAFETY: shutdown on a descriptor we own; sends FIN after the queued reason.
        unsafe {
            libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR);
        }
        if self.lingering.len() >= LINGER_SOCKETS_MAX {
            if let Some(old) = self.lingering.pop_front() {
                close_now(old.fd);
            }
        }
        if self.lingering.is_empty() {
            self.timers.schedule(self.now_ms + TICK_MS, TIMER_LINGER);
        }
        self.lingering.push_back(Lingering {
            fd,
            until_ms: self.now_ms + LINGER_MS,
            drained: 0,
        });
    }

    /// Reads and discards what lingering sockets received; closes those at EOF, in error,
    /// past their deadline or past `LINGER_DRAIN_BYTES_MAX`.
    fn drain_lingering(&mut self) {
        let now = self.now_ms;
        let mut buf = [0u8; 4096];
        let mut kept = std::collections::VecDeque::with_capacity(self.lingering.len());
        for mut l in self.lingering.drain(..) {
            let open = loop {
                // SAFETY: reads into a stack buffer of the length given, from an owned fd.
                let n = unsafe {
                    libc::recv(
                        l.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    l.drained += n as usize;
                    if l.drained > LINGER_DRAIN_BYTES_MAX {
                        break false;
                    }
                    continue;
                }
                if n < 0 {
                    match std::io::Error::last_os_error().kind() {
                        std::io::ErrorKind::Interrupted => continue,
                        std::io::ErrorKind::WouldBlock => break now < l.until_ms,
                        _ => break false,
                    }
                }
                break false; // EOF: the client read the reason and closed.
            };
            if open {
                kept.push_back(l);
            } else {
                close_now(l.fd);
            }
        }
        self.lingering = kept;
        if !self.lingering.is_empty() {
            self.timers.schedule(now + TICK_MS, TIMER_LINGER);
        }
    }

    fn publish_will(&mut self, sidx: u32, will: Will, protocol: Protocol) {
        let publisher = self.session(sidx).session.client_id.clone();
        let properties = (protocol == Protocol::V5 && !will.properties.is_empty()).then(|| {
            let mut p = will.properties;
            p.will_delay_interval = None;
            Box::new(p)
        });
        let expires_at = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| Instant::now() + Duration::from_secs(s as u64));
        let msg = Arc::new(Message {
            topic: will.topic.as_str().into(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            publisher,
            expires_at,
            id: self.next_message_id(),
        });
        if msg.retain && self.cfg().retain_available {
            self.set_retained(&msg);
        }
        self.route(msg);
    }

    // ---------------------------------------------------------------- cluster data links

    fn on_link_attach(&mut self, a: LinkAttach) {
        let node = a.node;
        let (slot, gen) = self
            .links
            .attach(node, a.epoch, a.fd, a.outbound, a.unsent, &a.received);
        let fd = self
            .links
            .get_mut(slot, gen)
            .and_then(|l| l.raw_fd())
            .expect("attached with a socket");
        log::debug!(
            "shard {}: data link {} node {node} attached",
            self.id,
            if a.outbound { "to" } else { "from" }
        );
        self.ring.recv_multi_as(fd, Token::LinkRecv { slot, gen });
        if !a.received.is_empty() {
            self.link_frames(slot, gen);
        }
    }

    fn on_link_recv(&mut self, slot: u32, gen: u32, mut c: Completion) {
        // Given back to the pool when dropped, whatever the result.
        let buf = c.take_buffer();
        let Some(link) = self.links.get_mut(slot, gen) else {
            return;
        };
        if c.result > 0 {
            if let Some(buf) = buf {
                link.reader.extend(buf.bytes());
            }
            if !self.link_frames(slot, gen) {
                return;
            }
        } else if c.result == 0 || (c.result != -libc::ENOBUFS && c.result != -libc::ECANCELED) {
            self.link_lost(slot, "closed by peer");
            return;
        }
        if !c.more() {
            if let Some(fd) = self.links.get_mut(slot, gen).and_then(|l| l.raw_fd()) {
                self.ring.recv_multi_as(fd, Token::LinkRecv { slot, gen });
            }
        }
    }

    /// Routes every complete frame received on a link; false if the link was closed.
    fn link_frames(&mut self, slot: u32, gen: u32) -> bool {
        loop {
            let Some(link) = self.links.get_mut(slot, gen) else {
                return false;
            };
            let node = link.node;
            match link.reader.next_frame() {
                Ok(None) => return true,
                Ok(Some(Frame::Publish {
                    msg,
                    normal,
                    shared,
                })) => {
                    // A peer's topic is checked as a client's PUBLISH topic (MQTT-3.3.2-2).
                    if !crate::cluster::valid_peer_topic(&msg.topic, self.cfg().max_topic_levels) {
                        log::warn!(
                            "shard {}: node {node} forwarded a message with an invalid topic; \
                             dropped",
                            self.id
                        );
                        continue;
                    }
                    let Some(msg) = from_wire(msg) else { continue };
                    let shared = shared.into_iter().map(Arc::from).collect();
                    self.route_with(msg, normal, Some(shared));
                }
                Ok(Some(_)) => {
                    log::warn!(
                        "shard {}: unexpected frame on a data link from node {node}",
                        self.id
                    );
                    self.link_lost(slot, "unexpected frame");
                    return false;
                }
                Err(e) => {
                    log::warn!("shard {}: bad frame from node {node}: {e}", self.id);
                    self.link_lost(slot, "bad frame");
                    return false;
                }
            }
        }
    }

    /// Drops a failed link and tells the cluster thread, which takes the peer down; its
    /// links are set up anew when it comes back.
    fn link_lost(&mut self, slot: u32, why: &str) {
        let Some(link) = self.links.remove(slot) else {
            return;
        };
        log::info!(
            "shard {}: data link with node {} lost: {why}",
            self.id,
            link.node
        );
        let cluster = self.mesh.cluster();
        self.mesh.send(
            cluster,
            MeshMsg::ClusterLinkLost {
                node: link.node,
                epoch: link.epoch,
            },
        );
    }

    /// Writes every link with queued frames (one `writev` per link per turn, more only when
    /// a batch exceeds the iovec limit), then applies backpressure.
    fn flush_links(&mut self) {
        let dirty = std::mem::take(&mut self.links.dirty);
        let mut writes = 0;
        for &slot in &dirty {
            let Some((gen, link)) = self.links.get_slot(slot) else {
                continue;
            };
            let Some(fd) = link.raw_fd() else { continue };
            if link.write_blocked || link.out.is_empty() {
                continue;
            }
            match write_queue::<LINK_IOV_MAX>(fd, &mut link.out, &mut link.out_bytes, &mut writes) {
                Ok(true) => {}
                Ok(false) => {
                    link.write_blocked = true;
                    self.ring
                        .poll_writable_as(fd, Token::LinkWritable { slot, gen });
                }
                Err(e) => self.link_lost(slot, &e.to_string()),
            }
        }
        Metrics::add(&self.shared.metrics.cluster_link_writes, writes);
        let mut dirty = dirty;
        dirty.clear();
        if self.links.dirty.is_empty() {
            self.links.dirty = dirty;
        }
        let limit = self.cfg().cluster.link_buffer_bytes;
        if !self.paused && self.links.any_above(limit) {
            self.paused = true;
            Metrics::add(&self.shared.metrics.cluster_backpressure, 1);
            self.shared
                .metrics
                .cluster_paused_shards
                .fetch_add(1, Ordering::Relaxed);
            log::debug!("shard {}: link to a peer is full; pausing clients", self.id);
        } else if self.paused && !self.links.any_above(limit / 2) {
            self.resume();
        }
    }

    /// Stops reading a connection that delivered bytes while paused. Returns false for
    /// connections that are not paused (still connecting: their CONNECT is not held up).
    fn park(&mut self, slot: u32, gen: u32, armed: bool) -> bool {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return false;
        };
        if conn.state != ConnState::Active {
            return false;
        }
        if !conn.parked {
            conn.parked = true;
            self.parked.push((slot, gen));
            if armed {
                self.ring.cancel(Token::Recv { slot, gen });
            }
        }
        true
    }

    /// Links drained: read the paused connections again, starting with what they had sent.
    fn resume(&mut self) {
        self.paused = false;
        self.shared
            .metrics
            .cluster_paused_shards
            .fetch_sub(1, Ordering::Relaxed);
        log::debug!("shard {}: links drained; resuming clients", self.id);
        for (slot, gen) in std::mem::take(&mut self.parked) {
            let Some(conn) = self.conns.get_mut(slot, gen) else {
                continue;
            };
            conn.parked = false;
            let fd = conn.raw_fd();
            let stashed = !conn.partial.is_empty();
            self.ring.recv_multi(fd, slot, gen);
            if stashed {
                self.on_bytes(slot, gen, &[]);
            }
        }
    }

    fn shutdown(&mut self) {
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

/// The v5 subscription options byte (MQTT 3.8.3.1), used to move subscriptions between nodes.
fn options_to_byte(o: SubscriptionOptions) -> u8 {
    o.qos as u8
        | (o.no_local as u8) << 2
        | (o.retain_as_published as u8) << 3
        | (o.retain_handling as u8) << 4
}

fn options_from_byte(b: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::from_u8(b & 3).unwrap_or(QoS::AtMostOnce),
        no_local: b & 0x04 != 0,
        retain_as_published: b & 0x08 != 0,
        retain_handling: match (b >> 4) & 3 {
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => RetainHandling::SendAtSubscribe,
        },
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Errors of accept that mean the process or system is out of descriptors or memory.
fn is_resource_shortage(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// Closes a socket now; the shutdown first ends any receive the ring still has on it (the
/// ring holds the file until that completes).
fn close_now(fd: OwnedFd) {
    // SAFETY: shutdown on a descriptor we own.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// The key a client's source address is counted under for `mqtt.max_sessions_per_ip`: an
/// IPv4 address (also when IPv4-mapped), or an IPv6 /64 (one subscriber's usual allocation)
/// folded to 32 bits (two prefixes may share a quota); 0 when the address cannot be read.
fn origin_key(fd: std::os::fd::RawFd) -> u32 {
    // SAFETY: the TcpStream borrows a descriptor the connection owns and is never dropped
    // (ManuallyDrop), so it does not close it; only getpeername is called on it.
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    let Ok(addr) = stream.peer_addr() else {
        return 0;
    };
    let key = match addr.ip() {
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

/// A random upper half for this shard's message ids, never zero (0 means "no id").
fn random_id_base() -> u64 {
    use std::hash::BuildHasher;
    let high = std::collections::hash_map::RandomState::new().hash_one(std::process::id()) >> 32;
    high.max(1) << 32
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

fn message_from(p: Publish, publisher: Arc<str>, id: u64) -> Message {
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
        .map(|s| Instant::now() + Duration::from_secs(s as u64));
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
    fn session_entry_fits_its_memory_budget() {
        let size = std::mem::size_of::<Option<SessionEntry>>();
        // 200: the subscription list's index pointer (8 bytes) keeps SUBSCRIBE linear.
        assert!(size <= 200, "SessionEntry grew to {size} bytes");
    }
}
