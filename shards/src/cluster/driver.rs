//! One round of the cluster thread ([`Cluster::turn`]) and the link plumbing under it:
//! accepting and dialling links, and reading, writing and closing them under the per-link
//! bounds ([`LINK_OUT_MAX_BYTES`], [`READ_BUDGET_BYTES`], [`HANDSHAKES_MAX`]), all through
//! [`ClusterIo`]. Frames read here go to [`Cluster::on_frame`]. The thread's `poll(2)` loop
//! is in `poll_driver`.

use super::*;

/// What a driver should wait for on one link before the next [`Cluster::turn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInterest {
    /// The link is read (a data link waiting for its peer is not).
    pub readable: bool,
    /// Bytes are queued for it.
    pub writable: bool,
}

impl Cluster {
    /// Loads the saved member list and joins the static seeds (on a listening node), at
    /// `now_ms` on the node's clock (uptime and the first heartbeat count from it).
    pub fn start(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.started_at_ms = now_ms;
        self.last_heartbeat_ms = now_ms;
        if self.listening() {
            self.load_members();
            if let Discovery::Static(seeds) = self.cfg.discovery.clone() {
                for seed in seeds {
                    if let Err(e) = self.join(&seed) {
                        log::warn!("cluster: static seed {seed}: {e}");
                    }
                }
            }
        }
    }

    /// One round at `now_ms` on the node's clock: the shards' messages, management commands,
    /// new links, what the links sent, deadlines and heartbeats, then what is queued goes
    /// out (as far as the links take it) and the mesh is flushed. Never blocks.
    pub fn turn(&mut self, now_ms: u64) {
        debug_assert!(now_ms >= self.now_ms, "the node's clock went back");
        self.now_ms = now_ms;
        let mut msgs = Vec::new();
        self.mesh.recv(MESH_BUDGET, &mut msgs);
        let drained = msgs.len() < MESH_BUDGET;
        for m in msgs.drain(..) {
            self.on_mesh(m);
        }
        if drained {
            // A moved session's importing shard asks for its `TakeoverEnd` after its
            // route changes went to the filters' home shards, which sent them here:
            // `recv` returned only when every queue was empty, so those route changes
            // were in this round and went out first, and peers learn the new routes
            // before the old node lets go.
            for (client_id, node) in std::mem::take(&mut self.takeover_ends) {
                if let Some(link) = self.peers.get(node as usize).and_then(|p| p.link) {
                    let frame = Frame::TakeoverEnd {
                        client_id: client_id.to_string(),
                    };
                    self.send(link, &frame);
                }
            }
        }
        self.on_control();
        self.accept();
        self.read_links();
        self.tick();
        self.flush_links();
        self.mesh.flush();
    }

    /// Writes what the links still hold, once (the thread is stopping).
    pub fn finish(&mut self) {
        self.flush_links();
    }

    /// The links' sockets and what to wait for on each, for a driver's `poll`.
    pub fn link_interest(&self) -> impl Iterator<Item = (&Sock, LinkInterest)> + '_ {
        self.links.iter().flatten().map(|l| {
            let interest = LinkInterest {
                readable: !l.data_waiting,
                writable: !l.out.is_empty(),
            };
            (&l.sock, interest)
        })
    }

    /// The mesh endpoint (a driver parks on its doorbell).
    pub fn mesh(&self) -> &MeshEndpoint {
        &self.mesh
    }

    // ------------------------------------------------------------------ I/O plumbing

    pub(super) fn accept(&mut self) {
        if !self.listening() {
            return;
        }
        while let Some((sock, addr, ip)) = self.io.accept() {
            let handshaking = self
                .links
                .iter()
                .flatten()
                .filter(|l| !l.authed && !l.dialed)
                .count();
            if handshaking >= HANDSHAKES_MAX {
                // Closed at once: unauthenticated links cannot pile up.
                self.io.close(sock);
                self.refused_accepts += 1;
                if self
                    .refused_logged_ms
                    .is_none_or(|t| self.now_ms.saturating_sub(t) >= REFUSED_LOG_INTERVAL_MS)
                {
                    log::warn!(
                        "cluster: refused {} link(s): {HANDSHAKES_MAX} links are already in \
                         their handshake (last from {addr})",
                        self.refused_accepts
                    );
                    self.refused_accepts = 0;
                    self.refused_logged_ms = Some(self.now_ms);
                }
                continue;
            }
            if let Err(e) = self.add_link(sock, addr.clone(), ip, false) {
                log::warn!("cluster: link from {addr} dropped: {e}");
            }
        }
    }

    pub(super) fn add_link(
        &mut self,
        sock: Sock,
        peer_addr: String,
        remote_ip: Option<IpAddr>,
        dialed: bool,
    ) -> std::io::Result<usize> {
        let nonce = match self.io.nonce() {
            Ok(n) => n,
            Err(e) => {
                self.io.close(sock);
                return Err(std::io::Error::other(format!("no random nonce: {e}")));
            }
        };
        let link = Link {
            sock,
            reader: FrameReader::with_max(HANDSHAKE_FRAME_MAX_BYTES),
            out: VecDeque::new(),
            out_bytes: 0,
            nonce,
            peer_nonce: None,
            dialed,
            remote_ip,
            peer_name: None,
            peer_addr,
            authed: false,
            hello_seen: false,
            started_ms: self.now_ms,
            last_rx_ms: self.now_ms,
            closed: false,
            data_shard: None,
            data_out: false,
            data_waiting: false,
        };
        let idx = match self.links.iter().position(|l| l.is_none()) {
            Some(i) => {
                self.links[i] = Some(link);
                i
            }
            None => {
                self.links.push(Some(link));
                self.links.len() - 1
            }
        };
        let hello = Frame::Hello {
            version: CLUSTER_PROTOCOL_VERSION,
            node: self.node.clone(),
            cluster_addr: self.advertised.clone(),
            nonce,
            started_ms: self.started_ms,
        };
        self.send(idx, &hello);
        Ok(idx)
    }

    /// Queues a frame on a link. Past [`LINK_OUT_MAX_BYTES`] the peer is not reading: the
    /// link is closed instead of queueing more.
    pub(super) fn send(&mut self, link: usize, frame: &Frame) {
        frame.encode(&mut self.scratch);
        let bytes = self.scratch.split().freeze();
        if let Some(l) = self
            .links
            .get_mut(link)
            .and_then(|l| l.as_mut())
            .filter(|l| !l.closed)
        {
            l.out_bytes += bytes.len();
            l.out.push_back(bytes);
            if l.out_bytes > LINK_OUT_MAX_BYTES {
                log::warn!(
                    "cluster: {} does not read its link ({} bytes queued); closing it",
                    shown(l.peer_name.as_deref().unwrap_or(&l.peer_addr)),
                    l.out_bytes
                );
                l.closed = true;
            }
        }
    }

    pub(super) fn read_links(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        for i in 0..self.links.len() {
            let mut error = None;
            let mut budget = READ_BUDGET_BYTES;
            loop {
                // Decode what is buffered before reading more, so a link never holds more
                // than one partial frame (bounded by the reader's maximum) plus one read.
                // One frame at a time: a frame can hand the socket (and the bytes after it)
                // to a shard, or park it.
                while let Some(link) = self.links[i]
                    .as_mut()
                    .filter(|l| !l.closed && !l.data_waiting)
                {
                    match link.reader.next_frame() {
                        Ok(Some(f)) => self.on_frame(i, f),
                        Ok(None) => break,
                        Err(e) => {
                            log::warn!(
                                "cluster: bad frame from {}: {e}; closing link",
                                shown(&link.peer_addr)
                            );
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                if error.is_some() || budget == 0 {
                    break;
                }
                let Some(link) = self.links[i]
                    .as_mut()
                    .filter(|l| !l.closed && !l.data_waiting)
                else {
                    break;
                };
                debug_assert!(link.reader.buffered() <= FRAME_MAX_BYTES + 4);
                match self.io.read(&link.sock, &mut buf[..budget.min(64 * 1024)]) {
                    Ok(0) => {
                        error = Some("closed by peer".to_string());
                        break;
                    }
                    Ok(n) => {
                        link.last_rx_ms = self.now_ms;
                        link.reader.extend(&buf[..n]);
                        budget -= n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(e) = error {
                self.close_link(i, &e);
            }
        }
        for i in 0..self.links.len() {
            if self.links[i].as_ref().is_some_and(|l| l.closed) {
                self.close_link(i, "closed");
            }
        }
    }

    pub(super) fn flush_links(&mut self) {
        for i in 0..self.links.len() {
            let mut failed = None;
            if let Some(link) = self.links[i].as_mut() {
                while !link.out.is_empty() {
                    let slices: Vec<std::io::IoSlice> = link
                        .out
                        .iter()
                        .take(64)
                        .map(|b| std::io::IoSlice::new(b))
                        .collect();
                    Metrics::add(&self.metrics.metrics.cluster_link_writes, 1);
                    match self.io.write(&link.sock, &slices) {
                        Ok(0) => {
                            failed = Some("write returned 0".to_string());
                            break;
                        }
                        Ok(mut n) => {
                            link.out_bytes -= n;
                            while n > 0 {
                                let front =
                                    link.out.front_mut().expect("written bytes were queued");
                                if front.len() <= n {
                                    n -= front.len();
                                    link.out.pop_front();
                                } else {
                                    let _ = front.split_to(n);
                                    n = 0;
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                self.close_link(i, &e);
            }
        }
    }

    pub(super) fn close_link(&mut self, idx: usize, why: &str) {
        let Some(link) = self.links[idx].take() else {
            return;
        };
        self.io.close(link.sock);
        let Some(name) = link.peer_name else {
            log::debug!(
                "cluster: link from {} closed before handshake: {why}",
                shown(&link.peer_addr)
            );
            return;
        };
        let Some(p) = self.peer_index(&name) else {
            return;
        };
        if link.data_out && self.peers[p].state == PeerState::Up {
            // Our shard's link to this peer could not be set up: start over with the peer.
            log::warn!("cluster: data link to {name} failed ({why})");
            if let Some(control) = self.peers[p].link {
                self.close_link(control, "a data link failed");
            }
            return;
        }
        if self.peers[p].link == Some(idx) {
            self.peers[p].link = None;
            if self.peers[p].state == PeerState::Up {
                log::warn!("cluster: node {name} is down ({why})");
                self.peers[p].state = PeerState::Down;
                self.peers[p].down_since_ms = self.now_ms;
                self.peer_down(p);
            }
        }
    }

    /// Opens a link without waiting for the connection: the `Hello` waits in the out queue
    /// until the socket is writable, and a connection that never completes is closed with
    /// the handshake deadline.
    pub(super) fn dial(&mut self, addr: &str) -> std::io::Result<usize> {
        let (sock, ip) = self.io.dial(addr)?;
        self.add_link(sock, addr.to_string(), ip, true)
    }
}
