//! Membership: the peer table (lookup, adding a peer, a peer going down), the member list
//! gossiped between nodes and saved across restarts (through `ClusterIo`), heartbeats and the
//! down-after timeout, redialling, autoclean of peers down too long, and `join`/`leave`.

use super::*;

impl Cluster {
    pub(super) fn peer_down(&mut self, p: usize) {
        self.peers[p].routes.clear();
        self.control.peers_up.fetch_sub(1, Ordering::Relaxed);
        for shard in 0..self.mesh.shards() {
            self.mesh.send(shard, MeshMsg::NodeDown { node: p as u8 });
        }
        // A resuming CONNECT no longer waits for this node.
        let tokens: Vec<u64> = self.pending.keys().copied().collect();
        for t in tokens {
            self.takeover_answer(t, p as u8, None);
        }
    }

    pub(super) fn peer_index(&self, name: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.name == name)
    }

    pub(super) fn peer_entry(&mut self, name: &str, addr: &str) -> Option<usize> {
        if let Some(i) = self.peer_index(name) {
            if !addr.is_empty() {
                self.peers[i].addr = addr.to_string();
            }
            return Some(i);
        }
        if self.peers.len() >= PEERS_MAX {
            log::error!("cluster: more than {PEERS_MAX} nodes; ignoring {name}");
            return None;
        }
        self.peers.push(Peer {
            name: name.to_string(),
            addr: addr.to_string(),
            state: PeerState::Down,
            link: None,
            last_dial_ms: None,
            uptime_s: 0,
            connections: 0,
            routes: HashSet::default(),
            route_seq: 0,
            epoch: 0,
            down_since_ms: self.now_ms,
            relink_until_ms: None,
        });
        Some(self.peers.len() - 1)
    }

    pub(super) fn member_list(&self) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = self
            .peers
            .iter()
            .filter(|p| p.state != PeerState::Gone)
            .map(|p| (p.name.clone(), p.addr.clone()))
            .collect();
        m.push((self.node.clone(), self.advertised.clone()));
        m
    }

    pub(super) fn peer_of_link(&self, link: usize) -> Option<usize> {
        let name = self.links[link].as_ref()?.peer_name.as_deref()?;
        let p = self.peer_index(name)?;
        (self.peers[p].link == Some(link)).then_some(p)
    }

    pub(super) fn tick(&mut self) {
        let now = self.now_ms;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.finish_takeover(t);
        }
        let late: Vec<u64> = self
            .queries
            .iter()
            .filter(|(_, q)| q.deadline_ms <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.finish_query(t);
        }
        // Links that never finished the handshake, or went silent.
        let down_after_ms = self.cfg.down_after_ms;
        for i in 0..self.links.len() {
            let stale = match &self.links[i] {
                Some(l) if !l.authed => now.saturating_sub(l.started_ms) > HANDSHAKE_TIMEOUT_MS,
                Some(l) => now.saturating_sub(l.last_rx_ms) > down_after_ms,
                None => false,
            };
            if stale {
                self.close_link(i, "no heartbeat");
            }
        }
        // A peer between links whose new link did not come up in time.
        for p in 0..self.peers.len() {
            let late = self.peers[p].relink_until_ms.is_some_and(|t| t <= now);
            if late && self.peers[p].state == PeerState::Up && self.peers[p].link.is_none() {
                log::warn!(
                    "cluster: node {} is down (its other link did not come up)",
                    self.peers[p].name
                );
                self.peers[p].relink_until_ms = None;
                self.peers[p].state = PeerState::Down;
                self.peers[p].down_since_ms = now;
                self.peer_down(p);
            }
        }
        if now.saturating_sub(self.last_heartbeat_ms) >= self.cfg.heartbeat_ms {
            self.last_heartbeat_ms = now;
            self.autoclean();
            for (_, link) in self.up_links() {
                self.send_heartbeat(link);
            }
            self.redial();
        }
    }

    /// Removes peers down for longer than `autoclean_ms`: no longer listed or dialled, and
    /// not in the saved member list. One that comes back and dials in rejoins.
    pub(super) fn autoclean(&mut self) {
        if self.cfg.autoclean_ms == 0 {
            return;
        }
        let limit_ms = self.cfg.autoclean_ms;
        let now = self.now_ms;
        let mut cleaned = false;
        for peer in &mut self.peers {
            if peer.state == PeerState::Down && now.saturating_sub(peer.down_since_ms) >= limit_ms {
                log::info!(
                    "cluster: node {} was down for {} s; removed (autoclean)",
                    peer.name,
                    limit_ms / 1000
                );
                peer.state = PeerState::Gone;
                cleaned = true;
            }
        }
        if cleaned {
            self.save_members();
        }
    }

    pub(super) fn send_heartbeat(&mut self, link: usize) {
        let frame = Frame::Heartbeat {
            uptime_s: self.now_ms.saturating_sub(self.started_at_ms) / 1000,
            connections: self.metrics.metrics.connections.load(Ordering::Relaxed) as u64,
            routes: self.local_routes.len() as u64,
        };
        self.send(link, &frame);
    }

    pub(super) fn redial(&mut self) {
        if !self.listening() {
            return;
        }
        let retry_ms = self.cfg.heartbeat_ms.max(500);
        let now = self.now_ms;
        for p in 0..self.peers.len() {
            let peer = &self.peers[p];
            let dialing =
                self.links.iter().flatten().any(|l| {
                    l.peer_name.as_deref() == Some(&peer.name) || l.peer_addr == peer.addr
                });
            if peer.state != PeerState::Down
                || dialing
                || peer
                    .last_dial_ms
                    .is_some_and(|t| now.saturating_sub(t) < retry_ms)
            {
                continue;
            }
            self.peers[p].last_dial_ms = Some(now);
            let addr = self.peers[p].addr.clone();
            if let Err(e) = self.dial(&addr) {
                log::debug!("cluster: dialling {addr}: {e}");
            }
        }
    }

    /// Connects to `target` (`name@host[:port]` or `host:port`).
    pub(super) fn join(&mut self, target: &str) -> Result<String, String> {
        if !self.listening() {
            return Err("this node has no cluster listener (cluster.bind is empty)".into());
        }
        let addr = if target.contains('@') {
            node_addr(target).ok_or_else(|| format!("{target:?} is not name@host[:port]"))?
        } else {
            target.to_string()
        };
        self.dial(&addr)
            .map_err(|e| format!("cannot reach {target} at {addr}: {e}"))?;
        Ok(format!(
            "{{\"joining\":{},\"addr\":{}}}",
            json_str(target),
            json_str(&addr)
        ))
    }

    pub(super) fn leave(&mut self) -> String {
        for (_, link) in self.up_links() {
            self.send(link, &Frame::Leave);
        }
        self.flush_links();
        for p in 0..self.peers.len() {
            if self.peers[p].state == PeerState::Up {
                self.peer_down(p);
            }
            self.peers[p].state = PeerState::Gone;
            self.peers[p].link = None;
        }
        for i in 0..self.links.len() {
            if let Some(l) = self.links[i].take() {
                self.io.close(l.sock);
            }
        }
        self.peers.clear();
        self.save_members();
        "{\"left\":true}".into()
    }

    pub(super) fn load_members(&mut self) {
        let Some(text) = self.io.load_members() else {
            return;
        };
        for line in text.lines() {
            if let Some((name, addr)) = line.split_once(' ') {
                if name != self.node && valid_node_name(name) && valid_cluster_addr(addr) {
                    self.peer_entry(name, addr);
                }
            }
        }
    }

    pub(super) fn save_members(&mut self) {
        let text: String = self
            .peers
            .iter()
            .filter(|p| p.state != PeerState::Gone)
            .map(|p| format!("{} {}\n", p.name, p.addr))
            .collect();
        self.io.save_members(&text);
    }
}
