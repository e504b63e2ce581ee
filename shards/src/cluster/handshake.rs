//! The link handshake: `Hello` and the mutual HMAC proof of the cookie (`Auth`), the checks
//! on the peer's name and address, a control link coming up (full route, retained and member
//! sync), and a data link handed to its shard once authenticated. Frames of an
//! authenticated control link go on to [`Cluster::on_peer_frame`].

use super::*;

impl Cluster {
    pub(super) fn on_frame(&mut self, link: usize, frame: Frame) {
        let (authed, hello_seen) = match &self.links[link] {
            Some(l) => (l.authed, l.hello_seen),
            None => return,
        };
        match frame {
            Frame::Hello {
                version,
                node,
                cluster_addr,
                nonce,
                ..
            } => {
                let l = self.links[link].as_mut().expect("checked above");
                // A data link we dialled must be answered by the node we dialled it for.
                let expected = l.dialed && l.peer_name.as_ref().is_some_and(|n| *n != node);
                if hello_seen
                    || version != CLUSTER_PROTOCOL_VERSION
                    || node == self.node
                    || expected
                    || !valid_node_name(&node)
                    || !valid_cluster_addr(&cluster_addr)
                {
                    log::warn!(
                        "cluster: refusing link from {}: bad hello (version {version})",
                        shown(&node)
                    );
                    self.mark_closed(link);
                    return;
                }
                l.hello_seen = true;
                l.peer_nonce = Some(nonce);
                let dialed = l.dialed;
                let ours = l.nonce;
                l.peer_name = Some(node.clone());
                l.peer_addr = cluster_addr;
                if dialed {
                    // The dialler proves first; the acceptor answers only a valid proof.
                    let t = Transcript {
                        dialer: &self.node,
                        dialer_nonce: &ours,
                        acceptor: &node,
                        acceptor_nonce: &nonce,
                    };
                    let proof = handshake_proof(&self.cfg.cookie, Role::Dialer, &t);
                    self.send(link, &Frame::Auth { proof });
                }
            }
            Frame::Auth { proof } => {
                let l = self.links[link].as_ref().expect("checked above");
                let verified = match (&l.peer_name, &l.peer_nonce) {
                    (Some(peer), Some(theirs)) if hello_seen && !authed => {
                        let (t, peer_role) = if l.dialed {
                            let t = Transcript {
                                dialer: &self.node,
                                dialer_nonce: &l.nonce,
                                acceptor: peer,
                                acceptor_nonce: theirs,
                            };
                            (t, Role::Acceptor)
                        } else {
                            let t = Transcript {
                                dialer: peer,
                                dialer_nonce: theirs,
                                acceptor: &self.node,
                                acceptor_nonce: &l.nonce,
                            };
                            (t, Role::Dialer)
                        };
                        verify_proof(&self.cfg.cookie, peer_role, &t, &proof).then(|| {
                            // Our answer, computed only now that the dialler has proven.
                            (!l.dialed)
                                .then(|| handshake_proof(&self.cfg.cookie, Role::Acceptor, &t))
                        })
                    }
                    _ => None,
                };
                let Some(answer) = verified else {
                    log::warn!(
                        "cluster: refusing link from {} ({}): wrong cookie",
                        shown(l.peer_name.as_deref().unwrap_or("?")),
                        shown(&l.peer_addr)
                    );
                    self.mark_closed(link);
                    return;
                };
                let peer = l.peer_name.clone().expect("verified after hello");
                if !self.cfg.allow_node_name_mismatch {
                    let ip = l.remote_ip;
                    let io = &mut self.io;
                    if !ip.is_some_and(|ip| name_matches_ip(&peer, ip, |a| io.resolve(a))) {
                        log::warn!(
                            "cluster: refusing node {peer}: its link comes from {}, not the \
                             host of its name (cluster.allow_node_name_mismatch = false)",
                            ip.map(|ip| ip.to_string()).unwrap_or_default()
                        );
                        self.mark_closed(link);
                        return;
                    }
                }
                let l = self.links[link].as_mut().expect("checked above");
                l.authed = true;
                l.reader.set_max(FRAME_MAX_BYTES);
                if let Some(proof) = answer {
                    self.send(link, &Frame::Auth { proof });
                }
                let l = self.links[link].as_ref().expect("checked above");
                if l.data_shard.is_some() {
                    self.data_link_ready(link);
                } else {
                    self.link_up(link);
                }
            }
            Frame::DataLink { shard } => {
                let l = self.links[link].as_mut().expect("checked above");
                if !hello_seen || authed || l.dialed || l.data_shard.is_some() {
                    log::warn!("cluster: unexpected data-link frame; closing link");
                    self.mark_closed(link);
                    return;
                }
                l.data_shard = Some(shard);
            }
            _ if !authed => {
                log::warn!("cluster: frame before handshake; closing link");
                self.mark_closed(link);
            }
            Frame::Superseded => self.on_superseded(link),
            f => self.on_peer_frame(link, f),
        }
    }

    /// What a peer gets when its link comes up: the members, this node's routes and
    /// retained messages, and a heartbeat.
    fn resync(&mut self, link: usize) {
        let members = self.member_list();
        self.send(link, &Frame::Members { members });
        let filters: Vec<String> = self.local_routes.iter().cloned().collect();
        let seq = self.route_seq;
        self.send(link, &Frame::RouteSnapshot { seq, filters });
        let retained: Vec<Arc<Message>> = self.retained.values().cloned().collect();
        for m in retained {
            let msg = to_wire(&m, self.now_ms);
            self.send(link, &Frame::Retain { msg });
        }
        self.send_heartbeat(link);
    }

    /// Whether `link` is the one of a pair that both ends keep: dialled by the smaller name.
    fn preferred(&self, link: usize, peer: &str) -> bool {
        let dialed = self.links[link].as_ref().is_some_and(|l| l.dialed);
        dialed == (self.node.as_str() < peer)
    }

    /// Another open control link with `peer` (in its handshake or up), if any: one that
    /// named it in its `Hello`, or one this node dialled to its address whose `Hello` has
    /// not come yet.
    fn other_link(&self, link: usize, peer: &str, addr: &str) -> Option<usize> {
        (0..self.links.len()).find(|&i| {
            i != link
                && self.links[i].as_ref().is_some_and(|l| {
                    !l.closed
                        && l.data_shard.is_none()
                        && match l.peer_name.as_deref() {
                            Some(name) => name == peer,
                            None => l.dialed && l.peer_addr == addr,
                        }
                })
        })
    }

    /// Drops `link`, one of a pair dialled at once, telling the peer to use the other.
    fn supersede(&mut self, link: usize) {
        self.send(link, &Frame::Superseded);
        if let Some(l) = self.links[link].as_mut() {
            // Closed without taking the peer down (see `close_link`).
            l.peer_name = None;
            l.closed = true;
        }
    }

    /// Moves an up peer to `link` without taking it down: the new link gets what a new
    /// peer gets (members, routes, retained messages), in case frames were lost between.
    fn relink(&mut self, p: usize, link: usize) {
        self.peers[p].link = Some(link);
        self.peers[p].relink_until_ms = None;
        self.resync(link);
    }

    /// The peer says `link` is superseded by the other link of a pair dialled at once.
    pub(super) fn on_superseded(&mut self, link: usize) {
        let Some(p) = self.peer_of_link(link) else {
            self.supersede_silently(link);
            return;
        };
        let (name, addr) = (self.peers[p].name.clone(), self.peers[p].addr.clone());
        match self.other_link(link, &name, &addr) {
            Some(other) => {
                self.supersede_silently(link);
                let authed = self.links[other].as_ref().is_some_and(|l| l.authed);
                if authed {
                    self.relink(p, other);
                } else {
                    self.peers[p].link = None;
                    self.peers[p].relink_until_ms = Some(self.now_ms + HANDSHAKE_TIMEOUT_MS);
                }
            }
            // No other link to move to: an ordinary loss of the link.
            None => self.mark_closed(link),
        }
    }

    fn supersede_silently(&mut self, link: usize) {
        if let Some(l) = self.links[link].as_mut() {
            l.peer_name = None;
            l.closed = true;
        }
    }

    pub(super) fn mark_closed(&mut self, link: usize) {
        if let Some(l) = self.links[link].as_mut() {
            l.closed = true;
        }
    }

    pub(super) fn link_up(&mut self, link: usize) {
        let (name, addr) = {
            let l = self.links[link].as_ref().expect("link exists");
            (
                l.peer_name.clone().expect("hello seen"),
                l.peer_addr.clone(),
            )
        };
        let Some(p) = self.peer_entry(&name, &addr) else {
            self.mark_closed(link);
            return;
        };
        // Both nodes may dial each other at once. Both keep the link dialled by the smaller
        // name and tell the other side when they drop the other one (`Superseded`), so that
        // it moves over instead of taking this node down. (Deciding by name alone, without
        // who dialled which link, made each side keep a different one: the peers went down
        // and up again on every redial, in step. Found by the simulator.)
        let preferred = self.preferred(link, &name);
        if !preferred
            && self
                .other_link(link, &name, &addr)
                .is_some_and(|o| self.preferred(o, &name))
        {
            self.supersede(link);
            return;
        }
        if self.peers[p].state == PeerState::Up {
            match self.peers[p].link {
                Some(old) if !preferred => {
                    // Already up on a link of the pair: this one goes.
                    let _ = old;
                    self.supersede(link);
                }
                Some(old) => {
                    self.supersede(old);
                    self.relink(p, link);
                }
                None => self.relink(p, link),
            }
            return;
        }
        log::info!("cluster: node {name} is up ({addr})");
        self.peers[p].state = PeerState::Up;
        self.peers[p].link = Some(link);
        self.peers[p].routes.clear();
        self.peers[p].epoch = self.peers[p].epoch.wrapping_add(1);
        self.control.peers_up.fetch_add(1, Ordering::Relaxed);
        self.save_members();
        self.resync(link);
        // Our shards' data links to it, and its data links that arrived before this one.
        for shard in 0..self.mesh.shards() {
            match self.dial(&addr) {
                Ok(d) => {
                    self.send(
                        d,
                        &Frame::DataLink {
                            shard: shard as u16,
                        },
                    );
                    let l = self.links[d].as_mut().expect("just dialled");
                    l.data_shard = Some(shard as u16);
                    l.data_out = true;
                    l.peer_name = Some(name.clone());
                }
                Err(e) => {
                    log::warn!("cluster: cannot open a data link to {name}: {e}");
                    self.mark_closed(link);
                    return;
                }
            }
        }
        let waiting: Vec<usize> = (0..self.links.len())
            .filter(|&i| {
                self.links[i].as_ref().is_some_and(|l| {
                    l.data_waiting && l.peer_name.as_deref() == Some(name.as_str())
                })
            })
            .collect();
        for i in waiting {
            self.data_link_ready(i);
        }
    }

    /// An authenticated data link: hand it to its shard once its peer is up (an inbound one
    /// may arrive before the peer's control link is up here; it waits, unread).
    pub(super) fn data_link_ready(&mut self, link: usize) {
        let (name, shard, outbound) = {
            let l = self.links[link].as_ref().expect("link exists");
            (
                l.peer_name.clone().expect("hello seen"),
                l.data_shard.expect("a data link"),
                l.data_out,
            )
        };
        let peer = self
            .peer_index(&name)
            .filter(|&p| self.peers[p].state == PeerState::Up);
        let Some(p) = peer else {
            if outbound {
                self.mark_closed(link);
            } else if let Some(l) = self.links[link].as_mut() {
                l.data_waiting = true;
            }
            return;
        };
        let mut l = self.links[link].take().expect("link exists");
        // What the handshake left unwritten goes out first, from the shard.
        let unsent: Vec<Bytes> = l.out.drain(..).collect();
        let received = l.reader.take_buffered();
        let target = if outbound {
            shard as usize
        } else {
            shard as usize % self.mesh.shards()
        };
        let attach = crate::mesh::LinkAttach {
            node: p as u8,
            epoch: self.peers[p].epoch,
            sock: l.sock,
            outbound,
            unsent,
            received,
        };
        log::debug!(
            "cluster: data link {} {name} (shard {shard}) goes to shard {target}",
            if outbound { "to" } else { "from" }
        );
        self.mesh
            .send(target, MeshMsg::LinkAttach(Box::new(attach)));
    }
}
