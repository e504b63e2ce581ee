//! Client input: accepting connections (with the back-off when descriptors run out and the
//! refusal of connections over quota), receiving into the ring's buffers, and decoding bytes
//! into packets, each handed to CONNECT handling or to the packet handlers; a decoding error
//! closes the connection with the reason the spec asks for.

use super::*;

impl Shard {
    pub(super) fn on_accept(&mut self, c: Completion) {
        if c.result < 0 && is_resource_shortage(-c.result) {
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
                    "shard {}: accept failed {} time(s): {}; retrying every {ACCEPT_BACKOFF_MS} ms",
                    self.id,
                    self.accept_failures,
                    std::io::Error::from_raw_os_error(-c.result)
                );
                self.accept_failures = 0;
                self.accept_logged_ms = Some(now);
            }
            if !c.more() {
                self.timers
                    .schedule(now + ACCEPT_BACKOFF_MS, TimerToken::Accept);
            }
            return;
        }
        if !c.more() {
            self.ring.accept_multi(self.listener.as_raw_fd());
        }
        if c.result < 0 {
            if c.result != -libc::ECANCELED {
                log::warn!(
                    "shard {}: accept failed: {}",
                    self.id,
                    std::io::Error::from_raw_os_error(-c.result)
                );
            }
            return;
        }
        // SAFETY: a successful accept returns a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
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
            return;
        }
        Metrics::add(&m.connections_total, 1);
        let deadline = self.now_ms + self.cfg().connect_timeout_ms;
        let mut conn = Conn::new(fd.into(), deadline);
        conn.over_quota = live >= max;
        conn.timer_ms = deadline;
        let (slot, gen) = self.conns.insert(conn);
        let raw = self
            .conns
            .get_mut(slot, gen)
            .map(|c| c.raw_fd())
            .unwrap_or(-1);
        self.ring.recv_once(raw, slot, gen);
        self.timers
            .schedule(deadline, TimerToken::Conn { slot, gen });
    }

    pub(super) fn on_recv(&mut self, slot: u32, gen: u32, mut c: Completion) {
        // Owned here and given back to the pool when dropped, on every path below (a buffer
        // on a completion without data included).
        let buf = c.take_buffer();
        let live = self.conns.get_mut(slot, gen).is_some();
        if !live {
            return;
        }
        if c.result > 0 && self.paused && self.park(slot, gen, c.more()) {
            // Cluster backpressure: keep what already arrived, read no more.
            let len = c.result as usize;
            Metrics::add(&self.shared.metrics.bytes_received, len as u64);
            if let Some(buf) = &buf {
                if let Some(conn) = self.conns.get_mut(slot, gen) {
                    conn.partial.extend_from_slice(buf.bytes());
                    if conn.keepalive_ms > 0 {
                        conn.deadline_ms = self.now_ms + conn.keepalive_ms;
                    }
                }
            }
            return;
        }
        if c.result > 0 {
            let len = c.result as usize;
            Metrics::add(&self.shared.metrics.bytes_received, len as u64);
            if let Some(buf) = &buf {
                // Decoded straight from the pool buffer, which `buf` owns until it is dropped.
                self.on_bytes(slot, gen, buf.bytes());
            }
        } else if c.result == 0 {
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
        } else if c.result != -libc::ENOBUFS && c.result != -libc::ECANCELED {
            log::debug!(
                "shard {}: recv on {slot}: {}",
                self.id,
                std::io::Error::from_raw_os_error(-c.result)
            );
            self.close(slot, Close::Abnormal);
            return;
        }
        // A cancelled receive was cancelled by `park`; `resume` arms a new one.
        if !c.more() && c.result != -libc::ECANCELED {
            if let Some(conn) = self.conns.get_mut(slot, gen).filter(|c| !c.parked) {
                let fd = conn.raw_fd();
                match conn.state {
                    ConnState::Connecting | ConnState::Resuming => {
                        self.ring.recv_once(fd, slot, gen)
                    }
                    ConnState::Active => self.ring.recv_multi(fd, slot, gen),
                }
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
