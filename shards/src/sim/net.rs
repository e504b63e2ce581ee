//! The simulator's network: TCP-like connections between hosts, in memory.
//!
//! A connection is two ends (socket ids `2k` and `2k + 1`). What one end writes travels as
//! chunks with an arrival time and becomes readable at the other end in order (FIFO per
//! direction, as TCP). A send buffer bounds what may be in flight (`SOCK_BUF_BYTES`), so a
//! reader that stops reading pushes back on its writer. Faults are the ones a network has:
//! a partition between two hosts (one-way or both ways) holds chunks in flight until it heals
//! (TCP retransmits) and refuses new connections; a reset ends every connection between two
//! hosts; a crashed host loses its listeners and its peers see resets.

use super::rng::Rng;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr};

/// A socket end in the simulated network.
pub type SockId = u64;
/// A machine: nodes are hosts `1..=n`, clients live on hosts from [`CLIENT_HOST_BASE`].
pub type Host = u32;

/// First host number of simulated clients.
pub const CLIENT_HOST_BASE: Host = 1000;
/// Bytes one end may have in flight plus unread at its peer before writes would block.
pub const SOCK_BUF_BYTES: usize = 256 * 1024;

/// The address a host has (loopback-looking, never used for real traffic).
pub fn ip_of(host: Host) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (host >> 8) as u8, host as u8))
}

/// One end of a connection.
#[derive(Default)]
struct End {
    host: Host,
    /// Arrived and not yet read.
    readable: VecDeque<u8>,
    /// Sent towards this end, not yet arrived: (arrival ms, bytes), in order.
    in_flight: VecDeque<(u64, Bytes)>,
    /// Least delay (ms) of what travels towards this end: most paths are fast, some are
    /// slow (a congested or distant link), so messages and route updates race.
    base_latency_ms: u64,
    /// The peer shut down writing: EOF once everything before it was read.
    peer_fin: bool,
    /// This end shut down writing.
    wr_shut: bool,
    /// This end is closed: it reads and writes nothing more.
    closed: bool,
    /// The connection was reset: every call fails.
    reset: bool,
}

/// A listening address: connections wait in one of its accept queues (several shards
/// listening on one port with `SO_REUSEPORT` each have one; the kernel picks).
struct Listener {
    host: Host,
    queues: Vec<VecDeque<SockId>>,
}

/// The whole network of a simulation.
pub struct Net {
    ends: BTreeMap<SockId, End>,
    listeners: BTreeMap<String, Listener>,
    /// Directed pairs (from, to) whose traffic does not get through.
    blocked: BTreeSet<(Host, Host)>,
    next_conn: u64,
    rng: Rng,
    /// Most extra delay (ms) a chunk may get on its way.
    pub max_latency_ms: u64,
}

impl Net {
    pub fn new(rng: Rng) -> Net {
        Net {
            ends: BTreeMap::new(),
            listeners: BTreeMap::new(),
            blocked: BTreeSet::new(),
            next_conn: 1,
            rng,
            max_latency_ms: 3,
        }
    }

    /// Opens `addr` on `host` with `queues` accept queues.
    pub fn listen(&mut self, host: Host, addr: &str, queues: usize) {
        self.listeners.insert(
            addr.to_string(),
            Listener {
                host,
                queues: vec![VecDeque::new(); queues],
            },
        );
    }

    /// Connects from `host` to `addr`: refused when nobody listens there or the two hosts
    /// cannot reach each other. Returns the connecting end; the other waits in an accept
    /// queue.
    pub fn connect(&mut self, host: Host, addr: &str) -> io::Result<SockId> {
        let Some(l) = self.listeners.get(addr) else {
            return Err(io::ErrorKind::ConnectionRefused.into());
        };
        let server = l.host;
        if self.blocked.contains(&(host, server)) || self.blocked.contains(&(server, host)) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let id = self.next_conn * 2;
        self.next_conn += 1;
        let mut slow = || {
            if self.rng.chance(100) {
                self.rng.range(20, 120)
            } else {
                0
            }
        };
        let (up, down) = (slow(), slow());
        self.ends.insert(
            id,
            End {
                host,
                base_latency_ms: down,
                ..End::default()
            },
        );
        self.ends.insert(
            id + 1,
            End {
                host: server,
                base_latency_ms: up,
                ..End::default()
            },
        );
        let n = self.listeners[addr].queues.len() as u64;
        let q = self.rng.below(n) as usize;
        if let Some(l) = self.listeners.get_mut(addr) {
            l.queues[q].push_back(id + 1);
        }
        Ok(id)
    }

    /// The next connection waiting in accept queue `queue` of `addr`.
    pub fn accept(&mut self, addr: &str, queue: usize) -> Option<SockId> {
        self.listeners
            .get_mut(addr)
            .and_then(|l| l.queues.get_mut(queue))
            .and_then(|q| q.pop_front())
    }

    /// The address of the host at the other end.
    pub fn peer_ip(&self, s: SockId) -> Option<IpAddr> {
        self.ends.get(&(s ^ 1)).map(|e| ip_of(e.host))
    }

    /// Writes what fits of `bufs` (in order), like `writev` on a non-blocking socket.
    pub fn write(&mut self, s: SockId, bufs: &[Bytes], now_ms: u64) -> io::Result<usize> {
        let (reset, closed, shut) = match self.ends.get(&s) {
            Some(e) => (e.reset, e.closed, e.wr_shut),
            None => return Err(io::ErrorKind::NotConnected.into()),
        };
        if reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if closed || shut {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let Some(peer) = self.ends.get(&(s ^ 1)) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if peer.closed {
            // Writing to a closed socket gets a reset back.
            self.reset_conn(s);
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let queued = peer.readable.len() + peer.in_flight.iter().map(|c| c.1.len()).sum::<usize>();
        let mut room = SOCK_BUF_BYTES.saturating_sub(queued);
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let last = peer.in_flight.back().map_or(0, |c| c.0);
        let at =
            (now_ms + peer.base_latency_ms + self.rng.below(self.max_latency_ms + 1)).max(last);
        let peer = self.ends.get_mut(&(s ^ 1)).expect("checked above");
        let mut written = 0;
        for b in bufs {
            if room == 0 {
                break;
            }
            let n = b.len().min(room);
            if n > 0 {
                peer.in_flight.push_back((at, b.slice(..n)));
            }
            room -= n;
            written += n;
        }
        Ok(written)
    }

    /// Reads what has arrived, like `read` on a non-blocking socket: `Ok(0)` is EOF.
    pub fn read(&mut self, s: SockId, buf: &mut [u8]) -> io::Result<usize> {
        let Some(e) = self.ends.get_mut(&s) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if e.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if e.closed {
            return Err(io::ErrorKind::NotConnected.into());
        }
        if !e.readable.is_empty() {
            let n = buf.len().min(e.readable.len());
            for (i, b) in e.readable.drain(..n).enumerate() {
                buf[i] = b;
            }
            return Ok(n);
        }
        if e.peer_fin && e.in_flight.is_empty() {
            return Ok(0);
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Something to report on `s`: data, EOF or a reset.
    pub fn readable(&self, s: SockId) -> bool {
        self.ends.get(&s).is_some_and(|e| {
            !e.closed
                && (e.reset || !e.readable.is_empty() || (e.peer_fin && e.in_flight.is_empty()))
        })
    }

    /// Whether `s` is still open here (not closed, not reset, not forgotten).
    pub fn is_open(&self, s: SockId) -> bool {
        self.ends.get(&s).is_some_and(|e| !e.closed)
    }

    /// Room to write on `s` (or an error to report).
    pub fn writable(&self, s: SockId) -> bool {
        let Some(e) = self.ends.get(&s) else {
            return true;
        };
        let Some(peer) = self.ends.get(&(s ^ 1)) else {
            return true;
        };
        let queued = peer.readable.len() + peer.in_flight.iter().map(|c| c.1.len()).sum::<usize>();
        e.reset || e.closed || peer.closed || queued < SOCK_BUF_BYTES
    }

    /// `shutdown(SHUT_WR)`: the peer reads EOF after what was sent.
    pub fn shutdown_write(&mut self, s: SockId) {
        if let Some(e) = self.ends.get_mut(&s) {
            e.wr_shut = true;
        }
        if let Some(p) = self.ends.get_mut(&(s ^ 1)) {
            p.peer_fin = true;
        }
    }

    /// `close`: the peer reads EOF; nothing more is read or written here.
    pub fn close(&mut self, s: SockId) {
        self.shutdown_write(s);
        if let Some(e) = self.ends.get_mut(&s) {
            e.closed = true;
            e.readable.clear();
            e.in_flight.clear();
        }
        self.forget_if_done(s);
    }

    fn forget_if_done(&mut self, s: SockId) {
        let done = |e: Option<&End>| e.is_none_or(|e| e.closed || e.reset);
        if done(self.ends.get(&s)) && done(self.ends.get(&(s ^ 1))) {
            self.ends.remove(&s);
            self.ends.remove(&(s ^ 1));
        }
    }

    /// Resets the connection `s` belongs to: both ends fail from now on.
    pub fn reset_conn(&mut self, s: SockId) {
        for end in [s, s ^ 1] {
            if let Some(e) = self.ends.get_mut(&end) {
                e.reset = true;
                e.readable.clear();
                e.in_flight.clear();
            }
        }
    }

    /// Resets every connection between hosts `a` and `b`.
    pub fn reset_between(&mut self, a: Host, b: Host) {
        let ids: Vec<SockId> = self
            .ends
            .iter()
            .filter(|(id, e)| {
                e.host == a && self.ends.get(&(**id ^ 1)).is_some_and(|p| p.host == b)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.reset_conn(id);
        }
    }

    /// Traffic from `from` to `to` stops getting through (and back too, unless `one_way`).
    pub fn partition(&mut self, from: Host, to: Host, one_way: bool) {
        self.blocked.insert((from, to));
        if !one_way {
            self.blocked.insert((to, from));
        }
    }

    /// The partition between `a` and `b` (both directions) heals.
    pub fn unblock(&mut self, a: Host, b: Host) {
        self.blocked.remove(&(a, b));
        self.blocked.remove(&(b, a));
    }

    /// Every partition heals; what was held in flight arrives.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// A host dies: its listeners go, every connection it had is reset (its peers see it;
    /// its own ends are gone with the process).
    pub fn crash(&mut self, host: Host) {
        self.listeners.retain(|_, l| l.host != host);
        let ids: Vec<SockId> = self
            .ends
            .iter()
            .filter(|(_, e)| e.host == host)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.reset_conn(id);
        }
    }

    /// Moves every chunk whose time has come (and whose path is open) to its reader.
    pub fn deliver(&mut self, now_ms: u64) {
        let hosts: BTreeMap<SockId, Host> = self.ends.iter().map(|(k, e)| (*k, e.host)).collect();
        for (id, e) in self.ends.iter_mut() {
            let Some(from) = hosts.get(&(id ^ 1)).copied() else {
                continue;
            };
            if self.blocked.contains(&(from, e.host)) {
                continue;
            }
            while e.in_flight.front().is_some_and(|c| c.0 <= now_ms) {
                let (_, b) = e.in_flight.pop_front().expect("front checked");
                e.readable.extend(b.iter());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_after_their_time_and_not_across_a_partition() {
        let mut net = Net::new(Rng::new(1));
        net.listen(1, "n1:1883", 1);
        let c = net.connect(1000, "n1:1883").unwrap();
        let s = net.accept("n1:1883", 0).unwrap();
        net.write(
            c,
            &[Bytes::from_static(b"ab"), Bytes::from_static(b"cd")],
            0,
        )
        .unwrap();
        net.partition(1000, 1, true);
        net.deliver(100);
        let mut buf = [0u8; 8];
        assert!(net.read(s, &mut buf).is_err(), "held by the partition");
        net.heal();
        net.deliver(100);
        assert_eq!(net.read(s, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"abcd");
        net.shutdown_write(c);
        assert_eq!(net.read(s, &mut buf).unwrap(), 0, "EOF after the data");
    }

    #[test]
    fn a_reader_that_does_not_read_blocks_its_writer_and_a_crash_resets() {
        let mut net = Net::new(Rng::new(2));
        net.listen(1, "n1:1883", 2);
        let c = net.connect(1000, "n1:1883").unwrap();
        let big = Bytes::from(vec![0u8; SOCK_BUF_BYTES + 10]);
        assert_eq!(
            net.write(c, std::slice::from_ref(&big), 0).unwrap(),
            SOCK_BUF_BYTES
        );
        assert_eq!(
            net.write(c, &[big], 0).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        net.crash(1);
        let mut buf = [0u8; 4];
        assert_eq!(
            net.read(c, &mut buf).unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert!(
            net.connect(1000, "n1:1883").is_err(),
            "no listener after a crash"
        );
    }
}
