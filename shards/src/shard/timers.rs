//! Timer expiries (accept back-off, lingering sockets, delayed wills, `$SYS`, session expiry
//! and the end of a session move, keep-alive and CONNECT deadlines), the rows this shard
//! gives the management API, and the `$SYS` publication.

use super::*;

impl Shard {
    pub(super) fn on_timer(&mut self, token: TimerToken) {
        match token {
            TimerToken::Accept => self.io.accept(),
            TimerToken::Linger => self.drain_lingering(),
            TimerToken::Will(sidx) => self.on_will_timer(sidx, token),
            TimerToken::Sys => {
                self.publish_sys();
                let at = self.now_ms + self.cfg().sys_interval_s * 1000;
                self.timers.schedule(at, TimerToken::Sys);
            }
            TimerToken::Session(sidx) => self.on_session_timer(sidx, token),
            TimerToken::Conn { slot, gen } => self.on_conn_timer(slot, gen, token),
        }
    }

    /// A delayed will is due, unless its client came back.
    fn on_will_timer(&mut self, sidx: u32, token: TimerToken) {
        let now = self.now_ms;
        let Some(Some(entry)) = self.sessions.get_mut(sidx as usize) else {
            return;
        };
        if entry.conn().is_some() {
            return;
        }
        let due = entry.pending_will.as_ref().map(|p| p.due_ms);
        match due {
            Some(at) if at <= now => {
                let pending = entry.pending_will.take().expect("checked above");
                let PendingWill { will, protocol, .. } = *pending;
                self.publish_will(sidx, will, protocol);
            }
            Some(at) => self.timers.schedule(at, token),
            None => {}
        }
    }

    /// An offline session expired, or its move to another node ended.
    fn on_session_timer(&mut self, sidx: u32, token: TimerToken) {
        let Some(Some(entry)) = self.sessions.get(sidx as usize) else {
            return;
        };
        let (at, moving) = match entry.phase {
            SessionPhase::Online { .. } => return,
            SessionPhase::Offline { expires_at_ms } => (expires_at_ms, None),
            SessionPhase::MovingAway {
                to,
                ended,
                until_ms,
            } => (until_ms, Some((to, ended))),
        };
        if at <= self.now_ms {
            if let Some((node, true)) = moving {
                let client_id = entry.session.client_id.clone();
                self.send_tail(sidx, client_id, node);
            } else if moving.is_some() {
                log::info!(
                    "shard {}: session {:?} moved away, but its new node never said it \
                     routes it; dropping what was queued since",
                    self.id,
                    entry.session.client_id
                );
            } else {
                log::debug!(
                    "shard {}: session {:?} expired",
                    self.id,
                    entry.session.client_id
                );
            }
            self.destroy_session(sidx);
        } else {
            self.timers.schedule(at, token);
        }
    }

    /// A connection's CONNECT or keep-alive deadline may have passed.
    fn on_conn_timer(&mut self, slot: u32, gen: u32, token: TimerToken) {
        let now = self.now_ms;
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        // The wheel fires a token anywhere within its tick, possibly a little before the time
        // it was scheduled for: a token of this tick is the one `timer_ms` stands for.
        if conn.timer_ms / TICK_MS <= now / TICK_MS {
            conn.timer_ms = u64::MAX;
        }
        if conn.deadline_ms == u64::MAX {
            return;
        }
        if conn.parked {
            // Not read while paused: its keep-alive counts from when reading resumes.
            conn.deadline_ms = now + conn.keepalive_ms.max(TICK_MS);
        }
        if conn.deadline_ms > now {
            let at = conn.deadline_ms;
            if at < conn.timer_ms {
                conn.timer_ms = at;
                self.timers.schedule(at, token);
            }
            return;
        }
        let reason = match conn.state {
            ConnState::Connecting | ConnState::Resuming => {
                log::info!("shard {}: CONNECT not completed in time; closing", self.id);
                ReasonCode::MaximumConnectTime
            }
            ConnState::Active => {
                log::info!("shard {}: keep-alive expired; closing", self.id);
                ReasonCode::KeepAliveTimeout
            }
        };
        self.close(slot, Close::Error(reason));
    }

    /// Rows for the management API: this shard's clients or subscriptions, each a JSON object
    /// naming the node (routes and figures are the cluster thread's; a shard has none).
    pub(super) fn query_rows(&mut self, kind: QueryKind) -> Vec<String> {
        use crate::json::json_str;
        let node = json_str(&self.shared.cfg.node_name);
        let mut rows = Vec::new();
        for entry in self.sessions.iter().flatten() {
            let s = &entry.session;
            let id = json_str(&s.client_id);
            match kind {
                QueryKind::Clients => rows.push(format!(
                    "{{\"clientid\":{id},\"node\":{node},\"connected\":{},\"subscriptions\":{},\"inflight\":{},\"queued\":{},\"dropped\":{}}}",
                    entry.conn().is_some(),
                    s.subscriptions.len(),
                    s.inflight_len(),
                    s.queue_len(),
                    s.dropped
                )),
                QueryKind::Subscriptions => {
                    for sub in &s.subscriptions {
                        rows.push(format!(
                            "{{\"clientid\":{id},\"topic\":{},\"qos\":{},\"node\":{node}}}",
                            json_str(&sub.filter),
                            sub.options.qos as u8
                        ));
                    }
                }
                QueryKind::Routes | QueryKind::Metrics => break,
            }
        }
        rows
    }

    /// Publishes the node's counters under `$SYS/brokers/<node>/` (as EMQX does, not retained).
    fn publish_sys(&mut self) {
        let m = &self.shared.metrics;
        let r = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed).to_string();
        let items: [(&str, String); 12] = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("uptime", (self.now_ms / 1000).to_string()),
            (
                "clients/connected",
                m.connections.load(Ordering::Relaxed).to_string(),
            ),
            ("clients/disconnected", r(&m.disconnects_total)),
            ("clients/total", r(&m.connections_total)),
            ("messages/received", r(&m.messages_received)),
            ("messages/sent", r(&m.messages_sent)),
            ("messages/dropped", r(&m.messages_dropped)),
            ("bytes/received", r(&m.bytes_received)),
            ("bytes/sent", r(&m.bytes_sent)),
            (
                "subscriptions/count",
                m.subscriptions.load(Ordering::Relaxed).max(0).to_string(),
            ),
            ("retained/count", self.retained.len().to_string()),
        ];
        // Drops per reason: messages/dropped/queue_full, ... (the figure names, shortened).
        let reasons: Vec<(String, String)> = m
            .figures()
            .into_iter()
            .filter_map(|(name, _, value, _)| {
                let reason = name
                    .strip_prefix("messages_dropped_")?
                    .strip_suffix("_total")?;
                Some((format!("messages/dropped/{reason}"), value.to_string()))
            })
            .collect();
        let prefix = format!("$SYS/brokers/{}/", self.cfg().node_name);
        let publisher: Arc<str> = "$SYS".into();
        let items = items
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .chain(reasons);
        for (name, value) in items {
            let msg = Message {
                topic: format!("{prefix}{name}").into(),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: None,
                publisher: publisher.clone(),
                expires_at: None,
                id: 0,
            };
            self.route(Arc::new(msg));
        }
    }
}
