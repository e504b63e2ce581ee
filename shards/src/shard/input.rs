//! Client input: accepting connections (with the back-off when descriptors run out and the
//! refusal of connections over quota), receiving into the ring's buffers, and decoding bytes
//! into packets, each handed to CONNECT handling or to the packet handlers; a decoding error
//! closes the connection with the reason the spec asks for.

use super::*;

impl Shard {
    pub(super) fn on_accept(&mut self, result: Result<Done<'_>, IoError>, more: bool) {
        if result.as_ref().is_err_and(|e| *e == IoError::NoDescriptors) {
            // Out of descriptors (or memory): the connection stays in the backlog. Accepting
            // again at once fails again at once, so wait, count, and log once per interval.
            Metrics::add(&self.shared.metrics.accept_errors_no_fd, 1);
            self.accept_failures += 1;
            let now = self.now_ms;
            if self
                .accept_logged_ms
                .is_none_or(|t| now >= t + ACCEPT_LOG_INTERVAL_MS)
            {
                log::warn!(
                    "shard {}: accept failed {} time(s): out of descriptors or memory; \
                     retrying every {ACCEPT_BACKOFF_MS} ms",
                    self.id,
                    self.accept_failures,
                );
                self.accept_failures = 0;
                self.accept_logged_ms = Some(now);
            }
            if !more {
                self.timers
                    .schedule(now + ACCEPT_BACKOFF_MS, TimerToken::Accept);
            }
            return;
        }
        if !more {
            self.io.accept();
        }
        let sock = match result {
            Ok(Done::Accepted(sock)) => sock,
            Ok(_) => return,
            Err(IoError::Cancelled) => return,
            Err(e) => {
                log::warn!("shard {}: accept failed: {e}", self.id);
                return;
            }
        };
        let m = &self.shared.metrics;
        let max = self.cfg().max_connections;
        let live = m.connections.fetch_add(1, Ordering::Relaxed);
        // Up to OVER_QUOTA_SLACK connections past the limit are kept long enough to be told
        // why (CONNACK 0x97 / 0x03); beyond that they are closed at once.
        if live >= max.saturating_add(OVER_QUOTA_SLACK) {
            m.connections.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&m.refused, 1);
            log::warn!(
                "shard {}: closing new connection: max_connections reached",
                self.id
            );
            self.io.close(sock);
            return;
        }
        Metrics::add(&m.connections_total, 1);
        let deadline = self.now_ms + self.cfg().connect_timeout_ms;
        let mut conn = Conn::new(sock, deadline);
        conn.over_quota = live >= max;
        conn.timer_ms = deadline;
        let (slot, gen) = self.conns.insert(conn);
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            self.io.recv(&conn.sock, Token::Recv { slot, gen }, false);
        }
        self.timers
            .schedule(deadline, TimerToken::Conn { slot, gen });
    }

    pub(super) fn on_recv(
        &mut self,
        slot: u32,
        gen: u32,
        result: Result<Done<'_>, IoError>,
        more: bool,
    ) {
        // The bytes live in the driver's buffer (the ring's pool) until this returns.
        let live = self.conns.get_mut(slot, gen).is_some();
        if !live {
            return;
        }
        let data = match result {
            Ok(Done::Data(data)) => Some(data),
            // Not a receive's result; nothing to do.
            Ok(_) => return,
            Err(IoError::NoBuffers | IoError::Cancelled) => None,
            Err(e) => {
                log::debug!("shard {}: recv on {slot}: {e}", self.id);
                self.close(slot, Close::Abnormal);
                return;
            }
        };
        match data {
            Some(data) if !data.is_empty() => {
                Metrics::add(&self.shared.metrics.bytes_received, data.len() as u64);
                if self.paused && self.park(slot, gen, more) {
                    // Cluster backpressure: keep what already arrived, read no more.
                    if let Some(conn) = self.conns.get_mut(slot, gen) {
                        conn.partial.extend_from_slice(data);
                        if conn.keepalive_ms > 0 {
                            conn.deadline_ms = self.now_ms + conn.keepalive_ms;
                        }
                    }
                    return;
                }
                // Decoded straight from the driver's buffer.
                self.on_bytes(slot, gen, data);
            }
            Some(_) => {
                // End of stream: the client closed.
                if self.sub_jobs.holds(slot, gen) {
                    self.sub_jobs.eof_while_held(slot, gen);
                    return;
                }
                if self.conns.get_mut(slot, gen).is_some_and(|c| c.parked) {
                    // What a paused client sent before it closed still counts (a DISCONNECT
                    // among it keeps its will from being published).
                    self.on_bytes(slot, gen, &[]);
                }
                self.close(slot, Close::Abnormal);
                return;
            }
            None => {}
        }
        // A cancelled receive was cancelled by `park`; `resume` arms a new one.
        if !more && !matches!(result, Err(IoError::Cancelled)) {
            if let Some(conn) = self.conns.get_mut(slot, gen).filter(|c| !c.parked) {
                let multishot = match conn.state {
                    ConnState::Connecting | ConnState::Resuming => false,
                    ConnState::Active => true,
                };
                self.io
                    .recv(&conn.sock, Token::Recv { slot, gen }, multishot);
            }
        }
    }

    /// Decodes and handles every complete packet in `data` (after any partial packet kept).
    pub(super) fn on_bytes(&mut self, slot: u32, gen: u32, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(slot, gen) else {
            return;
        };
        if conn.state == ConnState::Active && conn.keepalive_ms > 0 {
            conn.deadline_ms = self.now_ms + conn.keepalive_ms;
        }
        if conn.state == ConnState::Resuming {
            // Kept until the session arrives; bounded like any partial packet by the
            // connect timeout and the maximum packet size of what follows.
            if conn.partial.len() + data.len() > self.shared.cfg.max_packet_size as usize * 2 {
                self.protocol_error(slot, ReasonCode::PacketTooLarge);
                return;
            }
            conn.partial.extend_from_slice(data);
            return;
        }
        if self.sub_jobs.holds(slot, gen) {
            // A SUBSCRIBE of this client is still being worked through: what follows it
            // waits (its receive is cancelled, so only what was in flight arrives here).
            conn.partial.extend_from_slice(data);
            self.stop_reading(slot, gen);
            return;
        }
        let mut partial = std::mem::take(&mut conn.partial);
        let buf: &[u8] = if partial.is_empty() {
            data
        } else {
            partial.extend_from_slice(data);
            &partial
        };
        let mut off = 0;
        let max = self.cfg().max_packet_size;
        // Before CONNECT completes only a CONNECT may come, which needs a few KiB unless it
        // carries a large will: a smaller limit keeps unauthenticated partial packets small.
        let max_connecting = max.min(self.cfg().max_connect_packet_size);
        loop {
            let Some(conn) = self.conns.get_mut(slot, gen) else {
                return;
            };
            let protocol = conn.protocol;
            let connecting = conn.state == ConnState::Connecting;
            let limit = if connecting { max_connecting } else { max };
            match decode(&buf[off..], protocol, limit) {
                Ok(Some((packet, used))) => {
                    off += used;
                    let flow = if connecting {
                        match packet {
                            Packet::Connect(connect) => {
                                self.on_connect(slot, gen, connect, &buf[off..])
                            }
                            _ => {
                                // MQTT-3.1.0-1: the first packet must be CONNECT.
                                log::info!(
                                    "shard {}: first packet is not CONNECT; closing",
                                    self.id
                                );
                                self.protocol_error(slot, ReasonCode::ProtocolError);
                                Flow::Stop
                            }
                        }
                    } else {
                        self.on_packet(slot, gen, packet)
                    };
                    if let Flow::Stop = flow {
                        return;
                    }
                    let held = self.sub_jobs.holds(slot, gen);
                    if let Some(c) = self.conns.get_mut(slot, gen) {
                        if c.state == ConnState::Resuming || held {
                            c.partial = buf[off..].to_vec();
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.on_decode_error(slot, connecting, protocol, e);
                    return;
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(slot, gen) {
            if off < buf.len() {
                if partial.is_empty() {
                    conn.partial = buf[off..].to_vec();
                } else {
                    partial.drain(..off);
                    conn.partial = partial;
                }
            }
        }
    }

    fn on_decode_error(&mut self, slot: u32, connecting: bool, protocol: Protocol, e: DecodeError) {
        log::info!("shard {}: closing connection: {e}", self.id);
        if connecting {
            if let DecodeError::UnsupportedProtocol { level, .. } = e {
                // MQTT-3.1.2-2: answer in the form the client can read, then close.
                let (proto, reason) = if level >= 5 {
                    (Protocol::V5, ReasonCode::UnsupportedProtocolVersion)
                } else {
                    (Protocol::V311, ReasonCode::UnsupportedProtocolVersion)
                };
                self.send_packet(
                    slot,
                    proto,
                    &Packet::ConnAck(ConnAck {
                        reason,
                        ..Default::default()
                    }),
                );
            }
            Metrics::add(&self.shared.metrics.protocol_errors, 1);
            self.close(slot, Close::Error(e.reason_code()));
            return;
        }
        let _ = protocol;
        self.protocol_error(slot, e.reason_code());
    }

    /// Closes a connection for a protocol violation, telling a v5 client why (MQTT-4.13.1).
    pub(super) fn protocol_error(&mut self, slot: u32, reason: ReasonCode) {
        Metrics::add(&self.shared.metrics.protocol_errors, 1);
        self.close(slot, Close::Error(reason));
    }
}
