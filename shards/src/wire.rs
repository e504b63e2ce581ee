//! The wire form of a forwarded message: [`to_wire`] turns a [`Message`] into the
//! [`WireMessage`] of a cluster frame (properties re-encoded, expiry as time left) and
//! [`from_wire`] rebuilds it on the receiving node. Used by the shards' data links and the
//! cluster thread (retained messages, session transfers).

use crate::message::Message;
use bytes::BytesMut;
use shardmq_net::cluster::WireMessage;
use shardmq_net::codec::{decode_message_properties, encode_message_properties};
use shardmq_net::QoS;
use std::sync::Arc;

/// Converts a message for the wire (properties re-encoded, expiry as time left after
/// `now_ms` on the node's clock).
pub fn to_wire(m: &Message, now_ms: u64) -> WireMessage {
    let mut props = BytesMut::new();
    if let Some(p) = &m.properties {
        encode_message_properties(p, &mut props);
    }
    WireMessage {
        topic: m.topic.to_string(),
        payload: m.payload.clone(),
        qos: m.qos as u8,
        retain: m.retain,
        publisher: m.publisher.to_string(),
        properties: props.freeze(),
        expiry_ms: m
            .expires_at
            .map(|t| t.saturating_sub(now_ms).max(1))
            .unwrap_or(0),
        id: m.id,
    }
}

/// Rebuilds a message from the wire, its expiry counted from `now_ms` on this node's clock;
/// `None` (logged) if its properties do not decode.
pub fn from_wire(w: WireMessage, now_ms: u64) -> Option<Arc<Message>> {
    let properties = if w.properties.is_empty() {
        None
    } else {
        match decode_message_properties(&w.properties) {
            Ok(p) => Some(Box::new(p)),
            Err(e) => {
                log::warn!("cluster: dropping forwarded message with bad properties: {e}");
                return None;
            }
        }
    };
    Some(Arc::new(Message {
        topic: w.topic.into(),
        payload: w.payload,
        qos: QoS::from_u8(w.qos)?,
        retain: w.retain,
        properties,
        publisher: w.publisher.into(),
        expires_at: (w.expiry_ms > 0).then(|| now_ms.saturating_add(w.expiry_ms)),
        id: w.id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;

    #[test]
    fn messages_survive_the_wire() {
        let m = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Some(Box::new(shardmq_net::Properties {
                content_type: Some("text/plain".into()),
                ..Default::default()
            })),
            publisher: "p".into(),
            expires_at: Some(1_500),
            id: 42,
        };
        let back = from_wire(to_wire(&m, 1_000), 7_000).unwrap();
        assert_eq!(back.expires_at, Some(7_500), "expiry travels as time left");
        assert_eq!(back.id, 42);
        assert_eq!(back.topic, m.topic);
        assert_eq!(back.properties, m.properties);
        assert_eq!((back.qos, back.retain), (m.qos, m.retain));
    }
}
