//! What an authenticated peer sends on its control link, in one dispatch
//! ([`Cluster::on_peer_frame`]): heartbeats and member lists, route changes and snapshots,
//! retained messages, the session move (takeover, transfer, end, tail) and queries. Every
//! filter, topic, name and message is checked as a client's would be before it reaches a
//! shard, the disk or a dial.

use super::*;

impl Cluster {
    pub(super) fn on_peer_frame(&mut self, link: usize, frame: Frame) {
        let Some(p) = self.peer_of_link(link) else {
            return;
        };
        let node = p as u8;
        match frame {
            Frame::Heartbeat {
                uptime_s,
                connections,
                ..
            } => {
                self.peers[p].uptime_s = uptime_s;
                self.peers[p].connections = connections;
            }
            Frame::Members { members } => {
                // The list holds the sender and its peers: PEERS_MAX + 1 at most.
                if members.len() > PEERS_MAX + 1 {
                    log::warn!(
                        "cluster: {} sent a member list of {} nodes (at most {}); ignored",
                        self.peers[p].name,
                        members.len(),
                        PEERS_MAX + 1
                    );
                    return;
                }
                let mut learned = false;
                for (name, addr) in members {
                    if name == self.node || self.peer_index(&name).is_some() {
                        continue;
                    }
                    if !valid_node_name(&name) || !valid_cluster_addr(&addr) {
                        log::warn!(
                            "cluster: {} listed a malformed member {} at {}; ignored",
                            self.peers[p].name,
                            shown(&name),
                            shown(&addr)
                        );
                        continue;
                    }
                    log::info!("cluster: learned of node {name} ({addr})");
                    learned |= self.peer_entry(&name, &addr).is_some();
                }
                if learned {
                    self.save_members();
                }
            }
            Frame::Leave => {
                log::info!("cluster: node {} left", self.peers[p].name);
                self.peers[p].state = PeerState::Gone;
                self.peers[p].link = None;
                self.peer_down(p);
                self.save_members();
                if let Some(l) = self.links[link].as_mut() {
                    l.peer_name = None;
                    l.closed = true;
                }
            }
            Frame::RouteAdd { filter, .. } if !self.valid_filter(&filter) => {
                self.refuse_routes(p, 1);
            }
            Frame::RouteAdd { seq, filter } => {
                if seq > self.peers[p].route_seq {
                    self.peers[p].route_seq = seq;
                    if self.peers[p].routes.insert(filter.clone()) {
                        self.broadcast_route(filter.into(), node, true);
                    }
                }
            }
            Frame::RouteDel { seq, filter } => {
                if seq > self.peers[p].route_seq {
                    self.peers[p].route_seq = seq;
                    if self.peers[p].routes.remove(&filter) {
                        self.broadcast_route(filter.into(), node, false);
                    }
                }
            }
            Frame::RouteSnapshot { seq, filters } => {
                let all = filters.len();
                let new: HashSet<String> = filters
                    .into_iter()
                    .filter(|f| self.valid_filter(f))
                    .collect();
                if new.len() < all {
                    // Duplicates count here too, which an honest node never sends.
                    self.refuse_routes(p, all - new.len());
                }
                let old = std::mem::take(&mut self.peers[p].routes);
                for f in old.difference(&new) {
                    self.broadcast_route(f.as_str().into(), node, false);
                }
                for f in new.difference(&old) {
                    self.broadcast_route(f.as_str().into(), node, true);
                }
                self.peers[p].routes = new;
                self.peers[p].route_seq = seq;
            }
            Frame::Publish { .. } => {
                log::warn!(
                    "cluster: {} sent a message on its control link; closing it",
                    self.peers[p].name
                );
                self.mark_closed(link);
            }
            Frame::Retain { msg } => {
                if !valid_peer_topic(&msg.topic, self.metrics.cfg.max_topic_levels) {
                    log::warn!(
                        "cluster: {} sent a retained message with an invalid topic; ignored",
                        self.peers[p].name
                    );
                    return;
                }
                let Some(msg) = from_wire(msg, self.now_ms) else {
                    return;
                };
                self.store_retained(&msg);
                let value = (!msg.payload.is_empty()).then(|| msg.clone());
                for shard in 0..self.mesh.shards() {
                    self.mesh.send(
                        shard,
                        MeshMsg::Retain {
                            topic: msg.topic.clone(),
                            msg: value.clone(),
                        },
                    );
                }
            }
            Frame::Takeover {
                client_id,
                want_session,
                token,
                at_ms,
            } => {
                if client_id.len() > MQTT_STRING_MAX_BYTES {
                    return;
                }
                // The arbitration compares connection times across nodes: a peer's time is
                // never taken from the future, nor from further back than the skew allowed.
                let now = self.io.unix_ms();
                let at_ms = at_ms.clamp(now.saturating_sub(TAKEOVER_SKEW_MAX_MS), now);
                let shard = home_shard(&client_id, self.mesh.shards());
                self.mesh.send(
                    shard,
                    MeshMsg::RemoteTakeover {
                        client_id: client_id.into(),
                        want_session,
                        token,
                        node,
                        at_ms,
                    },
                );
            }
            Frame::SessionTransfer {
                token,
                client_id,
                found,
                subscriptions,
                messages,
                pubrel,
                sent_ids,
                incoming_qos2,
            } => {
                let cfg = &self.metrics.cfg;
                let inflight_max = usize::from(cfg.max_inflight);
                let valid = client_id.len() <= MQTT_STRING_MAX_BYTES
                    && pubrel.len() <= inflight_max
                    && sent_ids.len() <= inflight_max
                    && (cfg.max_awaiting_rel == 0
                        || incoming_qos2.len() <= cfg.max_awaiting_rel.max(inflight_max))
                    && (cfg.max_subscriptions == 0 || subscriptions.len() <= cfg.max_subscriptions)
                    && subscriptions
                        .iter()
                        .all(|s| valid_peer_filter(&s.filter, cfg.max_topic_levels))
                    && messages
                        .iter()
                        .all(|m| valid_peer_topic(&m.topic, cfg.max_topic_levels));
                if !valid {
                    // Answered as "no session there" rather than imported past the limits.
                    log::warn!(
                        "cluster: {} sent a session transfer beyond this node's limits \
                         (in-flight, subscriptions, filters); refused",
                        self.peers[p].name
                    );
                    self.takeover_answer(token, node, None);
                    return;
                }
                let export = found.then(|| {
                    Box::new(SessionExport {
                        token,
                        node,
                        client_id: client_id.as_str().into(),
                        found,
                        subscriptions: subscriptions
                            .into_iter()
                            .map(|s| (Arc::from(s.filter.as_str()), s.options, s.id))
                            .collect(),
                        messages: messages
                            .into_iter()
                            .filter_map(|m| from_wire(m, self.now_ms))
                            .collect(),
                        pubrel,
                        sent_ids,
                        incoming_qos2,
                    })
                });
                self.takeover_answer(token, node, export);
            }
            Frame::TakeoverEnd { client_id } => {
                let shard = home_shard(&client_id, self.mesh.shards());
                let client_id = client_id.into();
                self.mesh
                    .send(shard, MeshMsg::RemoteTakeoverEnd { client_id, node });
            }
            Frame::SessionTail {
                client_id,
                messages,
            } => {
                let max_levels = self.metrics.cfg.max_topic_levels;
                if client_id.len() > MQTT_STRING_MAX_BYTES
                    || !messages
                        .iter()
                        .all(|m| valid_peer_topic(&m.topic, max_levels))
                {
                    log::warn!(
                        "cluster: {} sent a malformed session tail; ignored",
                        self.peers[p].name
                    );
                    return;
                }
                let shard = home_shard(&client_id, self.mesh.shards());
                let msg = MeshMsg::SessionTail {
                    client_id: client_id.into(),
                    messages: messages
                        .into_iter()
                        .filter_map(|m| from_wire(m, self.now_ms))
                        .collect(),
                };
                self.mesh.send(shard, msg);
            }
            // Routes are answered from the asking node's own table, never asked of peers.
            Frame::Query { token, kind } => match QueryKind::from_wire(kind) {
                Some(k @ (QueryKind::Clients | QueryKind::Subscriptions | QueryKind::Metrics)) => {
                    self.start_query(k, QueryOrigin::Peer(p, token))
                }
                Some(QueryKind::Routes) | None => {
                    log::debug!("cluster: ignoring query of kind {kind}");
                }
            },
            Frame::QueryReply { token, rows } => self.query_rows(token, rows, Some(p)),
            Frame::Hello { .. }
            | Frame::Auth { .. }
            | Frame::DataLink { .. }
            | Frame::Superseded => self.mark_closed(link),
        }
    }

    /// A peer's route filter, checked as a client's SUBSCRIBE filter would be.
    pub(super) fn valid_filter(&self, filter: &str) -> bool {
        valid_peer_filter(filter, self.metrics.cfg.max_topic_levels)
    }

    pub(super) fn refuse_routes(&self, p: usize, count: usize) {
        log::warn!(
            "cluster: refused {count} invalid route filter(s) from {} (wildcards, length or \
             more than mqtt.max_topic_levels levels)",
            self.peers[p].name
        );
    }
}
