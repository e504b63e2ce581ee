//! Property tests of the codec: generated packets round-trip for every protocol level, decode
//! incrementally at every split point, and `frame_len` agrees with what `encode` wrote.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use shardmq_net::*;

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9/+#$ é]{0,12}"
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pid() -> impl Strategy<Value = u16> {
    1u16..=u16::MAX
}

fn payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

/// Properties valid on a PUBLISH (v5).
fn publish_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(payload()),
        proptest::collection::vec(1u32..=268_435_455, 0..3),
        proptest::option::of(1u16..),
        proptest::collection::vec((text(), text()), 0..3),
    )
        .prop_map(|(pfi, exp, ct, rt, cd, ids, alias, up)| Properties {
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            subscription_identifiers: ids,
            topic_alias: alias,
            user_properties: up,
            ..Default::default()
        })
}

fn ack_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(text()),
        proptest::collection::vec((text(), text()), 0..2),
    )
        .prop_map(|(rs, up)| Properties {
            reason_string: rs,
            user_properties: up,
            ..Default::default()
        })
}

fn packet(v5: bool) -> BoxedStrategy<Packet> {
    let props = move |s: BoxedStrategy<Properties>| {
        if v5 {
            s
        } else {
            Just(Properties::default()).boxed()
        }
    };
    let publish = (
        qos(),
        any::<bool>(),
        any::<bool>(),
        text(),
        pid(),
        payload(),
        props(publish_props().boxed()),
    )
        .prop_map(|(q, dup, retain, topic, id, payload, properties)| {
            Packet::Publish(Publish {
                dup: dup && q != QoS::AtMostOnce,
                qos: q,
                retain,
                topic,
                packet_id: if q == QoS::AtMostOnce { 0 } else { id },
                payload,
                properties,
            })
        });
    let reason = if v5 {
        prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::NoMatchingSubscribers),
            Just(ReasonCode::PacketIdentifierNotFound),
            Just(ReasonCode::QuotaExceeded)
        ]
        .boxed()
    } else {
        Just(ReasonCode::Success).boxed()
    };
    let resp = (pid(), reason, props(ack_props().boxed()), 4u8..=7).prop_map(
        |(packet_id, reason, properties, kind)| {
            let r = PubResp {
                packet_id,
                reason,
                properties,
            };
            match kind {
                4 => Packet::PubAck(r),
                5 => Packet::PubRec(r),
                6 => Packet::PubRel(r),
                _ => Packet::PubComp(r),
            }
        },
    );
    let options =
        (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(q, nl, rap, rh)| {
            if v5 {
                SubscriptionOptions {
                    qos: q,
                    no_local: nl,
                    retain_as_published: rap,
                    retain_handling: match rh {
                        0 => RetainHandling::SendAtSubscribe,
                        1 => RetainHandling::SendIfNew,
                        _ => RetainHandling::DoNotSend,
                    },
                }
            } else {
                SubscriptionOptions {
                    qos: q,
                    ..Default::default()
                }
            }
        });
    let subscribe = (pid(), proptest::collection::vec((text(), options), 1..4)).prop_map(
        |(packet_id, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties: Properties::default(),
            })
        },
    );
    let suback_codes = if v5 {
        prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::GrantedQoS1),
            Just(ReasonCode::GrantedQoS2),
            Just(ReasonCode::TopicFilterInvalid)
        ]
        .boxed()
    } else {
        prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::GrantedQoS1),
            Just(ReasonCode::GrantedQoS2),
            Just(ReasonCode::UnspecifiedError)
        ]
        .boxed()
    };
    let suback = (
        pid(),
        proptest::collection::vec(suback_codes, 1..4),
        props(ack_props().boxed()),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties,
            })
        });
    let unsubscribe =
        (pid(), proptest::collection::vec(text(), 1..4)).prop_map(|(packet_id, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties: Properties::default(),
            })
        });
    let connect = (
        any::<bool>(),
        any::<u16>(),
        text(),
        proptest::option::of((text(), payload(), qos(), any::<bool>())),
        proptest::option::of(text()),
        proptest::option::of(payload()),
    )
        .prop_map(move |(clean, ka, id, will, user, pass)| {
            let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
            Packet::Connect(Box::new(Connect {
                protocol,
                clean_start: clean,
                keep_alive: ka,
                client_id: id,
                will: will.map(|(topic, payload, qos, retain)| Will {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties: Properties::default(),
                }),
                // 3.1.1 forbids a password without a user name (MQTT-3.1.2-22).
                password: if user.is_some() || v5 { pass } else { None },
                username: user,
                properties: Properties::default(),
            }))
        });
    prop_oneof![
        publish,
        resp,
        subscribe,
        suback,
        unsubscribe,
        connect,
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect(Disconnect::default())),
    ]
    .boxed()
}

fn check(p: &Packet, protocol: Protocol) -> Result<(), TestCaseError> {
    let mut out = BytesMut::new();
    encode(p, protocol, &mut out);
    prop_assert_eq!(frame_len(&out, u32::MAX).unwrap(), Some(out.len()));
    let (got, used) = decode(&out, protocol, u32::MAX).unwrap().unwrap();
    prop_assert_eq!(&got, p);
    prop_assert_eq!(used, out.len());
    for cut in 0..out.len() {
        prop_assert_eq!(decode(&out[..cut], protocol, u32::MAX).unwrap(), None);
    }
    // Two packets back to back come out as two.
    let mut two = out.clone();
    two.extend_from_slice(&out);
    let (first, n) = decode(&two, protocol, u32::MAX).unwrap().unwrap();
    let (second, m) = decode(&two[n..], protocol, u32::MAX).unwrap().unwrap();
    prop_assert_eq!((&first, &second, n + m), (p, p, two.len()));
    if let Packet::Publish(publish) = p {
        let mut head = BytesMut::new();
        encode_publish_header(publish, protocol, &mut head);
        head.extend_from_slice(&publish.payload);
        prop_assert_eq!(head, out);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn v311_packets_round_trip(p in packet(false)) {
        check(&p, Protocol::V311)?;
    }

    #[test]
    fn v5_packets_round_trip(p in packet(true)) {
        check(&p, Protocol::V5)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_oversize_is_refused_early(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        for protocol in [Protocol::V31, Protocol::V311, Protocol::V5] {
            let _ = decode(&data, protocol, 16);
            if let Ok(Some(n)) = frame_len(&data, u32::MAX) {
                if n > 16 {
                    let refused = matches!(decode(&data, protocol, 16), Err(DecodeError::PacketTooLarge { .. }));
                    prop_assert!(refused);
                }
            }
        }
    }
}
