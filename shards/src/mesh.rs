//! Everything shards say to each other: the message types and the queues that carry them.
//!
//! Every pair of shards has one bounded single-producer/single-consumer queue per direction, so
//! messages from one shard to another arrive in the order they were sent (which keeps each
//! publisher's messages in order). A shard that finds a queue full keeps the overflow in a local
//! FIFO and retries on its next turn; nothing is dropped here. A receiver that goes to sleep in
//! its ring says so in [`Doorbell::parked`]; senders ring its eventfd only then.

use crate::message::Message;
use crate::shared::Member;
use crossbeam_queue::ArrayQueue;
use shardmq_net::Connect;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

/// A message from one shard to another.
pub enum MeshMsg {
    /// Deliver to this shard's subscribers whose filters match.
    Publish(Arc<Message>),
    /// `shard` now has subscribers for `filter`; reply [`MeshMsg::RouteAck`] with `ack`.
    RouteAdd {
        filter: Arc<str>,
        shard: u16,
        ack: u64,
    },
    /// The route change with this token is applied on the sending shard.
    RouteAck { token: u64 },
    /// `shard` has no subscriber left for `filter`.
    RouteDel { filter: Arc<str>, shard: u16 },
    /// Retained message set (`Some`) or cleared (`None`) for `topic`.
    Retain {
        topic: Arc<str>,
        msg: Option<Arc<Message>>,
    },
    /// A session joined shared group `key`; sent to the group's owner shard.
    ShareJoin { key: Arc<str>, member: Member },
    /// Session `session` of `shard` left shared group `key`; sent to the owner.
    ShareLeave {
        key: Arc<str>,
        shard: u16,
        session: u32,
    },
    /// `shard` has members of group `key` on `filter`; reply RouteAck. The group is owned by
    /// the home shard of `key`.
    ShareRouteAdd {
        filter: Arc<str>,
        key: Arc<str>,
        shard: u16,
        ack: u64,
    },
    /// `shard` has no member of group `key` left.
    ShareRouteDel {
        filter: Arc<str>,
        key: Arc<str>,
        shard: u16,
    },
    /// To the owner of `key`: pick a member not in `tried` for `msg`.
    SharedPublish {
        key: Arc<str>,
        msg: Arc<Message>,
        tried: Vec<(u16, u32)>,
    },
    /// To a member's shard: deliver unless the member is gone, offline or full (then send
    /// SharedPublish back with this member added to `tried`); `force` queues regardless.
    SharedDeliver {
        key: Arc<str>,
        msg: Arc<Message>,
        member: Member,
        tried: Vec<(u16, u32)>,
        force: bool,
    },
    /// A connection whose CONNECT arrived here but whose client id lives on the receiver.
    Handoff(Box<Handoff>),
    /// Close every connection and stop.
    Shutdown,

    // ---- between shards and the cluster endpoint (see `cluster`)
    /// Shard → cluster: this node gained (`add`) or lost its last subscriber of `filter`
    /// (ordinary filter or shared group key); sent by the filter's home shard only.
    ClusterRoute { filter: Arc<str>, add: bool },
    /// Shard → cluster: a retained message was set or cleared (empty payload) on this node.
    ClusterRetain { msg: Arc<Message> },
    /// Shard → cluster: `client_id` connected here; close it elsewhere. With `want_session`,
    /// answer with `SessionImport` carrying the session found on another node.
    ClusterTakeover {
        client_id: Arc<str>,
        want_session: bool,
        token: u64,
        shard: u16,
        /// When the new connection arrived (Unix ms).
        at_ms: u64,
    },
    /// Shard → cluster: the answer to a remote takeover.
    ClusterSessionExport(Box<SessionExport>),
    /// Cluster → shard: an authenticated data link to or from node `node` is now this
    /// shard's to drive.
    LinkAttach(Box<LinkAttach>),
    /// Shard → cluster: a data link with `node` failed; the peer is treated as down (and
    /// re-synced when it is back).
    ClusterLinkLost { node: u8, epoch: u32 },
    /// Cluster → every shard: node `node` has (or no longer has) subscribers for `filter`.
    NodeRoute {
        filter: Arc<str>,
        node: u8,
        add: bool,
    },
    /// Cluster → every shard: node `node` is down or left; forget its routes.
    NodeDown { node: u8 },
    /// Cluster → client id's home shard: another node took `client_id`; close it here and,
    /// with `want_session`, export the session.
    RemoteTakeover {
        client_id: Arc<str>,
        want_session: bool,
        token: u64,
        node: u8,
        /// When the connection that takes over arrived (Unix ms); newer local ones stay.
        at_ms: u64,
    },
    /// Cluster → the shard holding a CONNECT: what other nodes had for this client.
    SessionImport(Box<SessionExport>),
    /// Shard → cluster: the session moved here from `node` is routed here now; tell `node`
    /// to let go of it (sent once a full mesh round after this node's route changes).
    ClusterTakeoverEnd { client_id: Arc<str>, node: u8 },
    /// Cluster → client id's home shard: `node` routes the session it imported from here;
    /// drop it and send it what was queued meanwhile.
    RemoteTakeoverEnd { client_id: Arc<str>, node: u8 },
    /// Shard → cluster: what a moved session queued here until `node` took over its routes.
    ClusterSessionTail {
        client_id: Arc<str>,
        node: u8,
        messages: Vec<Arc<Message>>,
    },
    /// Cluster → client id's home shard: the tail of a session that moved here.
    SessionTail {
        client_id: Arc<str>,
        messages: Vec<Arc<Message>>,
    },
    /// Cluster → every shard: list this shard's clients (`kind` 1) or subscriptions (2).
    Query {
        token: u64,
        kind: crate::node_shared::QueryKind,
    },
    /// Shard → cluster: the rows of a `Query`, one JSON object each.
    QueryReply { token: u64, rows: Vec<String> },
}

/// A session leaving one node for another (its connection has been closed).
pub struct SessionExport {
    pub token: u64,
    /// Node the session goes to (for exports) or came from (imports).
    pub node: u8,
    pub client_id: Arc<str>,
    pub found: bool,
    /// (filter, v5 options byte, subscription id or 0).
    pub subscriptions: Vec<(Arc<str>, u8, u32)>,
    /// In-flight then queued messages, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// Packet ids awaiting PUBCOMP (PUBREL sent), kept with their ids.
    pub pubrel: Vec<u16>,
    /// Packet ids of the first messages, which were in flight.
    pub sent_ids: Vec<u16>,
    /// Incoming QoS 2 packet ids awaiting the client's PUBREL (already routed).
    pub incoming_qos2: Vec<u16>,
}

/// A cluster data link moving from the cluster thread, which set it up, to a shard.
pub struct LinkAttach {
    pub node: u8,
    /// Which time the peer came up; a loss reported for an older epoch is stale.
    pub epoch: u32,
    pub sock: crate::sock::Sock,
    /// This shard's link to `node` (true), or one of `node`'s shards' links to us.
    pub outbound: bool,
    /// Handshake bytes not yet written; they go out first.
    pub unsent: Vec<bytes::Bytes>,
    /// Bytes received after the handshake, not yet decoded.
    pub received: Vec<u8>,
}

/// A client socket moving to the shard that owns its client id (its home shard).
pub struct Handoff {
    pub sock: crate::sock::Sock,
    pub connect: Box<Connect>,
    /// Bytes received after the CONNECT packet, decoded by the new owner.
    pub leftover: Vec<u8>,
    /// The client id was assigned by the broker (sent back in a v5 CONNACK).
    pub assigned: bool,
}

/// Wakes a shard sleeping in its ring.
pub struct Doorbell {
    fd: OwnedFd,
    /// True while the owner is (about to be) blocked waiting for completions.
    pub parked: AtomicBool,
}

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Doorbell {
            // SAFETY: fd is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            parked: AtomicBool::new(false),
        })
    }

    /// The eventfd the owner reads through its ring.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Rings the bell; cheap and harmless when the owner is awake.
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}

/// One shard's end of the mesh.
pub struct MeshEndpoint {
    /// This endpoint's id: shards are `0..shards`, the cluster endpoint is `shards`.
    pub id: usize,
    shard_count: usize,
    inbound: Vec<Arc<ArrayQueue<MeshMsg>>>,
    outbound: Vec<Arc<ArrayQueue<MeshMsg>>>,
    overflow: Vec<VecDeque<MeshMsg>>,
    doorbells: Vec<Arc<Doorbell>>,
    sent: Vec<bool>,
}

/// Builds the full mesh for `shards` shards plus the cluster endpoint: element `i` belongs to
/// shard `i`, the last element to the cluster thread.
pub fn build(shards: usize) -> std::io::Result<Vec<MeshEndpoint>> {
    let shard_count = shards;
    let shards = shards + 1;
    // Room per pair shrinks with the square of the shard count so the mesh stays a few MiB.
    let cap = (1 << 20) / (shards * shards).max(1);
    let cap = cap.clamp(256, 8192);
    let doorbells: Vec<Arc<Doorbell>> = (0..shards)
        .map(|_| Doorbell::new().map(Arc::new))
        .collect::<Result<_, _>>()?;
    // queues[from][to]
    let queues: Vec<Vec<Arc<ArrayQueue<MeshMsg>>>> = (0..shards)
        .map(|_| {
            (0..shards)
                .map(|_| Arc::new(ArrayQueue::new(cap)))
                .collect()
        })
        .collect();
    Ok((0..shards)
        .map(|id| MeshEndpoint {
            id,
            shard_count,
            inbound: (0..shards).map(|from| queues[from][id].clone()).collect(),
            outbound: queues[id].clone(),
            overflow: (0..shards).map(|_| VecDeque::new()).collect(),
            doorbells: doorbells.clone(),
            sent: vec![false; shards],
        })
        .collect())
}

impl MeshEndpoint {
    /// Number of shards in the mesh (the cluster endpoint not counted).
    pub fn shards(&self) -> usize {
        self.shard_count
    }

    /// Id of the cluster endpoint.
    pub fn cluster(&self) -> usize {
        self.shard_count
    }

    /// This shard's doorbell.
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbells[self.id]
    }

    /// A handle to ring shard `to` from outside the shards (shutdown).
    pub fn doorbell_of(&self, to: usize) -> Arc<Doorbell> {
        self.doorbells[to].clone()
    }

    /// Queues `msg` for shard `to`, keeping order with anything already in overflow.
    pub fn send(&mut self, to: usize, msg: MeshMsg) {
        debug_assert_ne!(to, self.id, "a shard handles its own messages directly");
        self.sent[to] = true;
        if self.overflow[to].is_empty() {
            if let Err(msg) = self.outbound[to].push(msg) {
                self.overflow[to].push_back(msg);
            }
        } else {
            self.overflow[to].push_back(msg);
        }
    }

    /// Messages for shard `to` waiting in local overflow because its queue is full.
    pub fn backlog(&self, to: usize) -> usize {
        self.overflow[to].len()
    }

    /// The longest local overflow towards any one destination, in messages.
    pub fn max_backlog(&self) -> usize {
        self.overflow.iter().map(VecDeque::len).max().unwrap_or(0)
    }

    /// Moves overflow into the queues and rings the shards that were sent to and are asleep.
    /// Returns true if some overflow is still waiting (the caller must not sleep long).
    pub fn flush(&mut self) -> bool {
        let mut backlog = false;
        for to in 0..self.outbound.len() {
            while let Some(msg) = self.overflow[to].pop_front() {
                // What overflow moves into the queue is news to the receiver as much as a
                // fresh send: it may have emptied the queue and parked meanwhile.
                self.sent[to] = true;
                if let Err(msg) = self.outbound[to].push(msg) {
                    self.overflow[to].push_front(msg);
                    backlog = true;
                    break;
                }
            }
        }
        fence(Ordering::SeqCst);
        for to in 0..self.outbound.len() {
            if std::mem::take(&mut self.sent[to])
                && self.doorbells[to].parked.load(Ordering::SeqCst)
            {
                self.doorbells[to].ring();
            }
        }
        backlog
    }

    /// Takes up to `budget` messages from the inbound queues, round robin over senders.
    pub fn recv(&mut self, budget: usize, out: &mut Vec<MeshMsg>) {
        let mut taken = 0;
        loop {
            let before = taken;
            for q in &self.inbound {
                if let Some(m) = q.pop() {
                    out.push(m);
                    taken += 1;
                }
            }
            if taken == before || taken >= budget {
                return;
            }
        }
    }

    /// Marks this shard parked and reports whether anything is waiting; the caller sleeps only
    /// when this returns false (Dekker-style handshake with [`MeshEndpoint::flush`]).
    pub fn park(&self) -> bool {
        self.doorbell().parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let pending = self.inbound.iter().any(|q| !q.is_empty());
        if pending {
            self.unpark();
        }
        !pending
    }

    /// Marks this shard awake.
    pub fn unpark(&self) {
        self.doorbell().parked.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_overflow_in_order_and_arrive_in_order() {
        let mut mesh = build(1).unwrap();
        let (a, rest) = mesh.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut rest[0]);
        let n = 20_000u64;
        for i in 0..n {
            a.send(1, MeshMsg::RouteAck { token: i });
        }
        let mut got = Vec::new();
        let mut next = 0;
        while next < n {
            a.flush();
            got.clear();
            b.recv(1000, &mut got);
            for m in got.drain(..) {
                match m {
                    MeshMsg::RouteAck { token } => {
                        assert_eq!(token, next);
                        next += 1;
                    }
                    _ => unreachable!(),
                }
            }
        }
        assert!(!a.flush());
    }

    #[test]
    fn max_backlog_is_the_longest_overflow_and_shrinks_as_it_drains() {
        let mut mesh = build(2).unwrap();
        let (a, rest) = mesh.split_at_mut(1);
        let a = &mut a[0];
        assert_eq!(a.max_backlog(), 0);
        let mut sent = 0u64;
        while a.backlog(1) < 10 {
            a.send(1, MeshMsg::RouteAck { token: sent });
            sent += 1;
        }
        a.send(2, MeshMsg::RouteAck { token: 0 });
        assert_eq!(a.max_backlog(), 10, "towards shard 1, the longer one");
        // The receiver drains its queue; the sender's flush moves the overflow in.
        let mut got = Vec::new();
        rest[0].recv(usize::MAX, &mut got);
        a.flush();
        assert_eq!(a.max_backlog(), 0);
    }

    #[test]
    fn overflow_moved_in_a_later_turn_rings_a_parked_receiver() {
        let mut mesh = build(1).unwrap();
        let (a, rest) = mesh.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut rest[0]);
        // Fill the queue and leave some in overflow; the receiver is awake, so no ring.
        let mut n = 0u64;
        while a.backlog(1) == 0 {
            a.send(1, MeshMsg::RouteAck { token: n });
            n += 1;
        }
        assert!(a.flush());
        let mut got = Vec::new();
        b.recv(usize::MAX, &mut got);
        let first = got.len() as u64;
        assert!(b.park(), "queue drained, so the receiver may sleep");
        // The sender's next turn moves the overflow in without a new send: it must ring.
        assert!(!a.flush());
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the (non-blocking) eventfd.
        let r = unsafe {
            libc::read(
                b.doorbell().raw_fd(),
                &mut counter as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        assert_eq!(r, 8, "the parked receiver was not woken");
        b.unpark();
        got.clear();
        b.recv(usize::MAX, &mut got);
        assert_eq!(first + got.len() as u64, n);
    }
}
