//! The retained store is bounded (`mqtt.max_retained_messages`, `mqtt.max_retained_bytes`):
//! past the limit a retained PUBLISH to a new topic is still delivered but not retained, and
//! what is retained can still be replaced and cleared.

mod common;

use common::*;
use std::time::Duration;

/// Topics of the retained messages a fresh subscriber to `filter` receives.
fn retained_topics(b: &Broker, id: &str, filter: &str) -> Vec<String> {
    let (mut c, _) = RawClient::mqtt(b.addr(), id, true);
    assert_eq!(c.subscribe(1, filter, 0), 0);
    let mut topics = Vec::new();
    while let Some(p) = c.recv(Duration::from_millis(700)) {
        assert!(p.retain(), "only retained messages here: {p:?}");
        topics.push(p.publish().0);
    }
    topics.sort();
    topics
}

#[test]
fn a_full_retained_store_refuses_new_topics_but_replaces_and_clears() {
    let b = Broker::start(&[("MQTT__MAX_RETAINED_MESSAGES", "3")]);
    let (mut live, _) = RawClient::mqtt(b.addr(), "live", true);
    assert_eq!(live.subscribe(1, "rl/#", 0), 0);
    let (mut p, _) = RawClient::mqtt(b.addr(), "retainer", true);
    for i in 0..5 {
        p.send(&publish_packet(&format!("rl/{i}"), b"v", 0, 0, false, true));
    }
    assert!(p.ping());
    // Every message is delivered live, retained or not.
    for _ in 0..5 {
        let m = live.recv(WAIT).expect("live delivery of every message");
        assert!(m.publish().0.starts_with("rl/"));
    }
    assert_eq!(retained_topics(&b, "s1", "rl/#"), ["rl/0", "rl/1", "rl/2"]);
    // Replacing a retained message still works at the limit; clearing one makes room.
    p.send(&publish_packet("rl/1", b"new", 0, 0, false, true));
    p.send(&publish_packet("rl/0", b"", 0, 0, false, true));
    p.send(&publish_packet("rl/4", b"v", 0, 0, false, true));
    assert!(p.ping());
    assert_eq!(retained_topics(&b, "s2", "rl/#"), ["rl/1", "rl/2", "rl/4"]);
    let log = b.log_with("retained store full", WAIT);
    assert!(log.contains("retained store full"), "{log}");
}

#[test]
fn retained_bytes_are_bounded() {
    let b = Broker::start(&[("MQTT__MAX_RETAINED_BYTES", "3000")]);
    let (mut p, _) = RawClient::mqtt(b.addr(), "retainer", true);
    let payload = vec![b'x'; 1000];
    for i in 0..5 {
        p.send(&publish_packet(
            &format!("rb/{i}"),
            &payload,
            0,
            0,
            false,
            true,
        ));
    }
    assert!(p.ping());
    // 1004 bytes each (topic + payload): two fit in 3000, the third does not.
    assert_eq!(retained_topics(&b, "s", "rb/#"), ["rb/0", "rb/1"]);
}
