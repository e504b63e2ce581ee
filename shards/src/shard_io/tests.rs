//! A shard driven by an in-memory `ShardIo`: no ring, no descriptor, no OS clock.

use super::*;
use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::node_shared::{ClusterControl, NodeShared};
use crate::shard::Shard;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What the shard asked of its io, for the test to look at.
#[derive(Default)]
struct Calls {
    accepts: usize,
    recvs: Vec<(u64, Token, bool)>,
    written: Vec<u8>,
    shutdowns: Vec<(u64, Shutdown)>,
    closed: Vec<u64>,
}

struct FakeIo(Rc<RefCell<Calls>>);

impl ShardIo for FakeIo {
    fn accept(&mut self) {
        self.0.borrow_mut().accepts += 1;
    }
    fn recv(&mut self, sock: &Sock, token: Token, multishot: bool) {
        let id = sock.sim_id().expect("a simulated socket");
        self.0.borrow_mut().recvs.push((id, token, multishot));
    }
    fn cancel(&mut self, _token: Token) {}
    fn poll_writable(&mut self, _sock: &Sock, _token: Token) {}
    fn write(&mut self, _sock: &Sock, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut calls = self.0.borrow_mut();
        let mut n = 0;
        for b in bufs {
            calls.written.extend_from_slice(b);
            n += b.len();
        }
        Ok(n)
    }
    fn shutdown(&mut self, sock: &Sock, how: Shutdown) {
        let id = sock.sim_id().expect("a simulated socket");
        self.0.borrow_mut().shutdowns.push((id, how));
    }
    fn close(&mut self, sock: Sock) {
        let id = sock.sim_id().expect("a simulated socket");
        self.0.borrow_mut().closed.push(id);
    }
    fn read_now(&mut self, _sock: &Sock, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn peer_ip(&self, _sock: &Sock) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, 1]))
    }
    fn unix_ms(&self) -> u64 {
        1_000_000
    }
}

fn shard(calls: &Rc<RefCell<Calls>>) -> Shard {
    let mut endpoints = crate::mesh::build(1).expect("mesh");
    let cluster_bell = endpoints[0].doorbell_of(1);
    endpoints.truncate(1);
    let shared = Arc::new(NodeShared {
        cfg: BrokerConfig::default(),
        metrics: Metrics::default(),
        shutdown: AtomicBool::new(false),
        cluster: Arc::new(ClusterControl::default()),
        cluster_bell,
        clock: crate::clock::NodeClock::start(),
    });
    let mesh = endpoints.pop().expect("one shard endpoint");
    Shard::new(shared, mesh, Box::new(FakeIo(calls.clone())), 42)
}

fn recv(token: Token, data: &[u8]) -> ShardEvent<'_> {
    ShardEvent {
        token,
        result: Ok(Done::Data(data)),
        more: true,
    }
}

#[test]
fn a_shard_without_a_ring_accepts_answers_connect_and_closes_through_its_io() {
    let calls = Rc::new(RefCell::new(Calls::default()));
    let mut shard = shard(&calls);
    shard.start();
    assert_eq!(calls.borrow().accepts, 1);

    shard.begin_turn(10);
    shard.on_event(ShardEvent {
        token: Token::Accept,
        result: Ok(Done::Accepted(Sock::Sim(7))),
        more: true,
    });
    shard.end_turn();
    // Until CONNECT is complete, one receive at a time.
    let (id, token, multishot) = calls.borrow().recvs[0];
    assert_eq!((id, multishot), (7, false));

    // MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, client id "a".
    let connect = [
        0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a',
    ];
    shard.begin_turn(20);
    shard.on_event(recv(token, &connect));
    shard.on_event(recv(token, &[0xc0, 0x00])); // PINGREQ
    assert!(!shard.end_turn(), "everything was written");
    // CONNACK (accepted), then PINGRESP.
    assert_eq!(calls.borrow().written, [0x20, 0x02, 0x00, 0x00, 0xd0, 0x00]);

    shard.begin_turn(30);
    shard.on_event(recv(token, &[0xe0, 0x00])); // DISCONNECT
    shard.end_turn();
    let c = calls.borrow();
    assert_eq!(c.shutdowns, [(7, Shutdown::Both)]);
    assert_eq!(c.closed, [7]);
}

#[test]
fn an_accept_out_of_descriptors_waits_before_accepting_again() {
    let calls = Rc::new(RefCell::new(Calls::default()));
    let mut shard = shard(&calls);
    shard.start();
    shard.begin_turn(0);
    shard.on_event(ShardEvent {
        token: Token::Accept,
        result: Err(IoError::NoDescriptors),
        more: false,
    });
    shard.end_turn();
    assert_eq!(calls.borrow().accepts, 1, "not re-armed at once");
    // The back-off (100 ms) passes on the shard's clock, as the driver hands it in.
    shard.begin_turn(1_000);
    shard.end_turn();
    assert_eq!(calls.borrow().accepts, 2);
}
