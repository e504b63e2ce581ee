//! The simulator's drivers: [`ShardIo`] and [`ClusterIo`] over the in-memory [`Net`], with
//! the virtual clock, a seeded nonce source and a members "file" that survives a restart.
//!
//! A shard's io_uring is modelled by what the core armed: an accept on its listener queue,
//! receives (one-shot or multishot) and writability polls, each completed by [`SimShard::pump`]
//! when the network has something for it, in a seeded order across sockets and in order on
//! each socket.

use super::net::{ip_of, Host, Net, SockId};
use super::rng::Rng;
use crate::cluster::ClusterIo;
use crate::shard::Shard;
use crate::shard_io::{Done, IoError, ShardEvent, ShardIo, Token};
use crate::sock::Sock;
use bytes::Bytes;
use shardmq_net::cluster::Nonce;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Shutdown};
use std::rc::Rc;

/// Size of one simulated receive (the ring's buffer size).
const RECV_BYTES: usize = 4096;
/// ECONNRESET, as a real receive would report a reset.
const ECONNRESET: i32 = 104;
/// Unix time of virtual time zero.
const UNIX_EPOCH_MS: u64 = 1_800_000_000_000;

/// The virtual clock, shared by everything of one run.
pub type Clock = Rc<Cell<u64>>;

fn sim_id(s: &Sock) -> SockId {
    s.sim_id()
        .expect("the simulator only hands out simulated sockets")
}

fn copy(bufs: &[IoSlice<'_>]) -> Vec<Bytes> {
    bufs.iter().map(|b| Bytes::copy_from_slice(b)).collect()
}

/// What a shard has armed, as its ring would hold it.
#[derive(Default)]
pub struct Armed {
    accept: bool,
    /// Token (encoded) -> (socket, multishot).
    recvs: BTreeMap<u64, (SockId, bool)>,
    writable: BTreeMap<u64, SockId>,
    cancelled: Vec<Token>,
}

/// [`ShardIo`] of one simulated shard.
pub struct SimShardIo {
    pub net: Rc<RefCell<Net>>,
    pub armed: Rc<RefCell<Armed>>,
    pub clock: Clock,
}

impl ShardIo for SimShardIo {
    fn accept(&mut self) {
        self.armed.borrow_mut().accept = true;
    }

    fn recv(&mut self, sock: &Sock, token: Token, multishot: bool) {
        let id = sim_id(sock);
        self.armed
            .borrow_mut()
            .recvs
            .insert(token.encode(), (id, multishot));
    }

    fn cancel(&mut self, token: Token) {
        let mut a = self.armed.borrow_mut();
        let found = a.recvs.remove(&token.encode()).is_some()
            || a.writable.remove(&token.encode()).is_some();
        if found {
            a.cancelled.push(token);
        }
    }

    fn poll_writable(&mut self, sock: &Sock, token: Token) {
        self.armed
            .borrow_mut()
            .writable
            .insert(token.encode(), sim_id(sock));
    }

    fn write(&mut self, sock: &Sock, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let now = self.clock.get();
        self.net.borrow_mut().write(sim_id(sock), &copy(bufs), now)
    }

    fn shutdown(&mut self, sock: &Sock, how: Shutdown) {
        let mut net = self.net.borrow_mut();
        match how {
            Shutdown::Write => net.shutdown_write(sim_id(sock)),
            _ => net.close(sim_id(sock)),
        }
    }

    fn close(&mut self, sock: Sock) {
        self.net.borrow_mut().close(sim_id(&sock));
    }

    fn read_now(&mut self, sock: &Sock, buf: &mut [u8]) -> io::Result<usize> {
        self.net.borrow_mut().read(sim_id(sock), buf)
    }

    fn peer_ip(&self, sock: &Sock) -> Option<IpAddr> {
        self.net.borrow().peer_ip(sim_id(sock))
    }

    fn unix_ms(&self) -> u64 {
        UNIX_EPOCH_MS + self.clock.get()
    }
}

/// An owned completion, collected before the core is called (the core calls back into the
/// driver while it handles one).
enum Completion {
    Accepted(SockId),
    Data(Token, Vec<u8>, bool),
    Failed(Token, IoError),
    Ready(Token),
}

/// A shard of a simulated node with its driver state.
pub struct SimShard {
    pub core: Shard,
    pub armed: Rc<RefCell<Armed>>,
    /// The listening address and this shard's accept queue on it.
    pub listen: (String, usize),
}

impl SimShard {
    /// One turn of the shard: mesh, then the completions the network has for it (in a
    /// seeded order across sockets), then timers and output.
    pub fn pump(&mut self, net: &Rc<RefCell<Net>>, rng: &mut Rng, now: u64) {
        self.core.begin_turn(now);
        let mut done = Vec::new();
        {
            let mut a = self.armed.borrow_mut();
            let mut n = net.borrow_mut();
            for t in a.cancelled.drain(..) {
                done.push(Completion::Failed(t, IoError::Cancelled));
            }
            if a.accept {
                while let Some(id) = n.accept(&self.listen.0, self.listen.1) {
                    done.push(Completion::Accepted(id));
                }
            }
            let keys: Vec<u64> = a.recvs.keys().copied().collect();
            for k in keys {
                let (id, multi) = a.recvs[&k];
                let token = Token::decode(k);
                if !n.is_open(id) {
                    // Shut down here: the pending receive ends as at end of stream.
                    a.recvs.remove(&k);
                    done.push(Completion::Data(token, Vec::new(), false));
                    continue;
                }
                if !n.readable(id) {
                    continue;
                }
                let mut buf = vec![0u8; RECV_BYTES];
                match n.read(id, &mut buf) {
                    Ok(0) => {
                        a.recvs.remove(&k);
                        done.push(Completion::Data(token, Vec::new(), false));
                    }
                    Ok(len) => {
                        buf.truncate(len);
                        if !multi {
                            a.recvs.remove(&k);
                        }
                        done.push(Completion::Data(token, buf, multi));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        a.recvs.remove(&k);
                        done.push(Completion::Failed(token, IoError::Other(ECONNRESET)));
                    }
                }
            }
            let keys: Vec<u64> = a.writable.keys().copied().collect();
            for k in keys {
                if n.writable(a.writable[&k]) {
                    a.writable.remove(&k);
                    done.push(Completion::Ready(Token::decode(k)));
                }
            }
        }
        // Completions of different sockets come in any order; one socket's stay in order
        // (at most one receive per socket per turn).
        let cancels = done
            .iter()
            .take_while(|c| matches!(c, Completion::Failed(_, IoError::Cancelled)))
            .count();
        rng.shuffle(&mut done[cancels..]);
        for c in done {
            let ev = match &c {
                Completion::Accepted(id) => ShardEvent {
                    token: Token::Accept,
                    result: Ok(Done::Accepted(Sock::Sim(*id))),
                    more: true,
                },
                Completion::Data(t, bytes, more) => ShardEvent {
                    token: *t,
                    result: Ok(Done::Data(bytes)),
                    more: *more,
                },
                Completion::Failed(t, e) => ShardEvent {
                    token: *t,
                    result: Err(*e),
                    more: false,
                },
                Completion::Ready(t) => ShardEvent {
                    token: *t,
                    result: Ok(Done::Ready),
                    more: false,
                },
            };
            self.core.on_event(ev);
        }
        self.core.end_turn();
    }
}

/// [`ClusterIo`] of one simulated node.
pub struct SimClusterIo {
    pub net: Rc<RefCell<Net>>,
    pub host: Host,
    pub listen: String,
    pub rng: Rng,
    pub clock: Clock,
    /// The member list as saved; kept by the world across a restart, as a file would be.
    pub members: Rc<RefCell<Option<String>>>,
}

impl ClusterIo for SimClusterIo {
    fn accept(&mut self) -> Option<(Sock, String, Option<IpAddr>)> {
        let mut net = self.net.borrow_mut();
        let id = net.accept(&self.listen, 0)?;
        let ip = net.peer_ip(id);
        let shown = ip.map_or_else(|| "?".to_string(), |ip| format!("{ip}:40000"));
        Some((Sock::Sim(id), shown, ip))
    }

    fn dial(&mut self, addr: &str) -> io::Result<(Sock, Option<IpAddr>)> {
        let id = self.net.borrow_mut().connect(self.host, addr)?;
        let ip = addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        Ok((Sock::Sim(id), ip))
    }

    fn resolve(&mut self, addr: &str) -> Vec<IpAddr> {
        // Simulated names are addresses already.
        addr.parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .into_iter()
            .collect()
    }

    fn read(&mut self, sock: &Sock, buf: &mut [u8]) -> io::Result<usize> {
        self.net.borrow_mut().read(sim_id(sock), buf)
    }

    fn write(&mut self, sock: &Sock, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let now = self.clock.get();
        self.net.borrow_mut().write(sim_id(sock), &copy(bufs), now)
    }

    fn close(&mut self, sock: Sock) {
        self.net.borrow_mut().close(sim_id(&sock));
    }

    fn nonce(&mut self) -> Result<Nonce, String> {
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
        n[8..].copy_from_slice(&self.rng.next_u64().to_le_bytes());
        Ok(n)
    }

    fn unix_ms(&self) -> u64 {
        UNIX_EPOCH_MS + self.clock.get()
    }

    fn load_members(&mut self) -> Option<String> {
        self.members.borrow().clone()
    }

    fn save_members(&mut self, text: &str) {
        *self.members.borrow_mut() = Some(text.to_string());
    }
}

/// The address a node's host has, as a string for listeners and dials.
pub fn addr_of(host: Host, port: u16) -> String {
    format!("{}:{port}", ip_of(host))
}
