//! Packets of connected clients: the dispatch of every packet after CONNECT (PUBLISH and its
//! acknowledgements, SUBSCRIBE/UNSUBSCRIBE to the jobs in `subscribe.rs`, PINGREQ,
//! DISCONNECT), and an incoming PUBLISH with its aliases, QoS 2 state, retain and routing.

use super::*;

impl Shard {
    pub(super) fn on_packet(&mut self, slot: u32, gen: u32, packet: Packet) -> Flow {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return Flow::Stop;
        };
        let sidx = conn.session;
        let protocol = conn.protocol;
        match packet {
            Packet::Publish(p) => return self.on_publish(slot, sidx, protocol, p),
            Packet::PubAck(a) => {
                self.session_mut(sidx).session.on_puback(a.packet_id);
                self.pump(sidx);
            }
            Packet::PubRec(a) => {
                let reason = found(self.session_mut(sidx).session.on_pubrec(a.packet_id));
                if a.reason.is_error() {
                    // v5: an error PUBREC ends the exchange (MQTT-4.3.3-4 family); forget it.
                    self.session_mut(sidx).session.on_pubcomp(a.packet_id);
                    self.pump(sidx);
                } else {
                    self.send_packet(
                        slot,
                        protocol,
                        &Packet::PubRel(PubResp::new(a.packet_id, reason)),
                    );
                }
            }
            Packet::PubRel(a) => {
                let reason = found(self.session_mut(sidx).session.release_qos2(a.packet_id));
                self.send_packet(
                    slot,
                    protocol,
                    &Packet::PubComp(PubResp::new(a.packet_id, reason)),
                );
            }
            Packet::PubComp(a) => {
                self.session_mut(sidx).session.on_pubcomp(a.packet_id);
                self.pump(sidx);
            }
            Packet::Subscribe(s) => self.on_subscribe(slot, gen, sidx, protocol, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(slot, gen, sidx, protocol, u),
            Packet::PingReq => self.send_packet(slot, protocol, &Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    let cap = self.cfg().session_expiry_interval_s;
                    let entry = self.session_mut(sidx);
                    if entry.session.ephemeral && expiry > 0 {
                        // MQTT-3.14.2-2: expiry 0 at CONNECT cannot be raised at DISCONNECT.
                        self.protocol_error(slot, ReasonCode::ProtocolError);
                        return Flow::Stop;
                    }
                    let expiry = expiry.min(cap);
                    match &mut entry.phase {
                        SessionPhase::Online { expiry_ms, .. } => *expiry_ms = expiry as u64 * 1000,
                        _ => debug_assert!(false, "a DISCONNECT comes on an online session"),
                    }
                    entry.session.ephemeral = expiry == 0;
                }
                // MQTT-3.14.4-3: a normal DISCONNECT discards the will, except v5 0x04.
                if d.reason != ReasonCode::DisconnectWithWillMessage {
                    if let Some(conn) = self.conns.get_mut(slot, gen) {
                        conn.will = None;
                    }
                }
                self.close(slot, Close::Graceful);
                return Flow::Stop;
            }
            Packet::Connect(_) => {
                // MQTT-3.1.0-2: a second CONNECT is a protocol violation.
                log::info!("shard {}: second CONNECT; closing", self.id);
                self.protocol_error(slot, ReasonCode::ProtocolError);
                return Flow::Stop;
            }
            Packet::Auth(_) => {
                self.protocol_error(slot, ReasonCode::BadAuthenticationMethod);
                return Flow::Stop;
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error(slot, ReasonCode::ProtocolError);
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn on_publish(&mut self, slot: u32, sidx: u32, protocol: Protocol, mut p: Publish) -> Flow {
        Metrics::add(&self.shared.metrics.messages_received, 1);
        if let Some(alias) = p.properties.topic_alias {
            // MQTT-3.3.2-9/10: aliases are 1..=our Topic Alias Maximum.
            if alias == 0 || alias > self.cfg().max_topic_alias {
                self.protocol_error(slot, ReasonCode::TopicAliasInvalid);
                return Flow::Stop;
            }
            let Some(conn) = self.conns.get_slot(slot) else {
                return Flow::Stop;
            };
            let aliases = conn.aliases.get_or_insert_with(Default::default);
            if p.topic.is_empty() {
                match aliases.inbound.get(alias) {
                    Some(t) => p.topic = t.to_string(),
                    None => {
                        // MQTT-3.3.4: an alias must be defined before it is used alone.
                        self.protocol_error(slot, ReasonCode::ProtocolError);
                        return Flow::Stop;
                    }
                }
            } else if aliases
                .inbound
                .define(alias, &p.topic, self.shared.cfg.max_topic_alias_bytes)
                .is_err()
            {
                // Aliases in range but too many topic bytes pinned: our limit, not a
                // protocol error, hence Quota exceeded rather than Topic Alias invalid.
                log::info!("shard {}: topic aliases over their byte budget", self.id);
                self.protocol_error(slot, ReasonCode::QuotaExceeded);
                return Flow::Stop;
            }
        }
        if let Err(e) = topic::validate_name(&p.topic, self.cfg().max_topic_levels) {
            // MQTT-3.3.2-2: wildcards are not allowed in a topic name.
            log::info!(
                "shard {}: invalid PUBLISH topic {:?}: {e:?}",
                self.id,
                p.topic
            );
            self.protocol_error(slot, ReasonCode::TopicNameInvalid);
            return Flow::Stop;
        }
        let (qos, packet_id) = (p.qos, p.packet_id);
        if qos == QoS::ExactlyOnce && !self.session(sidx).session.awaits_pubrel(packet_id) {
            let awaiting = self.session(sidx).session.incoming_qos2_len();
            if protocol == Protocol::V5 && awaiting >= self.cfg().max_inflight as usize {
                // MQTT-3.3.4-9: more unacknowledged QoS 2 than our Receive Maximum.
                self.protocol_error(slot, ReasonCode::ReceiveMaximumExceeded);
                return Flow::Stop;
            }
            let max_rel = self.cfg().max_awaiting_rel;
            if protocol != Protocol::V5 && max_rel > 0 && awaiting >= max_rel {
                // 3.x has no Receive Maximum: past mqtt.max_awaiting_rel ids awaiting
                // PUBREL the connection is closed (EMQX max_awaiting_rel).
                log::info!(
                    "shard {}: {awaiting} QoS 2 messages await PUBREL; closing",
                    self.id
                );
                self.protocol_error(slot, ReasonCode::QuotaExceeded);
                return Flow::Stop;
            }
        }
        let route = match qos {
            QoS::AtMostOnce | QoS::AtLeastOnce => true,
            QoS::ExactlyOnce => self.session_mut(sidx).session.incoming_qos2(packet_id),
        };
        let mut matched = true;
        // Clients may not publish into $SYS (EMQX ignores such messages too).
        if route && !p.topic.starts_with("$SYS") {
            let publisher = self.session(sidx).session.client_id.clone();
            let id = self.next_message_id();
            let msg = Arc::new(message_from(p, publisher, id, self.now_ms));
            if msg.retain && self.cfg().retain_available {
                self.set_retained(&msg);
            }
            matched = self.route(msg);
        }
        let mut ack = PubResp {
            packet_id,
            ..Default::default()
        };
        if !matched {
            self.shared.metrics.dropped(DropReason::NoSubscribers);
        }
        if !matched && protocol == Protocol::V5 {
            // As EMQX: tell v5 publishers nobody was subscribed (0x10 is a success code).
            ack.reason = ReasonCode::NoMatchingSubscribers;
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send_packet(slot, protocol, &Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send_packet(slot, protocol, &Packet::PubRec(ack)),
        }
        Flow::Continue
    }
}
