//! The cluster core on an in-memory network and a virtual clock: no socket, OS clock, OS
//! random source or disk (what the simulator relies on).

use super::*;
use crate::clock::NodeClock;
use crate::config::BrokerConfig;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;

/// An in-memory network: connections are pairs of socket ids, bytes written to one end wait
/// in the other end's inbox.
#[derive(Default)]
struct Net {
    next_id: u64,
    /// Bytes waiting to be read on a socket end, and whether its peer closed.
    inbox: HashMap<u64, (VecDeque<u8>, bool)>,
    peer: HashMap<u64, u64>,
    /// Connections waiting to be accepted, by listening address.
    backlog: HashMap<String, VecDeque<(u64, IpAddr)>>,
    /// Every byte written is lost (a partition).
    cut: bool,
}

struct MemIo {
    net: Rc<RefCell<Net>>,
    addr: String,
    ip: IpAddr,
    nonces: u8,
}

fn sim_id(sock: &Sock) -> u64 {
    sock.sim_id().expect("only simulated sockets here")
}

impl ClusterIo for MemIo {
    fn accept(&mut self) -> Option<(Sock, String, Option<IpAddr>)> {
        let mut net = self.net.borrow_mut();
        let (id, ip) = net.backlog.get_mut(&self.addr)?.pop_front()?;
        Some((Sock::Sim(id), format!("{ip}:50000"), Some(ip)))
    }

    fn dial(&mut self, addr: &str) -> std::io::Result<(Sock, Option<IpAddr>)> {
        let mut net = self.net.borrow_mut();
        if !net.backlog.contains_key(addr) {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        let (ours, theirs) = (net.next_id, net.next_id + 1);
        net.next_id += 2;
        net.peer.insert(ours, theirs);
        net.peer.insert(theirs, ours);
        net.inbox.insert(ours, Default::default());
        net.inbox.insert(theirs, Default::default());
        let backlog = net.backlog.get_mut(addr).expect("checked above");
        backlog.push_back((theirs, self.ip));
        let ip = addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        Ok((Sock::Sim(ours), ip))
    }

    fn resolve(&mut self, addr: &str) -> Vec<IpAddr> {
        addr.parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .into_iter()
            .collect()
    }

    fn read(&mut self, sock: &Sock, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut net = self.net.borrow_mut();
        let Some((bytes, closed)) = net.inbox.get_mut(&sim_id(sock)) else {
            return Ok(0);
        };
        if bytes.is_empty() {
            return if *closed {
                Ok(0)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(bytes.len());
        for (dst, src) in buf.iter_mut().zip(bytes.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }

    fn write(&mut self, sock: &Sock, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut net = self.net.borrow_mut();
        let total = bufs.iter().map(|b| b.len()).sum();
        let Some(&peer) = net.peer.get(&sim_id(sock)) else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        if net.cut {
            return Ok(total);
        }
        let Some((inbox, _)) = net.inbox.get_mut(&peer) else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        for b in bufs {
            inbox.extend(b.iter());
        }
        Ok(total)
    }

    fn close(&mut self, sock: Sock) {
        let mut net = self.net.borrow_mut();
        let id = sim_id(&sock);
        net.inbox.remove(&id);
        if let Some(peer) = net.peer.remove(&id) {
            net.peer.remove(&peer);
            if let Some((_, closed)) = net.inbox.get_mut(&peer) {
                *closed = true;
            }
        }
    }

    fn nonce(&mut self) -> Result<Nonce, String> {
        self.nonces += 1;
        // Distinct per link and per node, and the same in every run.
        let mut n = [self.nonces; 16];
        if let IpAddr::V4(ip) = self.ip {
            n[0] = ip.octets()[3];
        }
        Ok(n)
    }

    fn unix_ms(&self) -> u64 {
        1_700_000_000_000
    }

    fn load_members(&mut self) -> Option<String> {
        None
    }

    fn save_members(&mut self, _text: &str) {}
}

/// A node of no shards (so no data links) named `name@ip`, listening on `ip:4370`.
fn node(net: &Rc<RefCell<Net>>, ip: &str, seeds: Vec<String>) -> (Cluster, Arc<ClusterControl>) {
    let addr = format!("{ip}:{DEFAULT_PORT}");
    net.borrow_mut()
        .backlog
        .insert(addr.clone(), VecDeque::new());
    let cfg = ClusterConfig {
        bind: Some(addr.parse().expect("literal")),
        cookie: "test cookie".into(),
        discovery: Discovery::Static(seeds),
        heartbeat_ms: 100,
        down_after_ms: 500,
        ..ClusterConfig::default()
    };
    let mesh = crate::mesh::build(0)
        .expect("eventfd")
        .pop()
        .expect("cluster endpoint");
    let control = Arc::new(ClusterControl::default());
    let shared = Arc::new(NodeShared {
        cfg: BrokerConfig {
            node_name: format!("node@{ip}"),
            ..BrokerConfig::default()
        },
        metrics: Metrics::default(),
        shutdown: AtomicBool::new(false),
        cluster: control.clone(),
        cluster_bell: mesh.doorbell_of(0),
        clock: NodeClock::start(),
    });
    let io = MemIo {
        net: net.clone(),
        addr: addr.clone(),
        ip: ip.parse().expect("literal"),
        nonces: 0,
    };
    let cluster = Cluster::new(cfg, shared, mesh, control.clone(), Box::new(io), addr);
    (cluster, control)
}

fn up(c: &ClusterControl) -> usize {
    c.peers_up.load(Ordering::Relaxed)
}

#[test]
fn two_cores_on_a_virtual_network_come_up_stay_up_on_heartbeats_and_go_down_when_cut() {
    let net = Rc::new(RefCell::new(Net::default()));
    let (mut a, a_control) = node(&net, "127.0.0.1", vec!["node@127.0.0.2".into()]);
    let (mut b, b_control) = node(&net, "127.0.0.2", Vec::new());
    let mut now_ms = 0;
    a.start(now_ms);
    b.start(now_ms);
    // The handshake and the member sync need a few rounds, not time.
    for _ in 0..20 {
        now_ms += 10;
        a.turn(now_ms);
        b.turn(now_ms);
    }
    assert_eq!((up(&a_control), up(&b_control)), (1, 1), "both peers up");
    // Ten times down_after_ms of virtual time: heartbeats keep both up.
    for _ in 0..500 {
        now_ms += 10;
        a.turn(now_ms);
        b.turn(now_ms);
    }
    assert_eq!(
        (up(&a_control), up(&b_control)),
        (1, 1),
        "heartbeats kept them up"
    );
    // A partition: after down_after_ms of virtual silence each marks the other down.
    net.borrow_mut().cut = true;
    for _ in 0..60 {
        now_ms += 10;
        a.turn(now_ms);
        b.turn(now_ms);
    }
    assert_eq!(
        (up(&a_control), up(&b_control)),
        (0, 0),
        "silent peers went down"
    );
}
