//! Hostile bytes: each case gets the spec's answer or a closed connection, and every other
//! client keeps being served (checked with a fresh publish/subscribe round trip each time).

mod common;

use common::*;
use std::time::Duration;

fn assert_closed_and_others_served(b: &Broker, bytes: &[u8], what: &str) {
    let (mut bystander, _) =
        RawClient::mqtt(b.addr(), &format!("bystander-{}", free_port()), false);
    assert_eq!(bystander.subscribe(1, "keep/#", 1), 1);
    let mut bad = RawClient::connect(b.addr());
    bad.try_send(bytes);
    assert!(bad.closed_within(WAIT), "{what}: connection not closed");
    assert!(bystander.ping(), "{what}: bystander lost");
    assert_broker_serves(b);
}

fn connected(b: &Broker, id: &str) -> RawClient {
    let (c, _) = RawClient::mqtt(b.addr(), id, true);
    c
}

#[test]
fn malformed_fixed_header_closes_the_connection() {
    let b = Broker::start(&[]);
    assert_closed_and_others_served(&b, &[0x00, 0x00], "packet type 0");
    let mut c = connected(&b, "qos3");
    c.send(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]);
    assert!(c.closed_within(WAIT), "PUBLISH with QoS 3");
    let mut c = connected(&b, "flags");
    c.send(&[0xC1, 0x00]);
    assert!(c.closed_within(WAIT), "PINGREQ with reserved flags");
    assert_broker_serves(&b);
}

#[test]
fn remaining_length_over_four_bytes_closes_the_connection() {
    let b = Broker::start(&[]);
    let mut c = connected(&b, "rl");
    c.send(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]);
    assert!(c.closed_within(WAIT));
    assert_closed_and_others_served(&b, &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], "CONNECT");
}

#[test]
fn packet_over_the_maximum_size_is_refused_before_its_body() {
    let b = Broker::start(&[("MQTT__MAX_PACKET_SIZE", "1024")]);
    let mut c = connected(&b, "big");
    // Only the fixed header of a 4 KiB publish: refused without waiting for the body.
    c.send(&[0x30, 0x80, 0x20]);
    assert!(c.closed_within(WAIT), "3.1.1 client not closed");
    let mut v5 = RawClient::connect(b.addr());
    v5.send(&connect_packet(5, "big5", true, 60, None));
    assert_eq!(v5.recv(WAIT).unwrap().first, 0x20);
    v5.send(&publish_packet("t", &[0u8; 4096], 0, 0, false, false));
    let d = v5.recv(WAIT).expect("DISCONNECT");
    assert_eq!(
        (d.first, d.body[0]),
        (0xE0, 0x95),
        "v5 DISCONNECT packet too large"
    );
    assert!(v5.closed_within(WAIT));
    assert_broker_serves(&b);
}

#[test]
fn publish_before_connect_is_refused_without_connack() {
    let b = Broker::start(&[]);
    let mut c = RawClient::connect(b.addr());
    c.send(&publish_packet("t", b"x", 0, 0, false, false));
    assert!(
        c.recv(Duration::from_secs(2)).is_none(),
        "no CONNACK or anything else"
    );
    assert_closed_and_others_served(
        &b,
        &publish_packet("t", b"x", 1, 1, false, false),
        "early PUBLISH",
    );
}

#[test]
fn second_connect_closes_the_connection() {
    let b = Broker::start(&[]);
    let mut c = connected(&b, "twice");
    c.send(&connect_packet(4, "twice", true, 60, None));
    assert!(c.closed_within(WAIT));
    assert_broker_serves(&b);
}

#[test]
fn unknown_protocol_level_gets_connack_refusal() {
    let b = Broker::start(&[]);
    let mut c = RawClient::connect(b.addr());
    let mut level6 = connect_packet(4, "lvl", true, 60, None);
    level6[8] = 6; // fixed header (2) + "MQTT" field (6) -> level byte
    c.send(&level6);
    let ack = c.recv(WAIT).expect("CONNACK");
    assert_eq!(ack.first, 0x20);
    assert!(
        matches!(ack.body[1], 0x01 | 0x84),
        "refusal code {:#x}",
        ack.body[1]
    );
    assert!(c.closed_within(WAIT));
    // 3.1 (MQIsdp, level 3) is spoken.
    let mut v31 = RawClient::connect(b.addr());
    let mut body = field(b"MQIsdp");
    body.extend_from_slice(&[3, 0x02, 0, 60]);
    body.extend(field(b"old-client"));
    v31.send(&packet(0x10, &body));
    assert_eq!(v31.recv(WAIT).unwrap().body, vec![0, 0]);
    assert_broker_serves(&b);
}

#[test]
fn invalid_utf8_topic_closes_the_connection() {
    let b = Broker::start(&[]);
    let mut c = connected(&b, "utf8");
    c.send(&packet(0x30, &[0x00, 0x02, 0xC3, 0x28, b'x']));
    assert!(c.closed_within(WAIT));
    assert_broker_serves(&b);
}

#[test]
fn wildcard_in_a_publish_topic_closes_the_connection() {
    let b = Broker::start(&[]);
    let (mut sub, _) = RawClient::mqtt(b.addr(), "wild-sub", true);
    assert_eq!(sub.subscribe(1, "a/#", 0), 0);
    let mut c = connected(&b, "wild-pub");
    c.send(&publish_packet("a/+", b"x", 0, 0, false, false));
    assert!(c.closed_within(WAIT));
    assert!(
        sub.recv(Duration::from_millis(300)).is_none(),
        "wildcard publish was routed"
    );
    assert_broker_serves(&b);
}

#[test]
fn invalid_filter_is_refused_in_suback() {
    let b = Broker::start(&[]);
    let mut c = connected(&b, "badfilter");
    assert_eq!(
        c.subscribe(1, "a/#/b", 1),
        0x80,
        "3.1.1 failure return code"
    );
    let mut p = connected(&b, "badfilter-pub");
    p.send(&publish_packet("a/x/b", b"x", 0, 0, false, false));
    assert!(
        c.recv(Duration::from_millis(300)).is_none(),
        "the invalid filter matched"
    );
    let mut v5 = RawClient::connect(b.addr());
    v5.send(&connect_packet(5, "badfilter5", true, 60, None));
    assert_eq!(v5.recv(WAIT).unwrap().first, 0x20);
    v5.send(&subscribe_packet(5, 1, "a/#/b", 1));
    let ack = v5.recv(WAIT).unwrap();
    assert_eq!(
        (ack.first, *ack.body.last().unwrap()),
        (0x90, 0x8F),
        "v5 topic filter invalid"
    );
}

#[test]
fn client_that_never_completes_connect_is_closed() {
    let b = Broker::start(&[("MQTT__CONNECT_TIMEOUT_MS", "500")]);
    let mut silent = RawClient::connect(b.addr());
    let mut half = RawClient::connect(b.addr());
    let full = connect_packet(4, "slow", true, 60, None);
    half.send(&full[..5]); // slowloris: a CONNECT that never ends
    assert!(
        silent.closed_within(Duration::from_secs(3)),
        "silent client"
    );
    assert!(half.closed_within(Duration::from_secs(3)), "half CONNECT");
    assert_broker_serves(&b);
}

#[test]
fn garbage_after_connect_closes_only_that_connection() {
    let b = Broker::start(&[]);
    let mut c = connected(&b, "garbage");
    c.send(b"\xFF\xFF\xFF\xFF\xFF garbage");
    assert!(c.closed_within(WAIT));
    assert_broker_serves(&b);
}

#[test]
fn subscriber_that_stops_reading_is_bounded_and_others_keep_their_messages() {
    let b = Broker::start(&[("MQTT__MAX_QUEUED_MESSAGES", "100")]);
    let rss_before = b.rss_kib();
    // A persistent session that is offline keeps its queued QoS 1 messages.
    let (mut offline, _) = RawClient::mqtt(b.addr(), "flood-offline", false);
    assert_eq!(offline.subscribe(1, "flood/keep", 1), 1);
    drop(offline);
    // A subscriber with a tiny receive buffer that never reads.
    let stuck = {
        let s = socket_with_small_buffer(b.addr());
        let mut c = RawClient::from_stream(s);
        c.send(&connect_packet(4, "flood-stuck", true, 60, None));
        assert_eq!(c.recv(WAIT).unwrap().first, 0x20);
        c.send(&subscribe_packet(4, 1, "flood/#", 0));
        assert_eq!(c.recv(WAIT).unwrap().kind(), 9);
        c
    };
    let (mut healthy, _) = RawClient::mqtt(b.addr(), "flood-healthy", true);
    assert_eq!(healthy.subscribe(1, "flood/data", 0), 0);
    let total = 20_000;
    // The healthy subscriber reads continuously on its own thread; the publisher sends in
    // bursts it can absorb, so every loss would be the stuck subscriber's fault.
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let reader = std::thread::spawn(move || {
        while seen.load(std::sync::atomic::Ordering::Relaxed) < total
            && healthy.recv(Duration::from_secs(3)).is_some()
        {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let (mut p, _) = RawClient::mqtt(b.addr(), "flood-pub", true);
    let payload = vec![7u8; 1024];
    let burst = 100;
    for i in 0..total {
        p.send(&publish_packet("flood/data", &payload, 0, 0, false, false));
        if i % burst == burst - 1 {
            let deadline = std::time::Instant::now() + WAIT;
            while count.load(std::sync::atomic::Ordering::Relaxed) < i + 1
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    for n in 0..5u16 {
        p.send(&publish_packet(
            "flood/keep",
            &[n as u8],
            1,
            n + 1,
            false,
            false,
        ));
    }
    reader.join().unwrap();
    let received = count.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(received, total, "healthy subscriber lost messages");
    let rss_growth_mib = (b.rss_kib().saturating_sub(rss_before)) / 1024;
    assert!(rss_growth_mib < 300, "broker grew by {rss_growth_mib} MiB");
    let (mut back, present) = RawClient::mqtt(b.addr(), "flood-offline", false);
    assert!(present);
    for n in 0..5u8 {
        let m = back.recv(WAIT).expect("queued message kept");
        assert_eq!(m.publish().2, vec![n]);
        back.send(&ack_packet(0x40, m.publish().1));
    }
    drop(stuck);
    assert_broker_serves(&b);
}

fn socket_with_small_buffer(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::AsRawFd;
    let stream = std::net::TcpStream::connect(addr).unwrap();
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt with a live int on a socket we own.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    stream
}
