//! MQTT wire format: fixed header, variable byte integers, properties and every packet body.
//!
//! Decoding is incremental: [`decode`] looks at whatever bytes have arrived and either returns a
//! whole packet and how many bytes it used, or `Ok(None)` to ask for more. The remaining length is
//! checked against the maximum packet size as soon as the fixed header is complete, so an
//! oversized packet is refused before its body is read.
//!
//! ```
//! use shardmq_net::{decode, encode, Packet, Protocol};
//! let mut out = bytes::BytesMut::new();
//! encode(&Packet::PingReq, Protocol::V311, &mut out);
//! assert_eq!(&out[..], &[0xC0, 0x00]);
//! assert_eq!(decode(&out, Protocol::V311, 1024).unwrap(), Some((Packet::PingReq, 2)));
//! assert_eq!(decode(&out[..1], Protocol::V311, 1024).unwrap(), None);
//! ```

use crate::packet::*;
use crate::reader::ShortInput;
use bytes::{BufMut, Bytes, BytesMut};

mod encode;
mod properties;

use properties::{allowed, read_property, PropCtx};

pub use encode::{
    decode_message_properties, encode, encode_message_properties, encode_publish_header,
    encode_publish_header_parts,
};

/// Largest value of a variable byte integer (MQTT 1.5.5).
pub const VARINT_MAX: u32 = 268_435_455;

/// Why bytes could not be turned into a packet. Every variant closes the connection; the v5
/// reason code to send first (if any) comes from [`DecodeError::reason_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("remaining length needs more than 4 bytes")]
    BadRemainingLength,
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: u64, max: u32 },
    #[error("unsupported protocol level {level} (name {name:?})")]
    UnsupportedProtocol { level: u8, name: String },
    #[error("string is not valid UTF-8 or holds a forbidden character")]
    InvalidUtf8,
}

impl DecodeError {
    /// The v5 reason code that tells the peer why (CONNACK or DISCONNECT).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) | DecodeError::BadRemainingLength => {
                ReasonCode::MalformedPacket
            }
            DecodeError::InvalidUtf8 => ReasonCode::MalformedPacket,
            DecodeError::Protocol(_) => ReasonCode::ProtocolError,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocol { .. } => ReasonCode::UnsupportedProtocolVersion,
        }
    }
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Parses the fixed header: (first byte, remaining length, header length), `None` if incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, u32, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= ((b & 0x7F) as u32) << (7 * i);
        if b & 0x80 == 0 {
            // MQTT-1.5.5-1: the minimal number of bytes must be used... a trailing 0x80 0x00 is
            // tolerated by most brokers; we accept it as the spec's decoding algorithm does.
            return Ok(Some((first, value, 2 + i)));
        }
    }
    Err(DecodeError::BadRemainingLength)
}

/// Length of the whole packet at the front of `buf` (fixed header included), `Ok(None)` if the
/// fixed header is not complete yet. Fails if the remaining length is malformed or the packet
/// would exceed `max_packet_size` bytes.
pub fn frame_len(buf: &[u8], max_packet_size: u32) -> Result<Option<usize>> {
    let Some((_, remaining, header)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header as u64 + remaining as u64;
    if size > max_packet_size as u64 {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(Some(size as usize))
}

/// Decodes one packet from the front of `buf`. `protocol` is the level of the connection (it
/// is ignored for CONNECT, which carries its own). Returns the packet and the bytes it used, or
/// `Ok(None)` when more bytes are needed. Payloads are copied out of `buf` into `Bytes`.
pub fn decode(
    buf: &[u8],
    protocol: Protocol,
    max_packet_size: u32,
) -> Result<Option<(Packet, usize)>> {
    let Some(total) = frame_len(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let (first, _, header) = fixed_header(buf)?.expect("complete: frame_len succeeded");
    let body = &buf[header..total];
    let packet = decode_body(first, body, protocol)?;
    Ok(Some((packet, total)))
}

impl ShortInput for DecodeError {
    fn short_input() -> Self {
        DecodeError::Malformed("packet body shorter than its fields")
    }
}

/// Cursor over a packet body; every read is bounds-checked.
type Reader<'a> = crate::reader::Reader<'a, DecodeError>;

/// The MQTT data types (section 1.5) on top of the shared cursor.
impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u32> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7F) as u32) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    fn binary(&mut self) -> Result<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
        // MQTT-1.5.4-2: no U+0000 in UTF-8 strings.
        if s.contains('\0') {
            return Err(DecodeError::InvalidUtf8);
        }
        Ok(s.to_string())
    }

    fn packet_id(&mut self) -> Result<u16> {
        let id = self.u16()?;
        if id == 0 {
            // MQTT-2.2.1-3: packet identifiers are non-zero.
            return Err(DecodeError::Protocol("packet identifier 0"));
        }
        Ok(id)
    }

    fn done(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(DecodeError::Malformed("bytes left after the last field"));
        }
        Ok(())
    }
}

fn read_properties(r: &mut Reader, ctx: PropCtx) -> Result<Properties> {
    let len = r.varint()? as usize;
    let block = r.take(len)?;
    let mut r = Reader::new(block);
    let mut p = Properties::default();
    let mut seen: u64 = 0;
    while r.remaining() > 0 {
        let id = r.varint()?;
        if id > 0x7F {
            return Err(DecodeError::Malformed("unknown property identifier"));
        }
        let id = id as u8;
        if !allowed(ctx, id) {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
        // MQTT 2.2.2.2: only user properties (and subscription ids in PUBLISH) may repeat.
        let repeatable = id == 0x26 || (id == 0x0B && ctx == PropCtx::Publish);
        if !repeatable {
            if seen & (1 << id) != 0 {
                return Err(DecodeError::Protocol("property appears twice"));
            }
            seen |= 1 << id;
        }
        read_property(&mut r, id, &mut p)?;
    }
    if ctx == PropCtx::Subscribe && p.subscription_identifiers.len() > 1 {
        return Err(DecodeError::Protocol(
            "more than one subscription identifier",
        ));
    }
    Ok(p)
}

fn reason(v: u8) -> Result<ReasonCode> {
    ReasonCode::from_u8(v).ok_or(DecodeError::Malformed("unknown reason code"))
}

fn decode_body(first: u8, body: &[u8], protocol: Protocol) -> Result<Packet> {
    let kind = first >> 4;
    let flags = first & 0x0F;
    let v5 = protocol.is_v5();
    // MQTT-2.1.3-1: reserved flag bits must hold their fixed values.
    let want_flags = match kind {
        3 => flags,
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != want_flags {
        return Err(DecodeError::Malformed("reserved fixed header flags"));
    }
    let mut r = Reader::new(body);
    let packet = match kind {
        1 => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        2 => {
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("CONNACK reserved flags"));
            }
            let code = r.u8()?;
            let reason = if v5 {
                reason(code)?
            } else {
                match code {
                    0 => ReasonCode::Success,
                    1 => ReasonCode::UnsupportedProtocolVersion,
                    2 => ReasonCode::ClientIdentifierNotValid,
                    3 => ReasonCode::ServerUnavailable,
                    4 => ReasonCode::BadUserNameOrPassword,
                    5 => ReasonCode::NotAuthorized,
                    _ => return Err(DecodeError::Malformed("unknown CONNACK return code")),
                }
            };
            let properties = if v5 {
                read_properties(&mut r, PropCtx::ConnAck)?
            } else {
                Properties::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 == 1,
                reason,
                properties,
            })
        }
        3 => {
            let qos = QoS::from_u8((flags >> 1) & 3)
                .ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
            let dup = flags & 0b1000 != 0;
            if dup && qos == QoS::AtMostOnce {
                // MQTT-3.3.1-2.
                return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
            }
            let topic = r.string()?;
            let packet_id = if qos == QoS::AtMostOnce {
                0
            } else {
                r.packet_id()?
            };
            let properties = if v5 {
                read_properties(&mut r, PropCtx::Publish)?
            } else {
                Properties::default()
            };
            let payload = Bytes::copy_from_slice(r.rest());
            Packet::Publish(Publish {
                dup,
                qos,
                retain: flags & 1 == 1,
                topic,
                packet_id,
                payload,
                properties,
            })
        }
        4..=7 => {
            let packet_id = r.packet_id()?;
            let mut resp = PubResp {
                packet_id,
                ..Default::default()
            };
            if v5 && r.remaining() > 0 {
                resp.reason = reason(r.u8()?)?;
                if r.remaining() > 0 {
                    resp.properties = read_properties(&mut r, PropCtx::Ack)?;
                }
            }
            match kind {
                4 => Packet::PubAck(resp),
                5 => Packet::PubRec(resp),
                6 => Packet::PubRel(resp),
                _ => Packet::PubComp(resp),
            }
        }
        8 => {
            let packet_id = r.packet_id()?;
            let properties = if v5 {
                read_properties(&mut r, PropCtx::Subscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                let filter = r.string()?;
                let o = r.u8()?;
                let options = if v5 {
                    // MQTT-3.8.3-5: the reserved bits 6-7 must be 0.
                    if o & 0xC0 != 0 {
                        return Err(DecodeError::Malformed("subscription options reserved bits"));
                    }
                    // v5 3.8.3.1: QoS 3, retain handling 3 and No Local on a shared
                    // subscription (MQTT-3.8.3-4) are protocol errors, not malformed packets.
                    let options =
                        SubscriptionOptions::from_byte(o).map_err(DecodeError::Protocol)?;
                    if options.no_local && filter.starts_with("$share/") {
                        return Err(DecodeError::Protocol("No Local on a shared subscription"));
                    }
                    options
                } else {
                    // MQTT-3.8.3-4: the upper 6 bits are reserved in 3.1.1.
                    if o & 0xFC != 0 {
                        return Err(DecodeError::Malformed("requested QoS reserved bits"));
                    }
                    SubscriptionOptions {
                        qos: QoS::from_u8(o).ok_or(DecodeError::Malformed("subscription QoS 3"))?,
                        ..Default::default()
                    }
                };
                filters.push((filter, options));
            }
            if filters.is_empty() {
                // MQTT-3.8.3-3.
                return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        }
        9 => {
            let packet_id = r.packet_id()?;
            let properties = if v5 {
                read_properties(&mut r, PropCtx::SubAck)?
            } else {
                Properties::default()
            };
            let mut reasons = Vec::with_capacity(r.remaining());
            for &b in r.rest() {
                let code = if v5 {
                    reason(b)?
                } else {
                    match b {
                        0 => ReasonCode::Success,
                        1 => ReasonCode::GrantedQoS1,
                        2 => ReasonCode::GrantedQoS2,
                        0x80 => ReasonCode::UnspecifiedError,
                        _ => return Err(DecodeError::Malformed("unknown SUBACK return code")),
                    }
                };
                reasons.push(code);
            }
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties,
            })
        }
        10 => {
            let packet_id = r.packet_id()?;
            let properties = if v5 {
                read_properties(&mut r, PropCtx::Unsubscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                // MQTT-3.10.3-2.
                return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        }
        11 => {
            let packet_id = r.packet_id()?;
            let (properties, reasons) = if v5 {
                let p = read_properties(&mut r, PropCtx::SubAck)?;
                let reasons = r
                    .rest()
                    .iter()
                    .map(|&b| reason(b))
                    .collect::<Result<Vec<_>>>()?;
                (p, reasons)
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reasons,
                properties,
            })
        }
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => {
            let mut d = Disconnect::default();
            if v5 && r.remaining() > 0 {
                d.reason = reason(r.u8()?)?;
                if r.remaining() > 0 {
                    d.properties = read_properties(&mut r, PropCtx::Disconnect)?;
                }
            }
            Packet::Disconnect(d)
        }
        15 if v5 => {
            let mut a = Auth::default();
            if r.remaining() > 0 {
                a.reason = reason(r.u8()?)?;
                if r.remaining() > 0 {
                    a.properties = read_properties(&mut r, PropCtx::Auth)?;
                }
            }
            Packet::Auth(a)
        }
        _ => return Err(DecodeError::Malformed("unknown packet type")),
    };
    r.done()?;
    Ok(packet)
}

fn decode_connect(r: &mut Reader) -> Result<Connect> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQIsdp", 3) => Protocol::V31,
        _ => {
            return Err(DecodeError::UnsupportedProtocol {
                level,
                name: String::from_utf8_lossy(name).into_owned(),
            })
        }
    };
    let v5 = protocol.is_v5();
    let flags = r.u8()?;
    if flags & 1 != 0 {
        // MQTT-3.1.2-3.
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0x20 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        // MQTT-3.1.2-11/13/15.
        return Err(DecodeError::Malformed("will QoS or retain without a will"));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    let has_username = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    if protocol != Protocol::V5 && has_password && !has_username {
        // MQTT-3.1.2-22.
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        read_properties(r, PropCtx::Connect)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let will_props = if v5 {
            read_properties(r, PropCtx::Will)?
        } else {
            Properties::default()
        };
        let topic = r.string()?;
        let payload = Bytes::copy_from_slice(r.binary()?);
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: will_props,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(Bytes::copy_from_slice(r.binary()?))
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

#[cfg(test)]
mod tests;
