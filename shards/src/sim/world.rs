//! One simulated run: `NODES` nodes of `SHARDS` shards each (the real shard and cluster
//! cores) and a set of clients on the in-memory network, stepped on a virtual clock in an
//! order drawn from the seed, with faults injected in the middle of the run.
//!
//! The run has three phases:
//! 1. forming (0 .. `WORKLOAD_START_MS`): nodes find each other through static seeds;
//!    subscribers connect and subscribe;
//! 2. chaos (until `CHAOS_END_MS`): publishers publish QoS 1 and 2, clients leave and come
//!    back on another node (gracefully, abruptly, or by connecting elsewhere while still
//!    connected: a takeover), links between nodes are reset and partitioned;
//! 3. drain (until `END_MS`): faults heal, every client is back, publishing stops, and the
//!    cluster has time to deliver everything; then the ledger is checked.

use super::check::Ledger;
use super::client::{Client, Phase};
use super::io::{addr_of, Armed, Clock, SimClusterIo, SimShard, SimShardIo};
use super::net::{Host, Net, CLIENT_HOST_BASE};
use super::rng::Rng;
use crate::cluster::{Cluster, ClusterConfig, Discovery};
use crate::config::BrokerConfig;
use crate::node_shared::{ClusterControl, NodeShared};
use shardmq_net::{Protocol, QoS};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const MQTT_PORT: u16 = 1883;
const CLUSTER_PORT: u16 = 4370;
pub const WORKLOAD_START_MS: u64 = 4_000;
pub const CHAOS_END_MS: u64 = 16_000;
pub const PUBLISH_END_MS: u64 = 18_000;
pub const END_MS: u64 = 30_000;
/// How often (virtual ms) every queue is checked against its bound.
const BOUNDS_CHECK_MS: u64 = 97;

/// What one run is made of (the seed picks the rest).
#[derive(Clone, Debug)]
pub struct Shape {
    pub nodes: usize,
    pub shards: usize,
    pub subscribers: usize,
    pub publishers: usize,
    /// Faults between nodes (resets, partitions) on or off.
    pub link_faults: bool,
    /// Least time (ms) between two departures of one client.
    pub roam_gap_ms: u64,
    /// Clients come back on any node (true) or on the one they left (false).
    pub roam: bool,
    /// Check each publisher's order at each subscriber.
    pub check_order: bool,
    /// Nodes crash (losing everything but their member file) and restart.
    pub crashes: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            nodes: 3,
            shards: 2,
            subscribers: 4,
            publishers: 3,
            link_faults: true,
            roam_gap_ms: 0,
            roam: true,
            check_order: true,
            crashes: true,
        }
    }
}

/// A node: its shards and its cluster thread's core.
struct SimNode {
    name: String,
    control: Arc<ClusterControl>,
    shards: Vec<SimShard>,
    cluster: Cluster,
    /// The member file, which outlives a crash.
    members: Rc<RefCell<Option<String>>>,
    /// Down since a crash, until it restarts at this time.
    down_until: Option<u64>,
}

/// A partition in force: hosts, one-way, when it heals, its ledger entry.
struct Partition {
    a: Host,
    b: Host,
    until: u64,
    fault: usize,
}

/// The outcome of one run.
pub struct Outcome {
    pub violations: Vec<String>,
    /// What happened, for a failing seed's report.
    pub trace: Vec<String>,
    pub published: usize,
    pub delivered: usize,
    /// Times a node lost sight of a peer while no fault was near (a healthy cluster: 0).
    pub flaps: usize,
    /// Faults injected (link resets, partitions, crashes) and session moves begun.
    pub faults: usize,
    pub moves: usize,
}

pub struct World {
    /// Every node's cluster address (the static seeds).
    seeds: Vec<String>,
    shape: Shape,
    rng: Rng,
    clock: Clock,
    net: Rc<RefCell<Net>>,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    /// When an offline client connects again (and to which node).
    returns: Vec<Option<(u64, usize)>>,
    /// When each client last left on its own.
    left_at: Vec<u64>,
    /// Old connections left open by a takeover (drained, never answered).
    zombies: Vec<u64>,
    partitions: Vec<Partition>,
    /// Peers each node saw up at the last look.
    peers_seen: Vec<usize>,
    flaps: usize,
    moves: usize,
    next_bounds_check: u64,
    ledger: Ledger,
    trace: Vec<String>,
}

fn node_host(i: usize) -> Host {
    i as Host + 1
}

impl World {
    pub fn new(seed: u64, shape: Shape) -> World {
        crate::hash::seed_thread(seed);
        let mut rng = Rng::new(seed);
        let clock: Clock = Rc::new(Cell::new(0));
        let net = Rc::new(RefCell::new(Net::new(rng.fork())));
        let seeds: Vec<String> = (0..shape.nodes)
            .map(|i| addr_of(node_host(i), CLUSTER_PORT))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..shape.nodes {
            let members = Rc::new(RefCell::new(None));
            nodes.push(build_node(
                i, &shape, &seeds, &net, &clock, &mut rng, members,
            ));
        }
        let mut clients = Vec::new();
        for i in 0..shape.subscribers + shape.publishers {
            let protocol = if rng.chance(500) {
                Protocol::V5
            } else {
                Protocol::V311
            };
            let mut c = Client::new(i as u32, CLIENT_HOST_BASE + i as Host, protocol);
            if i < shape.subscribers {
                // One wildcard over everything, or the exact topics of some publishers.
                if rng.chance(500) {
                    c.filters.push(("t/#".into(), QoS::ExactlyOnce));
                } else {
                    for p in 0..shape.publishers {
                        if rng.chance(600) {
                            let q = if rng.chance(500) {
                                QoS::AtLeastOnce
                            } else {
                                QoS::ExactlyOnce
                            };
                            c.filters.push((format!("t/{}", shape.subscribers + p), q));
                        }
                    }
                    if c.filters.is_empty() {
                        c.filters.push(("t/+".into(), QoS::AtLeastOnce));
                    }
                }
            } else {
                let q = if rng.chance(500) {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                c.topic = Some((format!("t/{i}"), q));
                c.window = rng.range(1, 4) as usize;
            }
            clients.push(c);
        }
        let n = clients.len();
        let n_nodes = nodes.len();
        World {
            seeds,
            shape: shape.clone(),
            rng,
            clock,
            net,
            nodes,
            clients,
            returns: vec![None; n],
            left_at: vec![0; n],
            zombies: Vec::new(),
            partitions: Vec::new(),
            peers_seen: vec![0; n_nodes],
            flaps: 0,
            moves: 0,
            next_bounds_check: 0,
            ledger: Ledger {
                check_order: shape.check_order,
                ..Ledger::default()
            },
            trace: Vec::new(),
        }
    }

    fn now(&self) -> u64 {
        self.clock.get()
    }

    fn log(&mut self, what: String) {
        let line = format!("t={} {what}", self.now());
        self.trace.push(line);
    }

    /// Runs to the end and checks.
    pub fn run(mut self) -> Outcome {
        for node in &mut self.nodes {
            node.cluster.start(0);
            for s in &mut node.shards {
                s.core.start();
            }
        }
        // Subscribers come first, spread over the nodes; publishers when the routes are in.
        for i in 0..self.shape.subscribers {
            let node = self.rng.below(self.shape.nodes as u64) as usize;
            self.returns[i] = Some((1_000 + self.rng.below(500), node));
        }
        for i in self.shape.subscribers..self.clients.len() {
            let node = self.rng.below(self.shape.nodes as u64) as usize;
            self.returns[i] = Some((WORKLOAD_START_MS + self.rng.below(200), node));
        }
        while self.now() < END_MS {
            let step = self.rng.range(0, 2);
            self.clock.set(self.now() + step);
            super::SIM_NOW.with(|n| n.set(self.now()));
            let now = self.now();
            self.net.borrow_mut().deliver(now);
            self.step_actors(now);
            if (WORKLOAD_START_MS..CHAOS_END_MS).contains(&now) {
                self.chaos(now);
            }
            if now >= CHAOS_END_MS {
                self.heal_all(now);
            }
            self.heal_due(now);
            self.restart_due(now);
            self.watch_peers();
            if now >= self.next_bounds_check {
                self.next_bounds_check = now + BOUNDS_CHECK_MS;
                self.check_bounds(now);
            }
        }
        self.check_cluster();
        let violations = self.ledger.check();
        self.trace.append(&mut self.ledger.notes);
        // Both are in time order; one list in time order reads best.
        self.trace
            .sort_by_key(|l| l[2..].split(' ').next().and_then(|t| t.parse::<u64>().ok()));
        let delivered = self.ledger.got.values().map(|n| *n as usize).sum();
        Outcome {
            violations,
            trace: self.trace,
            published: self.ledger.msgs.len(),
            delivered,
            flaps: self.flaps,
            faults: self.ledger.faults.len(),
            moves: self.moves,
        }
    }

    /// Every core and client gets one turn, in an order drawn from the seed.
    fn step_actors(&mut self, now: u64) {
        let shards = self.shape.shards;
        let mut order: Vec<usize> =
            (0..self.nodes.len() * (shards + 1) + self.clients.len()).collect();
        self.rng.shuffle(&mut order);
        for a in order {
            let per_node = shards + 1;
            if a < self.nodes.len() * per_node {
                let (n, s) = (a / per_node, a % per_node);
                super::SIM_NODE.with(|c| c.set(n));
                let node = &mut self.nodes[n];
                if node.down_until.is_some() {
                    continue;
                }
                if s < shards {
                    node.shards[s].pump(&self.net, &mut self.rng, now);
                } else {
                    node.cluster.turn(now);
                }
            } else {
                self.client_turn(a - self.nodes.len() * per_node, now);
            }
        }
        let net = &mut *self.net.borrow_mut();
        let mut buf = [0u8; 4096];
        self.zombies.retain(|&z| loop {
            match net.read(z, &mut buf) {
                Ok(0) => {
                    net.close(z);
                    break false;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(_) => {
                    net.close(z);
                    break false;
                }
            }
        });
    }

    fn client_turn(&mut self, i: usize, now: u64) {
        {
            let net = &mut *self.net.borrow_mut();
            self.clients[i].poll(net, &mut self.ledger, now);
        }
        if self.clients[i].phase == Phase::Offline {
            match self.returns[i] {
                Some((at, node)) if at <= now => {
                    self.returns[i] = None;
                    let addr = addr_of(node_host(node), MQTT_PORT);
                    let net = &mut *self.net.borrow_mut();
                    self.clients[i].connect(net, node, &addr, now);
                }
                None => {
                    // Dropped by the broker (taken over, or its node's link): back soon.
                    let mut node = self.rng.below(self.shape.nodes as u64) as usize;
                    if self.ledger.fault_near(now) || !self.shape.roam {
                        node = self.clients[i].node;
                    }
                    self.returns[i] = Some((now + self.rng.range(10, 300), node));
                }
                _ => {}
            }
            return;
        }
        if now < PUBLISH_END_MS && self.rng.chance(100) {
            let net = &mut *self.net.borrow_mut();
            self.clients[i].publish_next(net, &mut self.ledger, now);
        }
    }

    /// Draws this millisecond's disturbances.
    fn chaos(&mut self, now: u64) {
        // A client roams about every two seconds.
        if self
            .rng
            .chance(1000 / 2 / self.clients.len().max(1) as u64 + 1)
        {
            let i = self.rng.below(self.clients.len() as u64) as usize;
            let mut to = self.rng.below(self.shape.nodes as u64) as usize;
            if self.ledger.fault_near(now) || !self.shape.roam {
                // While nodes cannot see each other a session cannot follow its client
                // (partitions are issue 11's): clients come back where they were.
                to = self.clients[i].node;
            }
            let how = self.rng.below(3);
            let rested = self.left_at[i] + self.shape.roam_gap_ms <= now;
            let c = &mut self.clients[i];
            if c.phase == Phase::Online && rested {
                self.left_at[i] = now;
                let net_rc = self.net.clone();
                let mut net = net_rc.borrow_mut();
                let net = &mut *net;
                match how {
                    0 => c.disconnect(net, true, now),
                    1 => c.disconnect(net, false, now),
                    _ => {
                        // Takeover: the new connection arrives while the old is open.
                        if let Some(old) = c.sock.take() {
                            self.zombies.push(old);
                        }
                        c.phase = Phase::Offline;
                    }
                }
                let delay = if how == 2 { 0 } else { self.rng.range(0, 400) };
                self.returns[i] = Some((now + delay, to));
                if to != self.clients[i].node {
                    self.moves += 1;
                }
                let kind = ["leaves", "drops", "is taken over"][how as usize];
                self.log(format!(
                    "client {i} {kind}, back on node {to} in {delay} ms"
                ));
            }
        }
        if self.shape.crashes && self.rng.chance(1) && self.rng.chance(80) {
            self.crash(now);
        }
        if !self.shape.link_faults || self.shape.nodes < 2 {
            return;
        }
        // A link fault about every four seconds.
        if self.rng.chance(1) && self.rng.chance(250) {
            let a = self.rng.below(self.shape.nodes as u64) as usize;
            let b =
                (a + 1 + self.rng.below(self.shape.nodes as u64 - 1) as usize) % self.shape.nodes;
            let (ha, hb) = (node_host(a), node_host(b));
            if self.rng.chance(500) {
                self.net.borrow_mut().reset_between(ha, hb);
                let f = self.ledger.fault_started(now);
                // Down until the link is dialled again and the routes re-sent.
                self.ledger.fault_ended(f, now + 3_000);
                self.log(format!("links between node {a} and node {b} reset"));
            } else {
                let one_way = self.rng.chance(300);
                let until = now + self.rng.range(300, 8_000);
                self.net.borrow_mut().partition(ha, hb, one_way);
                let fault = self.ledger.fault_started(now);
                self.partitions.push(Partition {
                    a: ha,
                    b: hb,
                    until,
                    fault,
                });
                let kind = if one_way { "one-way" } else { "both ways" };
                self.log(format!(
                    "partition node {a} -> node {b} ({kind}) until t={until}"
                ));
            }
        }
    }

    /// A node dies (kill -9): its connections reset, its state is gone; it restarts later
    /// from its member file alone. One node down at a time.
    fn crash(&mut self, now: u64) {
        if self.nodes.iter().any(|n| n.down_until.is_some()) {
            return;
        }
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        let until = now + self.rng.range(300, 3_000);
        if until + 2_000 >= CHAOS_END_MS {
            return;
        }
        self.net.borrow_mut().crash(node_host(i));
        self.nodes[i].down_until = Some(until);
        let f = self.ledger.fault_started(now);
        // Its peers see it back, and it sees its sessions' clients back, a little later.
        self.ledger.fault_ended(f, until + 3_000);
        self.log(format!("node {i} crashed, restarts at t={until}"));
    }

    /// Restarts crashed nodes whose time has come: new cores, old member file.
    fn restart_due(&mut self, now: u64) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].down_until.is_none_or(|t| t > now) {
                continue;
            }
            let members = self.nodes[i].members.clone();
            let mut node = build_node(
                i,
                &self.shape,
                &self.seeds,
                &self.net,
                &self.clock,
                &mut self.rng,
                members,
            );
            node.cluster.start(now);
            for s in &mut node.shards {
                s.core.start();
            }
            self.nodes[i] = node;
            self.peers_seen[i] = 0;
            self.log(format!("node {i} restarted"));
        }
    }

    fn heal_due(&mut self, now: u64) {
        let due: Vec<Partition> = {
            let (due, keep) = std::mem::take(&mut self.partitions)
                .into_iter()
                .partition(|p| p.until <= now);
            self.partitions = keep;
            due
        };
        for p in due {
            self.net.borrow_mut().unblock(p.a, p.b);
            // The side that marked the other down re-syncs when the link is back.
            self.ledger.fault_ended(p.fault, now + 3_000);
            self.log(format!("partition {} - {} healed", p.a, p.b));
        }
    }

    /// At the end, with every fault long healed: a client is online on one node at most,
    /// each node replicates exactly the filters its sessions hold, and every other node's
    /// replica of them is the same.
    fn check_cluster(&mut self) {
        let mut online: BTreeMap<Arc<str>, Vec<usize>> = BTreeMap::new();
        let mut truth: Vec<BTreeSet<String>> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let mut filters = BTreeSet::new();
            for s in &node.shards {
                for c in s.core.online_clients() {
                    online.entry(c).or_default().push(i);
                }
                filters.extend(s.core.session_filters().iter().map(|f| f.to_string()));
            }
            truth.push(filters);
        }
        let v = &mut self.ledger.violations;
        for (client, nodes) in online {
            if nodes.len() > 1 {
                v.push(format!("end: client {client} is online on nodes {nodes:?}"));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let own: BTreeSet<String> = node.cluster.own_routes().into_iter().collect();
            if own != truth[i] {
                v.push(format!(
                    "end: node {i} replicates {own:?} but its sessions hold {:?}",
                    truth[i]
                ));
            }
            for (j, other) in self.nodes.iter().enumerate() {
                if i == j {
                    continue;
                }
                match other.cluster.replica_of(&node.name) {
                    None => v.push(format!("end: node {j} does not see node {i} up")),
                    Some(r) => {
                        let r: BTreeSet<String> = r.into_iter().collect();
                        if r != truth[i] {
                            v.push(format!(
                                "end: node {j} holds {r:?} for node {i}, which holds {:?}",
                                truth[i]
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Every queue within its bound (checked every [`BOUNDS_CHECK_MS`]).
    fn check_bounds(&mut self, now: u64) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            for (j, s) in node.shards.iter_mut().enumerate() {
                for what in s.core.bounds_exceeded() {
                    self.ledger.violations.push(format!(
                        "t={now}: node {i} shard {j}: bound exceeded: {what}"
                    ));
                }
            }
        }
    }

    /// Logs each change in how many peers a node sees.
    fn watch_peers(&mut self) {
        for i in 0..self.nodes.len() {
            let up = self.nodes[i]
                .control
                .peers_up
                .load(std::sync::atomic::Ordering::Relaxed);
            if up < self.peers_seen[i] && !self.ledger.fault_near(self.now()) {
                self.flaps += 1;
            }
            if up != self.peers_seen[i] {
                self.peers_seen[i] = up;
                self.log(format!("node {i} sees {up} peers"));
            }
        }
    }

    fn heal_all(&mut self, now: u64) {
        for p in &mut self.partitions {
            p.until = now;
        }
    }
}

fn build_node(
    i: usize,
    shape: &Shape,
    seeds: &[String],
    net: &Rc<RefCell<Net>>,
    clock: &Clock,
    rng: &mut Rng,
    members: Rc<RefCell<Option<String>>>,
) -> SimNode {
    let host = node_host(i);
    let cluster_addr = addr_of(host, CLUSTER_PORT);
    let mqtt_addr = addr_of(host, MQTT_PORT);
    net.borrow_mut().listen(host, &cluster_addr, 1);
    net.borrow_mut().listen(host, &mqtt_addr, shape.shards);
    let cluster_cfg = ClusterConfig {
        bind: Some(cluster_addr.parse().expect("a simulated address")),
        cookie: "simulated cluster".into(),
        discovery: Discovery::Static(
            seeds
                .iter()
                .filter(|s| **s != cluster_addr)
                .cloned()
                .collect(),
        ),
        heartbeat_ms: 500,
        down_after_ms: 2_000,
        ..ClusterConfig::default()
    };
    let node_name = format!("sim{i}@{}", super::net::ip_of(host));
    let cfg = BrokerConfig {
        node_name: node_name.clone(),
        shards: shape.shards,
        bind: mqtt_addr.parse().expect("a simulated address"),
        cluster: cluster_cfg.clone(),
        ..BrokerConfig::default()
    };
    let mut endpoints = crate::mesh::build(shape.shards).expect("eventfds for the mesh");
    let cluster_mesh = endpoints.pop().expect("the mesh has a cluster endpoint");
    let control = Arc::new(ClusterControl::default());
    let shared = Arc::new(NodeShared {
        cfg,
        metrics: Default::default(),
        shutdown: AtomicBool::new(false),
        cluster: control.clone(),
        cluster_bell: cluster_mesh.doorbell_of(shape.shards),
        clock: crate::clock::NodeClock::start(),
    });
    let mut shards = Vec::new();
    for (j, mesh) in endpoints.into_iter().enumerate() {
        let armed = Rc::new(RefCell::new(Armed::default()));
        let io = SimShardIo {
            net: net.clone(),
            armed: armed.clone(),
            clock: clock.clone(),
        };
        let core = crate::shard::Shard::new(shared.clone(), mesh, Box::new(io), rng.next_u64());
        shards.push(SimShard {
            core,
            armed,
            listen: (mqtt_addr.clone(), j),
        });
    }
    let io = SimClusterIo {
        net: net.clone(),
        host,
        listen: cluster_addr.clone(),
        rng: rng.fork(),
        clock: clock.clone(),
        members: members.clone(),
    };
    let cluster = Cluster::new(
        cluster_cfg,
        shared,
        cluster_mesh,
        control.clone(),
        Box::new(io),
        cluster_addr,
    );
    SimNode {
        name: node_name,
        control: control.clone(),
        shards,
        cluster,
        members,
        down_until: None,
    }
}
