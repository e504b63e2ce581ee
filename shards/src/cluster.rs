//! The cluster endpoint: one thread per node that keeps a control link to every other node,
//! replicates this node's routes and retained messages to them, and carries client-id
//! takeovers, session transfers and management queries.
//!
//! It is the last endpoint of the mesh, so shards talk to it exactly as to each other. Control
//! links are plain non-blocking TCP sockets driven by `poll(2)` together with the endpoint's
//! doorbell. Messages do not pass through here: when a peer comes up, this thread dials one
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
//! [`HANDSHAKE_TIMEOUT`], and only [`HANDSHAKES_MAX`] such links are accepted at once; an
//! authenticated peer's filters, topics, names, member lists and session transfers are checked
//! as a client's would be before they reach a shard, the disk or a dial.

use crate::json::{flat_json_object, json_str};
use crate::mesh::{MeshEndpoint, MeshMsg, SessionExport};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::node_shared::{home_shard, ClusterControl, ControlCmd, NodeShared, QUERY_METRICS};
// `pub(crate)`: the shards still name it by this path.
pub(crate) use crate::peer_input::valid_peer_topic;
use crate::peer_input::{valid_peer_filter, MQTT_STRING_MAX_BYTES};
use crate::wire::{from_wire, to_wire};
use bytes::{Bytes, BytesMut};
use shardmq_net::cluster::{
    fresh_nonce, handshake_proof, verify_proof, Frame, FrameReader, Nonce, Role, Transcript,
    WireSubscription, CLUSTER_PROTOCOL_VERSION, FRAME_MAX_BYTES, HANDSHAKE_FRAME_MAX_BYTES,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Most peers a node links to (node indices are bits of a `u64`).
pub const PEERS_MAX: usize = 64;
/// Default cluster port, used when a node is named without one.
pub const DEFAULT_PORT: u16 = 4370;
/// Time a new link has to complete the handshake (a dialled one: to connect, too).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most accepted links in their handshake at once; more are closed at accept (and counted in
/// one log line per [`REFUSED_LOG_INTERVAL`]). A node's peers open one link per shard each
/// when they come up, so this is far above what a cluster needs at a time.
pub const HANDSHAKES_MAX: usize = 256;
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Bytes queued to one link before the peer is deemed not to read: the link is closed (the
/// peer goes down and is re-synced when it is back) rather than queueing without bound.
pub const LINK_OUT_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Bytes read from one link per round, so one busy peer cannot hold the thread.
const READ_BUDGET_BYTES: usize = 1024 * 1024;
/// Longest node name or cluster address accepted from a peer.
pub const NODE_NAME_MAX_BYTES: usize = 255;
/// How far a peer's takeover time may lie in the past (ms); it is never taken from the future.
const TAKEOVER_SKEW_MAX_MS: u64 = 10_000;
/// The cookie in the shipped configuration: a node listening beyond loopback with it is
/// joinable by anyone who read the docs, and says so at start-up.
pub const SHIPPED_COOKIE: &str = "shardmq-cluster-cookie";
/// Time a node waits for the other nodes' sessions before answering a resuming CONNECT.
const SESSION_WAIT: Duration = Duration::from_secs(3);

/// How a node finds its peers at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// `shardmq ctl cluster join` only.
    Manual,
    /// Join the listed seeds (`name@host[:port]`) at start-up.
    Static(Vec<String>),
}

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Cluster listener; `None` = this node never clusters.
    pub bind: Option<SocketAddr>,
    /// Shared secret checked on every link handshake.
    pub cookie: String,
    pub discovery: Discovery,
    /// Interval of heartbeats, in ms.
    pub heartbeat_ms: u64,
    /// Silence after which a peer is marked down, in ms.
    pub down_after_ms: u64,
    /// A peer down this long (ms) is removed from the cluster (EMQX's autoclean); 0 = never.
    pub autoclean_ms: u64,
    /// Where the member list is kept across restarts.
    pub data_dir: PathBuf,
    /// Bytes a shard queues on its link to one peer before it drops QoS 0 and pauses its
    /// clients (backpressure).
    pub link_buffer_bytes: usize,
    /// Accept a peer whose node name's host is not the address its link comes from (NAT,
    /// names that do not resolve here). Off: such a peer is refused after the handshake.
    pub allow_node_name_mismatch: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            bind: None,
            cookie: SHIPPED_COOKIE.into(),
            discovery: Discovery::Manual,
            heartbeat_ms: 1000,
            down_after_ms: 5000,
            autoclean_ms: 24 * 3600 * 1000,
            data_dir: PathBuf::from("./data"),
            link_buffer_bytes: 16 * 1024 * 1024,
            allow_node_name_mismatch: false,
        }
    }
}

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
    deadline: Instant,
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
    last_dial: Option<Instant>,
    uptime_s: u64,
    connections: u64,
    routes: HashSet<String>,
    route_seq: u64,
    /// Bumped each time the peer comes up; data links carry it.
    epoch: u32,
    /// Since when it is down (for autoclean).
    down_since: Instant,
}

/// One TCP connection to a peer, before or after the handshake.
struct Link {
    stream: TcpStream,
    reader: FrameReader,
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Our nonce on this link, fresh from the OS.
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
    started: Instant,
    last_rx: Instant,
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
    deadline: Instant,
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
    listener: Option<TcpListener>,
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
    started: Instant,
    started_ms: u64,
    last_heartbeat: Instant,
    /// Accepts refused because [`HANDSHAKES_MAX`] links were in their handshake, since the
    /// last log line about it.
    refused_accepts: u64,
    refused_logged: Option<Instant>,
    scratch: BytesMut,
}

/// True for `name@host[:port]` made of characters that need no escaping anywhere (JSON,
/// Prometheus labels, logs, the member file): letters, digits, `-_.` in the name, and
/// `-.:[]` in the host.
pub fn valid_node_name(node: &str) -> bool {
    let Some((name, host)) = node.split_once('@') else {
        return false;
    };
    node.len() <= NODE_NAME_MAX_BYTES
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && valid_host(host)
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= NODE_NAME_MAX_BYTES
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// True for a cluster address `host:port` a peer may tell us to dial.
pub fn valid_cluster_addr(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| valid_host(host) && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// True when the host of node name `node` is `ip` or resolves to it. Called only for a peer
/// that has proven the cookie (a host name costs a resolver look-up).
pub fn name_matches_ip(node: &str, ip: IpAddr) -> bool {
    let Some(addr) = node_addr(node) else {
        return false;
    };
    let want = ip.to_canonical();
    addr.to_socket_addrs()
        .is_ok_and(|mut all| all.any(|a| a.ip().to_canonical() == want))
}

/// A name from a peer for a log line: as is when it is a valid node name, quoted and
/// escaped otherwise (so it cannot forge log lines).
fn shown(name: &str) -> String {
    if valid_node_name(name) {
        name.to_string()
    } else {
        format!("{:?}", name.chars().take(64).collect::<String>())
    }
}

/// True when a listener on `bind` with `cookie` lets anyone beyond this host join.
pub fn exposed_with_shipped_cookie(bind: SocketAddr, cookie: &str) -> bool {
    !bind.ip().is_loopback() && cookie == SHIPPED_COOKIE
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Host part of `name@host[:port]` and the cluster address it stands for.
pub fn node_addr(node: &str) -> Option<String> {
    let (_, host) = node.split_once('@')?;
    if host.is_empty() {
        return None;
    }
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        Some(host.to_string())
    } else {
        Some(format!("{host}:{DEFAULT_PORT}"))
    }
}

impl Cluster {
    /// Binds the cluster listener (if any); the thread is started with [`Cluster::run`].
    pub fn new(
        cfg: ClusterConfig,
        shared: Arc<NodeShared>,
        mesh: MeshEndpoint,
        control: Arc<ClusterControl>,
    ) -> std::io::Result<Cluster> {
        let node = shared.cfg.node_name.clone();
        let listener = match cfg.bind {
            Some(addr) => {
                if exposed_with_shipped_cookie(addr, &cfg.cookie) {
                    log::warn!(
                        "cluster: listening on {addr} with the shipped default cookie: anyone \
                         who can reach this port can join the cluster; set cluster.cookie \
                         (or bind cluster.bind to a loopback or private address)"
                    );
                }
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                control.enabled.store(true, Ordering::Relaxed);
                Some(l)
            }
            None => None,
        };
        let port = listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or(DEFAULT_PORT);
        let host = node
            .split_once('@')
            .map(|(_, h)| h.to_string())
            .unwrap_or_default();
        let advertised = match cfg.bind {
            Some(a) if !a.ip().is_unspecified() => format!("{}:{port}", a.ip()),
            _ => format!("{host}:{port}"),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Cluster {
            node,
            advertised,
            cfg,
            mesh,
            control,
            metrics: shared,
            listener,
            peers: Vec::new(),
            links: Vec::new(),
            local_routes: HashSet::new(),
            route_seq: 0,
            retained: HashMap::new(),
            retained_bytes: 0,
            pending: HashMap::new(),
            takeover_ends: Vec::new(),
            queries: HashMap::new(),
            next_query: 1,
            started: Instant::now(),
            started_ms: now.as_millis() as u64,
            last_heartbeat: Instant::now(),
            refused_accepts: 0,
            refused_logged: None,
            scratch: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// The address peers reach this node at.
    pub fn advertised(&self) -> &str {
        &self.advertised
    }

    fn members_file(&self) -> PathBuf {
        self.cfg.data_dir.join("cluster_members")
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, stop: &AtomicBool) {
        if self.listener.is_some() {
            self.load_members();
            if let Discovery::Static(seeds) = self.cfg.discovery.clone() {
                for seed in seeds {
                    if let Err(e) = self.join(&seed) {
                        log::warn!("cluster: static seed {seed}: {e}");
                    }
                }
            }
        }
        let mut msgs = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            self.poll_once(Duration::from_millis(100));
            msgs.clear();
            self.mesh.recv(MESH_BUDGET, &mut msgs);
            let drained = msgs.len() < MESH_BUDGET;
            for m in msgs.drain(..) {
                self.on_mesh(m);
            }
            if drained {
                // A moved session's importing shard asks for its `TakeoverEnd` after its
                // route changes went to the filters' home shards, which sent them here:
                // `recv` returned only when every queue was empty, so those route changes
                // were in this round and went out first, and peers learn the new routes
                // before the old node lets go.
                for (client_id, node) in std::mem::take(&mut self.takeover_ends) {
                    if let Some(link) = self.peers.get(node as usize).and_then(|p| p.link) {
                        let frame = Frame::TakeoverEnd {
                            client_id: client_id.to_string(),
                        };
                        self.send(link, &frame);
                    }
                }
            }
            self.on_control();
            self.accept();
            self.read_links();
            self.tick();
            self.flush_links();
            self.mesh.flush();
        }
        self.flush_links();
    }

    // ------------------------------------------------------------------ I/O plumbing

    fn poll_once(&mut self, timeout: Duration) {
        let mut fds = vec![libc::pollfd {
            fd: self.mesh.doorbell().raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(l) = &self.listener {
            fds.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for link in self.links.iter().flatten() {
            let mut events = if link.data_waiting { 0 } else { libc::POLLIN };
            if !link.out.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: link.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        if !self.mesh.park() {
            return;
        }
        // SAFETY: fds is a live array of pollfd of the given length.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as i32,
            )
        };
        self.mesh.unpark();
        if fds[0].revents & libc::POLLIN != 0 {
            let mut b = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer from our eventfd.
            unsafe { libc::read(fds[0].fd, b.as_mut_ptr() as *mut libc::c_void, 8) };
        }
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        let mut accepted = Vec::new();
        while let Ok((stream, addr)) = l.accept() {
            accepted.push((stream, addr));
        }
        for (stream, addr) in accepted {
            let handshaking = self
                .links
                .iter()
                .flatten()
                .filter(|l| !l.authed && !l.dialed)
                .count();
            if handshaking >= HANDSHAKES_MAX {
                // Closed at once: unauthenticated links cannot pile up.
                drop(stream);
                self.refused_accepts += 1;
                if self
                    .refused_logged
                    .is_none_or(|t| t.elapsed() >= REFUSED_LOG_INTERVAL)
                {
                    log::warn!(
                        "cluster: refused {} link(s): {HANDSHAKES_MAX} links are already in \
                         their handshake (last from {addr})",
                        self.refused_accepts
                    );
                    self.refused_accepts = 0;
                    self.refused_logged = Some(Instant::now());
                }
                continue;
            }
            if let Err(e) = self.add_link(stream, addr.to_string(), Some(addr.ip()), false) {
                log::warn!("cluster: link from {addr} dropped: {e}");
            }
        }
    }

    fn add_link(
        &mut self,
        stream: TcpStream,
        peer_addr: String,
        remote_ip: Option<IpAddr>,
        dialed: bool,
    ) -> std::io::Result<usize> {
        let nonce = fresh_nonce()
            .map_err(|e| std::io::Error::other(format!("no random nonce from the OS: {e}")))?;
        let _ = stream.set_nonblocking(true);
        let _ = stream.set_nodelay(true);
        let link = Link {
            stream,
            reader: FrameReader::with_max(HANDSHAKE_FRAME_MAX_BYTES),
            out: VecDeque::new(),
            out_bytes: 0,
            nonce,
            peer_nonce: None,
            dialed,
            remote_ip,
            peer_name: None,
            peer_addr,
            authed: false,
            hello_seen: false,
            started: Instant::now(),
            last_rx: Instant::now(),
            closed: false,
            data_shard: None,
            data_out: false,
            data_waiting: false,
        };
        let idx = match self.links.iter().position(|l| l.is_none()) {
            Some(i) => {
                self.links[i] = Some(link);
                i
            }
            None => {
                self.links.push(Some(link));
                self.links.len() - 1
            }
        };
        let hello = Frame::Hello {
            version: CLUSTER_PROTOCOL_VERSION,
            node: self.node.clone(),
            cluster_addr: self.advertised.clone(),
            nonce,
            started_ms: self.started_ms,
        };
        self.send(idx, &hello);
        Ok(idx)
    }

    /// Queues a frame on a link. Past [`LINK_OUT_MAX_BYTES`] the peer is not reading: the
    /// link is closed instead of queueing more.
    fn send(&mut self, link: usize, frame: &Frame) {
        frame.encode(&mut self.scratch);
        let bytes = self.scratch.split().freeze();
        if let Some(l) = self
            .links
            .get_mut(link)
            .and_then(|l| l.as_mut())
            .filter(|l| !l.closed)
        {
            l.out_bytes += bytes.len();
            l.out.push_back(bytes);
            if l.out_bytes > LINK_OUT_MAX_BYTES {
                log::warn!(
                    "cluster: {} does not read its link ({} bytes queued); closing it",
                    shown(l.peer_name.as_deref().unwrap_or(&l.peer_addr)),
                    l.out_bytes
                );
                l.closed = true;
            }
        }
    }

    fn read_links(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        for i in 0..self.links.len() {
            let mut error = None;
            let mut budget = READ_BUDGET_BYTES;
            loop {
                // Decode what is buffered before reading more, so a link never holds more
                // than one partial frame (bounded by the reader's maximum) plus one read.
                // One frame at a time: a frame can hand the socket (and the bytes after it)
                // to a shard, or park it.
                while let Some(link) = self.links[i]
                    .as_mut()
                    .filter(|l| !l.closed && !l.data_waiting)
                {
                    match link.reader.next_frame() {
                        Ok(Some(f)) => self.on_frame(i, f),
                        Ok(None) => break,
                        Err(e) => {
                            log::warn!(
                                "cluster: bad frame from {}: {e}; closing link",
                                shown(&link.peer_addr)
                            );
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                if error.is_some() || budget == 0 {
                    break;
                }
                let Some(link) = self.links[i]
                    .as_mut()
                    .filter(|l| !l.closed && !l.data_waiting)
                else {
                    break;
                };
                debug_assert!(link.reader.buffered() <= FRAME_MAX_BYTES + 4);
                match link.stream.read(&mut buf[..budget.min(64 * 1024)]) {
                    Ok(0) => {
                        error = Some("closed by peer".to_string());
                        break;
                    }
                    Ok(n) => {
                        link.last_rx = Instant::now();
                        link.reader.extend(&buf[..n]);
                        budget -= n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(e) = error {
                self.close_link(i, &e);
            }
        }
        for i in 0..self.links.len() {
            if self.links[i].as_ref().is_some_and(|l| l.closed) {
                self.close_link(i, "closed");
            }
        }
    }

    fn flush_links(&mut self) {
        for i in 0..self.links.len() {
            let mut failed = None;
            if let Some(link) = self.links[i].as_mut() {
                while !link.out.is_empty() {
                    let slices: Vec<std::io::IoSlice> = link
                        .out
                        .iter()
                        .take(64)
                        .map(|b| std::io::IoSlice::new(b))
                        .collect();
                    Metrics::add(&self.metrics.metrics.cluster_link_writes, 1);
                    match link.stream.write_vectored(&slices) {
                        Ok(0) => {
                            failed = Some("write returned 0".to_string());
                            break;
                        }
                        Ok(mut n) => {
                            link.out_bytes -= n;
                            while n > 0 {
                                let front =
                                    link.out.front_mut().expect("written bytes were queued");
                                if front.len() <= n {
                                    n -= front.len();
                                    link.out.pop_front();
                                } else {
                                    let _ = front.split_to(n);
                                    n = 0;
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                self.close_link(i, &e);
            }
        }
    }

    fn close_link(&mut self, idx: usize, why: &str) {
        let Some(link) = self.links[idx].take() else {
            return;
        };
        let _ = link.stream.shutdown(std::net::Shutdown::Both);
        let Some(name) = link.peer_name else {
            log::debug!(
                "cluster: link from {} closed before handshake: {why}",
                shown(&link.peer_addr)
            );
            return;
        };
        let Some(p) = self.peer_index(&name) else {
            return;
        };
        if link.data_out && self.peers[p].state == PeerState::Up {
            // Our shard's link to this peer could not be set up: start over with the peer.
            log::warn!("cluster: data link to {name} failed ({why})");
            if let Some(control) = self.peers[p].link {
                self.close_link(control, "a data link failed");
            }
            return;
        }
        if self.peers[p].link == Some(idx) {
            self.peers[p].link = None;
            if self.peers[p].state == PeerState::Up {
                log::warn!("cluster: node {name} is down ({why})");
                self.peers[p].state = PeerState::Down;
                self.peers[p].down_since = Instant::now();
                self.peer_down(p);
            }
        }
    }

    fn peer_down(&mut self, p: usize) {
        self.peers[p].routes.clear();
        self.control.peers_up.fetch_sub(1, Ordering::Relaxed);
        for shard in 0..self.mesh.shards() {
            self.mesh.send(shard, MeshMsg::NodeDown { node: p as u8 });
        }
        // A resuming CONNECT no longer waits for this node.
        let tokens: Vec<u64> = self.pending.keys().copied().collect();
        for t in tokens {
            self.takeover_answer(t, p as u8, None);
        }
    }

    fn peer_index(&self, name: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.name == name)
    }

    fn peer_entry(&mut self, name: &str, addr: &str) -> Option<usize> {
        if let Some(i) = self.peer_index(name) {
            if !addr.is_empty() {
                self.peers[i].addr = addr.to_string();
            }
            return Some(i);
        }
        if self.peers.len() >= PEERS_MAX {
            log::error!("cluster: more than {PEERS_MAX} nodes; ignoring {name}");
            return None;
        }
        self.peers.push(Peer {
            name: name.to_string(),
            addr: addr.to_string(),
            state: PeerState::Down,
            link: None,
            last_dial: None,
            uptime_s: 0,
            connections: 0,
            routes: HashSet::new(),
            route_seq: 0,
            epoch: 0,
            down_since: Instant::now(),
        });
        Some(self.peers.len() - 1)
    }

    // ------------------------------------------------------------------ handshake and frames

    fn on_frame(&mut self, link: usize, frame: Frame) {
        let (authed, hello_seen) = match &self.links[link] {
            Some(l) => (l.authed, l.hello_seen),
            None => return,
        };
        match frame {
            Frame::Hello {
                version,
                node,
                cluster_addr,
                nonce,
                ..
            } => {
                let l = self.links[link].as_mut().expect("checked above");
                // A data link we dialled must be answered by the node we dialled it for.
                let expected = l.dialed && l.peer_name.as_ref().is_some_and(|n| *n != node);
                if hello_seen
                    || version != CLUSTER_PROTOCOL_VERSION
                    || node == self.node
                    || expected
                    || !valid_node_name(&node)
                    || !valid_cluster_addr(&cluster_addr)
                {
                    log::warn!(
                        "cluster: refusing link from {}: bad hello (version {version})",
                        shown(&node)
                    );
                    self.mark_closed(link);
                    return;
                }
                l.hello_seen = true;
                l.peer_nonce = Some(nonce);
                let dialed = l.dialed;
                let ours = l.nonce;
                l.peer_name = Some(node.clone());
                l.peer_addr = cluster_addr;
                if dialed {
                    // The dialler proves first; the acceptor answers only a valid proof.
                    let t = Transcript {
                        dialer: &self.node,
                        dialer_nonce: &ours,
                        acceptor: &node,
                        acceptor_nonce: &nonce,
                    };
                    let proof = handshake_proof(&self.cfg.cookie, Role::Dialer, &t);
                    self.send(link, &Frame::Auth { proof });
                }
            }
            Frame::Auth { proof } => {
                let l = self.links[link].as_ref().expect("checked above");
                let verified = match (&l.peer_name, &l.peer_nonce) {
                    (Some(peer), Some(theirs)) if hello_seen && !authed => {
                        let (t, peer_role) = if l.dialed {
                            let t = Transcript {
                                dialer: &self.node,
                                dialer_nonce: &l.nonce,
                                acceptor: peer,
                                acceptor_nonce: theirs,
                            };
                            (t, Role::Acceptor)
                        } else {
                            let t = Transcript {
                                dialer: peer,
                                dialer_nonce: theirs,
                                acceptor: &self.node,
                                acceptor_nonce: &l.nonce,
                            };
                            (t, Role::Dialer)
                        };
                        verify_proof(&self.cfg.cookie, peer_role, &t, &proof).then(|| {
                            // Our answer, computed only now that the dialler has proven.
                            (!l.dialed)
                                .then(|| handshake_proof(&self.cfg.cookie, Role::Acceptor, &t))
                        })
                    }
                    _ => None,
                };
                let Some(answer) = verified else {
                    log::warn!(
                        "cluster: refusing link from {} ({}): wrong cookie",
                        shown(l.peer_name.as_deref().unwrap_or("?")),
                        shown(&l.peer_addr)
                    );
                    self.mark_closed(link);
                    return;
                };
                let peer = l.peer_name.clone().expect("verified after hello");
                if !self.cfg.allow_node_name_mismatch {
                    let ip = l.remote_ip;
                    if !ip.is_some_and(|ip| name_matches_ip(&peer, ip)) {
                        log::warn!(
                            "cluster: refusing node {peer}: its link comes from {}, not the \
                             host of its name (cluster.allow_node_name_mismatch = false)",
                            ip.map(|ip| ip.to_string()).unwrap_or_default()
                        );
                        self.mark_closed(link);
                        return;
                    }
                }
                let l = self.links[link].as_mut().expect("checked above");
                l.authed = true;
                l.reader.set_max(FRAME_MAX_BYTES);
                if let Some(proof) = answer {
                    self.send(link, &Frame::Auth { proof });
                }
                let l = self.links[link].as_ref().expect("checked above");
                if l.data_shard.is_some() {
                    self.data_link_ready(link);
                } else {
                    self.link_up(link);
                }
            }
            Frame::DataLink { shard } => {
                let l = self.links[link].as_mut().expect("checked above");
                if !hello_seen || authed || l.dialed || l.data_shard.is_some() {
                    log::warn!("cluster: unexpected data-link frame; closing link");
                    self.mark_closed(link);
                    return;
                }
                l.data_shard = Some(shard);
            }
            _ if !authed => {
                log::warn!("cluster: frame before handshake; closing link");
                self.mark_closed(link);
            }
            f => self.on_peer_frame(link, f),
        }
    }

    fn mark_closed(&mut self, link: usize) {
        if let Some(l) = self.links[link].as_mut() {
            l.closed = true;
        }
    }

    fn link_up(&mut self, link: usize) {
        let (name, addr) = {
            let l = self.links[link].as_ref().expect("link exists");
            (
                l.peer_name.clone().expect("hello seen"),
                l.peer_addr.clone(),
            )
        };
        let Some(p) = self.peer_entry(&name, &addr) else {
            self.mark_closed(link);
            return;
        };
        if self.peers[p].state == PeerState::Up && self.peers[p].link.is_some() {
            // Both sides dialled at once: keep the link dialled by the smaller name.
            let keep_new = self.node < name;
            let old = self.peers[p].link.expect("up peer has a link");
            let (close, keep) = if keep_new { (old, link) } else { (link, old) };
            self.peers[p].link = Some(keep);
            if let Some(l) = self.links[close].as_mut() {
                l.peer_name = None;
                l.closed = true;
            }
            return;
        }
        log::info!("cluster: node {name} is up ({addr})");
        self.peers[p].state = PeerState::Up;
        self.peers[p].link = Some(link);
        self.peers[p].routes.clear();
        self.peers[p].epoch = self.peers[p].epoch.wrapping_add(1);
        self.control.peers_up.fetch_add(1, Ordering::Relaxed);
        self.save_members();
        let members = self.member_list();
        self.send(link, &Frame::Members { members });
        let filters: Vec<String> = self.local_routes.iter().cloned().collect();
        let seq = self.route_seq;
        self.send(link, &Frame::RouteSnapshot { seq, filters });
        let retained: Vec<Arc<Message>> = self.retained.values().cloned().collect();
        for m in retained {
            let msg = to_wire(&m);
            self.send(link, &Frame::Retain { msg });
        }
        self.send_heartbeat(link);
        // Our shards' data links to it, and its data links that arrived before this one.
        for shard in 0..self.mesh.shards() {
            match self.dial(&addr) {
                Ok(d) => {
                    self.send(
                        d,
                        &Frame::DataLink {
                            shard: shard as u16,
                        },
                    );
                    let l = self.links[d].as_mut().expect("just dialled");
                    l.data_shard = Some(shard as u16);
                    l.data_out = true;
                    l.peer_name = Some(name.clone());
                }
                Err(e) => {
                    log::warn!("cluster: cannot open a data link to {name}: {e}");
                    self.mark_closed(link);
                    return;
                }
            }
        }
        let waiting: Vec<usize> = (0..self.links.len())
            .filter(|&i| {
                self.links[i].as_ref().is_some_and(|l| {
                    l.data_waiting && l.peer_name.as_deref() == Some(name.as_str())
                })
            })
            .collect();
        for i in waiting {
            self.data_link_ready(i);
        }
    }

    /// An authenticated data link: hand it to its shard once its peer is up (an inbound one
    /// may arrive before the peer's control link is up here; it waits, unread).
    fn data_link_ready(&mut self, link: usize) {
        let (name, shard, outbound) = {
            let l = self.links[link].as_ref().expect("link exists");
            (
                l.peer_name.clone().expect("hello seen"),
                l.data_shard.expect("a data link"),
                l.data_out,
            )
        };
        let peer = self
            .peer_index(&name)
            .filter(|&p| self.peers[p].state == PeerState::Up);
        let Some(p) = peer else {
            if outbound {
                self.mark_closed(link);
            } else if let Some(l) = self.links[link].as_mut() {
                l.data_waiting = true;
            }
            return;
        };
        let mut l = self.links[link].take().expect("link exists");
        let _ = l.stream.set_nodelay(true);
        // What the handshake left unwritten goes out first, from the shard.
        let unsent: Vec<Bytes> = l.out.drain(..).collect();
        let received = l.reader.take_buffered();
        let target = if outbound {
            shard as usize
        } else {
            shard as usize % self.mesh.shards()
        };
        let attach = crate::mesh::LinkAttach {
            node: p as u8,
            epoch: self.peers[p].epoch,
            fd: std::os::fd::OwnedFd::from(l.stream),
            outbound,
            unsent,
            received,
        };
        log::debug!(
            "cluster: data link {} {name} (shard {shard}) goes to shard {target}",
            if outbound { "to" } else { "from" }
        );
        self.mesh
            .send(target, MeshMsg::LinkAttach(Box::new(attach)));
    }

    fn member_list(&self) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = self
            .peers
            .iter()
            .filter(|p| p.state != PeerState::Gone)
            .map(|p| (p.name.clone(), p.addr.clone()))
            .collect();
        m.push((self.node.clone(), self.advertised.clone()));
        m
    }

    fn peer_of_link(&self, link: usize) -> Option<usize> {
        let name = self.links[link].as_ref()?.peer_name.as_deref()?;
        let p = self.peer_index(name)?;
        (self.peers[p].link == Some(link)).then_some(p)
    }

    fn on_peer_frame(&mut self, link: usize, frame: Frame) {
        let Some(p) = self.peer_of_link(link) else {
            return;
        };
        let node = p as u8;
        match frame {
            Frame::Heartbeat {
                uptime_s,
                connections,
                ..
            } => {
                self.peers[p].uptime_s = uptime_s;
                self.peers[p].connections = connections;
            }
            Frame::Members { members } => {
                // The list holds the sender and its peers: PEERS_MAX + 1 at most.
                if members.len() > PEERS_MAX + 1 {
                    log::warn!(
                        "cluster: {} sent a member list of {} nodes (at most {}); ignored",
                        self.peers[p].name,
                        members.len(),
                        PEERS_MAX + 1
                    );
                    return;
                }
                let mut learned = false;
                for (name, addr) in members {
                    if name == self.node || self.peer_index(&name).is_some() {
                        continue;
                    }
                    if !valid_node_name(&name) || !valid_cluster_addr(&addr) {
                        log::warn!(
                            "cluster: {} listed a malformed member {} at {}; ignored",
                            self.peers[p].name,
                            shown(&name),
                            shown(&addr)
                        );
                        continue;
                    }
                    log::info!("cluster: learned of node {name} ({addr})");
                    learned |= self.peer_entry(&name, &addr).is_some();
                }
                if learned {
                    self.save_members();
                }
            }
            Frame::Leave => {
                log::info!("cluster: node {} left", self.peers[p].name);
                self.peers[p].state = PeerState::Gone;
                self.peers[p].link = None;
                self.peer_down(p);
                self.save_members();
                if let Some(l) = self.links[link].as_mut() {
                    l.peer_name = None;
                    l.closed = true;
                }
            }
            Frame::RouteAdd { filter, .. } if !self.valid_filter(&filter) => {
                self.refuse_routes(p, 1);
            }
            Frame::RouteAdd { seq, filter } => {
                if seq > self.peers[p].route_seq {
                    self.peers[p].route_seq = seq;
                    if self.peers[p].routes.insert(filter.clone()) {
                        self.broadcast_route(filter.into(), node, true);
                    }
                }
            }
            Frame::RouteDel { seq, filter } => {
                if seq > self.peers[p].route_seq {
                    self.peers[p].route_seq = seq;
                    if self.peers[p].routes.remove(&filter) {
                        self.broadcast_route(filter.into(), node, false);
                    }
                }
            }
            Frame::RouteSnapshot { seq, filters } => {
                let all = filters.len();
                let new: HashSet<String> = filters
                    .into_iter()
                    .filter(|f| self.valid_filter(f))
                    .collect();
                if new.len() < all {
                    // Duplicates count here too, which an honest node never sends.
                    self.refuse_routes(p, all - new.len());
                }
                let old = std::mem::take(&mut self.peers[p].routes);
                for f in old.difference(&new) {
                    self.broadcast_route(f.as_str().into(), node, false);
                }
                for f in new.difference(&old) {
                    self.broadcast_route(f.as_str().into(), node, true);
                }
                self.peers[p].routes = new;
                self.peers[p].route_seq = seq;
            }
            Frame::Publish { .. } => {
                log::warn!(
                    "cluster: {} sent a message on its control link; closing it",
                    self.peers[p].name
                );
                self.mark_closed(link);
            }
            Frame::Retain { msg } => {
                if !valid_peer_topic(&msg.topic, self.metrics.cfg.max_topic_levels) {
                    log::warn!(
                        "cluster: {} sent a retained message with an invalid topic; ignored",
                        self.peers[p].name
                    );
                    return;
                }
                let Some(msg) = from_wire(msg) else { return };
                self.store_retained(&msg);
                let value = (!msg.payload.is_empty()).then(|| msg.clone());
                for shard in 0..self.mesh.shards() {
                    self.mesh.send(
                        shard,
                        MeshMsg::Retain {
                            topic: msg.topic.clone(),
                            msg: value.clone(),
                        },
                    );
                }
            }
            Frame::Takeover {
                client_id,
                want_session,
                token,
                at_ms,
            } => {
                if client_id.len() > MQTT_STRING_MAX_BYTES {
                    return;
                }
                // The arbitration compares connection times across nodes: a peer's time is
                // never taken from the future, nor from further back than the skew allowed.
                let now = unix_ms();
                let at_ms = at_ms.clamp(now.saturating_sub(TAKEOVER_SKEW_MAX_MS), now);
                let shard = home_shard(&client_id, self.mesh.shards());
                self.mesh.send(
                    shard,
                    MeshMsg::RemoteTakeover {
                        client_id: client_id.into(),
                        want_session,
                        token,
                        node,
                        at_ms,
                    },
                );
            }
            Frame::SessionTransfer {
                token,
                client_id,
                found,
                subscriptions,
                messages,
                pubrel,
                sent_ids,
            } => {
                let cfg = &self.metrics.cfg;
                let inflight_max = usize::from(cfg.max_inflight);
                let valid = client_id.len() <= MQTT_STRING_MAX_BYTES
                    && pubrel.len() <= inflight_max
                    && sent_ids.len() <= inflight_max
                    && (cfg.max_subscriptions == 0 || subscriptions.len() <= cfg.max_subscriptions)
                    && subscriptions
                        .iter()
                        .all(|s| valid_peer_filter(&s.filter, cfg.max_topic_levels))
                    && messages
                        .iter()
                        .all(|m| valid_peer_topic(&m.topic, cfg.max_topic_levels));
                if !valid {
                    // Answered as "no session there" rather than imported past the limits.
                    log::warn!(
                        "cluster: {} sent a session transfer beyond this node's limits \
                         (in-flight, subscriptions, filters); refused",
                        self.peers[p].name
                    );
                    self.takeover_answer(token, node, None);
                    return;
                }
                let export = found.then(|| {
                    Box::new(SessionExport {
                        token,
                        node,
                        client_id: client_id.as_str().into(),
                        found,
                        subscriptions: subscriptions
                            .into_iter()
                            .map(|s| (Arc::from(s.filter.as_str()), s.options, s.id))
                            .collect(),
                        messages: messages.into_iter().filter_map(from_wire).collect(),
                        pubrel,
                        sent_ids,
                    })
                });
                self.takeover_answer(token, node, export);
            }
            Frame::TakeoverEnd { client_id } => {
                let shard = home_shard(&client_id, self.mesh.shards());
                let client_id = client_id.into();
                self.mesh
                    .send(shard, MeshMsg::RemoteTakeoverEnd { client_id, node });
            }
            Frame::SessionTail {
                client_id,
                messages,
            } => {
                let max_levels = self.metrics.cfg.max_topic_levels;
                if client_id.len() > MQTT_STRING_MAX_BYTES
                    || !messages
                        .iter()
                        .all(|m| valid_peer_topic(&m.topic, max_levels))
                {
                    log::warn!(
                        "cluster: {} sent a malformed session tail; ignored",
                        self.peers[p].name
                    );
                    return;
                }
                let shard = home_shard(&client_id, self.mesh.shards());
                let msg = MeshMsg::SessionTail {
                    client_id: client_id.into(),
                    messages: messages.into_iter().filter_map(from_wire).collect(),
                };
                self.mesh.send(shard, msg);
            }
            Frame::Query { token, kind } if matches!(kind, 1 | 2 | QUERY_METRICS) => {
                self.start_query(kind, QueryOrigin::Peer(p, token))
            }
            Frame::Query { kind, .. } => {
                log::debug!("cluster: ignoring query of unknown kind {kind}");
            }
            Frame::QueryReply { token, rows } => self.query_rows(token, rows, Some(p)),
            Frame::Hello { .. } | Frame::Auth { .. } | Frame::DataLink { .. } => {
                self.mark_closed(link)
            }
        }
    }

    /// A peer's route filter, checked as a client's SUBSCRIBE filter would be.
    fn valid_filter(&self, filter: &str) -> bool {
        valid_peer_filter(filter, self.metrics.cfg.max_topic_levels)
    }

    fn refuse_routes(&self, p: usize, count: usize) {
        log::warn!(
            "cluster: refused {count} invalid route filter(s) from {} (wildcards, length or \
             more than mqtt.max_topic_levels levels)",
            self.peers[p].name
        );
    }

    fn broadcast_route(&mut self, filter: Arc<str>, node: u8, add: bool) {
        for shard in 0..self.mesh.shards() {
            self.mesh.send(
                shard,
                MeshMsg::NodeRoute {
                    filter: filter.clone(),
                    node,
                    add,
                },
            );
        }
    }

    fn up_links(&self) -> Vec<(usize, usize)> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == PeerState::Up)
            .filter_map(|(i, p)| p.link.map(|l| (i, l)))
            .collect()
    }

    // ------------------------------------------------------------------ messages from shards

    fn on_mesh(&mut self, m: MeshMsg) {
        match m {
            MeshMsg::ClusterRoute { filter, add } => {
                let changed = if add {
                    self.local_routes.insert(filter.to_string())
                } else {
                    self.local_routes.remove(&*filter)
                };
                if !changed {
                    return;
                }
                self.route_seq += 1;
                let seq = self.route_seq;
                let frame = if add {
                    Frame::RouteAdd {
                        seq,
                        filter: filter.to_string(),
                    }
                } else {
                    Frame::RouteDel {
                        seq,
                        filter: filter.to_string(),
                    }
                };
                for (_, link) in self.up_links() {
                    self.send(link, &frame);
                }
            }
            MeshMsg::ClusterLinkLost { node, epoch } => {
                let p = node as usize;
                let current = self
                    .peers
                    .get(p)
                    .filter(|peer| peer.state == PeerState::Up && peer.epoch == epoch)
                    .and_then(|peer| peer.link);
                if let Some(control) = current {
                    self.close_link(control, "a data link was lost");
                }
            }
            MeshMsg::ClusterRetain { msg } => {
                self.store_retained(&msg);
                let frame = Frame::Retain { msg: to_wire(&msg) };
                for (_, link) in self.up_links() {
                    self.send(link, &frame);
                }
            }
            MeshMsg::ClusterTakeover {
                client_id,
                want_session,
                token,
                shard,
                at_ms,
            } => {
                let ups = self.up_links();
                if want_session {
                    self.pending.insert(
                        token,
                        PendingTakeover {
                            shard,
                            client_id: client_id.clone(),
                            waiting: ups.iter().map(|(p, _)| *p as u8).collect(),
                            found: None,
                            deadline: Instant::now() + SESSION_WAIT,
                        },
                    );
                }
                let frame = Frame::Takeover {
                    client_id: client_id.to_string(),
                    want_session,
                    token,
                    at_ms,
                };
                for (_, link) in &ups {
                    self.send(*link, &frame);
                }
                if want_session && ups.is_empty() {
                    self.finish_takeover(token);
                }
            }
            MeshMsg::ClusterSessionExport(e) => {
                let Some(link) = self.peers.get(e.node as usize).and_then(|p| p.link) else {
                    return;
                };
                let frame = Frame::SessionTransfer {
                    token: e.token,
                    client_id: e.client_id.to_string(),
                    found: e.found,
                    subscriptions: e
                        .subscriptions
                        .iter()
                        .map(|(f, o, id)| WireSubscription {
                            filter: f.to_string(),
                            options: *o,
                            id: *id,
                        })
                        .collect(),
                    messages: e.messages.iter().map(|m| to_wire(m)).collect(),
                    pubrel: e.pubrel.clone(),
                    sent_ids: e.sent_ids.clone(),
                };
                self.send(link, &frame);
            }
            MeshMsg::ClusterTakeoverEnd { client_id, node } => {
                self.takeover_ends.push((client_id, node));
            }
            MeshMsg::ClusterSessionTail {
                client_id,
                node,
                messages,
            } => {
                let Some(link) = self.peers.get(node as usize).and_then(|p| p.link) else {
                    return;
                };
                let frame = Frame::SessionTail {
                    client_id: client_id.to_string(),
                    messages: messages.iter().map(|m| to_wire(m)).collect(),
                };
                self.send(link, &frame);
            }
            MeshMsg::QueryReply { token, rows } => self.query_rows(token, rows, None),
            _ => log::debug!("cluster: unexpected mesh message"),
        }
    }

    /// The cluster thread's copy of the retained messages (sent to peers that come up),
    /// bounded like the shards' replicas by `mqtt.max_retained_messages` and
    /// `mqtt.max_retained_bytes`.
    fn store_retained(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            if let Some(old) = self.retained.remove(&*msg.topic) {
                self.retained_bytes -= old.topic.len() + old.payload.len();
            }
            return;
        }
        let cfg = &self.metrics.cfg;
        let old = self.retained.get(&*msg.topic);
        let grows = old.map_or(msg.topic.len() + msg.payload.len(), |o| {
            msg.payload.len().saturating_sub(o.payload.len())
        });
        let count_ok = cfg.max_retained_messages == 0
            || old.is_some()
            || self.retained.len() < cfg.max_retained_messages;
        let bytes_ok = cfg.max_retained_bytes == 0
            || grows == 0
            || self.retained_bytes + grows <= cfg.max_retained_bytes;
        if !(count_ok && bytes_ok) {
            return;
        }
        self.retained_bytes += msg.topic.len() + msg.payload.len();
        if let Some(old) = self.retained.insert(msg.topic.to_string(), msg.clone()) {
            self.retained_bytes -= old.topic.len() + old.payload.len();
        }
    }

    fn takeover_answer(&mut self, token: u64, node: u8, export: Option<Box<SessionExport>>) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        p.waiting.remove(&node);
        if p.found.is_none() {
            p.found = export;
        }
        if p.waiting.is_empty() {
            self.finish_takeover(token);
        }
    }

    fn finish_takeover(&mut self, token: u64) {
        let Some(p) = self.pending.remove(&token) else {
            // No peers at all: answer "nothing found" straight away.
            return;
        };
        let export = p.found.unwrap_or_else(|| {
            Box::new(SessionExport {
                token,
                node: 0,
                client_id: p.client_id.clone(),
                found: false,
                subscriptions: Vec::new(),
                messages: Vec::new(),
                pubrel: Vec::new(),
                sent_ids: Vec::new(),
            })
        });
        self.mesh
            .send(p.shard as usize, MeshMsg::SessionImport(export));
    }

    // ------------------------------------------------------------------ timers, membership

    fn tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.finish_takeover(t);
        }
        let late: Vec<u64> = self
            .queries
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.finish_query(t);
        }
        // Links that never finished the handshake, or went silent.
        let down_after = Duration::from_millis(self.cfg.down_after_ms);
        for i in 0..self.links.len() {
            let stale = match &self.links[i] {
                Some(l) if !l.authed => l.started.elapsed() > HANDSHAKE_TIMEOUT,
                Some(l) => l.last_rx.elapsed() > down_after,
                None => false,
            };
            if stale {
                self.close_link(i, "no heartbeat");
            }
        }
        if self.last_heartbeat.elapsed() >= Duration::from_millis(self.cfg.heartbeat_ms) {
            self.last_heartbeat = now;
            self.autoclean();
            for (_, link) in self.up_links() {
                self.send_heartbeat(link);
            }
            self.redial();
        }
    }

    /// Removes peers down for longer than `autoclean_ms`: no longer listed or dialled, and
    /// not in the saved member list. One that comes back and dials in rejoins.
    fn autoclean(&mut self) {
        if self.cfg.autoclean_ms == 0 {
            return;
        }
        let limit = Duration::from_millis(self.cfg.autoclean_ms);
        let mut cleaned = false;
        for peer in &mut self.peers {
            if peer.state == PeerState::Down && peer.down_since.elapsed() >= limit {
                log::info!(
                    "cluster: node {} was down for {} s; removed (autoclean)",
                    peer.name,
                    limit.as_secs()
                );
                peer.state = PeerState::Gone;
                cleaned = true;
            }
        }
        if cleaned {
            self.save_members();
        }
    }

    fn send_heartbeat(&mut self, link: usize) {
        let frame = Frame::Heartbeat {
            uptime_s: self.started.elapsed().as_secs(),
            connections: self.metrics.metrics.connections.load(Ordering::Relaxed) as u64,
            routes: self.local_routes.len() as u64,
        };
        self.send(link, &frame);
    }

    fn redial(&mut self) {
        if self.listener.is_none() {
            return;
        }
        let retry = Duration::from_millis(self.cfg.heartbeat_ms.max(500));
        for p in 0..self.peers.len() {
            let peer = &self.peers[p];
            let dialing =
                self.links.iter().flatten().any(|l| {
                    l.peer_name.as_deref() == Some(&peer.name) || l.peer_addr == peer.addr
                });
            if peer.state != PeerState::Down
                || dialing
                || peer.last_dial.is_some_and(|t| t.elapsed() < retry)
            {
                continue;
            }
            self.peers[p].last_dial = Some(Instant::now());
            let addr = self.peers[p].addr.clone();
            if let Err(e) = self.dial(&addr) {
                log::debug!("cluster: dialling {addr}: {e}");
            }
        }
    }

    /// Opens a link without waiting for the connection: the `Hello` waits in the out queue
    /// until the socket is writable, and a connection that never completes is closed with
    /// the handshake deadline. (A host name is still resolved here, by the system resolver.)
    fn dial(&mut self, addr: &str) -> std::io::Result<usize> {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{addr} does not resolve")))?;
        let s = Socket::new(Domain::for_address(sock), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        match s.connect(&sock.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        self.add_link(s.into(), addr.to_string(), Some(sock.ip()), true)
    }

    /// Connects to `target` (`name@host[:port]` or `host:port`).
    fn join(&mut self, target: &str) -> Result<String, String> {
        if self.listener.is_none() {
            return Err("this node has no cluster listener (cluster.bind is empty)".into());
        }
        let addr = if target.contains('@') {
            node_addr(target).ok_or_else(|| format!("{target:?} is not name@host[:port]"))?
        } else {
            target.to_string()
        };
        self.dial(&addr)
            .map_err(|e| format!("cannot reach {target} at {addr}: {e}"))?;
        Ok(format!(
            "{{\"joining\":{},\"addr\":{}}}",
            json_str(target),
            json_str(&addr)
        ))
    }

    fn leave(&mut self) -> String {
        for (_, link) in self.up_links() {
            self.send(link, &Frame::Leave);
        }
        self.flush_links();
        for p in 0..self.peers.len() {
            if self.peers[p].state == PeerState::Up {
                self.peer_down(p);
            }
            self.peers[p].state = PeerState::Gone;
            self.peers[p].link = None;
        }
        for i in 0..self.links.len() {
            if let Some(l) = self.links[i].take() {
                let _ = l.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        self.peers.clear();
        self.save_members();
        "{\"left\":true}".into()
    }

    fn status(&self) -> String {
        let mut nodes = vec![format!(
            "{{\"node\":{},\"status\":\"running\",\"self\":true,\"addr\":{},\"uptime_s\":{},\"connections\":{},\"routes\":{}}}",
            json_str(&self.node),
            json_str(&self.advertised),
            self.started.elapsed().as_secs(),
            self.metrics.metrics.connections.load(Ordering::Relaxed),
            self.local_routes.len()
        )];
        for p in self.peers.iter().filter(|p| p.state != PeerState::Gone) {
            let status = if p.state == PeerState::Up {
                "running"
            } else {
                "down"
            };
            nodes.push(format!(
                "{{\"node\":{},\"status\":\"{status}\",\"self\":false,\"addr\":{},\"uptime_s\":{},\"connections\":{},\"routes\":{}}}",
                json_str(&p.name),
                json_str(&p.addr),
                p.uptime_s,
                p.connections,
                p.routes.len()
            ));
        }
        format!("{{\"nodes\":[{}]}}", nodes.join(","))
    }

    fn on_control(&mut self) {
        let cmds: Vec<ControlCmd> = match self.control.queue.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(_) => return,
        };
        for cmd in cmds {
            match cmd {
                ControlCmd::Join(target, reply) => {
                    let _ = reply.send(self.join(&target));
                }
                ControlCmd::Leave(reply) => {
                    let _ = reply.send(Ok(self.leave()));
                }
                ControlCmd::Status(reply) => {
                    let _ = reply.send(Ok(self.status()));
                }
                ControlCmd::Query(3, reply) => {
                    let _ = reply.send(Ok(self.routes_json()));
                }
                ControlCmd::Query(kind, reply) => self.start_query(kind, QueryOrigin::Local(reply)),
            }
        }
    }

    fn routes_json(&self) -> String {
        let mut rows: Vec<String> = self
            .local_routes
            .iter()
            .map(|f| {
                format!(
                    "{{\"topic\":{},\"node\":{}}}",
                    json_str(f),
                    json_str(&self.node)
                )
            })
            .collect();
        for p in self.peers.iter().filter(|p| p.state == PeerState::Up) {
            rows.extend(p.routes.iter().map(|f| {
                format!(
                    "{{\"topic\":{},\"node\":{}}}",
                    json_str(f),
                    json_str(&p.name)
                )
            }));
        }
        format!("[{}]", rows.join(","))
    }

    fn start_query(&mut self, kind: u8, origin: QueryOrigin) {
        let token = self.next_query;
        self.next_query += 1;
        let mut peers_left = HashSet::new();
        if matches!(origin, QueryOrigin::Local(_)) {
            for (p, link) in self.up_links() {
                self.send(link, &Frame::Query { token, kind });
                peers_left.insert(p);
            }
        }
        // Figures are node-wide counters, answered here; listings come from every shard.
        let (shards, rows) = if kind == QUERY_METRICS {
            (0, vec![self.metrics.metrics.json(&self.node)])
        } else {
            (self.mesh.shards(), Vec::new())
        };
        for shard in 0..shards {
            self.mesh.send(shard, MeshMsg::Query { token, kind });
        }
        let done = shards == 0 && peers_left.is_empty();
        self.queries.insert(
            token,
            PendingQuery {
                origin,
                shards_left: shards,
                peers_left,
                rows,
                deadline: Instant::now() + Duration::from_secs(3),
            },
        );
        if done {
            self.finish_query(token);
        }
    }

    fn query_rows(&mut self, token: u64, rows: Vec<String>, from_peer: Option<usize>) {
        let Some(q) = self.queries.get_mut(&token) else {
            return;
        };
        let before = q.rows.len();
        match from_peer {
            // One answer per asked peer; a second (or unasked) one is dropped.
            Some(p) if !q.peers_left.remove(&p) => return,
            Some(p) => {
                let all = rows.len();
                q.rows
                    .extend(rows.into_iter().filter(|r| flat_json_object(r)));
                if q.rows.len() - before < all {
                    log::warn!(
                        "cluster: dropped {} malformed listing row(s) from {}",
                        all - (q.rows.len() - before),
                        self.peers[p].name
                    );
                }
            }
            None => {
                q.shards_left = q.shards_left.saturating_sub(1);
                q.rows.extend(rows);
            }
        }
        if q.shards_left == 0 && q.peers_left.is_empty() {
            self.finish_query(token);
        }
    }

    fn finish_query(&mut self, token: u64) {
        let Some(q) = self.queries.remove(&token) else {
            return;
        };
        match q.origin {
            QueryOrigin::Local(reply) => {
                let _ = reply.send(Ok(format!("[{}]", q.rows.join(","))));
            }
            QueryOrigin::Peer(p, remote) => {
                if let Some(link) = self.peers.get(p).and_then(|p| p.link) {
                    self.send(
                        link,
                        &Frame::QueryReply {
                            token: remote,
                            rows: q.rows,
                        },
                    );
                }
            }
        }
    }

    fn load_members(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.members_file()) else {
            return;
        };
        for line in text.lines() {
            if let Some((name, addr)) = line.split_once(' ') {
                if name != self.node && valid_node_name(name) && valid_cluster_addr(addr) {
                    self.peer_entry(name, addr);
                }
            }
        }
    }

    fn save_members(&self) {
        let text: String = self
            .peers
            .iter()
            .filter(|p| p.state != PeerState::Gone)
            .map(|p| format!("{} {}\n", p.name, p.addr))
            .collect();
        if let Err(e) = std::fs::write(self.members_file(), text) {
            log::warn!(
                "cluster: cannot save members to {:?}: {e}",
                self.members_file()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_map_to_cluster_addresses() {
        assert_eq!(node_addr("n1@127.0.0.1").as_deref(), Some("127.0.0.1:4370"));
        assert_eq!(
            node_addr("n2@127.0.0.1:4371").as_deref(),
            Some("127.0.0.1:4371")
        );
        assert_eq!(node_addr("n1@"), None);
        assert_eq!(node_addr("n1"), None);
    }

    #[test]
    fn node_names_that_would_need_escaping_are_not_node_names() {
        assert!(valid_node_name("n1@127.0.0.1"));
        assert!(valid_node_name("emqx-1.a_b@host.example:4370"));
        assert!(valid_node_name("n@[::1]:4370"));
        for bad in [
            "n1", "@h", "n@", "a\"b@h", "n@h\n", "n@h\\", "n@h\"}", "n@h h", "a@b@c",
        ] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
        assert!(!valid_node_name(&format!("n@{}", "h".repeat(300))));
        assert!(valid_cluster_addr("127.0.0.1:4370"));
        assert!(!valid_cluster_addr("127.0.0.1"));
        assert!(!valid_cluster_addr("127.0.0.1:0"));
        assert!(!valid_cluster_addr("x\":1"));
    }

    #[test]
    fn the_shipped_cookie_is_flagged_beyond_loopback_only() {
        let any: SocketAddr = "0.0.0.0:4370".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:4370".parse().unwrap();
        assert!(exposed_with_shipped_cookie(any, SHIPPED_COOKIE));
        assert!(!exposed_with_shipped_cookie(lo, SHIPPED_COOKIE));
        assert!(!exposed_with_shipped_cookie(any, "a-secret"));
        // The shipped configuration carries that cookie.
        assert_eq!(ClusterConfig::default().cookie, SHIPPED_COOKIE);
    }

    #[test]
    fn a_name_matches_the_address_it_names() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(name_matches_ip("n1@127.0.0.1", lo));
        assert!(name_matches_ip("n1@127.0.0.1:4371", lo));
        assert!(name_matches_ip(
            "n1@127.0.0.1",
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(!name_matches_ip("n1@10.0.0.1", lo));
        assert!(!name_matches_ip("n1", lo));
    }
}
