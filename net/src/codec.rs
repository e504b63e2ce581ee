//! MQTT wire format: fixed header, variable byte integers, properties and every packet body.
//!
//! Decoding is incremental: [`decode`] looks at whatever bytes have arrived and either returns a
//! whole packet and how many bytes it used, or `Ok(None)` to ask for more. The remaining length is
//! checked against the maximum packet size as soon as the fixed header is complete, so an
//! oversized packet is refused before its body is read.

use crate::packet::*;
use bytes::BytesMut;

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

/// Length of the whole packet at the front of `buf` (fixed header included), `Ok(None)` if the
/// fixed header is not complete yet. Fails if the remaining length is malformed or the packet
/// would exceed `max_packet_size` bytes.
pub fn frame_len(buf: &[u8], max_packet_size: u32) -> Result<Option<usize>, DecodeError> {
    let _ = (buf, max_packet_size);
    todo!()
}

/// Decodes one packet from the front of `buf`. `protocol` is the level of the connection (it
/// is ignored for CONNECT, which carries its own). Returns the packet and the bytes it used, or
/// `Ok(None)` when more bytes are needed. Payloads are copied out of `buf` into `Bytes`.
pub fn decode(
    buf: &[u8],
    protocol: Protocol,
    max_packet_size: u32,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let _ = (buf, protocol, max_packet_size);
    todo!()
}

/// Appends `packet` encoded for `protocol` to `out`.
pub fn encode(packet: &Packet, protocol: Protocol, out: &mut BytesMut) {
    let _ = (packet, protocol, out);
    todo!()
}

/// Appends everything of `publish` except its payload (fixed header with the full remaining
/// length, topic, packet id, properties), so the payload `Bytes` can be sent as a separate
/// iovec without copying. Returns the number of bytes written.
pub fn encode_publish_header(publish: &Publish, protocol: Protocol, out: &mut BytesMut) -> usize {
    let _ = (publish, protocol, out);
    todo!()
}
