//! Routing and delivery of a message: matching it against the route replica and sending it
//! to the shards and nodes with a match (`route`, `forward` onto the data links), delivering
//! it to this shard's sessions within their in-flight window (`deliver`, `pump`,
//! `send_publish`), and the retained replica (`set_retained`, `apply_retained`).

use super::*;

impl Shard {
    /// Sends a message to every shard and node with a matching route (this one included).
    /// Returns whether anything matched.
    pub(super) fn route(&mut self, msg: Arc<Message>) -> bool {
        self.route_with(msg, true, None)
    }

    /// Routes `msg` on this node: to local shards when `normal`, to the shared groups in
    /// `only_groups` (or all matching groups when `None`). Messages that came from another
    /// node are routed with `from_node = true` semantics by the caller passing
    /// `Some(groups)`: they are never forwarded again.
    pub(super) fn route_with(
        &mut self,
        msg: Arc<Message>,
        normal: bool,
        only_groups: Option<Vec<Arc<str>>>,
    ) -> bool {
        let remote = only_groups.is_some();
        let mut targets = ShardSet::default();
        let mut nodes = 0u64;
        if normal {
            self.routes.for_each_match(&msg.topic, |r| {
                targets.union_with(&r.shards);
                nodes |= r.nodes;
            });
        }
        if remote {
            nodes = 0;
        }
        for shard in targets.iter() {
            if shard == self.id {
                continue;
            }
            if msg.qos == QoS::AtMostOnce && self.mesh.backlog(shard) > MESH_QOS0_DROP_BACKLOG {
                self.shared.metrics.dropped(DropReason::Congested);
                continue;
            }
            self.mesh.send(shard, MeshMsg::Publish(msg.clone()));
        }
        if targets.contains(self.id) {
            self.deliver_local(&msg);
        }
        let mut matched = !targets.is_empty() || nodes != 0;
        let mut remote_groups: Vec<(Arc<str>, u8)> = Vec::new();
        if let Some(keys) = only_groups {
            matched |= !keys.is_empty();
            for key in keys {
                self.shared_publish(key, msg.clone(), Vec::new());
            }
        } else if !self.share_routes.is_empty() {
            let mut groups: SmallVec<[(Arc<str>, bool, u64); 2]> = SmallVec::new();
            self.share_routes.for_each_match(&msg.topic, |list| {
                groups.extend(
                    list.iter()
                        .map(|r| (r.key.clone(), !r.shards.is_empty(), r.nodes)),
                )
            });
            groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            groups.dedup_by(|a, b| {
                if a.0 == b.0 {
                    b.1 |= a.1;
                    b.2 |= a.2;
                    true
                } else {
                    false
                }
            });
            matched |= !groups.is_empty();
            for (key, local, group_nodes) in groups {
                // One member per group cluster-wide: this node's members when it has any,
                // else one node that has members, in turn.
                if local {
                    self.shared_publish(key, msg.clone(), Vec::new());
                } else if group_nodes != 0 {
                    self.share_rr = self.share_rr.wrapping_add(1);
                    let n = group_nodes.count_ones() as u64;
                    let pick = self.share_rr % n;
                    let node = (0..64u8)
                        .filter(|b| group_nodes & (1u64 << b) != 0)
                        .nth(pick as usize)
                        .unwrap_or(0);
                    remote_groups.push((key, node));
                }
            }
        }
        if nodes != 0 || !remote_groups.is_empty() {
            self.forward(&msg, nodes, &remote_groups);
        }
        matched
    }

    /// Appends one `Publish` frame per node in `nodes` or picked for a group in `groups` to
    /// this shard's link to that node: the frame head, then the payload as its own buffer.
    fn forward(&mut self, msg: &Arc<Message>, nodes: u64, groups: &[(Arc<str>, u8)]) {
        let wire = to_wire(msg, self.now_ms);
        let limit = self.cfg().cluster.link_buffer_bytes;
        let mut targets = nodes;
        for (_, n) in groups {
            targets |= 1u64 << n;
        }
        while targets != 0 {
            let node = targets.trailing_zeros() as u8;
            targets &= targets - 1;
            if msg.qos == QoS::AtMostOnce && self.links.backlog(node) > limit {
                Metrics::add(&self.shared.metrics.cluster_dropped, 1);
                self.shared.metrics.dropped(DropReason::LinkFull);
                continue;
            }
            let keys: Vec<String> = groups
                .iter()
                .filter(|(_, n)| *n == node)
                .map(|(k, _)| k.to_string())
                .collect();
            let normal = nodes & (1u64 << node) != 0;
            encode_publish_head(&wire, normal, &keys, &mut self.scratch);
            let head = self.scratch.split().freeze();
            self.links.queue(node, head);
            if !wire.payload.is_empty() {
                self.links.queue(node, wire.payload.clone());
            }
            Metrics::add(&self.shared.metrics.cluster_forwarded, 1);
        }
    }

    /// Delivers to this shard's matching sessions: one copy per session at the highest QoS of
    /// its matching subscriptions, with all their subscription ids (MQTT-3.3.4-2/3).
    pub(super) fn deliver_local(&mut self, msg: &Arc<Message>) {
        let mut matched: SmallVec<[Subscriber; 8]> = SmallVec::new();
        self.routes
            .for_each_match(&msg.topic, |r| matched.extend(r.subs.iter().copied()));
        if matched.is_empty() {
            return;
        }
        matched.sort_unstable_by_key(|s| s.session);
        let mut i = 0;
        while i < matched.len() {
            let sidx = matched[i].session;
            let mut qos = QoS::AtMostOnce;
            let mut retain_as_published = false;
            let mut sub_ids: SmallVec<[u32; 1]> = SmallVec::new();
            let mut any = false;
            while i < matched.len() && matched[i].session == sidx {
                let s = matched[i];
                i += 1;
                if s.options.no_local && *self.session(sidx).session.client_id == *msg.publisher {
                    continue;
                }
                any = true;
                qos = qos.max(s.options.qos);
                retain_as_published |= s.options.retain_as_published;
                if let Some(id) = s.id {
                    sub_ids.push(id.get());
                }
            }
            if !any {
                continue;
            }
            if !self.first_copy(sidx, msg.id) {
                continue;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos: msg.qos.min(qos),
                // MQTT-3.3.1-9: live messages go out with retain 0 unless retain-as-published.
                retain: retain_as_published && msg.retain,
                sub_ids,
                share: None,
            };
            self.deliver(sidx, d);
        }
    }

    /// Sends a delivery now if the session's connection and window allow, else queues it.
    pub(super) fn deliver(&mut self, sidx: u32, d: Delivery) {
        let (max_queued, policy, queue_qos0) = {
            let c = self.cfg();
            (c.max_queued_messages, c.queue_drop_policy, c.queue_qos0)
        };
        let entry = self.session_mut(sidx);
        if let SessionPhase::MovingAway {
            to: node, ended, ..
        } = entry.phase
        {
            // Its tail: bounded by the move's grace time, not the queue limit, since dropping
            // any of it loses what no other node has.
            entry.session.enqueue(d, usize::MAX, policy);
            if ended {
                // Lingering: straight on to the node it moved to (which keeps one copy).
                let client_id = entry.session.client_id.clone();
                self.send_tail(sidx, client_id, node);
            }
            return;
        }
        let window = self.window(sidx);
        let entry = self.session_mut(sidx);
        let conn_slot = entry.conn();
        if conn_slot.is_none() && d.qos == QoS::AtMostOnce && !queue_qos0 {
            self.shared.metrics.dropped(DropReason::Qos0Offline);
            return;
        }
        let out_ok = match conn_slot {
            Some(slot) => self
                .conns
                .get_slot(slot)
                .map(|c| c.out_bytes < OUT_HIGH_WATER_BYTES)
                .unwrap_or(false),
            None => false,
        };
        let entry = self.session_mut(sidx);
        if let (Some(slot), true) = (
            conn_slot,
            out_ok && entry.session.can_send_now(d.qos, window),
        ) {
            let pid = if d.qos == QoS::AtMostOnce {
                0
            } else {
                entry.session.start_inflight(d.clone())
            };
            self.send_publish(slot, pid, &d, false);
            return;
        }
        if entry.session.enqueue(d, max_queued, policy) != Enqueued::Queued {
            self.shared.metrics.dropped(DropReason::QueueFull);
        }
    }

    /// The in-flight window of a session's current connection.
    fn window(&mut self, sidx: u32) -> usize {
        let cfg = self.cfg().max_inflight as usize;
        match self.session(sidx).conn() {
            Some(slot) => self
                .conns
                .get_slot(slot)
                .map(|c| cfg.min(c.receive_max as usize))
                .unwrap_or(cfg),
            None => cfg,
        }
    }

    /// Moves queued messages to the connection while window and socket allow.
    pub(super) fn pump(&mut self, sidx: u32) {
        let Some(slot) = self.session(sidx).conn() else {
            return;
        };
        let window = self.window(sidx);
        loop {
            let full = self
                .conns
                .get_slot(slot)
                .map(|c| c.out_bytes >= OUT_HIGH_WATER_BYTES)
                .unwrap_or(true);
            if full {
                return;
            }
            let Some((pid, d)) = self.session_mut(sidx).session.next_to_send(window) else {
                return;
            };
            self.send_publish(slot, pid, &d, false);
        }
    }

    pub(super) fn send_publish(&mut self, slot: u32, packet_id: u16, d: &Delivery, dup: bool) {
        let Some(conn) = self.conns.get_slot(slot) else {
            return;
        };
        let (protocol, max_out, alias_max) =
            (conn.protocol, conn.max_packet_out, conn.client_alias_max);
        let v5 = protocol == Protocol::V5;
        if d.msg.expires_at.is_some_and(|t| t <= self.now_ms) {
            // MQTT-3.3.2-5: an expired message is not sent.
            self.drop_delivery(slot, packet_id, DropReason::Expired);
            return;
        }
        // Only v5 deliveries that carry properties pay for building a property block; the
        // common case encodes straight from the shared topic and payload.
        let mut properties = None;
        if v5 && (d.msg.properties.is_some() || !d.sub_ids.is_empty() || d.msg.expires_at.is_some())
        {
            let mut p = d.msg.properties.as_deref().cloned().unwrap_or_default();
            p.subscription_identifiers = d.sub_ids.to_vec();
            if let Some(expires_at) = d.msg.expires_at {
                // MQTT-3.3.2-6: forward the remaining lifetime.
                let left_ms = expires_at.saturating_sub(self.now_ms);
                p.message_expiry_interval = Some(left_ms.div_ceil(1000) as u32);
            }
            properties = Some(p);
        }
        let empty = Properties::default();
        let props_ref = if v5 {
            Some(properties.as_ref().unwrap_or(&empty))
        } else {
            None
        };
        let dup = dup && d.qos != QoS::AtMostOnce;
        let topic: &str = &d.msg.topic;
        let payload_len = d.msg.payload.len();
        let header_len = encode_publish_header_parts(
            topic,
            d.qos,
            dup,
            d.retain,
            packet_id,
            props_ref,
            payload_len,
            &mut self.scratch,
        );
        // An alias definition adds 3 bytes to the header: keep room for it when aliases are on.
        let alias_room = if alias_max > 0 { 3 } else { 0 };
        if (header_len + payload_len + alias_room) as u64 > max_out as u64 {
            // MQTT-3.1.2-24: never send a packet larger than the client's maximum.
            self.scratch.clear();
            self.drop_delivery(slot, packet_id, DropReason::TooLarge);
            return;
        }
        if alias_max > 0 {
            // Topic aliases towards the client (MQTT-3.3.2.3.4): the first message on a topic
            // carries topic + alias, later ones only the alias; see `alias` for the bounds.
            let budget = self.shared.cfg.max_topic_alias_bytes;
            let Some(conn) = self.conns.get_slot(slot) else {
                return;
            };
            let aliases = conn.aliases.get_or_insert_with(Default::default);
            let table = aliases
                .outbound
                .get_or_insert_with(|| OutboundAliases::new(alias_max, budget));
            let (alias, topic) = match table.resolve(&d.msg.topic) {
                AliasUse::Known(a) => (Some(a), ""),
                AliasUse::Assign(a) => (Some(a), topic),
                AliasUse::None => (None, topic),
            };
            if let Some(alias) = alias {
                let mut p = properties.unwrap_or_default();
                p.topic_alias = Some(alias);
                self.scratch.clear();
                encode_publish_header_parts(
                    topic,
                    d.qos,
                    dup,
                    d.retain,
                    packet_id,
                    Some(&p),
                    payload_len,
                    &mut self.scratch,
                );
            }
        }
        let header = self.scratch.split().freeze();
        let Some(conn) = self.conns.get_slot(slot) else {
            return;
        };
        conn.push(header);
        conn.push(d.msg.payload.clone());
        Metrics::add(&self.shared.metrics.messages_sent, 1);
        self.mark_dirty(slot);
    }

    /// Gives up one delivery (expired, or too large for the client), counted as dropped.
    fn drop_delivery(&mut self, slot: u32, packet_id: u16, why: DropReason) {
        self.shared.metrics.dropped(why);
        if packet_id != 0 {
            if let Some(sidx) = self.conns.get_slot(slot).map(|c| c.session) {
                self.session_mut(sidx).session.abandon(packet_id);
            }
        }
    }

    pub(super) fn set_retained(&mut self, msg: &Arc<Message>) {
        let value = if msg.payload.is_empty() {
            None
        } else {
            Some(msg.clone())
        };
        if !self.apply_retained(msg.topic.clone(), value.clone()) {
            // Counted and logged by the shard the PUBLISH arrived on (every replica refuses).
            let n = self
                .shared
                .metrics
                .retained_refused
                .fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                log::warn!(
                    "shard {}: retained store full ({} messages, {} bytes; \
                     mqtt.max_retained_messages / max_retained_bytes): not retaining {:?} \
                     ({} refused so far)",
                    self.id,
                    self.retained.len(),
                    self.retained.bytes(),
                    msg.topic,
                    n + 1
                );
            }
            return;
        }
        if self.shared.cluster.enabled.load(Ordering::Relaxed) {
            let cluster = self.mesh.cluster();
            self.mesh
                .send(cluster, MeshMsg::ClusterRetain { msg: msg.clone() });
        }
        for to in 0..self.mesh.shards() {
            if to != self.id {
                self.mesh.send(
                    to,
                    MeshMsg::Retain {
                        topic: msg.topic.clone(),
                        msg: value.clone(),
                    },
                );
            }
        }
    }

    /// Applies a retained message (or its removal) to this shard's replica; false when the
    /// store is full (`mqtt.max_retained_*`) and the message was not retained. Each replica
    /// applies the limit itself, so at the limit replicas may differ by the messages that
    /// raced for the last room.
    pub(super) fn apply_retained(&mut self, topic: Arc<str>, msg: Option<Arc<Message>>) -> bool {
        match msg {
            Some(m) => {
                let (count, bytes) = (
                    self.cfg().max_retained_messages,
                    self.cfg().max_retained_bytes,
                );
                if !self.retained.fits(&topic, &m, count, bytes) {
                    return false;
                }
                self.retained.insert(topic, m);
            }
            None => {
                self.retained.remove(&topic);
            }
        }
        true
    }
}
