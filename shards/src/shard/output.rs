//! Output and closing: packets are encoded into a connection's output queue and written once
//! per turn (`flush_conns`, one `writev` each); closing a connection sends what its reason
//! calls for, publishes the will if due, detaches or ends its session, and lingers the
//! socket so the client reads the reason.

use super::*;

impl Shard {
    pub(super) fn conn_protocol(&mut self, slot: u32) -> Protocol {
        self.conns
            .get_slot(slot)
            .map(|c| c.protocol)
            .unwrap_or(Protocol::V311)
    }

    pub(super) fn send_packet(&mut self, slot: u32, protocol: Protocol, packet: &Packet) {
        encode(packet, protocol, &mut self.scratch);
        let bytes: Bytes = self.scratch.split().freeze();
        if let Some(conn) = self.conns.get_slot(slot) {
            conn.push_ctrl(bytes);
            self.mark_dirty(slot);
        }
    }

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        if let Some(conn) = self.conns.get_slot(slot) {
            if !conn.dirty {
                conn.dirty = true;
                self.flush_list.push(slot);
            }
        }
    }

    pub(super) fn flush_conns(&mut self) {
        let list = std::mem::take(&mut self.flush_list);
        for &slot in &list {
            let gen = self.conns.gen(slot);
            let Some(conn) = self.conns.get_mut(slot, gen) else {
                continue;
            };
            conn.dirty = false;
            if conn.ctrl_bytes > self.shared.cfg.max_conn_output_bytes {
                // A client that keeps provoking responses and never reads them (EMQX's
                // force_shutdown): cut it rather than hold its output without bound.
                log::info!(
                    "shard {}: closing a client that does not read: {} B of responses queued",
                    self.id,
                    conn.ctrl_bytes
                );
                Metrics::add(&self.shared.metrics.disconnects_output_overflow, 1);
                self.close(slot, Close::OutputOverflow);
                continue;
            }
            if conn.write_blocked {
                continue;
            }
            let before = conn.out_bytes;
            match conn.flush(&mut *self.io) {
                Ok(done) => {
                    let written = before - conn.out_bytes;
                    Metrics::add(&self.shared.metrics.bytes_sent, written as u64);
                    if !done {
                        conn.write_blocked = true;
                        self.io
                            .poll_writable(&conn.sock, Token::Writable { slot, gen });
                    } else if conn.state == ConnState::Active {
                        // The socket drained: let queued messages follow.
                        let sidx = conn.session;
                        if self.session(sidx).session.queue_len() > 0 {
                            self.pump(sidx);
                        }
                    }
                }
                Err(e) => {
                    log::debug!("shard {}: write failed: {e}", self.id);
                    self.close(slot, Close::Abnormal);
                }
            }
        }
        let mut list = list;
        list.clear();
        if self.flush_list.is_empty() {
            self.flush_list = list;
        }
    }

    /// Closes a connection: sends what the reason calls for, publishes the will if due, and
    /// detaches (or ends) its session.
    pub(super) fn close(&mut self, slot: u32, why: Close) {
        let Some(conn) = self.conns.get_slot(slot) else {
            return;
        };
        let protocol = conn.protocol;
        let active = conn.state == ConnState::Active;
        let problem_info = conn.problem_info;
        if active && protocol == Protocol::V5 {
            let reason = match why {
                Close::Error(r) => Some(r),
                Close::TakenOver => Some(ReasonCode::SessionTakenOver),
                Close::Shutdown => Some(ReasonCode::ServerShuttingDown),
                Close::Graceful | Close::Abnormal | Close::OutputOverflow => None,
            };
            if let Some(reason) = reason {
                // MQTT-3.14.2.2.3: a reason string only when the client did not opt out.
                let properties = Properties {
                    reason_string: problem_info.then(|| reason_text(reason).to_string()),
                    ..Default::default()
                };
                self.send_packet(
                    slot,
                    protocol,
                    &Packet::Disconnect(Disconnect { reason, properties }),
                );
            }
        }
        let Some(mut conn) = self.conns.remove(slot) else {
            return;
        };
        // Best effort: the last packets (CONNACK refusal, DISCONNECT) before the FIN.
        let _ = conn.flush(&mut *self.io);
        let will = match why {
            Close::Abnormal | Close::Error(_) | Close::OutputOverflow => conn.will.take(),
            Close::Graceful => conn.will.take(), // only kept for v5 reason 0x04
            Close::TakenOver | Close::Shutdown => None,
        };
        let sidx = conn.session;
        let Conn { sock, .. } = conn;
        if matches!(why, Close::Error(_)) {
            // A reason was sent: let the client read it (see LINGER_MS).
            self.linger(sock);
        } else {
            // The shutdown ends any pending receive on the ring, whose completion is then
            // ignored by generation.
            close_now(&mut *self.io, sock);
        }
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        Metrics::add(&self.shared.metrics.disconnects_total, 1);
        if !active {
            return;
        }
        let now = self.now_ms;
        let entry = self.session_mut(sidx);
        let SessionPhase::Online {
            conn: bound,
            expiry_ms,
        } = entry.phase
        else {
            return;
        };
        if bound != slot {
            return;
        }
        // Offline from now: it ends `expiry_ms` from now (at once if ephemeral).
        let expires_at_ms = now + expiry_ms;
        entry.phase = SessionPhase::Offline { expires_at_ms };
        let ephemeral = entry.session.ephemeral;
        if let Some(will) = will {
            let delay_s = will.properties.will_delay_interval.unwrap_or(0) as u64;
            if protocol == Protocol::V5 && delay_s > 0 && !ephemeral {
                // MQTT-3.1.3-9: the will waits for its delay or the session's end, whichever
                // comes first, and is dropped if the session resumes before.
                let at = now + (delay_s * 1000).min(expiry_ms);
                entry.pending_will = Some(Box::new(PendingWill {
                    will: *will,
                    protocol,
                    due_ms: at,
                }));
                self.timers.schedule(at, TimerToken::Will(sidx));
            } else {
                self.publish_will(sidx, *will, protocol);
            }
        }
        self.redispatch_shared(sidx);
        if ephemeral {
            self.destroy_session(sidx);
        } else {
            self.timers
                .schedule(expires_at_ms, TimerToken::Session(sidx));
        }
    }

    /// Half-closes a socket that was just told why it is closed and keeps it, drained, until
    /// the client closes too or `LINGER_MS` pass: closing with its input unread would make
    /// the kernel reset the connection, and the client would never read the reason.
    fn linger(&mut self, sock: Sock) {
        // Sends FIN after the queued reason.
        self.io.shutdown(&sock, std::net::Shutdown::Write);
        if self.lingering.len() >= LINGER_SOCKETS_MAX {
            if let Some(old) = self.lingering.pop_front() {
                close_now(&mut *self.io, old.sock);
            }
        }
        if self.lingering.is_empty() {
            self.timers
                .schedule(self.now_ms + TICK_MS, TimerToken::Linger);
        }
        self.lingering.push_back(Lingering {
            sock,
            until_ms: self.now_ms + LINGER_MS,
            drained: 0,
        });
    }

    /// Reads and discards what lingering sockets received; closes those at EOF, in error,
    /// past their deadline or past `LINGER_DRAIN_BYTES_MAX`.
    pub(super) fn drain_lingering(&mut self) {
        let now = self.now_ms;
        let mut buf = [0u8; 4096];
        let mut kept = std::collections::VecDeque::with_capacity(self.lingering.len());
        for mut l in self.lingering.drain(..) {
            let open = loop {
                match self.io.read_now(&l.sock, &mut buf) {
                    Ok(0) => break false, // EOF: the client read the reason and closed.
                    Ok(n) => {
                        l.drained += n;
                        if l.drained > LINGER_DRAIN_BYTES_MAX {
                            break false;
                        }
                    }
                    Err(e) => match e.kind() {
                        std::io::ErrorKind::Interrupted => continue,
                        std::io::ErrorKind::WouldBlock => break now < l.until_ms,
                        _ => break false,
                    },
                }
            };
            if open {
                kept.push_back(l);
            } else {
                close_now(&mut *self.io, l.sock);
            }
        }
        self.lingering = kept;
        if !self.lingering.is_empty() {
            self.timers.schedule(now + TICK_MS, TimerToken::Linger);
        }
    }

    pub(super) fn publish_will(&mut self, sidx: u32, will: Will, protocol: Protocol) {
        let publisher = self.session(sidx).session.client_id.clone();
        let properties = (protocol == Protocol::V5 && !will.properties.is_empty()).then(|| {
            let mut p = will.properties;
            p.will_delay_interval = None;
            Box::new(p)
        });
        let expires_at = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| self.now_ms + s as u64 * 1000);
        let msg = Arc::new(Message {
            topic: will.topic.as_str().into(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            publisher,
            expires_at,
            id: self.next_message_id(),
        });
        if msg.retain && self.cfg().retain_available {
            self.set_retained(&msg);
        }
        self.route(msg);
    }
}
