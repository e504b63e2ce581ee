//! Cluster data links as a shard holds them: one outbound link per peer node, on which the
//! shard writes the `Publish` frames of its own publishers, and the inbound links of peers'
//! shards that the cluster thread handed to it.
//!
//! The cluster thread dials and authenticates every link, then moves the socket here; from
//! then on the link is driven by the shard's driver (`shard_io`) like a client connection: frames queued
//! in one turn leave in one `writev` (header and payload as separate iovecs), and received
//! frames are routed on this shard. An outbound link exists (without a socket) as soon as the
//! shard has something for the peer, so frames queued while the link is being set up keep
//! their order.

use crate::sock::Sock;
use bytes::Bytes;
use shardmq_net::cluster::FrameReader;
use std::collections::VecDeque;

/// Most iovecs in one `writev` on a link (Linux accepts 1024); a message takes two.
pub const LINK_IOV_MAX: usize = 512;

/// One data link of this shard.
pub struct DataLink {
    /// `None` while the cluster thread is still setting up an outbound link.
    pub sock: Option<Sock>,
    /// Index of the peer node.
    pub node: u8,
    /// The peer's up-epoch the socket belongs to (see `LinkAttach`).
    pub epoch: u32,
    /// Outbound links carry this shard's frames; inbound ones carry a peer shard's.
    pub outbound: bool,
    pub out: VecDeque<Bytes>,
    /// Bytes queued in `out`.
    pub out_bytes: usize,
    /// Waiting for POLLOUT after the socket's send buffer filled.
    pub write_blocked: bool,
    pub reader: FrameReader,
}

/// The data links of one shard, addressed by slot and generation like connections.
#[derive(Default)]
pub struct Links {
    slots: Vec<(u32, Option<DataLink>)>,
    /// Slot of the outbound link per peer node.
    outbound: Vec<Option<u32>>,
    /// Links with output queued this turn.
    pub dirty: Vec<u32>,
}

impl Links {
    fn insert(&mut self, link: DataLink) -> u32 {
        let slot = match self.slots.iter().position(|(_, l)| l.is_none()) {
            Some(i) => i,
            None => {
                self.slots.push((0, None));
                self.slots.len() - 1
            }
        };
        let entry = &mut self.slots[slot];
        entry.0 = crate::shard_io::Token::next_gen(entry.0);
        entry.1 = Some(link);
        slot as u32
    }

    /// Slot of the outbound link to `node`, created (without a socket) when missing.
    pub fn outbound_slot(&mut self, node: u8) -> u32 {
        let n = node as usize;
        if self.outbound.len() <= n {
            self.outbound.resize(n + 1, None);
        }
        if let Some(slot) = self.outbound[n] {
            return slot;
        }
        let slot = self.insert(DataLink {
            sock: None,
            node,
            epoch: 0,
            outbound: true,
            out: VecDeque::new(),
            out_bytes: 0,
            write_blocked: false,
            reader: FrameReader::default(),
        });
        self.outbound[n] = Some(slot);
        slot
    }

    /// Bytes queued on the outbound link to `node` (0 when there is none).
    pub fn backlog(&self, node: u8) -> usize {
        self.outbound
            .get(node as usize)
            .copied()
            .flatten()
            .and_then(|s| self.slots[s as usize].1.as_ref())
            .map_or(0, |l| l.out_bytes)
    }

    /// Queues `bytes` on the outbound link to `node` and lists it for this turn's flush.
    pub fn queue(&mut self, node: u8, bytes: Bytes) {
        let slot = self.outbound_slot(node);
        let link = self.slots[slot as usize]
            .1
            .as_mut()
            .expect("slot just found");
        if link.out.is_empty() {
            self.dirty.push(slot);
        }
        link.out_bytes += bytes.len();
        link.out.push_back(bytes);
    }

    /// Gives a link its socket. An outbound link keeps what was queued, after the handshake
    /// bytes the cluster thread had not written yet; an inbound one starts with the bytes
    /// already received. Returns (slot, generation) and the socket an outbound link had
    /// before, which the caller closes.
    pub fn attach(
        &mut self,
        node: u8,
        epoch: u32,
        sock: Sock,
        outbound: bool,
        unsent: Vec<Bytes>,
        received: &[u8],
    ) -> (u32, u32, Option<Sock>) {
        let mut replaced = None;
        let slot = if outbound {
            let slot = self.outbound_slot(node);
            let link = self.slots[slot as usize]
                .1
                .as_mut()
                .expect("slot just found");
            replaced = link.sock.replace(sock);
            link.epoch = epoch;
            for b in unsent.into_iter().rev() {
                link.out_bytes += b.len();
                link.out.push_front(b);
            }
            slot
        } else {
            let mut link = DataLink {
                sock: Some(sock),
                node,
                epoch,
                outbound: false,
                out: unsent.into_iter().collect(),
                out_bytes: 0,
                write_blocked: false,
                reader: FrameReader::default(),
            };
            link.out_bytes = link.out.iter().map(|b| b.len()).sum();
            link.reader.extend(received);
            self.insert(link)
        };
        let link = self.slots[slot as usize].1.as_mut().expect("slot just set");
        link.write_blocked = false;
        if !link.out.is_empty() {
            self.dirty.push(slot);
        }
        (slot, self.slots[slot as usize].0, replaced)
    }

    /// The link in `slot` if it still has generation `gen`.
    pub fn get_mut(&mut self, slot: u32, gen: u32) -> Option<&mut DataLink> {
        match self.slots.get_mut(slot as usize) {
            Some((g, Some(l))) if *g == gen => Some(l),
            _ => None,
        }
    }

    /// The link in `slot`, whatever its generation.
    pub fn get_slot(&mut self, slot: u32) -> Option<(u32, &mut DataLink)> {
        match self.slots.get_mut(slot as usize) {
            Some((g, Some(l))) => Some((*g, l)),
            _ => None,
        }
    }

    /// Removes a link; the caller closes its socket (which ends its pending receive).
    pub fn remove(&mut self, slot: u32) -> Option<DataLink> {
        let link = self.slots.get_mut(slot as usize)?.1.take()?;
        if link.outbound {
            if let Some(o) = self.outbound.get_mut(link.node as usize) {
                *o = None;
            }
        }
        Some(link)
    }

    /// Slots of every link (either way) with `node`.
    pub fn of_node(&self, node: u8) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (_, l))| l.as_ref().is_some_and(|l| l.node == node))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// True when an outbound link holds more than `limit` bytes.
    pub fn any_above(&self, limit: usize) -> bool {
        self.slots
            .iter()
            .filter_map(|(_, l)| l.as_ref())
            .any(|l| l.outbound && l.out_bytes > limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Sock {
        Sock::Sim(1)
    }

    #[test]
    fn frames_queued_before_the_socket_follow_the_handshake() {
        let mut links = Links::default();
        links.queue(3, Bytes::from_static(b"publish"));
        assert_eq!(links.backlog(3), 7);
        let (slot, gen, _) =
            links.attach(3, 1, socket(), true, vec![Bytes::from_static(b"auth")], &[]);
        let l = links.get_mut(slot, gen).unwrap();
        let order: Vec<&[u8]> = l.out.iter().map(|b| &b[..]).collect();
        assert_eq!(order, vec![&b"auth"[..], &b"publish"[..]]);
        assert_eq!(l.out_bytes, 11);
        assert!(links.any_above(10));
        assert!(!links.any_above(11));
    }

    #[test]
    fn removing_a_node_forgets_its_outbound_link() {
        let mut links = Links::default();
        links.queue(1, Bytes::from_static(b"x"));
        let (inbound, _, _) = links.attach(1, 1, socket(), false, Vec::new(), b"partial");
        let mut gone = links.of_node(1);
        gone.sort();
        assert_eq!(gone.len(), 2);
        assert!(gone.contains(&inbound));
        for s in gone {
            links.remove(s);
        }
        assert_eq!(links.backlog(1), 0);
        let fresh = links.outbound_slot(1);
        assert!(links.get_slot(fresh).is_some_and(|(_, l)| l.sock.is_none()));
    }
}
