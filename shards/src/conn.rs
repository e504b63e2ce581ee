//! Client connections: compact per-socket state in a slab, and the vectored write path.
//!
//! A connection is not a task and owns no buffer while idle: reads land in the shard's pool
//! (see `ring`), and only the bytes of an incomplete packet are kept in `partial`. Outgoing
//! packets are queued as `Bytes` (a small header plus the shared payload) and written with one
//! `writev` per connection per shard turn.

use crate::shard_io::ShardIo;
use crate::sock::Sock;
use bytes::{Buf, Bytes};
use shardmq_net::{Protocol, Will};
use std::collections::VecDeque;
use std::io::{self, IoSlice};

/// Most iovecs handed to one `writev`.
const IOV_MAX: usize = 64;
/// Memory of one queued entry besides its bytes (the `Bytes` in the deque), for budgets.
const OUT_ENTRY_BYTES: usize = std::mem::size_of::<Bytes>();

/// Lifecycle of a connection (sessions have their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Accepted, waiting for a complete CONNECT.
    Connecting,
    /// CONNECT accepted, waiting for other cluster nodes to hand over the session; bytes
    /// that arrive meanwhile are kept in `partial`.
    Resuming,
    /// CONNACK sent; bound to a session.
    Active,
}

/// One client socket on this shard.
pub struct Conn {
    pub sock: Sock,
    pub state: ConnState,
    pub protocol: Protocol,
    /// Index of the session in the shard's session slab once active.
    pub session: u32,
    /// Bytes of a packet that has not fully arrived; empty (unallocated) otherwise.
    pub partial: Vec<u8>,
    out: VecDeque<Bytes>,
    /// Bytes queued in `out`.
    pub out_bytes: usize,
    /// Memory held by queued control packets (responses the client provoked: PINGRESP,
    /// acks, SUBACK...), an upper bound in bytes including each entry's slot. Deliveries are
    /// bounded elsewhere (session window and queue); these are not, so a client that keeps
    /// asking and never reads is cut when this passes `mqtt.max_conn_output_bytes`.
    pub ctrl_bytes: usize,
    /// Waiting for POLLOUT after the kernel's send buffer filled.
    pub write_blocked: bool,
    /// Listed in the shard's flush list for this turn.
    pub dirty: bool,
    /// Reading is paused (cluster backpressure): no receive is armed, and bytes that were
    /// already received wait in `partial`.
    pub parked: bool,
    /// When the connection times out (connect timeout, then 1.5 x keep-alive), in shard ms.
    pub deadline_ms: u64,
    /// Keep-alive window in ms (1.5 x the negotiated keep-alive), 0 = none.
    pub keepalive_ms: u64,
    /// When this connection's timer token fires next (u64::MAX = none in the wheel).
    pub timer_ms: u64,
    /// Will message to publish if the connection ends without DISCONNECT.
    pub will: Option<Box<Will>>,
    /// Largest packet the client accepts (v5 Maximum Packet Size), bytes.
    pub max_packet_out: u32,
    /// Unacknowledged QoS 1/2 messages this client accepts (v5 Receive Maximum).
    pub receive_max: u16,
    /// Topic aliases the client accepts from us (v5 Topic Alias Maximum), 0 = none.
    pub client_alias_max: u16,
    /// The client wants reason strings (v5 Request Problem Information, default yes).
    pub problem_info: bool,
    /// Accepted over the connection limit: CONNECT is answered with a refusal.
    pub over_quota: bool,
    /// Topic aliases in both directions; allocated on first use only.
    pub aliases: Option<Box<Aliases>>,
}

/// Per-connection topic alias maps (MQTT 3.3.2.3.4), each bounded (see `alias`).
#[derive(Default)]
pub struct Aliases {
    /// Client → server: alias → topic.
    pub inbound: crate::alias::InboundAliases,
    /// Server → client: topic → alias; created at the first delivery to a client that
    /// takes aliases.
    pub outbound: Option<crate::alias::OutboundAliases>,
}

impl Conn {
    /// A freshly accepted socket.
    pub fn new(sock: Sock, deadline_ms: u64) -> Conn {
        Conn {
            sock,
            state: ConnState::Connecting,
            protocol: Protocol::V311,
            session: u32::MAX,
            partial: Vec::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            ctrl_bytes: 0,
            write_blocked: false,
            dirty: false,
            parked: false,
            deadline_ms,
            keepalive_ms: 0,
            timer_ms: u64::MAX,
            will: None,
            max_packet_out: u32::MAX,
            receive_max: u16::MAX,
            client_alias_max: 0,
            problem_info: true,
            over_quota: false,
            aliases: None,
        }
    }

    /// Queues bytes to send; the caller puts the connection on the flush list.
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.out_bytes += b.len();
            self.out.push_back(b);
        }
    }

    /// Queues a control packet, charging its memory to `ctrl_bytes`.
    pub fn push_ctrl(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.ctrl_bytes += b.len() + OUT_ENTRY_BYTES;
            self.push(b);
        }
    }

    /// True when nothing waits to be written.
    pub fn out_is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Writes as much queued output as the socket takes. Ok(true) when all was written,
    /// Ok(false) when the socket is full (wait for POLLOUT).
    pub fn flush(&mut self, io: &mut dyn ShardIo) -> io::Result<bool> {
        let mut writes = 0;
        if !write_queue::<IOV_MAX>(
            io,
            &self.sock,
            &mut self.out,
            &mut self.out_bytes,
            &mut writes,
        )? {
            // What is still queued bounds what is left of the control packets.
            self.ctrl_bytes = self
                .ctrl_bytes
                .min(self.out_bytes + self.out.len() * OUT_ENTRY_BYTES);
            return Ok(false);
        }
        self.ctrl_bytes = 0;
        // Give back the deque's buffer so an idle connection holds none (MQTT connections are
        // idle most of the time; a small malloc per busy turn is cheaper than 144 B each).
        self.out = VecDeque::new();
        Ok(true)
    }
}

/// Writes queued buffers to `sock` through `io` (one `writev` each), up to `N` per call,
/// until the queue is empty (Ok(true)) or the socket is full (Ok(false)); counts the calls in
/// `writes`. Shared by client connections and cluster links. The slices live on the stack:
/// nothing is allocated per write.
pub fn write_queue<const N: usize>(
    io: &mut dyn ShardIo,
    sock: &Sock,
    out: &mut VecDeque<Bytes>,
    out_bytes: &mut usize,
    writes: &mut u64,
) -> io::Result<bool> {
    while !out.is_empty() {
        let mut iov = [IoSlice::new(&[]); N];
        let n = out.len().min(N);
        *writes += 1;
        for (slot, b) in iov.iter_mut().zip(out.iter()) {
            *slot = IoSlice::new(b);
        }
        let written = match io.write(sock, &iov[..n]) {
            Ok(n) => n,
            Err(err) => {
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                }
            }
        };
        debug_assert!(written <= *out_bytes, "a write takes no more than queued");
        let mut left = written;
        *out_bytes -= left;
        while left > 0 {
            let front = out.front_mut().expect("kernel wrote no more than queued");
            if front.len() <= left {
                left -= front.len();
                out.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    Ok(true)
}

/// Connections of a shard, addressed by slot and generation so stale completions are ignored.
#[derive(Default)]
pub struct ConnSlab {
    slots: Vec<(u32, Option<Conn>)>,
    free: Vec<u32>,
    len: usize,
}

impl ConnSlab {
    /// Stores `conn`, returning (slot, generation).
    pub fn insert(&mut self, conn: Conn) -> (u32, u32) {
        self.len += 1;
        if let Some(slot) = self.free.pop() {
            let entry = &mut self.slots[slot as usize];
            debug_assert!(entry.1.is_none());
            entry.1 = Some(conn);
            return (slot, entry.0);
        }
        self.slots.push((0, Some(conn)));
        ((self.slots.len() - 1) as u32, 0)
    }

    /// The connection in `slot` if it is still of generation `gen`.
    pub fn get_mut(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        match self.slots.get_mut(slot as usize) {
            Some((g, Some(c))) if *g == gen => Some(c),
            _ => None,
        }
    }

    /// The connection in `slot`, whatever its generation.
    pub fn get_slot(&mut self, slot: u32) -> Option<&mut Conn> {
        self.slots
            .get_mut(slot as usize)
            .and_then(|(_, c)| c.as_mut())
    }

    /// Current generation of `slot`.
    pub fn gen(&self, slot: u32) -> u32 {
        self.slots[slot as usize].0
    }

    /// Removes the connection and bumps the slot's generation.
    pub fn remove(&mut self, slot: u32) -> Option<Conn> {
        let entry = self.slots.get_mut(slot as usize)?;
        let conn = entry.1.take()?;
        entry.0 = crate::shard_io::Token::next_gen(entry.0);
        self.free.push(slot);
        self.len -= 1;
        Some(conn)
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots of all live connections.
    pub fn live_slots(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| c.is_some())
            .map(|(i, _)| i as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connection_state_fits_its_memory_budget() {
        // The idle-connection budget is 512 B of user memory including the session; the
        // socket state itself must leave most of it to the session.
        let size = std::mem::size_of::<(u32, Option<Conn>)>();
        assert!(size <= 160, "Conn slot grew to {size} bytes");
    }
}
