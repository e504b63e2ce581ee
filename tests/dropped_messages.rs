//! Drops by design are visible: each dropped message is counted under its reason (and in the
//! total) in the management API's metrics, and a v5 publisher whose QoS 1 message matched no
//! subscriber is told so (PUBACK 0x10, as EMQX does).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `GET /api/v5/metrics` as (name, value) pairs, retried until the API answers (5 s).
fn metrics(api: u16) -> Vec<(String, i64)> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", api)) {
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(b"GET /api/v5/metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                let body = body.trim().trim_start_matches('{').trim_end_matches('}');
                return body
                    .split(',')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once(':')?;
                        Some((k.trim_matches('"').to_string(), v.parse().ok()?))
                    })
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "management API not answering");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(m: &[(String, i64)], name: &str) -> i64 {
    m.iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in {m:?}"))
        .1
}

/// The reason code of the v5 PUBACK for `pid` (0 when the PUBACK has none).
fn puback_reason(c: &mut RawClient, pid: u16) -> u8 {
    let ack = c.recv(WAIT).expect("PUBACK");
    assert_eq!(ack.kind(), 4, "not a PUBACK: {ack:?}");
    assert_eq!(u16::from_be_bytes([ack.body[0], ack.body[1]]), pid);
    ack.body.get(2).copied().unwrap_or(0)
}

#[test]
fn messages_dropped_by_design_are_counted_per_reason_and_a_v5_publisher_hears_no_subscribers() {
    let api = free_port();
    let bind = format!("127.0.0.1:{api}");
    let b = Broker::start(&[
        ("MANAGEMENT__BIND", bind.as_str()),
        ("MQTT__MAX_QUEUED_MESSAGES", "3"),
        ("MQTT__QUEUE_QOS0", "false"),
    ]);
    // An offline persistent session with one QoS 1 subscription.
    let (mut sub, _) = RawClient::mqtt(b.addr(), "dropped-sub", false);
    assert_eq!(sub.subscribe(1, "drop/t", 1), 1);
    sub.send(&packet(0xE0, &[]));
    assert!(sub.closed_within(WAIT));

    let mut publisher = RawClient::connect(b.addr());
    publisher.send(&connect_v5("dropped-pub", 30, &[]));
    let ack = publisher.recv(WAIT).expect("CONNACK");
    assert_eq!((ack.first, ack.body[1]), (0x20, 0));
    // Five QoS 1 messages into a queue of three: two dropped, all five acknowledged.
    for pid in 1..=5 {
        publisher.send(&publish_v5(
            "drop/t",
            1,
            pid,
            &[],
            pid.to_string().as_bytes(),
        ));
        assert_eq!(puback_reason(&mut publisher, pid), 0x00);
    }
    // QoS 0 for the offline session is not queued (mqtt.queue_qos0 = false).
    publisher.send(&{
        let mut body = field(b"drop/t");
        body.push(0);
        body.extend_from_slice(b"q0");
        packet(0x30, &body)
    });
    // Nobody subscribed: 0x10 No matching subscribers (a success code: MQTT-3.4.2.1).
    publisher.send(&publish_v5("drop/nobody", 1, 6, &[], b"6"));
    assert_eq!(puback_reason(&mut publisher, 6), 0x10);

    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = metrics(api);
        if get(&m, "messages_dropped_total") >= 4 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(get(&m, "messages_dropped_queue_full_total"), 2, "{m:?}");
    assert_eq!(get(&m, "messages_dropped_qos0_offline_total"), 1, "{m:?}");
    assert_eq!(get(&m, "messages_dropped_no_subscribers_total"), 1, "{m:?}");
    assert_eq!(get(&m, "messages_dropped_total"), 4, "{m:?}");

    // The session kept the newest three (drop_oldest): 3, 4, 5.
    let (mut sub, present) = RawClient::mqtt(b.addr(), "dropped-sub", false);
    assert!(present);
    let mut got = Vec::new();
    while got.len() < 3 {
        let p = sub.recv(WAIT).expect("queued PUBLISH");
        let (_, pid, payload) = p.publish();
        sub.send(&ack_packet(0x40, pid));
        got.push(String::from_utf8(payload).unwrap());
    }
    assert_eq!(got, ["3", "4", "5"]);
    assert!(sub.recv(Duration::from_millis(300)).is_none());
}
