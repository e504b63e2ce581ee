//! A simulated MQTT client: a persistent session that connects to one node or another,
//! subscribes, publishes numbered messages on its own topic and acknowledges what it gets,
//! keeping the client side of its session (unacknowledged publishes, QoS 2 ids awaiting
//! PUBREL) across connections as a real client library does. Everything it sees goes into
//! the [`Ledger`].

use super::check::{key_of, payload_of, Ledger};
use super::net::{Host, Net, SockId};
use bytes::{Bytes, BytesMut};
use shardmq_net::{
    decode, encode, Connect, Packet, Properties, Protocol, PubResp, Publish, QoS, ReasonCode,
    Subscribe, SubscriptionOptions,
};
use std::collections::{BTreeMap, BTreeSet};

/// Session expiry a simulated client asks for (s): longer than any run.
const SESSION_EXPIRY_S: u32 = 3_600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Offline,
    Connecting,
    Online,
}

/// Where an unacknowledged publish of this client stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

pub struct Client {
    pub idx: u32,
    pub client_id: String,
    pub host: Host,
    pub protocol: Protocol,
    pub sock: Option<SockId>,
    pub phase: Phase,
    /// Node the current (or last) connection went to.
    pub node: usize,
    input: BytesMut,
    /// Filters to hold, with their QoS; subscribed once per session.
    pub filters: Vec<(String, QoS)>,
    subscribe_sent: bool,
    /// Publishing: own topic, QoS, next sequence, window.
    pub topic: Option<(String, QoS)>,
    pub next_seq: u64,
    pub window: usize,
    outgoing: BTreeMap<u16, (u64, QoS, Stage)>,
    next_pid: u16,
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL.
    awaiting_rel: BTreeSet<u16>,
    /// Has had a session on the broker (a reconnect must find it).
    pub has_session: bool,
}

impl Client {
    pub fn new(idx: u32, host: Host, protocol: Protocol) -> Client {
        Client {
            idx,
            client_id: format!("sim-{idx}"),
            host,
            protocol,
            sock: None,
            phase: Phase::Offline,
            node: 0,
            input: BytesMut::new(),
            filters: Vec::new(),
            subscribe_sent: false,
            topic: None,
            next_seq: 1,
            window: 4,
            outgoing: BTreeMap::new(),
            next_pid: 0,
            awaiting_rel: BTreeSet::new(),
            has_session: false,
        }
    }

    fn send(&mut self, net: &mut Net, p: &Packet, now: u64) {
        let Some(s) = self.sock else { return };
        let mut b = BytesMut::new();
        encode(p, self.protocol, &mut b);
        // Client packets are small and the simulated socket buffer large: a full buffer is
        // treated as a broken connection, as a client library with a send timeout would.
        if net.write(s, &[b.freeze()], now).is_err() {
            self.drop_conn(net);
        }
    }

    fn drop_conn(&mut self, net: &mut Net) {
        if let Some(s) = self.sock.take() {
            net.close(s);
        }
        self.phase = Phase::Offline;
        self.input.clear();
    }

    /// Opens a connection to `addr` (node `node`) and sends CONNECT.
    pub fn connect(&mut self, net: &mut Net, node: usize, addr: &str, now: u64) {
        self.drop_conn(net);
        let Ok(s) = net.connect(self.host, addr) else {
            return;
        };
        self.sock = Some(s);
        self.node = node;
        self.phase = Phase::Connecting;
        let mut properties = Properties::default();
        if self.protocol == Protocol::V5 {
            properties.session_expiry_interval = Some(SESSION_EXPIRY_S);
        }
        let c = Connect {
            protocol: self.protocol,
            clean_start: false,
            keep_alive: 0,
            client_id: self.client_id.clone(),
            will: None,
            username: None,
            password: None,
            properties,
        };
        self.send(net, &Packet::Connect(Box::new(c)), now);
    }

    /// Leaves: with DISCONNECT when `graceful`, else just closes the socket.
    pub fn disconnect(&mut self, net: &mut Net, graceful: bool, now: u64) {
        if graceful && self.phase == Phase::Online {
            self.send(net, &Packet::Disconnect(Default::default()), now);
        }
        self.drop_conn(net);
    }

    fn pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            if !self.outgoing.contains_key(&self.next_pid) {
                return self.next_pid;
            }
        }
    }

    /// Publishes the next numbered message if online and the window has room.
    pub fn publish_next(&mut self, net: &mut Net, ledger: &mut Ledger, now: u64) {
        let Some((topic, qos)) = self.topic.clone() else {
            return;
        };
        if self.phase != Phase::Online || self.outgoing.len() >= self.window {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let key = (self.idx, seq);
        ledger.published(key, &topic, qos as u8, now);
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            let pid = self.pid();
            self.outgoing.insert(pid, (seq, qos, Stage::Sent));
            pid
        };
        let p = Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            packet_id,
            payload: Bytes::from(payload_of(key)),
            properties: Properties::default(),
        };
        self.send(net, &Packet::Publish(p), now);
    }

    fn resend(&mut self, net: &mut Net, now: u64) {
        let Some((topic, _)) = self.topic.clone() else {
            return;
        };
        let pending: Vec<(u16, (u64, QoS, Stage))> =
            self.outgoing.iter().map(|(k, v)| (*k, *v)).collect();
        for (pid, (seq, qos, stage)) in pending {
            let p = match stage {
                Stage::Sent => Packet::Publish(Publish {
                    dup: true,
                    qos,
                    retain: false,
                    topic: topic.clone(),
                    packet_id: pid,
                    payload: Bytes::from(payload_of((self.idx, seq))),
                    properties: Properties::default(),
                }),
                Stage::Released => Packet::PubRel(PubResp::new(pid, ReasonCode::Success)),
            };
            self.send(net, &p, now);
        }
    }

    /// Reads and answers everything that arrived.
    pub fn poll(&mut self, net: &mut Net, ledger: &mut Ledger, now: u64) {
        let Some(s) = self.sock else { return };
        let mut buf = [0u8; 8192];
        loop {
            match net.read(s, &mut buf) {
                Ok(0) => {
                    self.drop_conn(net);
                    return;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_conn(net);
                    return;
                }
            }
        }
        loop {
            let packet = match decode(&self.input, self.protocol, u32::MAX) {
                Ok(Some((p, used))) => {
                    let _ = self.input.split_to(used);
                    p
                }
                Ok(None) => break,
                Err(e) => {
                    ledger
                        .violations
                        .push(format!("t={now}: client {} got bad bytes: {e}", self.idx));
                    self.drop_conn(net);
                    return;
                }
            };
            self.on_packet(net, ledger, packet, now);
            if self.sock.is_none() {
                return;
            }
        }
    }

    fn on_packet(&mut self, net: &mut Net, ledger: &mut Ledger, p: Packet, now: u64) {
        match p {
            Packet::ConnAck(ack) => {
                if ack.reason != ReasonCode::Success {
                    self.drop_conn(net);
                    return;
                }
                self.phase = Phase::Online;
                ledger.note(
                    now,
                    format!(
                        "client {} online on node {} (session present: {})",
                        self.idx, self.node, ack.session_present
                    ),
                );
                if !ack.session_present {
                    if self.has_session {
                        ledger.session_lost(self.idx, now);
                    }
                    // The client side of the session goes with the broker's.
                    self.outgoing.clear();
                    self.awaiting_rel.clear();
                    self.subscribe_sent = false;
                }
                self.has_session = true;
                if !self.subscribe_sent && !self.filters.is_empty() {
                    self.subscribe_sent = true;
                    let filters = self
                        .filters
                        .iter()
                        .map(|(f, q)| {
                            let o = SubscriptionOptions {
                                qos: *q,
                                ..Default::default()
                            };
                            (f.clone(), o)
                        })
                        .collect();
                    let s = Subscribe {
                        packet_id: 0xFFFF,
                        filters,
                        properties: Properties::default(),
                    };
                    self.send(net, &Packet::Subscribe(s), now);
                }
                self.resend(net, now);
            }
            Packet::SubAck(ack) => {
                for ((f, _), r) in self.filters.iter().zip(&ack.reasons) {
                    if (*r as u8) < 0x80 {
                        ledger.subscribed(self.idx, f, *r as u8, now);
                    }
                }
            }
            Packet::Publish(p) => {
                let key = key_of(&p.payload);
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        let ack = PubResp::new(p.packet_id, ReasonCode::Success);
                        self.send(net, &Packet::PubAck(ack), now);
                    }
                    QoS::ExactlyOnce => {
                        let ack = PubResp::new(p.packet_id, ReasonCode::Success);
                        let again = !self.awaiting_rel.insert(p.packet_id);
                        self.send(net, &Packet::PubRec(ack), now);
                        if again {
                            // The same delivery resent before PUBREL: not a new copy.
                            return;
                        }
                    }
                }
                match key {
                    Some(key) => {
                        let n = ledger.received(self.idx, key, now);
                        if n > 1 {
                            let what = format!(
                                "client {} got message {} of publisher {} again ({n}) on node {} \
                                 (QoS {}, packet id {}, dup {})",
                                self.idx, key.1, key.0, self.node, p.qos as u8, p.packet_id, p.dup
                            );
                            ledger.note(now, what);
                        }
                    }
                    None => ledger.violations.push(format!(
                        "t={now}: client {} got a payload nobody published",
                        self.idx
                    )),
                }
            }
            Packet::PubRel(r) => {
                self.awaiting_rel.remove(&r.packet_id);
                let ack = PubResp::new(r.packet_id, ReasonCode::Success);
                self.send(net, &Packet::PubComp(ack), now);
            }
            Packet::PubAck(r) => {
                if let Some((seq, QoS::AtLeastOnce, Stage::Sent)) =
                    self.outgoing.get(&r.packet_id).copied()
                {
                    self.outgoing.remove(&r.packet_id);
                    if (r.reason as u8) < 0x80 {
                        ledger.acked((self.idx, seq), now);
                    }
                }
            }
            Packet::PubRec(r) => {
                if let Some((seq, QoS::ExactlyOnce, Stage::Sent)) =
                    self.outgoing.get(&r.packet_id).copied()
                {
                    if (r.reason as u8) >= 0x80 {
                        self.outgoing.remove(&r.packet_id);
                        return;
                    }
                    ledger.acked((self.idx, seq), now);
                    self.outgoing
                        .insert(r.packet_id, (seq, QoS::ExactlyOnce, Stage::Released));
                    let rel = PubResp::new(r.packet_id, ReasonCode::Success);
                    self.send(net, &Packet::PubRel(rel), now);
                }
            }
            Packet::PubComp(r) => {
                if let Some((_, _, Stage::Released)) = self.outgoing.get(&r.packet_id) {
                    self.outgoing.remove(&r.packet_id);
                }
            }
            Packet::Disconnect(_) => self.drop_conn(net),
            _ => {}
        }
    }
}
