//! Round trips and refusals of the codec, packet by packet.

use super::*;

fn round_trip(p: &Packet, proto: Protocol) {
    let mut out = BytesMut::new();
    encode(p, proto, &mut out);
    let (got, used) = decode(&out, proto, u32::MAX).unwrap().unwrap();
    assert_eq!(&got, p);
    assert_eq!(used, out.len());
    for cut in 0..out.len() {
        assert_eq!(
            decode(&out[..cut], proto, u32::MAX).unwrap(),
            None,
            "prefix {cut}"
        );
    }
}

#[test]
fn spec_connect_311_decodes() {
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 60, client id "c1".
    let bytes = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
    ];
    let (p, n) = decode(&bytes, Protocol::V311, 1024).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    let Packet::Connect(c) = p else {
        panic!("not CONNECT")
    };
    assert_eq!(
        (
            c.protocol,
            c.clean_start,
            c.keep_alive,
            c.client_id.as_str()
        ),
        (Protocol::V311, true, 60, "c1")
    );
}

#[test]
fn remaining_length_of_five_bytes_is_rejected() {
    let bytes = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
    assert_eq!(
        decode(&bytes, Protocol::V311, u32::MAX),
        Err(DecodeError::BadRemainingLength)
    );
}

#[test]
fn oversized_packet_is_refused_from_its_header_alone() {
    let bytes = [0x30, 0x80, 0x80, 0x01];
    assert!(matches!(
        decode(&bytes, Protocol::V311, 1024),
        Err(DecodeError::PacketTooLarge { .. })
    ));
}

/// A v5 SUBSCRIBE (packet id 1, no properties) of one filter with options byte `o`.
fn v5_subscribe(filter: &str, o: u8) -> Vec<u8> {
    let mut body = vec![0, 1, 0, 0, filter.len() as u8];
    body.extend_from_slice(filter.as_bytes());
    body.push(o);
    let mut bytes = vec![0x82, body.len() as u8];
    bytes.extend(body);
    bytes
}

#[test]
fn every_valid_subscription_options_byte_round_trips_and_the_others_are_refused() {
    for b in 0u8..0x40 {
        let valid = b & 3 != 3 && (b >> 4) & 3 != 3;
        match SubscriptionOptions::from_byte(b) {
            Ok(o) => {
                assert!(valid, "{b:#04x} accepted");
                assert_eq!(o.to_byte(), b);
                // The codec reads and writes the same byte.
                let Ok(Some((Packet::Subscribe(s), _))) =
                    decode(&v5_subscribe("a", b), Protocol::V5, 1024)
                else {
                    panic!("{b:#04x} not decoded");
                };
                assert_eq!(s.filters[0].1, o);
                let mut out = BytesMut::new();
                encode(&Packet::Subscribe(s), Protocol::V5, &mut out);
                assert_eq!(out.to_vec(), v5_subscribe("a", b));
            }
            Err(_) => assert!(!valid, "{b:#04x} refused"),
        }
    }
}

#[test]
fn v5_subscription_options_errors_are_classed_as_the_spec_says() {
    let d = |b: Vec<u8>| decode(&b, Protocol::V5, 1024);
    // 3.8.3.1: QoS 3 and retain handling 3 are protocol errors ...
    assert!(matches!(
        d(v5_subscribe("a", 0x03)),
        Err(DecodeError::Protocol(_))
    ));
    assert!(matches!(
        d(v5_subscribe("a", 0x30)),
        Err(DecodeError::Protocol(_))
    ));
    // ... so is No Local on a shared subscription (MQTT-3.8.3-4) ...
    assert!(matches!(
        d(v5_subscribe("$share/g/a", 0x04)),
        Err(DecodeError::Protocol(_))
    ));
    assert!(d(v5_subscribe("a", 0x04)).unwrap().is_some());
    assert!(d(v5_subscribe("$share/g/a", 0x01)).unwrap().is_some());
    // ... while reserved bits make the packet malformed (MQTT-3.8.3-5).
    assert!(matches!(
        d(v5_subscribe("a", 0x40)),
        Err(DecodeError::Malformed(_))
    ));
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        ReasonCode::ProtocolError
    );
}

#[test]
fn publish_with_qos_3_is_malformed() {
    let bytes = [0x36, 3, 0, 1, b'a'];
    assert!(matches!(
        decode(&bytes, Protocol::V311, 1024),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn invalid_utf8_topic_is_rejected() {
    let bytes = [0x30, 4, 0, 2, 0xC3, 0x28];
    assert_eq!(
        decode(&bytes, Protocol::V311, 1024),
        Err(DecodeError::InvalidUtf8)
    );
    let nul = [0x30, 4, 0, 2, b'a', 0];
    assert_eq!(
        decode(&nul, Protocol::V311, 1024),
        Err(DecodeError::InvalidUtf8)
    );
}

#[test]
fn reserved_flags_are_checked() {
    assert!(
        decode(&[0x80, 5, 0, 1, 0, 1, b'a'], Protocol::V311, 1024).is_err(),
        "SUBSCRIBE flags 0"
    );
    assert!(
        decode(&[0xC1, 0], Protocol::V311, 1024).is_err(),
        "PINGREQ flags 1"
    );
    assert!(decode(&[0x00, 0], Protocol::V311, 1024).is_err(), "type 0");
    assert!(
        decode(&[0xF0, 0], Protocol::V311, 1024).is_err(),
        "AUTH in 3.1.1"
    );
}

#[test]
fn unknown_protocol_level_is_reported_with_its_level() {
    let bytes = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 0];
    assert!(matches!(
        decode(&bytes, Protocol::V311, 1024),
        Err(DecodeError::UnsupportedProtocol { level: 6, .. })
    ));
}

#[test]
fn empty_subscribe_is_a_protocol_error() {
    assert!(matches!(
        decode(&[0x82, 2, 0, 1], Protocol::V311, 1024),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn duplicate_property_is_a_protocol_error() {
    // PUBACK v5 with reason 0 and two reason strings.
    let bytes = [0x40, 10, 0, 1, 0, 6, 0x1F, 0, 0, 0x1F, 0, 0];
    assert!(matches!(
        decode(&bytes, Protocol::V5, 1024),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn packets_round_trip_in_every_protocol() {
    let mut props = Properties::default();
    props.user_properties.push(("k".into(), "v".into()));
    props.message_expiry_interval = Some(30);
    props.subscription_identifiers = vec![1, 300];
    props.correlation_data = Some(Bytes::from_static(b"x"));
    for proto in [Protocol::V31, Protocol::V311, Protocol::V5] {
        let v5 = proto.is_v5();
        let pr = |p: &Properties| if v5 { p.clone() } else { Properties::default() };
        round_trip(
            &Packet::Publish(Publish {
                dup: true,
                qos: QoS::ExactlyOnce,
                retain: true,
                topic: "a/b".into(),
                packet_id: 9,
                payload: Bytes::from_static(b"hello"),
                properties: pr(&props),
            }),
            proto,
        );
        round_trip(
            &Packet::Connect(Box::new(Connect {
                protocol: proto,
                clean_start: false,
                keep_alive: 30,
                client_id: "id".into(),
                will: Some(Will {
                    topic: "w".into(),
                    payload: Bytes::from_static(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: Properties::default(),
                }),
                username: Some("u".into()),
                password: Some(Bytes::from_static(b"p")),
                properties: Properties::default(),
            })),
            proto,
        );
        let opts = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        round_trip(
            &Packet::Subscribe(Subscribe {
                packet_id: 3,
                filters: vec![
                    ("a/#".into(), opts),
                    ("b".into(), SubscriptionOptions::default()),
                ],
                properties: Properties::default(),
            }),
            proto,
        );
        round_trip(
            &Packet::SubAck(SubAck {
                packet_id: 3,
                reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::UnspecifiedError],
                properties: Properties::default(),
            }),
            proto,
        );
        round_trip(
            &Packet::Unsubscribe(Unsubscribe {
                packet_id: 4,
                filters: vec!["a/#".into()],
                properties: Properties::default(),
            }),
            proto,
        );
        round_trip(
            &Packet::PubRel(PubResp {
                packet_id: 5,
                ..Default::default()
            }),
            proto,
        );
        round_trip(&Packet::PingReq, proto);
        round_trip(&Packet::Disconnect(Disconnect::default()), proto);
        round_trip(
            &Packet::ConnAck(ConnAck {
                session_present: true,
                ..Default::default()
            }),
            proto,
        );
    }
    let ack_props = Properties {
        reason_string: Some("why".into()),
        ..Default::default()
    };
    round_trip(
        &Packet::PubAck(PubResp {
            packet_id: 1,
            reason: ReasonCode::NoMatchingSubscribers,
            properties: ack_props.clone(),
        }),
        Protocol::V5,
    );
    round_trip(
        &Packet::Disconnect(Disconnect {
            reason: ReasonCode::SessionTakenOver,
            properties: ack_props,
        }),
        Protocol::V5,
    );
    round_trip(
        &Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reasons: vec![ReasonCode::NoSubscriptionExisted],
            properties: Properties::default(),
        }),
        Protocol::V5,
    );
}

#[test]
fn publish_header_plus_payload_equals_full_encoding() {
    let p = Publish {
        qos: QoS::AtLeastOnce,
        topic: "t".into(),
        packet_id: 1,
        payload: Bytes::from(vec![7u8; 300]),
        ..Default::default()
    };
    let mut full = BytesMut::new();
    encode(&Packet::Publish(p.clone()), Protocol::V311, &mut full);
    let mut head = BytesMut::new();
    let n = encode_publish_header(&p, Protocol::V311, &mut head);
    assert_eq!(n, head.len());
    head.extend_from_slice(&p.payload);
    assert_eq!(head, full);
}

/// Every property set once (subscription ids and user properties twice).
fn every_property() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(0x0102_0304),
        content_type: Some("ct".into()),
        response_topic: Some("rt".into()),
        correlation_data: Some(Bytes::from_static(b"cd")),
        subscription_identifiers: vec![1, 200],
        session_expiry_interval: Some(5),
        assigned_client_identifier: Some("id".into()),
        server_keep_alive: Some(6),
        authentication_method: Some("am".into()),
        authentication_data: Some(Bytes::from_static(b"ad")),
        request_problem_information: Some(0),
        will_delay_interval: Some(7),
        request_response_information: Some(1),
        response_information: Some("ri".into()),
        server_reference: Some("sr".into()),
        reason_string: Some("rs".into()),
        receive_maximum: Some(8),
        topic_alias_maximum: Some(9),
        topic_alias: Some(10),
        maximum_qos: Some(1),
        retain_available: Some(0),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        maximum_packet_size: Some(11),
        wildcard_subscription_available: Some(1),
        subscription_identifier_available: Some(0),
        shared_subscription_available: Some(1),
    }
}

#[test]
fn property_block_bytes_do_not_change_and_connack_properties_round_trip() {
    let mut out = BytesMut::new();
    encode_message_properties(&every_property(), &mut out);
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    // Pinned from the encoder before the property table: identifiers in ascending order.
    assert_eq!(
        hex,
        "70010102010203040300026374080002727409000263640b010bc801110000000512000269641300061500\
         02616d16000261641700180000000719011a000272691c000273721f0002727321000822000923000a2401\
         25002600016b0001762600016b000177270000000b280129002a01"
    );
    // The decoder reads back every property a CONNACK may carry.
    let mut out = BytesMut::new();
    let mut p = every_property();
    p.subscription_identifiers.clear();
    p.payload_format_indicator = None;
    p.request_problem_information = None;
    p.request_response_information = None;
    p.message_expiry_interval = None;
    p.will_delay_interval = None;
    p.topic_alias = None;
    p.content_type = None;
    p.response_topic = None;
    p.correlation_data = None;
    encode(
        &Packet::ConnAck(ConnAck {
            properties: p.clone(),
            ..Default::default()
        }),
        Protocol::V5,
        &mut out,
    );
    let Ok(Some((Packet::ConnAck(c), _))) = decode(&out, Protocol::V5, u32::MAX) else {
        panic!("CONNACK with every CONNACK property not decoded");
    };
    assert_eq!(c.properties, p);
}
