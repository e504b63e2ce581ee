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
use crate::cluster::{from_wire, to_wire};
use crate::config::BrokerConfig;
use crate::conn::write_queue;
use crate::conn::{Conn, ConnSlab, ConnState};
use crate::link::{Links, LINK_IOV_MAX};
use crate::mesh::{Handoff, LinkAttach, MeshEndpoint, MeshMsg, SessionExport};
use crate::message::Message;
use crate::metrics::{DropReason, Metrics};
use crate::ring::{Completion, Ring, Token};
use crate::session::{Delivery, Enqueued, InflightState, Session, Subscription};
use crate::shard_set::ShardSet;
use crate::shared::{self, Group, Member};
use crate::timer::{TimerWheel, TICK_MS};
use crate::topic;
use crate::topic_index::TopicIndex;
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod connect;
mod input;
mod packets;
mod routes;
mod share;
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

/// State shared by every shard of the node.
pub struct NodeShared {
    pub cfg: BrokerConfig,
    pub metrics: Metrics,
    /// Set once to stop every shard.
    pub shutdown: AtomicBool,
    /// The cluster thread's control queue and peer count.
    pub cluster: Arc<crate::cluster::ClusterControl>,
    /// Rings the cluster thread after a control command was queued.
    pub cluster_bell: Arc<crate::mesh::Doorbell>,
}

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

/// Stable hash of a client id choosing its home shard (FNV-1a: identical on every thread and
/// every run, unlike a seeded hasher).
pub fn home_shard(client_id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in client_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % shards as u64) as usize
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
        use crate::cluster::json_str;
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
    fn home_shard_is_stable_and_spreads() {
        assert_eq!(home_shard("client-1", 8), home_shard("client-1", 8));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[home_shard(&format!("c{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn session_entry_fits_its_memory_budget() {
        let size = std::mem::size_of::<Option<SessionEntry>>();
        // 200: the subscription list's index pointer (8 bytes) keeps SUBSCRIBE linear.
        assert!(size <= 200, "SessionEntry grew to {size} bytes");
    }
}
