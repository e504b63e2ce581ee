//! Encoding of every packet, its properties and the publish header parts the shard writes
//! around a shared payload. Encoding trusts its input (the broker's own values); sizes that a
//! client limits are checked by the caller.

use super::*;

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut v: usize) {
    debug_assert!(v <= VARINT_MAX as usize);
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            return;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bin(out, s.as_bytes());
}

fn put_bin(out: &mut BytesMut, b: &[u8]) {
    // Strings and binary data are limited to 65,535 bytes (MQTT 1.5.4/1.5.6); callers keep
    // to that, so truncation here can only follow a caller's bug.
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

fn str_len(s: &str) -> usize {
    2 + s.len()
}

impl properties::Value<'_> {
    /// Bytes of the value on the wire (without the identifier).
    fn len(&self) -> usize {
        use properties::Value::*;
        match *self {
            Byte(_) => 1,
            TwoByte(_) => 2,
            FourByte(_) => 4,
            Varint(v) => varint_len(v as usize),
            Utf8(s) => str_len(s),
            Binary(d) => 2 + d.len(),
            Pair(k, v) => str_len(k) + str_len(v),
        }
    }

    fn put(&self, out: &mut BytesMut) {
        use properties::Value::*;
        match *self {
            Byte(v) => out.put_u8(v),
            TwoByte(v) => out.put_u16(v),
            FourByte(v) => out.put_u32(v),
            Varint(v) => put_varint(out, v as usize),
            Utf8(s) => put_str(out, s),
            Binary(d) => put_bin(out, d),
            Pair(k, v) => {
                put_str(out, k);
                put_str(out, v);
            }
        }
    }
}

/// Bytes of the property block content (without its length prefix). Every identifier in
/// the table is below 0x80, so it takes one byte.
fn props_len(p: &Properties) -> usize {
    let mut n = 0;
    properties::for_each_property(p, |_, v| n += 1 + v.len());
    n
}

fn put_props(out: &mut BytesMut, p: &Properties) {
    put_varint(out, props_len(p));
    properties::for_each_property(p, |id, v| {
        out.put_u8(id);
        v.put(out);
    });
}

/// Length of a property block including its length prefix.
fn props_block_len(p: &Properties) -> usize {
    let n = props_len(p);
    varint_len(n) + n
}

fn v3_connack_code(r: ReasonCode) -> u8 {
    match r {
        ReasonCode::Success => 0,
        ReasonCode::UnsupportedProtocolVersion => 1,
        ReasonCode::ClientIdentifierNotValid => 2,
        ReasonCode::BadUserNameOrPassword => 4,
        ReasonCode::NotAuthorized | ReasonCode::Banned => 5,
        // Every other refusal reads as "server unavailable" to a 3.1.1 client.
        _ => 3,
    }
}

fn v3_suback_code(r: ReasonCode) -> u8 {
    match r {
        ReasonCode::Success => 0,
        ReasonCode::GrantedQoS1 => 1,
        ReasonCode::GrantedQoS2 => 2,
        _ => 0x80,
    }
}

fn header(out: &mut BytesMut, first: u8, remaining: usize) {
    out.put_u8(first);
    put_varint(out, remaining);
}

/// Appends `packet` encoded for `protocol` to `out`.
pub fn encode(packet: &Packet, protocol: Protocol, out: &mut BytesMut) {
    let v5 = protocol.is_v5();
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(a) => {
            let props = if v5 {
                props_block_len(&a.properties)
            } else {
                0
            };
            header(out, 0x20, 2 + props);
            out.put_u8(a.session_present as u8);
            out.put_u8(if v5 {
                a.reason as u8
            } else {
                v3_connack_code(a.reason)
            });
            if v5 {
                put_props(out, &a.properties);
            }
        }
        Packet::Publish(p) => {
            encode_publish_header(p, protocol, out);
            out.put_slice(&p.payload);
        }
        Packet::PubAck(r) => encode_resp(0x40, r, v5, out),
        Packet::PubRec(r) => encode_resp(0x50, r, v5, out),
        Packet::PubRel(r) => encode_resp(0x62, r, v5, out),
        Packet::PubComp(r) => encode_resp(0x70, r, v5, out),
        Packet::Subscribe(s) => {
            let props = if v5 {
                props_block_len(&s.properties)
            } else {
                0
            };
            let list: usize = s.filters.iter().map(|(f, _)| str_len(f) + 1).sum();
            header(out, 0x82, 2 + props + list);
            out.put_u16(s.packet_id);
            if v5 {
                put_props(out, &s.properties);
            }
            for (f, o) in &s.filters {
                put_str(out, f);
                out.put_u8(if v5 { o.to_byte() } else { o.qos as u8 });
            }
        }
        Packet::SubAck(s) => {
            let props = if v5 {
                props_block_len(&s.properties)
            } else {
                0
            };
            header(out, 0x90, 2 + props + s.reasons.len());
            out.put_u16(s.packet_id);
            if v5 {
                put_props(out, &s.properties);
            }
            for &r in &s.reasons {
                out.put_u8(if v5 { r as u8 } else { v3_suback_code(r) });
            }
        }
        Packet::Unsubscribe(u) => {
            let props = if v5 {
                props_block_len(&u.properties)
            } else {
                0
            };
            let list: usize = u.filters.iter().map(|f| str_len(f)).sum();
            header(out, 0xA2, 2 + props + list);
            out.put_u16(u.packet_id);
            if v5 {
                put_props(out, &u.properties);
            }
            for f in &u.filters {
                put_str(out, f);
            }
        }
        Packet::UnsubAck(u) => {
            if v5 {
                header(
                    out,
                    0xB0,
                    2 + props_block_len(&u.properties) + u.reasons.len(),
                );
                out.put_u16(u.packet_id);
                put_props(out, &u.properties);
                for &r in &u.reasons {
                    out.put_u8(r as u8);
                }
            } else {
                header(out, 0xB0, 2);
                out.put_u16(u.packet_id);
            }
        }
        Packet::PingReq => header(out, 0xC0, 0),
        Packet::PingResp => header(out, 0xD0, 0),
        Packet::Disconnect(d) => encode_reason_only(0xE0, d.reason, &d.properties, v5, out),
        Packet::Auth(a) => encode_reason_only(0xF0, a.reason, &a.properties, true, out),
    }
}

fn encode_reason_only(
    first: u8,
    reason: ReasonCode,
    props: &Properties,
    v5: bool,
    out: &mut BytesMut,
) {
    if !v5 || (reason == ReasonCode::Success && props.is_empty()) {
        header(out, first, 0);
    } else if props.is_empty() {
        header(out, first, 1);
        out.put_u8(reason as u8);
    } else {
        header(out, first, 1 + props_block_len(props));
        out.put_u8(reason as u8);
        put_props(out, props);
    }
}

fn encode_resp(first: u8, r: &PubResp, v5: bool, out: &mut BytesMut) {
    // MQTT 3.4.2.1: reason Success without properties may use the 2-byte form.
    if !v5 || (r.reason == ReasonCode::Success && r.properties.is_empty()) {
        header(out, first, 2);
        out.put_u16(r.packet_id);
    } else if r.properties.is_empty() {
        header(out, first, 3);
        out.put_u16(r.packet_id);
        out.put_u8(r.reason as u8);
    } else {
        header(out, first, 3 + props_block_len(&r.properties));
        out.put_u16(r.packet_id);
        out.put_u8(r.reason as u8);
        put_props(out, &r.properties);
    }
}

fn encode_connect(c: &Connect, out: &mut BytesMut) {
    let v5 = c.protocol.is_v5();
    let name: &str = if c.protocol == Protocol::V31 {
        "MQIsdp"
    } else {
        "MQTT"
    };
    let mut len = str_len(name) + 1 + 1 + 2;
    if v5 {
        len += props_block_len(&c.properties);
    }
    len += str_len(&c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            len += props_block_len(&w.properties);
        }
        len += str_len(&w.topic) + 2 + w.payload.len();
    }
    if let Some(u) = &c.username {
        len += str_len(u);
    }
    if let Some(p) = &c.password {
        len += 2 + p.len();
    }
    header(out, 0x10, len);
    put_str(out, name);
    out.put_u8(c.protocol.level());
    let mut flags = (c.clean_start as u8) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | (w.retain as u8) << 5;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if v5 {
        put_props(out, &c.properties);
    }
    put_str(out, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            put_props(out, &w.properties);
        }
        put_str(out, &w.topic);
        put_bin(out, &w.payload);
    }
    if let Some(u) = &c.username {
        put_str(out, u);
    }
    if let Some(p) = &c.password {
        put_bin(out, p);
    }
}

/// Encodes a PUBLISH property block (length prefix included), e.g. to carry a message's
/// properties between nodes.
pub fn encode_message_properties(p: &Properties, out: &mut BytesMut) {
    put_props(out, p);
}

/// Decodes a block written by [`encode_message_properties`].
pub fn decode_message_properties(buf: &[u8]) -> Result<Properties> {
    let mut r = Reader::new(buf);
    let p = read_properties(&mut r, PropCtx::Publish)?;
    r.done()?;
    Ok(p)
}

/// Appends everything of `publish` except its payload (fixed header with the full remaining
/// length, topic, packet id, properties), so the payload `Bytes` can be sent as a separate
/// iovec without copying. Returns the number of bytes written.
pub fn encode_publish_header(publish: &Publish, protocol: Protocol, out: &mut BytesMut) -> usize {
    encode_publish_header_parts(
        &publish.topic,
        publish.qos,
        publish.dup,
        publish.retain,
        publish.packet_id,
        protocol.is_v5().then_some(&publish.properties),
        publish.payload.len(),
        out,
    )
}

/// [`encode_publish_header`] from borrowed parts, so a broker can send a shared topic string
/// without building a `Publish`. `properties` is `None` for 3.x.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish_header_parts(
    topic: &str,
    qos: QoS,
    dup: bool,
    retain: bool,
    packet_id: u16,
    properties: Option<&Properties>,
    payload_len: usize,
    out: &mut BytesMut,
) -> usize {
    let start = out.len();
    let mut remaining = str_len(topic) + payload_len;
    if qos != QoS::AtMostOnce {
        remaining += 2;
    }
    if let Some(p) = properties {
        remaining += props_block_len(p);
    }
    let first = 0x30 | (dup as u8) << 3 | (qos as u8) << 1 | retain as u8;
    header(out, first, remaining);
    put_str(out, topic);
    if qos != QoS::AtMostOnce {
        out.put_u16(packet_id);
    }
    if let Some(p) = properties {
        put_props(out, p);
    }
    out.len() - start
}
