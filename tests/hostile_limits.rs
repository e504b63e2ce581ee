//! Per-connection bounds against hostile clients (issue "Hostile input"): each bound is hit
//! by a raw client against the real binary, the offender alone is cut, memory stays bounded,
//! and the client can read why it was cut.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

/// A connected v5 client; CONNACK must be a success.
fn v5_client(b: &Broker, id: &str, props: &[u8]) -> RawClient {
    let mut c = RawClient::connect(b.addr());
    c.send(&connect_v5(id, 60, props));
    let ack = c.recv(WAIT).expect("CONNACK");
    assert_eq!((ack.first, ack.body[1]), (0x20, 0), "CONNACK refused");
    c
}

/// Reads packets until a DISCONNECT and returns its reason code (None: closed without one).
fn disconnect_reason(c: &mut RawClient) -> Option<u8> {
    loop {
        let p = c.recv(WAIT)?;
        if p.first == 0xE0 {
            return Some(p.body[0]);
        }
    }
}

/// Reads a variable byte integer at `at`; returns (value, bytes used).
fn varint(b: &[u8], at: usize) -> (usize, usize) {
    let (mut v, mut mult, mut i) = (0usize, 1usize, at);
    loop {
        let byte = b[i];
        v += (byte & 0x7F) as usize * mult;
        mult *= 128;
        i += 1;
        if byte & 0x80 == 0 {
            return (v, i - at);
        }
    }
}

/// (topic as sent, topic alias, payload) of a v5 QoS 0 PUBLISH.
fn publish_v5_parts(p: &Raw) -> (String, Option<u16>, Vec<u8>) {
    assert_eq!(p.kind(), 3, "expected PUBLISH, got {p:?}");
    let b = &p.body;
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    let topic = String::from_utf8(b[2..2 + n].to_vec()).unwrap();
    let mut at = 2 + n;
    if p.qos() > 0 {
        at += 2;
    }
    let (plen, used) = varint(b, at);
    at += used;
    let props = &b[at..at + plen];
    let mut alias = None;
    let mut i = 0;
    while i < props.len() {
        match props[i] {
            0x23 => {
                alias = Some(u16::from_be_bytes([props[i + 1], props[i + 2]]));
                i += 3;
            }
            other => panic!("unexpected property {other:#x} in {props:?}"),
        }
    }
    (topic, alias, b[at + plen..].to_vec())
}

/// Publishes `count` messages, each on its own topic `al/<i % distinct>` with the topic as
/// payload, to a v5 subscriber of Topic Alias Maximum `max`, and checks that every message
/// resolves (as a client resolves aliases) to the topic it was published on.
fn alias_churn(max: u16, distinct: usize, count: usize, extra: &[(&str, &str)]) {
    let mut env = vec![
        ("NODE__SHARDS", "1"),
        ("MQTT__MAX_QUEUED_MESSAGES", "1000000"),
    ];
    env.extend_from_slice(extra);
    let b = Broker::start(&env);
    let mut sub = v5_client(&b, "alias-sub", &[0x22, (max >> 8) as u8, max as u8]);
    sub.send(&subscribe_packet(5, 1, "al/#", 0));
    assert_eq!(sub.recv(WAIT).expect("SUBACK").kind(), 9);
    let (mut publisher, _) = RawClient::mqtt(b.addr(), "alias-pub", true);
    let mut batch = Vec::new();
    for i in 0..count {
        let topic = format!("al/{}", i % distinct);
        batch.extend(publish_packet(&topic, topic.as_bytes(), 0, 0, false, false));
        if batch.len() > 64 * 1024 {
            publisher.send(&batch);
            batch.clear();
        }
    }
    publisher.send(&batch);
    let mut known: std::collections::HashMap<u16, String> = Default::default();
    let mut used = std::collections::HashSet::new();
    for n in 0..count {
        let p = sub
            .recv(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("message {n} of {count} did not arrive"));
        let (topic, alias, payload) = publish_v5_parts(&p);
        let resolved = match alias {
            None => topic,
            Some(a) => {
                // MQTT-3.3.2-8/9: an alias is in 1..=the client's maximum.
                assert!(a >= 1 && a <= max, "alias {a} outside 1..={max}");
                used.insert(a);
                if topic.is_empty() {
                    known
                        .get(&a)
                        .cloned()
                        .expect("alias used before it was defined")
                } else {
                    known.insert(a, topic.clone());
                    topic
                }
            }
        };
        assert_eq!(
            resolved.as_bytes(),
            &payload[..],
            "message {n} arrived under another topic"
        );
    }
    assert!(used.len() <= max as usize);
    assert!(!used.is_empty(), "aliases were used");
    assert!(publisher.ping());
}

#[test]
fn alias_churn_with_a_small_alias_maximum_keeps_every_topic() {
    alias_churn(10, 37, 3000, &[]);
}

#[test]
fn alias_churn_past_65535_topics_never_sends_alias_0_or_a_stale_alias() {
    // A large byte budget, so that the count (not the bytes) is what forces reuse.
    alias_churn(
        u16::MAX,
        70_000,
        70_500,
        &[("MQTT__MAX_TOPIC_ALIAS_BYTES", "67108864")],
    );
}

#[test]
fn inbound_aliases_past_their_byte_budget_get_quota_exceeded() {
    let b = Broker::start(&[("MQTT__MAX_TOPIC_ALIAS_BYTES", "8192")]);
    let mut c = v5_client(&b, "alias-hog", &[]);
    for alias in 1..=100u16 {
        let topic = format!("hog/{alias}/{}", "x".repeat(1000));
        if !c.try_send(&publish_v5(
            &topic,
            0,
            0,
            &[0x23, (alias >> 8) as u8, alias as u8],
            b"",
        )) {
            break;
        }
    }
    assert_eq!(disconnect_reason(&mut c), Some(0x97));
    assert_broker_serves(&b);
}

#[test]
fn a_client_that_pings_without_reading_is_cut_and_memory_stays_bounded() {
    let b = Broker::start(&[]);
    let (mut other, _) = RawClient::mqtt(b.addr(), "bystander", true);
    let (mut hog, _) = RawClient::mqtt(b.addr(), "ping-hog", true);
    let before = b.rss_kib();
    let chunk = [0xC0u8, 0].repeat(32 * 1024);
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    // 20 MB of PINGREQ: about 280 MB of queued PINGRESP before the bound.
    while sent < 20 << 20 && Instant::now() < deadline {
        if hog.stream.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let log = b.log_with("does not read", WAIT);
    assert!(log.contains("does not read"), "the hog was not cut:\n{log}");
    let grown_kib = b.rss_kib().saturating_sub(before);
    eprintln!("ping hog: {sent} B of PINGREQ sent, RSS grew by {grown_kib} KiB");
    assert!(grown_kib < 64 * 1024, "RSS grew by {grown_kib} KiB");
    assert!(other.ping(), "the bystander was not served");
}

#[test]
fn partial_connects_larger_than_the_connect_limit_are_refused_at_once() {
    let b = Broker::start(&[]);
    let before = b.rss_kib();
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut c = RawClient::connect(b.addr());
        // CONNECT announcing 1,048,560 bytes of body (under max_packet_size), then 256 KiB.
        let mut head = vec![0x10, 0xF0, 0xFF, 0x3F];
        head.extend(field(b"MQTT"));
        c.try_send(&head);
        c.try_send(&vec![0u8; 256 * 1024]);
        clients.push(c);
    }
    for c in &mut clients {
        assert!(c.closed_within(WAIT), "a 1 MiB partial CONNECT was kept");
    }
    let grown_kib = b.rss_kib().saturating_sub(before);
    eprintln!("100 partial CONNECTs: RSS grew by {grown_kib} KiB");
    assert!(grown_kib < 32 * 1024, "RSS grew by {grown_kib} KiB");
    assert_broker_serves(&b);
}

#[test]
fn a_connect_with_a_will_under_the_connect_limit_is_accepted() {
    let b = Broker::start(&[("MQTT__MAX_CONNECT_PACKET_SIZE", "65536")]);
    let mut c = RawClient::connect(b.addr());
    let will = vec![b'w'; 60_000];
    c.send(&connect_packet(
        4,
        "big-will",
        true,
        60,
        Some(("w", &will, 0)),
    ));
    let ack = c.recv(WAIT).expect("CONNACK");
    assert_eq!((ack.first, ack.body[1]), (0x20, 0));
}

#[test]
fn v5_connect_with_an_authentication_method_gets_0x8c() {
    let b = Broker::start(&[]);
    let mut c = RawClient::connect(b.addr());
    let mut props = vec![0x15];
    props.extend(field(b"SCRAM-SHA-1"));
    c.send(&connect_v5("auth-method", 60, &props));
    let ack = c.recv(WAIT).expect("CONNACK");
    assert_eq!((ack.first, ack.body[1]), (0x20, 0x8C));
    assert!(c.closed_within(WAIT));
}

#[test]
fn persistent_sessions_from_one_address_are_capped_and_resumable() {
    // 2 shards: each takes ceil(10 / 2) = 5 sessions from 127.0.0.1.
    let b = Broker::start(&[("MQTT__MAX_SESSIONS_PER_IP", "10")]);
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for i in 0..40 {
        let id = format!("persist-{i}");
        let mut c = RawClient::connect(b.addr());
        c.send(&connect_packet(4, &id, false, 60, None));
        let ack = c.recv(WAIT).expect("CONNACK");
        match ack.body[1] {
            0 => {
                c.send(&[0xE0, 0]);
                accepted.push(id);
            }
            // 3.1.1 has no Quota exceeded: Server unavailable.
            3 => refused += 1,
            other => panic!("unexpected CONNACK code {other}"),
        }
    }
    assert!(
        (5..=10).contains(&accepted.len()),
        "{} persistent sessions accepted",
        accepted.len()
    );
    assert_eq!(accepted.len() + refused, 40);
    // Clean sessions are not capped, and a capped session still resumes.
    let _ = RawClient::mqtt(b.addr(), "clean-one", true);
    let (_, present) = RawClient::mqtt(b.addr(), &accepted[0], false);
    assert!(present, "the existing session was not resumed");
}

#[test]
fn qos2_awaiting_pubrel_of_a_311_client_is_bounded() {
    let b = Broker::start(&[("MQTT__MAX_AWAITING_REL", "5")]);
    let (mut c, _) = RawClient::mqtt(b.addr(), "rel-hog", true);
    for pid in 1..=5u16 {
        c.send(&publish_packet("q2", b"x", 2, pid, false, false));
        assert_eq!(c.recv(WAIT).expect("PUBREC").kind(), 5);
    }
    // A duplicate of an id already awaiting PUBREL is not a new one.
    c.send(&publish_packet("q2", b"x", 2, 1, true, false));
    assert_eq!(c.recv(WAIT).expect("PUBREC").kind(), 5);
    assert!(c.ping());
    c.send(&publish_packet("q2", b"x", 2, 6, false, false));
    assert!(
        c.closed_within(WAIT),
        "a sixth id awaiting PUBREL was accepted"
    );
    assert_broker_serves(&b);
}

#[test]
fn receive_maximum_exceeded_is_readable_while_the_client_keeps_writing() {
    let b = Broker::start(&[("MQTT__MAX_INFLIGHT", "2")]);
    let mut c = v5_client(&b, "keeps-writing", &[]);
    for pid in 1..=3u16 {
        c.send(&publish_v5("t", 2, pid, &[], b"x"));
    }
    // The client does not read yet: it goes on writing, as a pipelining client does.
    let more: Vec<u8> = (4..200u16)
        .flat_map(|pid| publish_v5("t", 2, pid, &[], &[0u8; 100]))
        .collect();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            c.try_send(&more),
            "the broker reset the connection before the client could read why"
        );
    }
    assert_eq!(disconnect_reason(&mut c), Some(0x93));
    assert!(c.closed_within(WAIT));
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_backs_off_and_serves_again_once_some_are_freed() {
    use std::os::unix::process::CommandExt;
    const FD_LIMIT: u64 = 96;
    let b = Broker::try_start_with(&[], |cmd| {
        // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: FD_LIMIT,
                    rlim_max: FD_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .unwrap_or_else(|log| panic!("broker did not start:\n{log}"));
    // Fill the descriptor table: the first client left without CONNACK is the one waiting in
    // the backlog.
    let mut held = Vec::new();
    let mut waiting = None;
    for i in 0..FD_LIMIT {
        let mut c = RawClient::connect(b.addr());
        c.send(&connect_packet(4, &format!("fd-{i}"), true, 0, None));
        match c.recv(Duration::from_secs(2)) {
            Some(ack) => {
                assert_eq!(ack.body[1], 0);
                held.push(c);
            }
            None => {
                waiting = Some(c);
                break;
            }
        }
    }
    let mut waiting = waiting.expect("the descriptor limit was never reached");
    let log_lines = |b: &Broker| b.log().matches("accept failed").count();
    let (ticks0, lines0) = (cpu_ticks(b.pid()), log_lines(&b));
    let held_for = Duration::from_secs(4);
    std::thread::sleep(held_for);
    let ticks = cpu_ticks(b.pid()) - ticks0;
    let lines = log_lines(&b) - lines0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let cpu = ticks as f64 / hz as f64 / held_for.as_secs_f64();
    eprintln!(
        "out of descriptors: {} clients held, {:.1}% of a core, {lines} log lines in {held_for:?}",
        held.len(),
        cpu * 100.0
    );
    assert!(
        cpu < 0.2,
        "the broker used {:.0}% of a core while out of descriptors",
        cpu * 100.0
    );
    // One line per shard per second at most (2 shards), not one per failure.
    assert!(lines <= 12, "{lines} accept log lines in {held_for:?}");
    assert!(
        held.last_mut().unwrap().ping(),
        "connected clients are still served"
    );
    held.truncate(held.len().saturating_sub(8));
    let ack = waiting
        .recv(WAIT)
        .expect("the waiting client is served once descriptors free");
    assert_eq!((ack.first, ack.body[1]), (0x20, 0));
    assert_broker_serves(&b);
}
