//! What this node's shards hand the cluster thread ([`Cluster::on_mesh`]): route changes,
//! numbered and sent to every peer (each node is the only writer of its own routes), lost
//! data links, retained messages (the thread keeps a bounded copy for peers that come up),
//! and the shard side of the session move (takeovers, exports, ends, tails) and query rows.

use super::*;

impl Cluster {
    pub(super) fn broadcast_route(&mut self, filter: Arc<str>, node: u8, add: bool) {
        for shard in 0..self.mesh.shards() {
            self.mesh.send(
                shard,
                MeshMsg::NodeRoute {
                    filter: filter.clone(),
                    node,
                    add,
                },
            );
        }
    }

    pub(super) fn up_links(&self) -> Vec<(usize, usize)> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == PeerState::Up)
            .filter_map(|(i, p)| p.link.map(|l| (i, l)))
            .collect()
    }

    // ------------------------------------------------------------------ messages from shards

    pub(super) fn on_mesh(&mut self, m: MeshMsg) {
        match m {
            MeshMsg::ClusterRoute { filter, add } => {
                let changed = if add {
                    self.local_routes.insert(filter.to_string())
                } else {
                    self.local_routes.remove(&*filter)
                };
                if !changed {
                    return;
                }
                self.route_seq += 1;
                let seq = self.route_seq;
                let frame = if add {
                    Frame::RouteAdd {
                        seq,
                        filter: filter.to_string(),
                    }
                } else {
                    Frame::RouteDel {
                        seq,
                        filter: filter.to_string(),
                    }
                };
                for (_, link) in self.up_links() {
                    self.send(link, &frame);
                }
            }
            MeshMsg::ClusterLinkLost { node, epoch } => {
                let p = node as usize;
                let current = self
                    .peers
                    .get(p)
                    .filter(|peer| peer.state == PeerState::Up && peer.epoch == epoch)
                    .and_then(|peer| peer.link);
                if let Some(control) = current {
                    self.close_link(control, "a data link was lost");
                }
            }
            MeshMsg::ClusterRetain { msg } => {
                self.store_retained(&msg);
                let frame = Frame::Retain {
                    msg: to_wire(&msg, self.now_ms),
                };
                for (_, link) in self.up_links() {
                    self.send(link, &frame);
                }
            }
            MeshMsg::ClusterTakeover {
                client_id,
                want_session,
                token,
                shard,
                at_ms,
            } => {
                let ups = self.up_links();
                if want_session {
                    let earlier = self.pending.insert(
                        token,
                        PendingTakeover {
                            shard,
                            client_id: client_id.clone(),
                            waiting: ups.iter().map(|(p, _)| *p as u8).collect(),
                            found: None,
                            deadline_ms: self.now_ms + SESSION_WAIT_MS,
                        },
                    );
                    debug_assert!(earlier.is_none(), "takeover tokens are unique per node");
                }
                let frame = Frame::Takeover {
                    client_id: client_id.to_string(),
                    want_session,
                    token,
                    at_ms,
                };
                for (_, link) in &ups {
                    self.send(*link, &frame);
                }
                if want_session && ups.is_empty() {
                    self.finish_takeover(token);
                }
            }
            MeshMsg::ClusterSessionExport(e) => {
                let Some(link) = self.peers.get(e.node as usize).and_then(|p| p.link) else {
                    return;
                };
                let frame = Frame::SessionTransfer {
                    token: e.token,
                    client_id: e.client_id.to_string(),
                    found: e.found,
                    subscriptions: e
                        .subscriptions
                        .iter()
                        .map(|(f, o, id)| WireSubscription {
                            filter: f.to_string(),
                            options: *o,
                            id: *id,
                        })
                        .collect(),
                    messages: e.messages.iter().map(|m| to_wire(m, self.now_ms)).collect(),
                    pubrel: e.pubrel.clone(),
                    sent_ids: e.sent_ids.clone(),
                    incoming_qos2: e.incoming_qos2.clone(),
                };
                self.send(link, &frame);
            }
            MeshMsg::ClusterTakeoverEnd { client_id, node } => {
                self.takeover_ends.push((client_id, node));
            }
            MeshMsg::ClusterSessionTail {
                client_id,
                node,
                messages,
            } => {
                let Some(link) = self.peers.get(node as usize).and_then(|p| p.link) else {
                    return;
                };
                let frame = Frame::SessionTail {
                    client_id: client_id.to_string(),
                    messages: messages.iter().map(|m| to_wire(m, self.now_ms)).collect(),
                };
                self.send(link, &frame);
            }
            MeshMsg::QueryReply { token, rows } => self.query_rows(token, rows, None),
            _ => log::debug!("cluster: unexpected mesh message"),
        }
    }

    /// The cluster thread's copy of the retained messages (sent to peers that come up),
    /// bounded like the shards' replicas by `mqtt.max_retained_messages` and
    /// `mqtt.max_retained_bytes`.
    pub(super) fn store_retained(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            if let Some(old) = self.retained.remove(&*msg.topic) {
                self.retained_bytes -= old.topic.len() + old.payload.len();
            }
            return;
        }
        let cfg = &self.metrics.cfg;
        let held = crate::retained::Held {
            count: self.retained.len(),
            bytes: self.retained_bytes,
        };
        let old = self.retained.get(&*msg.topic).map(|o| &**o);
        let (max_count, max_bytes) = (cfg.max_retained_messages, cfg.max_retained_bytes);
        if !crate::retained::within_limits(held, old, msg, max_count, max_bytes) {
            return;
        }
        self.retained_bytes += msg.topic.len() + msg.payload.len();
        if let Some(old) = self.retained.insert(msg.topic.to_string(), msg.clone()) {
            self.retained_bytes -= old.topic.len() + old.payload.len();
        }
    }
}
