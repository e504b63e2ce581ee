//! Cluster link frames: what nodes say to each other, and their byte format.
//!
//! A frame is `u32` big-endian length (of type + body), one type byte, then the body. Strings
//! and byte strings are `u32` length-prefixed. The format is hand-written rather than rkyv:
//! frames are few kinds of small headers around payloads that are written from their `Bytes`
//! with `writev`, and a reader must treat every byte as hostile, which a validating hand-written
//! reader does in a few lines. [`FrameReader`] refuses lengths over its maximum before
//! buffering them: [`HANDSHAKE_FRAME_MAX_BYTES`] until the peer has proven the cookie,
//! [`FRAME_MAX_BYTES`] after.
//!
//! The handshake is a mutual proof of the cookie (see [`handshake_proof`]): both ends send
//! `Hello` with a fresh random nonce; the dialler then sends `Auth` with its proof; the
//! acceptor checks it and only then sends its own. Each proof is an HMAC-SHA256 keyed by the
//! cookie over a direction label, both nonces and both node names, so a proof made for one
//! link or one direction never verifies on another (no reflection, no replay), and the
//! acceptor computes nothing for a peer that has not proven itself first.

use bytes::{BufMut, Bytes, BytesMut};

mod decode;
mod handshake;

pub use decode::{FrameError, FrameReader};
pub use handshake::{fresh_nonce, handshake_proof, verify_proof, Role, Transcript};

/// Largest frame accepted from an authenticated peer, in bytes.
pub const FRAME_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Largest frame accepted before the peer has proven the cookie, in bytes: a `Hello` (two
/// names, a nonce), a `DataLink` and an `Auth` fit many times over.
pub const HANDSHAKE_FRAME_MAX_BYTES: usize = 4 * 1024;
/// Version of this frame format, checked in the handshake: a node of another version is
/// refused (and logged) rather than misread. 2: message ids, session move frames 16 and 17.
/// 3: random 16-byte nonces and HMAC-SHA256 mutual authentication.
pub const CLUSTER_PROTOCOL_VERSION: u32 = 4;
/// Bytes of a handshake nonce (from the OS random source, fresh per link).
pub const NONCE_BYTES: usize = 16;
/// Bytes of a handshake proof (HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;
/// A handshake nonce.
pub type Nonce = [u8; NONCE_BYTES];
/// A handshake proof.
pub type Proof = [u8; PROOF_BYTES];

/// A message forwarded to another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub publisher: String,
    /// v5 properties as the codec encodes them (property block with its length prefix), or
    /// empty.
    pub properties: Bytes,
    /// Milliseconds left before the message expires, 0 = never.
    pub expiry_ms: u64,
    /// Cluster-wide id of the publish (0 = none), to keep one copy of it per moved session.
    pub id: u64,
}

/// A subscription moving with a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireSubscription {
    pub filter: String,
    /// The v5 subscription options byte.
    pub options: u8,
    pub id: u32,
}

/// Cluster frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame on a link, both ways: who I am and a nonce for the cookie challenge.
    Hello {
        version: u32,
        node: String,
        cluster_addr: String,
        nonce: Nonce,
        started_ms: u64,
    },
    /// Proof of the cookie for this link and direction (see [`handshake_proof`]).
    Auth { proof: Proof },
    /// Liveness and load, every heartbeat interval.
    Heartbeat {
        uptime_s: u64,
        connections: u64,
        routes: u64,
    },
    /// Members this node knows (name, cluster address), for forming the full mesh.
    Members { members: Vec<(String, String)> },
    /// The sender leaves the cluster: forget it.
    Leave,
    /// Both nodes dialled each other: the sender keeps the other link (the one dialled by
    /// the smaller node name) and closes this one. The receiver moves to that link without
    /// taking the sender down.
    Superseded,
    /// The sender has subscribers for `filter` (`seq` orders route changes of one node).
    RouteAdd { seq: u64, filter: String },
    /// The sender no longer has subscribers for `filter`.
    RouteDel { seq: u64, filter: String },
    /// All the sender's routes; replaces what the receiver had for it.
    RouteSnapshot { seq: u64, filters: Vec<String> },
    /// A published message for the receiver's subscribers. `normal` = deliver to ordinary
    /// subscriptions; `shared` = shared group keys this node must pick a member for.
    Publish {
        msg: WireMessage,
        normal: bool,
        shared: Vec<String>,
    },
    /// Retained message set (payload non-empty) or cleared.
    Retain { msg: WireMessage },
    /// A client id connected on the sender: close any connection of it here. When `want_session`
    /// is set, the receiver answers with [`Frame::SessionTransfer`].
    Takeover {
        client_id: String,
        want_session: bool,
        token: u64,
        /// When the new connection arrived (Unix ms): only older connections yield to it.
        at_ms: u64,
    },
    /// Answer to a takeover: the session, if one existed here (then it is gone here).
    SessionTransfer {
        token: u64,
        client_id: String,
        found: bool,
        subscriptions: Vec<WireSubscription>,
        messages: Vec<WireMessage>,
        /// Packet ids of QoS 2 messages released to the client (PUBREL sent) but not completed:
        /// the new node sends PUBREL for them again, with the same ids (MQTT-4.4.0-1).
        pubrel: Vec<u16>,
        /// Packet ids of the first `sent_ids.len()` of `messages`, which were in flight: the
        /// new node sends them again (DUP) under the same ids.
        sent_ids: Vec<u16>,
        /// Packet ids of QoS 2 messages the client published and the old node routed, whose
        /// PUBREL has not come: a resent PUBLISH with one of them is not routed again
        /// (MQTT-4.3.3-9), whichever node it reaches.
        incoming_qos2: Vec<u16>,
    },
    /// A management question (`kind`: 1 clients, 2 subscriptions) for the receiver's shards.
    Query { token: u64, kind: u8 },
    /// The receiver's answer: one JSON object per row.
    QueryReply { token: u64, rows: Vec<String> },
    /// Sent by the dialler right after its `Hello`: this link carries `Publish` frames from
    /// the dialler's shard `shard`, and is handed to a shard on both sides once authenticated.
    DataLink { shard: u16 },
    /// Second phase of a session move, from the node that imported the session to the one
    /// that exported it, sent after the importer's routes for it: stop holding it.
    TakeoverEnd { client_id: String },
    /// The exporter's answer to `TakeoverEnd`: what it queued for the session between the
    /// export and the end, while peers still routed to it.
    SessionTail {
        client_id: String,
        messages: Vec<WireMessage>,
    },
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

fn put_msg_head(out: &mut BytesMut, m: &WireMessage) {
    put_str(out, &m.topic);
    out.put_u8(m.qos);
    out.put_u8(m.retain as u8);
    put_str(out, &m.publisher);
    put_bytes(out, &m.properties);
    out.put_u64(m.expiry_ms);
    out.put_u64(m.id);
    out.put_u32(m.payload.len() as u32);
}

fn put_msg(out: &mut BytesMut, m: &WireMessage) {
    put_msg_head(out, m);
    out.put_slice(&m.payload);
}

/// Appends a whole `Publish` frame except the payload bytes, which end the frame: the caller
/// writes `msg.payload` right after it (as its own iovec), so payloads are never copied into a
/// staging buffer on the way out.
pub fn encode_publish_head(msg: &WireMessage, normal: bool, shared: &[String], out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(9);
    out.put_u8(normal as u8);
    out.put_u32(shared.len() as u32);
    for k in shared {
        put_str(out, k);
    }
    put_msg_head(out, msg);
    let len = (out.len() - start - 4 + msg.payload.len()) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::Auth { .. } => 2,
            Frame::Heartbeat { .. } => 3,
            Frame::Members { .. } => 4,
            Frame::Leave => 5,
            Frame::Superseded => 18,
            Frame::RouteAdd { .. } => 6,
            Frame::RouteDel { .. } => 7,
            Frame::RouteSnapshot { .. } => 8,
            Frame::Publish { .. } => 9,
            Frame::Retain { .. } => 10,
            Frame::Takeover { .. } => 11,
            Frame::SessionTransfer { .. } => 12,
            Frame::Query { .. } => 13,
            Frame::QueryReply { .. } => 14,
            Frame::DataLink { .. } => 15,
            Frame::TakeoverEnd { .. } => 16,
            Frame::SessionTail { .. } => 17,
        }
    }

    /// Appends the frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        out.put_u8(self.kind());
        match self {
            Frame::Hello {
                version,
                node,
                cluster_addr,
                nonce,
                started_ms,
            } => {
                out.put_u32(*version);
                put_str(out, node);
                put_str(out, cluster_addr);
                out.put_slice(nonce);
                out.put_u64(*started_ms);
            }
            Frame::Auth { proof } => out.put_slice(proof),
            Frame::Heartbeat {
                uptime_s,
                connections,
                routes,
            } => {
                out.put_u64(*uptime_s);
                out.put_u64(*connections);
                out.put_u64(*routes);
            }
            Frame::Members { members } => {
                out.put_u32(members.len() as u32);
                for (n, a) in members {
                    put_str(out, n);
                    put_str(out, a);
                }
            }
            Frame::Leave | Frame::Superseded => {}
            Frame::RouteAdd { seq, filter } | Frame::RouteDel { seq, filter } => {
                out.put_u64(*seq);
                put_str(out, filter);
            }
            Frame::RouteSnapshot { seq, filters } => {
                out.put_u64(*seq);
                out.put_u32(filters.len() as u32);
                for f in filters {
                    put_str(out, f);
                }
            }
            Frame::Publish {
                msg,
                normal,
                shared,
            } => {
                out.truncate(start);
                encode_publish_head(msg, *normal, shared, out);
                out.put_slice(&msg.payload);
                return;
            }
            Frame::Retain { msg } => put_msg(out, msg),
            Frame::Takeover {
                client_id,
                want_session,
                token,
                at_ms,
            } => {
                put_str(out, client_id);
                out.put_u8(*want_session as u8);
                out.put_u64(*token);
                out.put_u64(*at_ms);
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
                out.put_u64(*token);
                put_str(out, client_id);
                out.put_u8(*found as u8);
                out.put_u32(subscriptions.len() as u32);
                for s in subscriptions {
                    put_str(out, &s.filter);
                    out.put_u8(s.options);
                    out.put_u32(s.id);
                }
                out.put_u32(messages.len() as u32);
                for m in messages {
                    put_msg(out, m);
                }
                for ids in [pubrel, sent_ids, incoming_qos2] {
                    out.put_u32(ids.len() as u32);
                    for p in ids {
                        out.put_u16(*p);
                    }
                }
            }
            Frame::Query { token, kind } => {
                out.put_u64(*token);
                out.put_u8(*kind);
            }
            Frame::QueryReply { token, rows } => {
                out.put_u64(*token);
                out.put_u32(rows.len() as u32);
                for r in rows {
                    put_str(out, r);
                }
            }
            Frame::DataLink { shard } => out.put_u16(*shard),
            Frame::TakeoverEnd { client_id } => put_str(out, client_id),
            Frame::SessionTail {
                client_id,
                messages,
            } => {
                put_str(out, client_id);
                out.put_u32(messages.len() as u32);
                for m in messages {
                    put_msg(out, m);
                }
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> WireMessage {
        WireMessage {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hi"),
            qos: 1,
            retain: true,
            publisher: "p".into(),
            properties: Bytes::new(),
            expiry_ms: 5,
            id: 7 << 40 | 9,
        }
    }

    #[test]
    fn every_frame_round_trips_through_a_split_stream() {
        let frames = vec![
            Frame::Hello {
                version: CLUSTER_PROTOCOL_VERSION,
                node: "n1@h".into(),
                cluster_addr: "127.0.0.1:4370".into(),
                nonce: [7; NONCE_BYTES],
                started_ms: 9,
            },
            Frame::Auth {
                proof: [3; PROOF_BYTES],
            },
            Frame::Heartbeat {
                uptime_s: 1,
                connections: 2,
                routes: 3,
            },
            Frame::Members {
                members: vec![("a@b".into(), "x:1".into())],
            },
            Frame::Leave,
            Frame::Superseded,
            Frame::RouteAdd {
                seq: 1,
                filter: "a/+".into(),
            },
            Frame::RouteDel {
                seq: 2,
                filter: "a/+".into(),
            },
            Frame::RouteSnapshot {
                seq: 3,
                filters: vec!["x".into(), "y/#".into()],
            },
            Frame::Publish {
                msg: msg(),
                normal: true,
                shared: vec!["$share/g/a".into()],
            },
            Frame::Retain { msg: msg() },
            Frame::Takeover {
                client_id: "c".into(),
                want_session: true,
                token: 4,
                at_ms: 9,
            },
            Frame::SessionTransfer {
                token: 4,
                client_id: "c".into(),
                found: true,
                subscriptions: vec![WireSubscription {
                    filter: "a/#".into(),
                    options: 1,
                    id: 0,
                }],
                messages: vec![msg()],
                pubrel: vec![3, 65535],
                sent_ids: vec![9],
                incoming_qos2: vec![7, 1],
            },
            Frame::Query { token: 5, kind: 1 },
            Frame::QueryReply {
                token: 5,
                rows: vec!["{}".into()],
            },
            Frame::DataLink { shard: 3 },
            Frame::TakeoverEnd {
                client_id: "c".into(),
            },
            Frame::SessionTail {
                client_id: "c".into(),
                messages: vec![msg(), msg()],
            },
        ];
        let mut out = BytesMut::new();
        for f in &frames {
            f.encode(&mut out);
        }
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for chunk in out.chunks(3) {
            r.extend(chunk);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn buffered_bytes_move_with_the_socket() {
        let mut out = BytesMut::new();
        Frame::Auth {
            proof: [1; PROOF_BYTES],
        }
        .encode(&mut out);
        Frame::DataLink { shard: 2 }.encode(&mut out);
        let mut r = FrameReader::default();
        r.extend(&out[..out.len() - 1]);
        assert_eq!(
            r.next_frame().unwrap(),
            Some(Frame::Auth {
                proof: [1; PROOF_BYTES]
            })
        );
        let rest = r.take_buffered();
        assert!(r.is_empty());
        let mut moved = FrameReader::default();
        moved.extend(&rest);
        moved.extend(&out[out.len() - 1..]);
        assert_eq!(
            moved.next_frame().unwrap(),
            Some(Frame::DataLink { shard: 2 })
        );
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let mut r = FrameReader::default();
        r.extend(&[0xFF, 0xFF, 0xFF, 0xFF, 1]);
        assert!(matches!(r.next_frame(), Err(FrameError::TooLarge(_))));
        let mut r = FrameReader::default();
        r.extend(&[0, 0, 0, 2, 99, 0]);
        assert!(r.next_frame().is_err());
        let mut r = FrameReader::default();
        // Members frame claiming 2^32-1 entries in 4 bytes.
        r.extend(&[0, 0, 0, 5, 4, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(r.next_frame().is_err());
    }

    #[test]
    fn a_hello_of_another_version_is_read_for_its_version_and_name() {
        // Version 2: an 8-byte nonce.
        let mut body = vec![0, 0, 0, 2, 0, 0, 0, 5];
        body.extend(b"o@h:1");
        body.extend([0, 0, 0, 1, b'x']);
        body.extend([0; 16]);
        let mut bytes = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(1);
        bytes.extend(body);
        let mut r = FrameReader::default();
        r.extend(&bytes);
        assert_eq!(
            r.next_frame().unwrap(),
            Some(Frame::Hello {
                version: 2,
                node: "o@h:1".into(),
                cluster_addr: "x".into(),
                nonce: [0; NONCE_BYTES],
                started_ms: 0
            })
        );
    }

    #[test]
    fn a_frame_over_the_handshake_limit_is_refused_before_it_is_buffered() {
        let mut r = FrameReader::with_max(HANDSHAKE_FRAME_MAX_BYTES);
        let len = (HANDSHAKE_FRAME_MAX_BYTES + 1) as u32;
        r.extend(&len.to_be_bytes());
        assert_eq!(
            r.next_frame(),
            Err(FrameError::TooLarge(HANDSHAKE_FRAME_MAX_BYTES + 1))
        );
        r.set_max(FRAME_MAX_BYTES);
        assert_eq!(r.next_frame(), Ok(None));
    }

    fn transcript<'a>(d: &'a Nonce, a: &'a Nonce) -> Transcript<'a> {
        Transcript {
            dialer: "n1@127.0.0.1",
            dialer_nonce: d,
            acceptor: "n2@127.0.0.1",
            acceptor_nonce: a,
        }
    }

    #[test]
    fn a_proof_verifies_only_for_its_cookie_direction_and_nonces() {
        let (d, a) = (fresh_nonce().unwrap(), fresh_nonce().unwrap());
        assert_ne!(d, a);
        let t = transcript(&d, &a);
        let p = handshake_proof("c", Role::Dialer, &t);
        assert!(verify_proof("c", Role::Dialer, &t, &p));
        assert!(!verify_proof("x", Role::Dialer, &t, &p));
        // Reflected to the other direction.
        assert!(!verify_proof("c", Role::Acceptor, &t, &p));
        // The same nonces swapped, as on a second link the attacker relays to.
        assert!(!verify_proof("c", Role::Dialer, &transcript(&a, &d), &p));
        // Replayed on a link with a fresh acceptor nonce.
        let fresh = fresh_nonce().unwrap();
        assert!(!verify_proof(
            "c",
            Role::Dialer,
            &transcript(&d, &fresh),
            &p
        ));
        let other_names = Transcript {
            dialer: "n3@127.0.0.1",
            ..t
        };
        assert!(!verify_proof("c", Role::Dialer, &other_names, &p));
    }
}
