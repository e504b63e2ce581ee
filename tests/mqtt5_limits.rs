//! MQTT 5 limits and server-sent DISCONNECT reason codes, with a raw client so that every byte
//! the broker sends back can be checked.

mod common;

use common::*;
use std::time::Duration;

fn v5_client(b: &Broker, id: &str, keep_alive: u16) -> RawClient {
    let mut c = RawClient::connect(b.addr());
    c.send(&connect_v5(id, keep_alive, &[]));
    let ack = c.recv(WAIT).expect("CONNACK");
    assert_eq!((ack.first, ack.body[1]), (0x20, 0));
    c
}

/// Reads packets until a DISCONNECT; returns its reason code and whether a reason string came.
fn disconnect_reason(c: &mut RawClient) -> (u8, bool) {
    loop {
        let p = c.recv(WAIT).expect("DISCONNECT");
        if p.first == 0xE0 {
            return (p.body[0], p.body.len() > 2 && p.body[2] == 0x1F);
        }
    }
}

#[test]
fn more_unacknowledged_qos2_than_receive_maximum_gets_0x93() {
    let b = Broker::start(&[("MQTT__MAX_INFLIGHT", "2")]);
    let mut c = v5_client(&b, "rm93", 60);
    for pid in 1..=3u16 {
        c.send(&publish_v5("t", 2, pid, &[], b"x"));
    }
    assert_eq!(disconnect_reason(&mut c).0, 0x93);
    assert!(c.closed_within(WAIT));
    assert_broker_serves(&b);
}

#[test]
fn keep_alive_timeout_gets_0x8d_with_a_reason_string() {
    let b = Broker::start(&[]);
    let mut c = v5_client(&b, "ka8d", 1);
    assert_eq!(disconnect_reason(&mut c), (0x8D, true));
}

#[test]
fn no_reason_string_when_the_client_opts_out_of_problem_information() {
    let b = Broker::start(&[]);
    let mut c = RawClient::connect(b.addr());
    // Request Problem Information = 0 (MQTT-3.1.2-29).
    c.send(&connect_v5("quiet8d", 1, &[0x17, 0x00]));
    assert_eq!(c.recv(WAIT).unwrap().first, 0x20);
    assert_eq!(disconnect_reason(&mut c), (0x8D, false));
}

#[test]
fn topic_deeper_than_the_limit_is_refused() {
    let b = Broker::start(&[("MQTT__MAX_TOPIC_LEVELS", "3")]);
    let mut s = v5_client(&b, "levels-sub", 60);
    s.send(&subscribe_packet(5, 1, "a/b/c/d", 0));
    let ack = s.recv(WAIT).unwrap();
    assert_eq!((ack.first, *ack.body.last().unwrap()), (0x90, 0x8F));
    let mut p = v5_client(&b, "levels-pub", 60);
    p.send(&publish_v5("a/b/c/d", 0, 0, &[], b"x"));
    assert_eq!(disconnect_reason(&mut p).0, 0x90);
    assert_broker_serves(&b);
}

#[test]
fn topic_alias_above_the_maximum_gets_0x94() {
    let b = Broker::start(&[("MQTT__MAX_TOPIC_ALIAS", "2")]);
    let mut c = v5_client(&b, "alias94", 60);
    c.send(&publish_v5("t", 0, 0, &[0x23, 0x00, 0x03], b"x"));
    assert_eq!(disconnect_reason(&mut c).0, 0x94);
    let mut unknown = v5_client(&b, "alias-unknown", 60);
    unknown.send(&publish_v5("", 0, 0, &[0x23, 0x00, 0x01], b"x"));
    assert_eq!(
        disconnect_reason(&mut unknown).0,
        0x82,
        "alias used before it was defined"
    );
}

#[test]
fn shared_message_in_flight_to_a_leaving_member_goes_to_another() {
    let b = Broker::start(&[]);
    let (mut a, _) = RawClient::mqtt(b.addr(), "redis-a", true);
    assert_eq!(a.subscribe(1, "$share/g/redis", 1), 1);
    let (mut other, _) = RawClient::mqtt(b.addr(), "redis-b", true);
    assert_eq!(other.subscribe(1, "$share/g/redis", 1), 1);
    let (mut p, _) = RawClient::mqtt(b.addr(), "redis-pub", true);
    // Round robin: one of the two gets the first message; make sure `a` holds one unacked.
    let mut held = None;
    for n in 0..4u8 {
        p.send(&publish_packet(
            "redis",
            &[n],
            1,
            n as u16 + 1,
            false,
            false,
        ));
        if let Some(m) = a.recv(Duration::from_millis(300)) {
            held = Some(m.publish().2);
            break;
        }
        let m = other.recv(WAIT).expect("delivered to the other member");
        other.send(&ack_packet(0x40, m.publish().1));
    }
    let held = held.expect("member a got a message");
    drop(a); // leaves without PUBACK
    let m = other
        .recv(WAIT)
        .expect("redispatched to the remaining member");
    assert_eq!(m.publish().2, held);
}

#[test]
fn full_queue_member_is_skipped_for_another() {
    let b = Broker::start(&[
        ("MQTT__MAX_QUEUED_MESSAGES", "1"),
        ("MQTT__MAX_INFLIGHT", "1"),
    ]);
    let (mut slow, _) = RawClient::mqtt(b.addr(), "skip-slow", true);
    assert_eq!(slow.subscribe(1, "$share/g/skip", 1), 1);
    let (mut fast, _) = RawClient::mqtt(b.addr(), "skip-fast", true);
    assert_eq!(fast.subscribe(1, "$share/g/skip", 1), 1);
    let (mut p, _) = RawClient::mqtt(b.addr(), "skip-pub", true);
    // One message at a time: `slow` never acknowledges, so after one in flight and one queued
    // it is full, and every later message must go to `fast`.
    let total = 20u16;
    let mut fast_got = 0;
    for n in 0..total {
        p.send(&publish_packet(
            "skip",
            &n.to_be_bytes(),
            1,
            n + 1,
            false,
            false,
        ));
        if let Some(m) = fast.recv(Duration::from_millis(300)) {
            fast.send(&ack_packet(0x40, m.publish().1));
            fast_got += 1;
        }
    }
    // Now `slow` acknowledges: its queued message follows, nothing else was kept for it.
    let mut slow_got = 0;
    while let Some(m) = slow.recv(Duration::from_millis(300)) {
        slow.send(&ack_packet(0x40, m.publish().1));
        slow_got += 1;
    }
    assert!(slow_got <= 2, "the full member kept receiving: {slow_got}");
    assert_eq!(
        fast_got + slow_got,
        total as usize,
        "fast {fast_got}, slow {slow_got}"
    );
}

/// A v5 SUBSCRIBE (no properties) of one filter with subscription options byte `options`.
fn subscribe_v5(pid: u16, filter: &str, options: u8) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.push(0);
    body.extend(field(filter.as_bytes()));
    body.push(options);
    packet(0x82, &body)
}

#[test]
fn invalid_subscription_options_get_0x82_and_reserved_bits_0x81() {
    let b = Broker::start(&[]);
    for (id, filter, options, reason) in [
        ("no-local-share", "$share/g/t", 0x04, 0x82), // MQTT-3.8.3-4
        ("qos-3", "t", 0x03, 0x82),
        ("retain-handling-3", "t", 0x30, 0x82),
        ("reserved-bits", "t", 0x40, 0x81), // MQTT-3.8.3-5
    ] {
        let mut c = v5_client(&b, id, 60);
        c.send(&subscribe_v5(1, filter, options));
        assert_eq!(disconnect_reason(&mut c).0, reason, "{id}");
        assert!(c.closed_within(WAIT), "{id}");
    }
    // No Local on an ordinary filter is fine.
    let mut c = v5_client(&b, "no-local", 60);
    c.send(&subscribe_v5(1, "t", 0x05));
    let ack = c.recv(WAIT).expect("SUBACK");
    assert_eq!((ack.first, *ack.body.last().unwrap()), (0x90, 0x01));
    assert_broker_serves(&b);
}

#[test]
fn a_message_of_exactly_the_clients_maximum_packet_size_is_delivered() {
    let b = Broker::start(&[]);
    // Maximum Packet Size 100 (0x27), no Topic Alias Maximum: aliases are off.
    let mut sub = RawClient::connect(b.addr());
    sub.send(&connect_v5("mps-sub", 60, &[0x27, 0, 0, 0, 100]));
    assert_eq!(sub.recv(WAIT).expect("CONNACK").body[1], 0);
    sub.send(&subscribe_v5(1, "mps/t", 0));
    assert_eq!(sub.recv(WAIT).expect("SUBACK").kind(), 9);
    let (mut publisher, _) = RawClient::mqtt(b.addr(), "mps-pub", true);
    // To the subscriber: 2 (fixed header) + 7 (topic) + 1 (no properties) + payload.
    publisher.send(&publish_packet("mps/t", &[b'x'; 90], 0, 0, false, false));
    publisher.send(&publish_packet("mps/t", &[b'y'; 91], 0, 0, false, false));
    let p = sub.recv(WAIT).expect("the 100-byte PUBLISH");
    assert_eq!((p.first, p.body.len()), (0x30, 98), "{p:?}");
    assert!(
        sub.ping(),
        "the 101-byte PUBLISH is not sent (MQTT-3.1.2-24)"
    );
}
