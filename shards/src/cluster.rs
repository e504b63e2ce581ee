//! The cluster endpoint: one thread per node that keeps a control link to every other node,
//! replicates this node's routes and retained messages to them, and carries client-id
//! takeovers, session transfers and management queries.
//!
//! It is the last endpoint of the mesh, so shards talk to it exactly as to each other. Control
//! links are plain non-blocking TCP sockets driven by `poll(2)` together with the endpoint's
//! doorbell ([`PollDriver`]). The state and every decision ([`Cluster`]) are a sans-IO core: it
//! holds its links as opaque [`Sock`]s, asks the world for sockets, nonces, the wall clock and
//! the saved member list through a [`ClusterIo`], and is handed the time on the node's clock
//! with each [`Cluster::turn`], so the simulator can run it on a virtual network. Messages do not pass through here: when a peer comes up, this thread dials one
//! *data link* per local shard to it, authenticates each, and hands the socket to its shard
//! (see [`crate::link`]); the peer hands the accepting end to one of its shards. A data link
//! that fails takes the peer down, and everything is set up anew when it is back.
//!
//! Each node is the only writer of its own routes: the home shard of a filter reports when the
//! node gains or loses its last subscriber for it, this thread numbers the change and sends it
//! to every peer, and a (re)connected peer gets a full snapshot. A peer that goes down simply
//! has its routes dropped by every shard (`NodeDown`); nothing needs merging when it returns.
//!
//! Everything a peer sends is hostile input, before and after the handshake: a link that has
//! not proven the cookie may send small frames only, must finish within
//! [`HANDSHAKE_TIMEOUT_MS`], and only [`HANDSHAKES_MAX`] such links are accepted at once; an
//! authenticated peer's filters, topics, names, member lists and session transfers are checked
//! as a client's would be before they reach a shard, the disk or a dial.
//!
//! Where it lives:
//! - [`config`]: settings, node names and cluster addresses, and their checks.
//! - [`driver`]: one round of the thread ([`Cluster::turn`]), accepting, dialling, reading and
//!   writing links under their bounds.
//! - [`io`]: [`ClusterIo`], everything the core asks of the world.
//! - [`poll_driver`]: the thread's `poll(2)` loop, and [`ClusterIo`] on real sockets and disk.
//! - [`handshake`]: `Hello`/`Auth` (HMAC proof of the cookie), a link coming up.
//! - [`membership`]: peers, the member list, heartbeats, redial, autoclean, join/leave.
//! - [`peer_frames`]: what an authenticated peer sends (one dispatch, all checked).
//! - [`replication`]: what the shards send (routes, retained, the session move's shard side).
//! - [`session_move`]: collecting takeover answers for a resuming client.
//! - [`queries`]: management requests, status and cluster-wide listings.

mod config;
mod driver;
mod handshake;
#[cfg(test)]
mod inspect;
mod io;
mod membership;
mod peer_frames;
mod poll_driver;
mod queries;
mod replication;
mod session_move;
#[cfg(test)]
mod tests;

use config::shown;
pub use config::{
    exposed_with_shipped_cookie, name_matches_ip, node_addr, valid_cluster_addr, valid_node_name,
    ClusterConfig, Discovery, DEFAULT_PORT, NODE_NAME_MAX_BYTES, SHIPPED_COOKIE,
};
pub use driver::LinkInterest;
pub use io::ClusterIo;
pub use poll_driver::PollDriver;

use crate::hash::{Map as HashMap, Set as HashSet};
use crate::json::{flat_json_object, json_str};
use crate::mesh::{MeshEndpoint, MeshMsg, SessionExport};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::node_shared::{home_shard, ClusterControl, ControlCmd, NodeShared, QueryKind};
use crate::peer_input::{valid_peer_filter, valid_peer_topic, MQTT_STRING_MAX_BYTES};
use crate::sock::Sock;
use crate::wire::{from_wire, to_wire};
use bytes::{Bytes, BytesMut};
use shardmq_net::cluster::{
    handshake_proof, verify_proof, Frame, FrameReader, Nonce, Role, Transcript, WireSubscription,
    CLUSTER_PROTOCOL_VERSION, FRAME_MAX_BYTES, HANDSHAKE_FRAME_MAX_BYTES,
};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

/// Most peers a node links to (node indices are bits of a `u64`).
pub const PEERS_MAX: usize = 64;
/// Time a new link has to complete the handshake (a dialled one: to connect, too).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Most accepted links in their handshake at once; more are closed at accept (and counted in
/// one log line per [`REFUSED_LOG_INTERVAL_MS`]). A node's peers open one link per shard each
/// when they come up, so this is far above what a cluster needs at a time.
pub const HANDSHAKES_MAX: usize = 256;
const REFUSED_LOG_INTERVAL_MS: u64 = 10_000;
/// Bytes queued to one link before the peer is deemed not to read: the link is closed (the
/// peer goes down and is re-synced when it is back) rather than queueing without bound.
pub const LINK_OUT_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Bytes read from one link per round, so one busy peer cannot hold the thread.
const READ_BUDGET_BYTES: usize = 1024 * 1024;
/// How far a peer's takeover time may lie in the past (ms); it is never taken from the future.
const TAKEOVER_SKEW_MAX_MS: u64 = 10_000;
/// Time a node waits for the other nodes' sessions before answering a resuming CONNECT.
const SESSION_WAIT_MS: u64 = 3_000;
/// Time a node waits for its shards' and the other nodes' rows of a listing.
const QUERY_WAIT_MS: u64 = 3_000;

/// Who asked a pending query.
enum QueryOrigin {
    Local(mpsc::Sender<Result<String, String>>),
    /// Another node (index), with its own token.
    Peer(usize, u64),
}

/// A listing being collected from this node's shards (and, when asked here, other nodes).
struct PendingQuery {
    origin: QueryOrigin,
    shards_left: usize,
    peers_left: HashSet<usize>,
    rows: Vec<String>,
    /// On the node's clock (ms).
    deadline_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerState {
    Up,
    Down,
    /// Left the cluster (or was told to leave): not dialled again.
    Gone,
}

/// What we know of another node.
struct Peer {
    name: String,
    addr: String,
    state: PeerState,
    link: Option<usize>,
    /// When we last dialled it (node clock, ms).
    last_dial_ms: Option<u64>,
    uptime_s: u64,
    connections: u64,
    routes: HashSet<String>,
    route_seq: u64,
    /// Bumped each time the peer comes up; data links carry it.
    epoch: u32,
    /// Since when it is down (for autoclean; node clock, ms).
    down_since_ms: u64,
    /// Up, between links: its link was superseded by the other link of a pair dialled at
    /// once, which has not finished its handshake here yet; down if it has not by then.
    relink_until_ms: Option<u64>,
}

/// One TCP connection to a peer, before or after the handshake.
struct Link {
    sock: Sock,
    reader: FrameReader,
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Our nonce on this link, fresh from [`ClusterIo::nonce`].
    nonce: Nonce,
    /// The peer's, from its `Hello`.
    peer_nonce: Option<Nonce>,
    /// We opened this link (we prove first; the peer proves as the acceptor).
    dialed: bool,
    /// The address the TCP connection is with, for the node-name check.
    remote_ip: Option<IpAddr>,
    peer_name: Option<String>,
    peer_addr: String,
    authed: bool,
    hello_seen: bool,
    /// When the link was opened and last read from (node clock, ms).
    started_ms: u64,
    last_rx_ms: u64,
    closed: bool,
    /// A data link: the dialling node's shard it carries frames from.
    data_shard: Option<u16>,
    /// We dialled this data link (it becomes our shard's outbound link).
    data_out: bool,
    /// An authenticated inbound data link waiting for its peer's control link to come up;
    /// not read meanwhile.
    data_waiting: bool,
}

/// A resuming CONNECT waiting for the other nodes' answers.
struct PendingTakeover {
    shard: u16,
    client_id: Arc<str>,
    waiting: HashSet<u8>,
    found: Option<Box<SessionExport>>,
    /// On the node's clock (ms).
    deadline_ms: u64,
}

/// The cluster thread's state.
/// Most mesh messages the cluster thread takes per round.
const MESH_BUDGET: usize = 4096;

pub struct Cluster {
    node: String,
    advertised: String,
    cfg: ClusterConfig,
    mesh: MeshEndpoint,
    control: Arc<ClusterControl>,
    metrics: Arc<NodeShared>,
    /// Sockets, nonces, the wall clock and the saved member list.
    io: Box<dyn ClusterIo>,
    peers: Vec<Peer>,
    links: Vec<Option<Link>>,
    local_routes: HashSet<String>,
    route_seq: u64,
    retained: HashMap<String, Arc<Message>>,
    /// Topic + payload bytes in `retained`.
    retained_bytes: usize,
    pending: HashMap<u64, PendingTakeover>,
    /// `TakeoverEnd`s to send once this mesh round is over (see `run`).
    takeover_ends: Vec<(Arc<str>, u8)>,
    queries: HashMap<u64, PendingQuery>,
    next_query: u64,
    /// When the thread started (node clock, ms), for the uptime it reports.
    started_at_ms: u64,
    /// When it started in Unix ms, told to peers in `Hello`.
    started_ms: u64,
    last_heartbeat_ms: u64,
    /// Accepts refused because [`HANDSHAKES_MAX`] links were in their handshake, since the
    /// last log line about it.
    refused_accepts: u64,
    refused_logged_ms: Option<u64>,
    scratch: BytesMut,
    /// Now, on the node's clock (ms), as the driver last read it.
    now_ms: u64,
}

impl Cluster {
    /// The core of a node's cluster thread, reached by peers at `advertised` (`host:port`).
    /// A node with `cfg.bind` set listens (its `io` accepts), joins and redials; without it
    /// the cluster is off. Nothing happens until [`Cluster::start`].
    pub fn new(
        cfg: ClusterConfig,
        shared: Arc<NodeShared>,
        mesh: MeshEndpoint,
        control: Arc<ClusterControl>,
        io: Box<dyn ClusterIo>,
        advertised: String,
    ) -> Cluster {
        let node = shared.cfg.node_name.clone();
        if cfg.bind.is_some() {
            control.enabled.store(true, Ordering::Relaxed);
        }
        let started_ms = io.unix_ms();
        Cluster {
            node,
            advertised,
            cfg,
            mesh,
            control,
            metrics: shared,
            io,
            peers: Vec::new(),
            links: Vec::new(),
            local_routes: HashSet::default(),
            route_seq: 0,
            retained: HashMap::default(),
            retained_bytes: 0,
            pending: HashMap::default(),
            takeover_ends: Vec::new(),
            queries: HashMap::default(),
            next_query: 1,
            started_at_ms: 0,
            started_ms,
            last_heartbeat_ms: 0,
            refused_accepts: 0,
            refused_logged_ms: None,
            scratch: BytesMut::with_capacity(64 * 1024),
            now_ms: 0,
        }
    }

    /// The address peers reach this node at.
    pub fn advertised(&self) -> &str {
        &self.advertised
    }

    /// Whether this node has a cluster listener (`cluster.bind`): only then does it join,
    /// accept and redial.
    fn listening(&self) -> bool {
        self.cfg.bind.is_some()
    }
}
