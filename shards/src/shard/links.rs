//! Cluster data links: the sockets to other nodes' shards, handed over by the cluster thread,
//! read into forwarded messages and written once per turn; when a link's output backs up,
//! the shard pauses reading its clients (`park`) until the links drain (`resume`).

use super::*;

impl Shard {
    pub(super) fn on_link_attach(&mut self, a: LinkAttach) {
        let node = a.node;
        let (slot, gen, replaced) =
            self.links
                .attach(node, a.epoch, a.sock, a.outbound, a.unsent, &a.received);
        if let Some(old) = replaced {
            close_now(&mut *self.io, old);
        }
        log::debug!(
            "shard {}: data link {} node {node} attached",
            self.id,
            if a.outbound { "to" } else { "from" }
        );
        if let Some(sock) = self.links.get_mut(slot, gen).and_then(|l| l.sock.as_ref()) {
            self.io.recv(sock, Token::LinkRecv { slot, gen }, true);
        }
        if !a.received.is_empty() {
            self.link_frames(slot, gen);
        }
    }

    pub(super) fn on_link_recv(
        &mut self,
        slot: u32,
        gen: u32,
        result: Result<Done<'_>, IoError>,
        more: bool,
    ) {
        let Some(link) = self.links.get_mut(slot, gen) else {
            return;
        };
        match result {
            Ok(Done::Data(data)) if !data.is_empty() => {
                link.reader.extend(data);
                if !self.link_frames(slot, gen) {
                    return;
                }
            }
            Err(IoError::NoBuffers | IoError::Cancelled) => {}
            _ => {
                self.link_lost(slot, "closed by peer");
                return;
            }
        }
        if !more {
            if let Some(sock) = self.links.get_mut(slot, gen).and_then(|l| l.sock.as_ref()) {
                self.io.recv(sock, Token::LinkRecv { slot, gen }, true);
            }
        }
    }

    /// Routes every complete frame received on a link; false if the link was closed.
    fn link_frames(&mut self, slot: u32, gen: u32) -> bool {
        loop {
            let Some(link) = self.links.get_mut(slot, gen) else {
                return false;
            };
            let node = link.node;
            match link.reader.next_frame() {
                Ok(None) => return true,
                Ok(Some(Frame::Publish {
                    msg,
                    normal,
                    shared,
                })) => {
                    // A peer's topic is checked as a client's PUBLISH topic (MQTT-3.3.2-2).
                    if !crate::peer_input::valid_peer_topic(&msg.topic, self.cfg().max_topic_levels)
                    {
                        log::warn!(
                            "shard {}: node {node} forwarded a message with an invalid topic; \
                             dropped",
                            self.id
                        );
                        continue;
                    }
                    let Some(msg) = from_wire(msg, self.now_ms) else {
                        continue;
                    };
                    let shared = shared.into_iter().map(Arc::from).collect();
                    self.route_with(msg, normal, Some(shared));
                }
                Ok(Some(_)) => {
                    log::warn!(
                        "shard {}: unexpected frame on a data link from node {node}",
                        self.id
                    );
                    self.link_lost(slot, "unexpected frame");
                    return false;
                }
                Err(e) => {
                    log::warn!("shard {}: bad frame from node {node}: {e}", self.id);
                    self.link_lost(slot, "bad frame");
                    return false;
                }
            }
        }
    }

    /// Drops a failed link and tells the cluster thread, which takes the peer down; its
    /// links are set up anew when it comes back.
    fn link_lost(&mut self, slot: u32, why: &str) {
        let Some(link) = self.links.remove(slot) else {
            return;
        };
        if let Some(sock) = link.sock {
            close_now(&mut *self.io, sock);
        }
        log::info!(
            "shard {}: data link with node {} lost: {why}",
            self.id,
            link.node
        );
        let cluster = self.mesh.cluster();
        self.mesh.send(
            cluster,
            MeshMsg::ClusterLinkLost {
                node: link.node,
                epoch: link.epoch,
            },
        );
    }

    /// Writes every link with queued frames (one `writev` per link per turn, more only when
    /// a batch exceeds the iovec limit), then applies backpressure.
    pub(super) fn flush_links(&mut self) {
        let dirty = std::mem::take(&mut self.links.dirty);
        let mut writes = 0;
        for &slot in &dirty {
            let Some((gen, link)) = self.links.get_slot(slot) else {
                continue;
            };
            let Some(sock) = &link.sock else { continue };
            if link.write_blocked || link.out.is_empty() {
                continue;
            }
            let io = &mut *self.io;
            match write_queue::<LINK_IOV_MAX>(
                io,
                sock,
                &mut link.out,
                &mut link.out_bytes,
                &mut writes,
            ) {
                Ok(true) => {}
                Ok(false) => {
                    link.write_blocked = true;
                    io.poll_writable(sock, Token::LinkWritable { slot, gen });
                }
                Err(e) => self.link_lost(slot, &e.to_string()),
            }
        }
        Metrics::add(&self.shared.metrics.cluster_link_writes, writes);
        let mut dirty = dirty;
        dirty.clear();
        if self.links.dirty.is_empty() {
            self.links.dirty = dirty;
        }
    }

    /// Pauses reading the shard's clients while a cluster link or a mesh queue towards
    /// another shard is backed up, and resumes once both have drained to half (hysteresis).
    /// This is what bounds QoS 1/2 messages waiting to cross to another shard or node: they
    /// are never dropped, so their publishers wait instead (QoS 0 is dropped past
    /// `MESH_QOS0_DROP_BACKLOG`, which the pause keeps out of reach for client traffic).
    pub(super) fn apply_backpressure(&mut self) {
        let limit = self.cfg().cluster.link_buffer_bytes;
        let backlog = self.mesh.max_backlog();
        let links_full = self.links.any_above(limit);
        let mesh_full = backlog > MESH_BACKLOG_PAUSE;
        let drained = !self.links.any_above(limit / 2) && backlog <= MESH_BACKLOG_RESUME;
        if !self.paused && (links_full || mesh_full) {
            self.paused = true;
            let m = &self.shared.metrics;
            if links_full {
                Metrics::add(&m.cluster_backpressure, 1);
                log::debug!("shard {}: link to a peer is full; pausing clients", self.id);
            } else {
                Metrics::add(&m.mesh_backpressure, 1);
                log::debug!(
                    "shard {}: {backlog} messages wait for another shard; pausing clients",
                    self.id
                );
            }
            m.cluster_paused_shards.fetch_add(1, Ordering::Relaxed);
        } else if self.paused && drained {
            self.resume();
        }
    }

    /// Stops reading a connection that delivered bytes while paused. Returns false for
    /// connections that are not paused (still connecting: their CONNECT is not held up).
    pub(super) fn park(&mut self, slot: u32, gen: u32, armed: bool) -> bool {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return false;
        };
        if conn.state != ConnState::Active {
            return false;
        }
        if !conn.parked {
            conn.parked = true;
            self.parked.push(ConnRef { slot, gen });
            if armed {
                self.io.cancel(Token::Recv { slot, gen });
            }
        }
        true
    }

    /// Links drained: read the paused connections again, starting with what they had sent.
    fn resume(&mut self) {
        self.paused = false;
        self.shared
            .metrics
            .cluster_paused_shards
            .fetch_sub(1, Ordering::Relaxed);
        log::debug!("shard {}: links drained; resuming clients", self.id);
        for ConnRef { slot, gen } in std::mem::take(&mut self.parked) {
            self.read_again(slot, gen);
        }
    }

    /// Reads a paused connection again: a fresh receive, and first what it sent meanwhile.
    pub(super) fn read_again(&mut self, slot: u32, gen: u32) {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        conn.parked = false;
        let stashed = !conn.partial.is_empty();
        self.io.recv(&conn.sock, Token::Recv { slot, gen }, true);
        if stashed {
            self.on_bytes(slot, gen, &[]);
        }
    }
}
