//! CONNECT and the life of sessions: a valid CONNECT is handed to the client id's home shard,
//! bound to its session there (new, resumed or taken over), and in a cluster the session is
//! first taken from the other nodes (import, remote takeover, the tail sent after
//! `TakeoverEnd`, duplicates filtered by message id). Also creating, finding and ending
//! sessions, and resending a resumed session's in-flight messages.

use super::*;

impl Shard {
    pub(super) fn on_connect(
        &mut self,
        slot: u32,
        gen: u32,
        mut connect: Box<Connect>,
        leftover: &[u8],
    ) -> Flow {
        let protocol = connect.protocol;
        let reject = |this: &mut Shard, reason: ReasonCode| {
            this.send_packet(
                slot,
                protocol,
                &Packet::ConnAck(ConnAck {
                    reason,
                    ..Default::default()
                }),
            );
            Metrics::add(&this.shared.metrics.protocol_errors, 1);
            this.close(slot, Close::Error(reason));
            Flow::Stop
        };
        if self.conns.get_mut(slot, gen).is_none_or(|c| c.over_quota) {
            // Over listeners.tcp.default.max_connections: refused with the spec's code.
            Metrics::add(&self.shared.metrics.refused, 1);
            let reason = if protocol == Protocol::V5 {
                ReasonCode::QuotaExceeded
            } else {
                ReasonCode::ServerUnavailable
            };
            return reject(self, reason);
        }
        if connect.properties.authentication_method.is_some() {
            // MQTT-3.1.2 (4.12): no enhanced authentication method is supported; EMQX answers
            // the same way rather than ignoring the method.
            return reject(self, ReasonCode::BadAuthenticationMethod);
        }
        let mut assigned = false;
        if connect.client_id.is_empty() {
            // MQTT-3.1.3-7/8: an empty id needs clean session in 3.1.1; 3.1 requires an id.
            if protocol == Protocol::V31 || (protocol == Protocol::V311 && !connect.clean_start) {
                return reject(self, ReasonCode::ClientIdentifierNotValid);
            }
            self.next_client_seq += 1;
            // The upper half of the message ids is random per shard and process, so
            // assigned ids do not repeat across shards, restarts or nodes.
            connect.client_id = format!(
                "shardmq-{}-{:x}-{}",
                self.id,
                self.next_message_id >> 32,
                self.next_client_seq
            );
            assigned = true;
        }
        if connect.client_id.len() > self.cfg().max_clientid_len {
            return reject(self, ReasonCode::ClientIdentifierNotValid);
        }
        if let Some(will) = &connect.will {
            if topic::validate_name(&will.topic, self.cfg().max_topic_levels).is_err()
                || will.topic.starts_with('$')
            {
                return reject(self, ReasonCode::TopicNameInvalid);
            }
        }
        let home = home_shard(&connect.client_id, self.mesh.shards());
        if home != self.id {
            let Some(conn) = self.conns.remove(slot) else {
                return Flow::Stop;
            };
            let handoff = Handoff {
                sock: conn.sock,
                connect,
                leftover: leftover.to_vec(),
                assigned,
            };
            self.mesh.send(home, MeshMsg::Handoff(Box::new(handoff)));
            return Flow::Stop;
        }
        self.attach(slot, gen, connect, assigned);
        Flow::Continue
    }

    pub(super) fn on_handoff(&mut self, h: Handoff) {
        let Handoff {
            sock,
            connect,
            leftover,
            assigned,
        } = h;
        let deadline = self.now_ms + self.cfg().connect_timeout_ms;
        let mut conn = Conn::new(sock, deadline);
        conn.timer_ms = deadline;
        let (slot, gen) = self.conns.insert(conn);
        self.timers
            .schedule(deadline, TimerToken::Conn { slot, gen });
        self.attach(slot, gen, connect, assigned);
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            self.io.recv(&conn.sock, Token::Recv { slot, gen }, true);
            if !leftover.is_empty() {
                self.on_bytes(slot, gen, &leftover);
            }
        }
    }

    /// Binds a connection whose CONNECT is valid to its session on this (home) shard.
    /// Binds a connection whose CONNECT is valid to its session. In a cluster, the client id
    /// is first taken from every other node; a CONNECT that wants to resume a session this
    /// node does not have waits (state `Resuming`) for the other nodes to send theirs.
    fn attach(&mut self, slot: u32, gen: u32, connect: Box<Connect>, assigned: bool) {
        if self.shared.cluster.peers_up.load(Ordering::Relaxed) > 0 {
            let token = self.next_token;
            self.next_token += 1;
            let stub = self.by_client.get(connect.client_id.as_str()).copied();
            if let Some(sidx) = stub.filter(|&s| self.session(s).is_moving_away()) {
                // Back here while moving away: the node it moved to has the session now.
                self.destroy_session(sidx);
            }
            let local = self.by_client.contains_key(connect.client_id.as_str());
            let want_session = !connect.clean_start && !local;
            let cluster = self.mesh.cluster();
            let msg = MeshMsg::ClusterTakeover {
                client_id: connect.client_id.as_str().into(),
                want_session,
                token,
                shard: self.id as u16,
                at_ms: self.io.unix_ms(),
            };
            self.mesh.send(cluster, msg);
            if want_session {
                if let Some(conn) = self.conns.get_mut(slot, gen) {
                    conn.state = ConnState::Resuming;
                    let conn = ConnRef { slot, gen };
                    let resuming = Resuming {
                        conn,
                        connect,
                        assigned,
                    };
                    self.resuming.insert(token, resuming);
                }
                return;
            }
        }
        self.attach_local(slot, gen, connect, assigned);
    }

    /// Another node's answer for a CONNECT in `Resuming`: import its session, then attach.
    pub(super) fn on_session_import(&mut self, e: SessionExport) {
        let Some(Resuming {
            conn: ConnRef { slot, gen },
            connect,
            assigned,
        }) = self.resuming.remove(&e.token)
        else {
            return;
        };
        // A client gone while its session was on the way still has that session (offline)
        // for as long as its CONNECT asked, as if it had connected and dropped.
        let gone = self.conns.get_mut(slot, gen).is_none();
        let keep_ms =
            session_expiry_s(&connect, self.cfg().session_expiry_interval_s) as u64 * 1000;
        if gone && (!e.found || keep_ms == 0) {
            return;
        }
        let mut imported = None;
        if e.found && !self.by_client.contains_key(&*e.client_id) {
            log::info!(
                "shard {}: session {:?} moved here from another node",
                self.id,
                e.client_id
            );
            let sidx = self.new_session(e.client_id.clone(), false);
            imported = Some(sidx);
            let until_ms = self.now_ms + MOVE_GRACE_MS + TAIL_OVERLAP_MS;
            self.session_mut(sidx).seen = Some(Box::new(SeenIds {
                ids: Default::default(),
                until_ms,
            }));
            let token = self.next_token;
            self.next_token += 1;
            let mut new_routes = 0;
            for (filter, options, id) in e.subscriptions {
                // From a peer: a byte our encoder never writes falls back to the defaults.
                let options = SubscriptionOptions::from_byte(options).unwrap_or_default();
                let id = NonZeroU32::new(id);
                if shared::is_shared(&filter) {
                    let sub = Subscription {
                        filter: filter.clone(),
                        options,
                        id,
                    };
                    self.add_subscription(sidx, sub);
                    new_routes += self.share_join(sidx, filter, token) as usize;
                } else {
                    new_routes += self.subscribe_one(sidx, filter, options, id, token) as usize;
                }
            }
            let waiting = new_routes * (self.mesh.shards() - 1);
            if waiting == 0 {
                self.takeover_end(e.client_id.clone(), e.node);
            } else {
                let end = PendingEnd {
                    client_id: e.client_id.clone(),
                    from: e.node,
                    acks_awaited: waiting,
                };
                self.pending_ends.insert(token, end);
            }
            // A peer's ids are checked before they become ours: one id twice (hostile or
            // broken) is kept once (MQTT-2.2.1-3: an id in flight is not reused).
            for pid in e.pubrel {
                let session = &mut self.session_mut(sidx).session;
                if !session.holds_packet_id(pid) {
                    session.restore_released(pid);
                }
            }
            for pid in e.incoming_qos2 {
                self.session_mut(sidx).session.incoming_qos2(pid);
            }
            let (max_queued, policy) =
                (self.cfg().max_queued_messages, self.cfg().queue_drop_policy);
            for (i, msg) in e.messages.into_iter().enumerate() {
                // Remembered like a copy that came straight here or in the tail: this node
                // may route the same message to the session again (another session here
                // already had its filter), and a QoS 2 message must not go out twice.
                if !self.first_copy(sidx, msg.id) {
                    continue;
                }
                let d = moved_delivery(msg);
                let session = &mut self.session_mut(sidx).session;
                match e.sent_ids.get(i) {
                    // In flight there: again, as a DUP under its packet id (MQTT-4.4.0-1).
                    Some(&pid) if d.qos != QoS::AtMostOnce && !session.holds_packet_id(pid) => {
                        session.restore_inflight(pid, d)
                    }
                    _ => {
                        session.enqueue(d, max_queued, policy);
                    }
                }
            }
        } else if e.found {
            // A session of this id appeared here meanwhile; it gets the tail.
            self.takeover_end(e.client_id.clone(), e.node);
        }
        if gone {
            if let Some(sidx) = imported {
                let at = self.now_ms + keep_ms;
                let entry = self.session_mut(sidx);
                debug_assert_eq!(
                    entry.phase,
                    SessionPhase::Offline { expires_at_ms: 0 },
                    "an imported session is new"
                );
                entry.phase = SessionPhase::Offline { expires_at_ms: at };
                self.timers.schedule(at, TimerToken::Session(sidx));
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            conn.state = ConnState::Connecting;
        }
        self.attach_local(slot, gen, connect, assigned);
        if self
            .conns
            .get_mut(slot, gen)
            .is_some_and(|c| !c.partial.is_empty())
        {
            self.on_bytes(slot, gen, &[]);
        }
    }

    /// Another node took `client_id`: close it here and hand over or drop its session.
    pub(super) fn on_remote_takeover(
        &mut self,
        client_id: Arc<str>,
        want_session: bool,
        token: u64,
        node: u8,
        at_ms: u64,
    ) {
        let mut export = SessionExport {
            token,
            node,
            client_id: client_id.clone(),
            found: false,
            subscriptions: Vec::new(),
            messages: Vec::new(),
            pubrel: Vec::new(),
            incoming_qos2: Vec::new(),
            sent_ids: Vec::new(),
        };
        let newer_here = self.by_client.get(&client_id).is_some_and(|&s| {
            self.session(s).conn().is_some() && self.session(s).connected_at_ms > at_ms
        });
        // A session that is moving away is the other node's now: what is left here is its
        // tail on the way there. Answering with it would hand the asker a stale copy first
        // and the real session's export, second, would be dropped with its messages (found
        // by the simulator with clients moving several times a second).
        let moving_away = self
            .by_client
            .get(&client_id)
            .is_some_and(|&s| self.session(s).is_moving_away());
        if moving_away {
            log::debug!(
                "shard {}: {client_id:?} is moving away; the node it moves to answers",
                self.id
            );
        } else if newer_here {
            // Two nodes took the same id at nearly the same time: the newest connection wins.
            log::info!(
                "shard {}: ignoring an older takeover of {client_id:?}",
                self.id
            );
        } else if let Some(sidx) = self.by_client.get(&client_id).copied() {
            log::info!(
                "shard {}: client {client_id:?} taken over by another node",
                self.id
            );
            if let Some(slot) = self.session(sidx).conn() {
                self.close(slot, Close::TakenOver);
            }
            if let Some(sidx) = self.by_client.get(&client_id).copied() {
                let entry = self.session_mut(sidx);
                entry.pending_will = None;
                if want_session && !entry.session.ephemeral {
                    export.found = true;
                    export.subscriptions = entry
                        .session
                        .subscriptions
                        .iter()
                        .map(|s| {
                            (
                                s.filter.clone(),
                                s.options.to_byte(),
                                s.id.map_or(0, NonZeroU32::get),
                            )
                        })
                        .collect();
                    export.pubrel = self.session(sidx).session.released_ids();
                    export.sent_ids = self.session(sidx).session.sent_ids();
                    export.incoming_qos2 = self.session(sidx).session.unreleased_qos2();
                    export.messages = self.take_for_export(sidx);
                }
                if export.found {
                    // First phase of the move: kept, queuing, until `node` routes it.
                    let at = self.now_ms + MOVE_GRACE_MS;
                    let entry = self.session_mut(sidx);
                    debug_assert!(
                        entry.conn().is_none(),
                        "a session moves away once its connection is closed"
                    );
                    // Also when it was moving to another node: a new move starts.
                    entry.phase = SessionPhase::MovingAway {
                        to: node,
                        ended: false,
                        until_ms: at,
                    };
                    self.timers.schedule(at, TimerToken::Session(sidx));
                } else {
                    self.destroy_session(sidx);
                }
            }
        }
        if want_session {
            let cluster = self.mesh.cluster();
            self.mesh
                .send(cluster, MeshMsg::ClusterSessionExport(Box::new(export)));
        }
    }

    pub(super) fn next_message_id(&mut self) -> u64 {
        let id = self.next_message_id;
        // The counter wraps within the lower half; the upper half stays.
        self.next_message_id = (id & !0xFFFF_FFFF) | ((id + 1) & 0xFFFF_FFFF);
        id
    }

    /// Takes a session's unacknowledged and queued messages, each at the QoS it was to be
    /// delivered with, to be sent to the node it moves to.
    fn take_for_export(&mut self, sidx: u32) -> Vec<Arc<Message>> {
        self.session_mut(sidx)
            .session
            .take_messages()
            .into_iter()
            .map(exported)
            .collect()
    }

    /// A session moved here from `node` is routed by every shard here: tell `node`.
    pub(super) fn takeover_end(&mut self, client_id: Arc<str>, node: u8) {
        let cluster = self.mesh.cluster();
        self.mesh
            .send(cluster, MeshMsg::ClusterTakeoverEnd { client_id, node });
    }

    /// Second phase of a move away: `node` routes the session now; send it the tail.
    pub(super) fn on_remote_takeover_end(&mut self, client_id: Arc<str>, node: u8) {
        let Some(sidx) = self.by_client.get(&client_id).copied() else {
            return;
        };
        let moving_to_node = matches!(self.session(sidx).phase,
            SessionPhase::MovingAway { to, ended: false, .. } if to == node);
        if !moving_to_node {
            return;
        }
        self.send_tail(sidx, client_id, node);
        let at = self.now_ms + MOVE_LINGER_MS;
        self.session_mut(sidx).phase = SessionPhase::MovingAway {
            to: node,
            ended: true,
            until_ms: at,
        };
        self.timers.schedule(at, TimerToken::Session(sidx));
    }

    /// Sends what a moving session queued to the node it moved to.
    pub(super) fn send_tail(&mut self, sidx: u32, client_id: Arc<str>, node: u8) {
        let messages = self.take_for_export(sidx);
        if messages.is_empty() {
            return;
        }
        let cluster = self.mesh.cluster();
        self.mesh.send(
            cluster,
            MeshMsg::ClusterSessionTail {
                client_id,
                node,
                messages,
            },
        );
    }

    /// What the exporting node queued for a session that moved here, after the move began.
    pub(super) fn on_session_tail(&mut self, client_id: Arc<str>, messages: Vec<Arc<Message>>) {
        let Some(sidx) = self.by_client.get(&client_id).copied() else {
            log::info!(
                "shard {}: {} late messages for {client_id:?}, which is gone",
                self.id,
                messages.len()
            );
            return;
        };
        let until_ms = self.now_ms + TAIL_OVERLAP_MS;
        if let Some(seen) = self.session_mut(sidx).seen.as_mut() {
            seen.until_ms = until_ms;
        }
        for msg in messages {
            if self.first_copy(sidx, msg.id) {
                self.deliver(sidx, moved_delivery(msg));
            }
        }
    }

    /// False if a session that moved here recently was already given message `id`.
    pub(super) fn first_copy(&mut self, sidx: u32, id: u64) -> bool {
        let now = self.now_ms;
        let entry = self.session_mut(sidx);
        let Some(seen) = entry.seen.as_mut() else {
            return true;
        };
        if now > seen.until_ms || seen.ids.len() >= SEEN_IDS_MAX {
            entry.seen = None;
            return true;
        }
        id == 0 || seen.ids.insert(id)
    }

    fn attach_local(&mut self, slot: u32, gen: u32, connect: Box<Connect>, assigned: bool) {
        let cfg = &self.shared.cfg;
        let (cfg_inflight, cfg_expiry, max_packet) = (
            cfg.max_inflight,
            cfg.session_expiry_interval_s,
            cfg.max_packet_size,
        );
        let (retain_available, shared_available) = (cfg.retain_available, cfg.shared_subscription);
        let (server_keepalive, max_alias) = (cfg.server_keepalive_s, cfg.max_topic_alias);
        let response_information = cfg.response_information.clone();
        let expiry_s = session_expiry_s(&connect, cfg_expiry);
        let Connect {
            protocol,
            clean_start,
            keep_alive,
            client_id,
            will,
            properties,
            ..
        } = *connect;
        let client_id: Arc<str> = client_id.into();
        let v5 = protocol == Protocol::V5;
        let ephemeral = expiry_s == 0;

        // Persistent sessions outlive their connection: bound how many one source address
        // creates (the node has no authentication to tell clients apart otherwise).
        let existing = self.by_client.get(&client_id).copied();
        let mut origin = 0;
        if !ephemeral && self.cfg().max_sessions_per_ip > 0 {
            origin = self
                .conns
                .get_mut(slot, gen)
                .map_or(0, |c| origin_key(self.io.peer_ip(&c.sock)));
            let creates = match existing {
                None => true,
                Some(sidx) => clean_start || self.session(sidx).session.ephemeral,
            };
            let cap = self.cfg().max_sessions_per_ip.div_ceil(self.mesh.shards());
            let held = self.sessions_by_origin.get(&origin).copied().unwrap_or(0);
            if creates && origin != 0 && held as usize >= cap {
                log::info!(
                    "shard {}: refusing session {client_id:?}: {held} persistent sessions from its address",
                    self.id
                );
                let reason = if v5 {
                    ReasonCode::QuotaExceeded
                } else {
                    ReasonCode::ServerUnavailable
                };
                self.send_packet(
                    slot,
                    protocol,
                    &Packet::ConnAck(ConnAck {
                        reason,
                        ..Default::default()
                    }),
                );
                Metrics::add(&self.shared.metrics.refused, 1);
                self.close(slot, Close::Error(reason));
                return;
            }
        }

        // Takeover (MQTT-3.1.4-3): the old connection of this client id is closed.
        if let Some(sidx) = existing {
            if let Some(old_slot) = self.session(sidx).conn() {
                if old_slot != slot {
                    log::info!("shard {}: client {client_id:?} taken over", self.id);
                    self.close(old_slot, Close::TakenOver);
                }
            }
        }
        let mut session_present = false;
        let sidx = match self.by_client.get(&client_id).copied() {
            Some(sidx) if !clean_start => {
                session_present = true;
                sidx
            }
            Some(sidx) => {
                self.destroy_session(sidx);
                self.new_session(client_id.clone(), ephemeral)
            }
            None => self.new_session(client_id.clone(), ephemeral),
        };
        let connected_at_ms = self.io.unix_ms();
        {
            let entry = self.session_mut(sidx);
            debug_assert!(
                entry.conn().is_none(),
                "a session's old connection is closed before a new one binds it"
            );
            // Also ends a move away: resumed here because no peer was up to take it.
            entry.phase = SessionPhase::Online {
                conn: slot,
                expiry_ms: expiry_s as u64 * 1000,
            };
            entry.session.ephemeral = ephemeral;
            // A session resumed before its will delay ran out keeps its will unsent
            // (MQTT-3.1.3-9).
            entry.pending_will = None;
            entry.connected_at_ms = connected_at_ms;
        }
        if !ephemeral && origin != 0 && self.session(sidx).origin == 0 {
            self.session_mut(sidx).origin = origin;
            *self.sessions_by_origin.entry(origin).or_insert(0) += 1;
        }
        let keep_alive = if v5 && server_keepalive > 0 {
            server_keepalive
        } else {
            keep_alive
        };
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        conn.state = ConnState::Active;
        conn.protocol = protocol;
        conn.session = sidx;
        conn.will = will.map(Box::new);
        conn.keepalive_ms = keep_alive as u64 * 1500;
        conn.deadline_ms = if keep_alive > 0 {
            self.now_ms + conn.keepalive_ms
        } else {
            u64::MAX
        };
        // The wheel holds the connect-timeout token; bring it forward to the keep-alive
        // deadline when that is sooner (MQTT-3.1.2-24: 1.5 x keep-alive).
        if conn.deadline_ms < conn.timer_ms {
            conn.timer_ms = conn.deadline_ms;
            self.timers
                .schedule(conn.deadline_ms, TimerToken::Conn { slot, gen });
        }
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        if v5 {
            conn.receive_max = properties.receive_maximum.unwrap_or(u16::MAX).max(1);
            conn.max_packet_out = properties.maximum_packet_size.unwrap_or(u32::MAX);
            conn.client_alias_max = properties.topic_alias_maximum.unwrap_or(0);
            conn.problem_info = properties.request_problem_information != Some(0);
        }
        let mut ack = ConnAck {
            session_present,
            reason: ReasonCode::Success,
            properties: Properties::default(),
        };
        if v5 {
            let p = &mut ack.properties;
            if assigned {
                p.assigned_client_identifier = Some(client_id.to_string());
            }
            p.receive_maximum = Some(cfg_inflight);
            p.maximum_packet_size = Some(max_packet);
            p.retain_available = Some(retain_available as u8);
            p.shared_subscription_available = Some(shared_available as u8);
            p.topic_alias_maximum = Some(max_alias);
            if server_keepalive > 0 {
                p.server_keep_alive = Some(server_keepalive);
            }
            if properties.session_expiry_interval.unwrap_or(0) > expiry_s {
                p.session_expiry_interval = Some(expiry_s);
            }
            if properties.request_response_information == Some(1)
                && !response_information.is_empty()
            {
                p.response_information = Some(response_information);
            }
        }
        self.send_packet(slot, protocol, &Packet::ConnAck(ack));
        if session_present {
            self.resend_inflight(slot, sidx);
        }
        self.pump(sidx);
    }

    fn new_session(&mut self, client_id: Arc<str>, ephemeral: bool) -> u32 {
        let entry = SessionEntry {
            session: Session::new(client_id.clone(), ephemeral),
            // Until it is bound to a connection or given its expiry by its caller.
            phase: SessionPhase::Offline { expires_at_ms: 0 },
            connected_at_ms: 0,
            pending_will: None,
            seen: None,
            origin: 0,
        };
        let idx = match self.free_sessions.pop() {
            Some(i) => {
                self.sessions[i as usize] = Some(entry);
                i
            }
            None => {
                self.sessions.push(Some(entry));
                (self.sessions.len() - 1) as u32
            }
        };
        self.by_client.insert(client_id, idx);
        idx
    }

    pub(super) fn session(&self, idx: u32) -> &SessionEntry {
        self.sessions[idx as usize]
            .as_ref()
            .expect("live session index")
    }

    pub(super) fn session_mut(&mut self, idx: u32) -> &mut SessionEntry {
        self.sessions[idx as usize]
            .as_mut()
            .expect("live session index")
    }

    /// Ends a session: its subscriptions leave the slice (and routes), its messages are lost.
    pub(super) fn destroy_session(&mut self, idx: u32) {
        let Some(mut entry) = self.sessions[idx as usize].take() else {
            return;
        };
        if let Some(pending) = entry.pending_will.take() {
            // The session ends before the will delay: the will goes now (MQTT-3.1.3-9).
            let PendingWill { will, protocol, .. } = *pending;
            self.sessions[idx as usize] = Some(entry);
            self.publish_will(idx, will, protocol);
            entry = self.sessions[idx as usize].take().expect("just put back");
        }
        debug_assert!(
            entry.conn().is_none(),
            "a session is detached before it ends"
        );
        if entry.origin != 0 {
            if let Some(n) = self.sessions_by_origin.get_mut(&entry.origin) {
                *n -= 1;
                if *n == 0 {
                    self.sessions_by_origin.remove(&entry.origin);
                }
            }
        }
        let subs = entry.session.subscriptions.len() as i64;
        self.shared
            .metrics
            .subscriptions
            .fetch_sub(subs, Ordering::Relaxed);
        for sub in &entry.session.subscriptions {
            if shared::is_shared(&sub.filter) {
                self.share_leave(idx, &sub.filter);
            } else {
                self.slice_remove(&sub.filter, idx);
            }
        }
        if self.by_client.get(&entry.session.client_id) == Some(&idx) {
            self.by_client.remove(&entry.session.client_id);
        }
        self.free_sessions.push(idx);
    }

    fn resend_inflight(&mut self, slot: u32, sidx: u32) {
        // MQTT-4.4.0-1: unacknowledged PUBLISH again with DUP, PUBREL again.
        let items: Vec<(u16, InflightState, Delivery)> = self
            .session(sidx)
            .session
            .inflight()
            .map(|i| (i.packet_id, i.state, i.delivery.clone()))
            .collect();
        for (pid, state, d) in items {
            match state {
                InflightState::AwaitPubComp => {
                    let p = self.conn_protocol(slot);
                    self.send_packet(
                        slot,
                        p,
                        &Packet::PubRel(PubResp {
                            packet_id: pid,
                            ..Default::default()
                        }),
                    );
                }
                _ => self.send_publish(slot, pid, &d, true),
            }
        }
    }
}
