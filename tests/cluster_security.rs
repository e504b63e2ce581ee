//! The cluster port against outsiders and hostile peers: a raw cluster peer written here
//! (plain `TcpStream`, frames from `shardmq_net::cluster`) against the real binary. An
//! outsider without the cookie never gets a proof out of the node, by reflection or replay;
//! bytes before the handshake are bounded; and a peer that knows the cookie is still checked
//! like a client (filters, member lists, names).

mod common;

use bytes::BytesMut;
use common::*;
use shardmq_net::cluster::{
    fresh_nonce, handshake_proof, verify_proof, Frame, FrameReader, Nonce, Role, Transcript,
    CLUSTER_PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const COOKIE: &str = "test-cookie-9f2c";

/// A node with a loopback cluster listener; peers are never marked down for silence during
/// a test.
struct Node {
    broker: Broker,
    cluster_port: u16,
}

const NODE_NAME: &str = "n1@127.0.0.1";

fn node() -> Node {
    let cluster_port = free_port();
    let bind = format!("127.0.0.1:{cluster_port}");
    let broker = Broker::start(&[
        ("NODE__NAME", NODE_NAME),
        ("CLUSTER__BIND", &bind),
        ("CLUSTER__COOKIE", COOKIE),
        ("CLUSTER__DOWN_AFTER_MS", "60000"),
        ("CLUSTER__HEARTBEAT_MS", "200"),
    ]);
    // The cluster listener is bound by its own thread, maybe after the MQTT one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", cluster_port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no cluster listener:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Node {
        broker,
        cluster_port,
    }
}

#[derive(Debug, PartialEq)]
enum Got {
    Frame(Frame),
    Closed,
    Silent,
}

/// One raw link to the node.
struct Link {
    s: TcpStream,
    r: FrameReader,
}

impl Link {
    fn open(port: u16) -> Link {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        Link {
            s,
            r: FrameReader::default(),
        }
    }

    fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        f.encode(&mut out);
        let _ = self.s.write_all(&out);
    }

    /// The next frame, or EOF/reset, or nothing within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            match self.r.next_frame() {
                Ok(Some(f)) => return Got::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("the node sent a bad frame: {e}"),
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Got::Silent;
            };
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.r.extend(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Got::Silent
                }
                Err(_) => return Got::Closed,
            }
        }
    }

    /// The node's `Hello` (its name and nonce), which it sends first on every link.
    fn node_hello(&mut self) -> (String, Nonce) {
        match self.recv(WAIT) {
            Got::Frame(Frame::Hello { node, nonce, .. }) => (node, nonce),
            other => panic!("expected the node's Hello, got {other:?}"),
        }
    }

    /// Frames the node sends until it closes the link; panics if it is still open after
    /// `timeout`.
    fn frames_until_closed(&mut self, timeout: Duration) -> Vec<Frame> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Got::Frame(f) => frames.push(f),
                Got::Closed => return frames,
                Got::Silent => panic!("link still open; the node sent {frames:?}"),
            }
        }
    }
}

fn hello(name: &str, nonce: Nonce, cluster_addr: &str) -> Frame {
    Frame::Hello {
        version: CLUSTER_PROTOCOL_VERSION,
        node: name.into(),
        cluster_addr: cluster_addr.into(),
        nonce,
        started_ms: 0,
    }
}

/// Accepts the node's data links to a test peer and completes their handshake as the
/// acceptor, then keeps them open (their bytes are discarded). Runs on detached threads.
fn serve_data_links(name: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let mut l = Link {
                    s,
                    r: FrameReader::default(),
                };
                let (node, theirs) = l.node_hello();
                let ours = fresh_nonce().unwrap();
                l.send(&hello(&name, ours, &format!("127.0.0.1:{port}")));
                let t = Transcript {
                    dialer: &node,
                    dialer_nonce: &theirs,
                    acceptor: &name,
                    acceptor_nonce: &ours,
                };
                loop {
                    match l.recv(Duration::from_secs(60)) {
                        Got::Frame(Frame::Auth { proof }) => {
                            assert!(verify_proof(COOKIE, Role::Dialer, &t, &proof));
                            let proof = handshake_proof(COOKIE, Role::Acceptor, &t);
                            l.send(&Frame::Auth { proof });
                        }
                        Got::Frame(_) => {}
                        _ => return,
                    }
                }
            });
        }
    });
    port
}

/// A peer that knows the cookie, with its control link up: the node has answered with its
/// proof and sent its member list.
fn authenticated_peer(n: &Node, name: &str) -> Link {
    let data_port = serve_data_links(name.to_string());
    let mut l = Link::open(n.cluster_port);
    let (node, theirs) = l.node_hello();
    assert_eq!(node, NODE_NAME);
    let ours = fresh_nonce().unwrap();
    l.send(&hello(name, ours, &format!("127.0.0.1:{data_port}")));
    let t = Transcript {
        dialer: name,
        dialer_nonce: &ours,
        acceptor: &node,
        acceptor_nonce: &theirs,
    };
    l.send(&Frame::Auth {
        proof: handshake_proof(COOKIE, Role::Dialer, &t),
    });
    match l.recv(WAIT) {
        Got::Frame(Frame::Auth { proof }) => {
            assert!(verify_proof(COOKIE, Role::Acceptor, &t, &proof))
        }
        other => panic!("expected the node's proof, got {other:?}"),
    }
    match l.recv(WAIT) {
        Got::Frame(Frame::Members { .. }) => {}
        other => panic!("expected the member list, got {other:?}"),
    }
    let up = format!("node {name} is up");
    assert!(n.broker.log_with(&up, WAIT).contains(&up));
    l
}

/// The node is alive and still an up peer's: it keeps heartbeating on `link`.
fn assert_link_alive(link: &mut Link) {
    let deadline = Instant::now() + WAIT;
    loop {
        match link.recv(deadline.saturating_duration_since(Instant::now())) {
            Got::Frame(Frame::Heartbeat { .. }) => return,
            Got::Frame(_) => {}
            other => panic!("the peer's link is gone: {other:?}"),
        }
    }
}

#[test]
fn a_reflected_challenge_does_not_authenticate_an_outsider() {
    let n = node();
    // Link A: the node's challenge to us.
    let mut a = Link::open(n.cluster_port);
    let (_, na) = a.node_hello();
    // Link B: hand the node its own challenge and hope it proves knowledge of the cookie
    // for it (it used to answer any Hello with the digest of the Hello's nonce).
    let mut b = Link::open(n.cluster_port);
    let _ = b.node_hello();
    b.send(&hello("evil@127.0.0.1", na, "127.0.0.1:9"));
    let reflected = match b.recv(Duration::from_secs(1)) {
        Got::Frame(Frame::Auth { proof }) => Some(proof),
        _ => None,
    };
    assert_eq!(
        reflected, None,
        "the node proved the cookie to an unproven peer"
    );
    // Relay whatever there is back on A, as the outsider's proof.
    a.send(&hello(
        "evil@127.0.0.1",
        fresh_nonce().unwrap(),
        "127.0.0.1:9",
    ));
    a.send(&Frame::Auth {
        proof: reflected.unwrap_or([0; 32]),
    });
    let sent = a.frames_until_closed(WAIT);
    assert!(sent.is_empty(), "the outsider got {sent:?}");
    assert!(n
        .broker
        .log_with("wrong cookie", WAIT)
        .contains("wrong cookie"));
    assert!(!n.broker.log().contains("node evil@127.0.0.1 is up"));
    assert_broker_serves(&n.broker);
}

#[test]
fn a_replayed_handshake_is_refused() {
    let n = node();
    let name = "t1@127.0.0.1";
    // A real peer's handshake, recorded.
    let mut l = Link::open(n.cluster_port);
    let (node, theirs) = l.node_hello();
    let ours = fresh_nonce().unwrap();
    let t = Transcript {
        dialer: name,
        dialer_nonce: &ours,
        acceptor: &node,
        acceptor_nonce: &theirs,
    };
    let recorded = [
        hello(name, ours, "127.0.0.1:9"),
        Frame::Auth {
            proof: handshake_proof(COOKIE, Role::Dialer, &t),
        },
    ];
    drop(l);
    // Replayed verbatim on a new link: the node's fresh nonce is not the recorded one.
    let mut replay = Link::open(n.cluster_port);
    let (_, fresh) = replay.node_hello();
    assert_ne!(fresh, theirs, "the node reused a nonce");
    for f in &recorded {
        replay.send(f);
    }
    let sent = replay.frames_until_closed(WAIT);
    assert!(sent.is_empty(), "the replayer got {sent:?}");
    assert!(n
        .broker
        .log_with("wrong cookie", WAIT)
        .contains("wrong cookie"));
    assert!(!n.broker.log().contains("is up"));
}

#[test]
fn a_peer_with_the_wrong_cookie_is_refused_without_a_proof_from_the_node() {
    let n = node();
    let name = "t1@127.0.0.1";
    let mut l = Link::open(n.cluster_port);
    let (node, theirs) = l.node_hello();
    let ours = fresh_nonce().unwrap();
    let t = Transcript {
        dialer: name,
        dialer_nonce: &ours,
        acceptor: &node,
        acceptor_nonce: &theirs,
    };
    l.send(&hello(name, ours, "127.0.0.1:9"));
    l.send(&Frame::Auth {
        proof: handshake_proof("not-the-cookie", Role::Dialer, &t),
    });
    let sent = l.frames_until_closed(WAIT);
    assert!(
        sent.is_empty(),
        "the node answered a wrong cookie with {sent:?}"
    );
    assert!(n
        .broker
        .log_with("wrong cookie", WAIT)
        .contains("wrong cookie"));
}

#[test]
fn a_peer_whose_name_is_not_its_address_is_refused() {
    let n = node();
    let name = "t1@10.9.8.7";
    let mut l = Link::open(n.cluster_port);
    let (node, theirs) = l.node_hello();
    let ours = fresh_nonce().unwrap();
    let t = Transcript {
        dialer: name,
        dialer_nonce: &ours,
        acceptor: &node,
        acceptor_nonce: &theirs,
    };
    l.send(&hello(name, ours, "10.9.8.7:4370"));
    l.send(&Frame::Auth {
        proof: handshake_proof(COOKIE, Role::Dialer, &t),
    });
    let sent = l.frames_until_closed(WAIT);
    assert!(sent.is_empty(), "the node accepted {name} with {sent:?}");
    let log = n.broker.log_with("not the host of its name", WAIT);
    assert!(log.contains("refusing node t1@10.9.8.7"), "{log}");
}

#[test]
fn an_oversized_frame_before_the_handshake_closes_only_that_link() {
    let n = node();
    let mut peer = authenticated_peer(&n, "t1@127.0.0.1");
    let mut bad = Link::open(n.cluster_port);
    let _ = bad.node_hello();
    // A Hello that claims 1 MiB: far below the authenticated limit, far above what a
    // handshake needs. Only part of it is sent: the node must not wait for (and buffer) it.
    let mut bytes = (1u32 << 20).to_be_bytes().to_vec();
    bytes.push(1);
    bytes.extend([b'x'; 16 * 1024]);
    let _ = bad.s.write_all(&bytes);
    // Well before the 5 s handshake deadline.
    let sent = bad.frames_until_closed(Duration::from_secs(2));
    assert!(sent.is_empty());
    assert_link_alive(&mut peer);
    assert_broker_serves(&n.broker);
}

#[test]
fn a_peer_route_of_300000_levels_is_refused_and_the_node_keeps_serving() {
    let n = node();
    let mut peer = authenticated_peer(&n, "t1@127.0.0.1");
    let deep = "a/".repeat(300_000) + "#";
    peer.send(&Frame::RouteAdd {
        seq: 1,
        filter: deep.clone(),
    });
    peer.send(&Frame::RouteSnapshot {
        seq: 2,
        filters: vec![deep, "ok/+".into(), "bad/#/x".into()],
    });
    // The snapshot comes second; its line is the last to appear.
    let log = n.broker.log_with("refused 2 invalid route filter", WAIT);
    assert!(log.contains("refused 1 invalid route filter"), "{log}");
    assert!(log.contains("refused 2 invalid route filter"), "{log}");
    assert!(n
        .broker
        .log()
        .contains("refused 1 invalid route filter(s) from t1@127.0.0.1"));
    assert_link_alive(&mut peer);
    assert_broker_serves(&n.broker);
}

#[test]
fn an_oversized_member_list_is_refused_and_not_saved() {
    let n = node();
    let mut peer = authenticated_peer(&n, "t1@127.0.0.1");
    let members = (0..100)
        .map(|i| {
            (
                format!("m{i}@127.0.0.1"),
                format!("127.0.0.1:{}", 20000 + i),
            )
        })
        .collect();
    peer.send(&Frame::Members { members });
    let log = n.broker.log_with("sent a member list of 100 nodes", WAIT);
    assert!(log.contains("sent a member list of 100 nodes"), "{log}");
    assert!(!log.contains("learned of node m"), "{log}");
    let saved = std::fs::read_to_string(n.broker.dir.join("data/cluster_members")).unwrap();
    assert!(saved.contains("t1@127.0.0.1"), "{saved}");
    assert!(!saved.contains("m0@"), "{saved}");
    assert_link_alive(&mut peer);
}

#[test]
fn links_beyond_the_handshake_cap_are_closed_at_accept() {
    let n = node();
    let mut open = Vec::new();
    let refused_at = loop {
        let mut l = Link::open(n.cluster_port);
        match l.recv(WAIT) {
            Got::Frame(Frame::Hello { .. }) => open.push(l),
            Got::Closed => break open.len(),
            other => panic!("link {}: {other:?}", open.len()),
        }
        assert!(open.len() <= 300, "no cap on links in their handshake");
    };
    assert!(refused_at >= 200, "refused after {refused_at} links");
    let log = n.broker.log_with("already in their handshake", WAIT);
    assert!(log.contains("already in their handshake"), "{log}");
    // The slots free up with the links; a real peer gets in again.
    drop(open);
    let deadline = Instant::now() + WAIT;
    while !matches!(
        Link::open(n.cluster_port).recv(WAIT),
        Got::Frame(Frame::Hello { .. })
    ) {
        assert!(Instant::now() < deadline, "the slots were not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut peer = authenticated_peer(&n, "t1@127.0.0.1");
    assert_link_alive(&mut peer);
}
