//! MQTT 3.1.1 semantics against a real broker process, with rumqttc (an independent client)
//! and a raw client for what rumqttc cannot be made to do (withhold acks, resend with DUP).

mod common;

use common::v311::Client;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_round_trip_at_the_lower_of_publish_and_subscription_qos() {
    let b = Broker::start(&[]);
    let mut sub = Client::connect(&b, "qos-sub", true).await;
    sub.subscribe("q/0", 0).await;
    sub.subscribe("q/1", 1).await;
    sub.subscribe("q/2", 2).await;
    let publisher = Client::connect(&b, "qos-pub", true).await;
    for (topic, sub_qos) in [("q/0", 0u8), ("q/1", 1), ("q/2", 2)] {
        for pub_qos in 0..=2u8 {
            publisher
                .publish(topic, format!("{pub_qos}"), pub_qos, false)
                .await;
            let m = sub.next().await;
            assert_eq!(m.topic, topic);
            assert_eq!(m.payload.as_ref(), format!("{pub_qos}").as_bytes());
            assert_eq!(
                m.qos as u8,
                pub_qos.min(sub_qos),
                "{topic} published at {pub_qos}"
            );
        }
    }
}

#[test]
fn qos2_duplicate_before_pubrel_is_delivered_once() {
    let b = Broker::start(&[]);
    let (mut sub, _) = RawClient::mqtt(b.addr(), "eo-sub", true);
    assert_eq!(sub.subscribe(1, "eo/t", 2), 2);
    let (mut p, _) = RawClient::mqtt(b.addr(), "eo-pub", true);
    p.send(&publish_packet("eo/t", b"once", 2, 7, false, false));
    let rec = p.recv(WAIT).unwrap();
    assert_eq!(
        (rec.first, rec.body.clone()),
        (0x50, vec![0, 7]),
        "PUBREC 7"
    );
    p.send(&publish_packet("eo/t", b"once", 2, 7, true, false));
    let rec = p.recv(WAIT).unwrap();
    assert_eq!(
        (rec.first, rec.body.clone()),
        (0x50, vec![0, 7]),
        "PUBREC 7 again"
    );
    p.send(&ack_packet(0x62, 7));
    let comp = p.recv(WAIT).unwrap();
    assert_eq!((comp.first, comp.body), (0x70, vec![0, 7]), "PUBCOMP 7");
    let m = sub.recv(WAIT).unwrap();
    assert_eq!(m.publish().2, b"once");
    sub.send(&ack_packet(0x50, m.publish().1));
    let rel = sub.recv(WAIT).unwrap();
    assert_eq!(rel.first, 0x62);
    sub.send(&ack_packet(0x70, m.publish().1));
    assert!(
        sub.recv(Duration::from_millis(500)).is_none(),
        "delivered twice"
    );
}

#[test]
fn unacknowledged_qos1_is_redelivered_with_dup_on_resume() {
    let b = Broker::start(&[]);
    let (mut sub, present) = RawClient::mqtt(b.addr(), "dup-sub", false);
    assert!(!present);
    assert_eq!(sub.subscribe(1, "dup/t", 1), 1);
    let (mut p, _) = RawClient::mqtt(b.addr(), "dup-pub", true);
    p.send(&publish_packet("dup/t", b"m1", 1, 1, false, false));
    let first = sub.recv(WAIT).unwrap();
    assert!(!first.dup());
    drop(sub); // no PUBACK
    std::thread::sleep(Duration::from_millis(200));
    let (mut again, present) = RawClient::mqtt(b.addr(), "dup-sub", false);
    assert!(present, "session present");
    let m = again.recv(WAIT).expect("redelivery");
    assert!(m.dup(), "DUP set on redelivery");
    assert_eq!(m.publish().2, b"m1");
    assert_eq!(m.publish().1, first.publish().1, "same packet id");
}

#[test]
fn qos2_resume_resends_publish_then_pubrel() {
    let b = Broker::start(&[]);
    let (mut sub, _) = RawClient::mqtt(b.addr(), "q2r-sub", false);
    assert_eq!(sub.subscribe(1, "q2r/t", 2), 2);
    let (mut p, _) = RawClient::mqtt(b.addr(), "q2r-pub", true);
    p.send(&publish_packet("q2r/t", b"a", 2, 1, false, false));
    p.send(&ack_packet(0x62, 1));
    p.send(&publish_packet("q2r/t", b"b", 2, 2, false, false));
    p.send(&ack_packet(0x62, 2));
    let a = sub.recv(WAIT).unwrap();
    let bmsg = sub.recv(WAIT).unwrap();
    // PUBREC only the first: it moves to the PUBREL stage; the second stays unacknowledged.
    sub.send(&ack_packet(0x50, a.publish().1));
    assert_eq!(sub.recv(WAIT).unwrap().first, 0x62);
    drop(sub);
    std::thread::sleep(Duration::from_millis(200));
    let (mut again, present) = RawClient::mqtt(b.addr(), "q2r-sub", false);
    assert!(present);
    let r1 = again.recv(WAIT).unwrap();
    let r2 = again.recv(WAIT).unwrap();
    let kinds = [(r1.first & 0xF0, r1.dup()), (r2.first & 0xF0, r2.dup())];
    assert!(kinds.contains(&(0x60, false)), "PUBREL resent: {kinds:?}");
    assert!(
        kinds.contains(&(0x30, true)),
        "PUBLISH resent with DUP: {kinds:?}"
    );
    let resent = if r1.kind() == 3 { r1 } else { r2 };
    assert_eq!(resent.publish().2, bmsg.publish().2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let b = Broker::start(&[]);
    let mut sub = Client::connect(&b, "ov-sub", true).await;
    sub.subscribe("a/+", 1).await;
    sub.subscribe("a/#", 2).await;
    sub.subscribe("a/b", 0).await;
    let p = Client::connect(&b, "ov-pub", true).await;
    p.publish("a/b", "x", 2, false).await;
    let m = sub.next().await;
    assert_eq!(m.qos as u8, 2);
    sub.nothing_for(Duration::from_millis(500)).await;
}

#[test]
fn same_client_id_takes_over_across_shards() {
    let b = Broker::start(&[]);
    let mut previous: Option<RawClient> = None;
    for _ in 0..6 {
        let (mut c, _) = RawClient::mqtt(b.addr(), "takeover-me", true);
        if let Some(mut old) = previous.take() {
            assert!(
                old.closed_within(WAIT),
                "the previous connection was not closed"
            );
        }
        assert!(c.ping());
        previous = Some(c);
    }
}

#[test]
fn v5_takeover_sends_disconnect_0x8e_first() {
    let b = Broker::start(&[]);
    let mut old = RawClient::connect(b.addr());
    old.send(&connect_packet(5, "take5", true, 60, None));
    assert_eq!(old.recv(WAIT).unwrap().first, 0x20);
    let mut new = RawClient::connect(b.addr());
    new.send(&connect_packet(5, "take5", true, 60, None));
    assert_eq!(new.recv(WAIT).unwrap().first, 0x20);
    let d = old.recv(WAIT).expect("DISCONNECT");
    assert_eq!((d.first, d.body[0]), (0xE0, 0x8E));
    assert!(old.closed_within(WAIT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_queues_in_order_and_clean_session_discards() {
    let b = Broker::start(&[]);
    let sub = Client::connect(&b, "ps-sub", false).await;
    sub.subscribe("ps/t", 1).await;
    sub.disconnect().await;
    let p = Client::connect(&b, "ps-pub", true).await;
    for i in 0..10 {
        p.publish("ps/t", format!("{i}"), 1, false).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sub = Client::connect(&b, "ps-sub", false).await;
    assert!(sub.session_present);
    let got: Vec<String> = sub
        .collect(10)
        .await
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(got, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
    sub.disconnect().await;
    p.publish("ps/t", "lost", 1, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut clean = Client::connect(&b, "ps-sub", true).await;
    assert!(!clean.session_present);
    clean.nothing_for(Duration::from_millis(500)).await;
}

async fn queue_policy(policy: &str) -> Vec<String> {
    let b = Broker::start(&[
        ("MQTT__MAX_QUEUED_MESSAGES", "5"),
        ("MQTT__QUEUE_DROP_POLICY", policy),
    ]);
    let sub = Client::connect(&b, "bq-sub", false).await;
    sub.subscribe("bq/t", 1).await;
    sub.disconnect().await;
    let p = Client::connect(&b, "bq-pub", true).await;
    for i in 1..=10 {
        p.publish("bq/t", format!("{i}"), 1, false).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sub = Client::connect(&b, "bq-sub", false).await;
    let got = sub
        .collect(5)
        .await
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    sub.nothing_for(Duration::from_millis(400)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_queue_drops_oldest_by_default() {
    assert_eq!(
        queue_policy("drop_oldest").await,
        ["6", "7", "8", "9", "10"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_queue_can_drop_newest() {
    assert_eq!(queue_policy("drop_newest").await, ["1", "2", "3", "4", "5"]);
}

#[test]
fn keep_alive_expires_after_one_and_a_half_intervals() {
    let b = Broker::start(&[]);
    let mut idle = RawClient::connect(b.addr());
    idle.send(&connect_packet(4, "ka-idle", true, 1, None));
    assert_eq!(idle.recv(WAIT).unwrap().first, 0x20);
    assert!(
        !idle.closed_within(Duration::from_millis(900)),
        "closed before 1.5 x keep-alive"
    );
    assert!(
        idle.closed_within(Duration::from_secs(3)),
        "not closed after 1.5 x keep-alive"
    );
    let mut busy = RawClient::connect(b.addr());
    busy.send(&connect_packet(4, "ka-busy", true, 1, None));
    assert_eq!(busy.recv(WAIT).unwrap().first, 0x20);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(busy.ping(), "a pinging client stays connected");
    }
}

#[test]
fn will_is_published_on_abnormal_close_only() {
    let b = Broker::start(&[]);
    let (mut watcher, _) = RawClient::mqtt(b.addr(), "will-watch", true);
    assert_eq!(watcher.subscribe(1, "will/#", 1), 1);
    let mut dying = RawClient::connect(b.addr());
    dying.send(&connect_packet(
        4,
        "will-dying",
        true,
        60,
        Some(("will/dying", b"gone", 1)),
    ));
    assert_eq!(dying.recv(WAIT).unwrap().first, 0x20);
    drop(dying);
    let m = watcher.recv(WAIT).expect("will");
    assert_eq!(m.publish().0, "will/dying");
    assert_eq!(m.publish().2, b"gone");
    watcher.send(&ack_packet(0x40, m.publish().1));
    let mut polite = RawClient::connect(b.addr());
    polite.send(&connect_packet(
        4,
        "will-polite",
        true,
        60,
        Some(("will/polite", b"no", 1)),
    ));
    assert_eq!(polite.recv(WAIT).unwrap().first, 0x20);
    polite.send(&[0xE0, 0]);
    assert!(
        watcher.recv(Duration::from_millis(800)).is_none(),
        "will sent after DISCONNECT"
    );
    let mut silent = RawClient::connect(b.addr());
    silent.send(&connect_packet(
        4,
        "will-silent",
        true,
        1,
        Some(("will/silent", b"timeout", 0)),
    ));
    assert_eq!(silent.recv(WAIT).unwrap().first, 0x20);
    let m = watcher.recv(WAIT).expect("will after keep-alive expiry");
    assert_eq!(m.publish().0, "will/silent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_set_replace_clear_and_reach_wildcards() {
    let b = Broker::start(&[]);
    let p = Client::connect(&b, "ret-pub", true).await;
    p.publish("ret/a", "v1", 1, true).await;
    p.publish("ret/a", "v2", 1, true).await;
    p.publish("ret/b", "b", 1, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for filter in ["ret/a", "ret/+", "ret/#"] {
        let mut s = Client::connect(&b, "ret-sub", true).await;
        s.subscribe(filter, 1).await;
        let mut got: Vec<(String, String, bool)> = s
            .collect(if filter == "ret/a" { 1 } else { 2 })
            .await
            .iter()
            .map(|m| {
                (
                    m.topic.clone(),
                    String::from_utf8(m.payload.to_vec()).unwrap(),
                    m.retain,
                )
            })
            .collect();
        got.sort();
        assert_eq!(got[0], ("ret/a".into(), "v2".into(), true), "{filter}");
        s.disconnect().await;
    }
    let mut live = Client::connect(&b, "ret-live", true).await;
    live.subscribe("ret/live", 1).await;
    p.publish("ret/live", "now", 1, true).await;
    assert!(
        !live.next().await.retain,
        "live delivery has retain 0 (MQTT-3.3.1-9)"
    );
    p.publish("ret/a", "", 1, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = Client::connect(&b, "ret-after-clear", true).await;
    s.subscribe("ret/a", 1).await;
    s.nothing_for(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let b = Broker::start(&[]);
    let mut all = Client::connect(&b, "dl-all", true).await;
    all.subscribe("#", 0).await;
    all.subscribe("+/x", 0).await;
    let mut dollar = Client::connect(&b, "dl-dollar", true).await;
    dollar.subscribe("$foo/#", 0).await;
    let p = Client::connect(&b, "dl-pub", true).await;
    p.publish("$foo/x", "d", 0, false).await;
    assert_eq!(dollar.next().await.topic, "$foo/x");
    // The wildcard subscriber sees its own traffic only, never the $ topic.
    p.publish("plain/x", "p", 0, false).await;
    let m = all.next().await;
    assert_eq!(m.topic, "plain/x");
    all.nothing_for(Duration::from_millis(300)).await;
}

#[test]
fn zero_length_client_id_needs_clean_session_in_311() {
    let b = Broker::start(&[]);
    let mut ok = RawClient::connect(b.addr());
    ok.send(&connect_packet(4, "", true, 60, None));
    let ack = ok.recv(WAIT).unwrap();
    assert_eq!(ack.body, vec![0, 0]);
    let mut refused = RawClient::connect(b.addr());
    refused.send(&connect_packet(4, "", false, 60, None));
    let ack = refused.recv(WAIT).unwrap();
    assert_eq!(ack.body, vec![0, 2], "identifier rejected");
    assert!(refused.closed_within(WAIT));
    let mut v5 = RawClient::connect(b.addr());
    v5.send(&connect_packet(5, "", true, 60, None));
    let ack = v5.recv(WAIT).unwrap();
    assert_eq!(ack.body[1], 0);
    // Assigned Client Identifier (0x12) among the CONNACK properties.
    assert!(
        ack.body.windows(1).any(|w| w[0] == 0x12),
        "no assigned client id: {:?}",
        ack.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_across_shards_get_every_qos1_message_once_in_order() {
    let b = Broker::start(&[]);
    let mut subs = Vec::new();
    for i in 0..10 {
        let s = Client::connect(&b, &format!("fan-sub-{i}"), true).await;
        s.subscribe(&format!("fan/{i}"), 1).await;
        s.subscribe("fan/all/#", 1).await;
        subs.push(s);
    }
    let mut pubs = Vec::new();
    for i in 0..10 {
        pubs.push(Client::connect(&b, &format!("fan-pub-{i}"), true).await);
    }
    for n in 0..20 {
        for (i, p) in pubs.iter().enumerate() {
            p.publish(&format!("fan/{i}"), format!("{n}"), 1, false)
                .await;
            p.publish(&format!("fan/all/{i}"), format!("{n}"), 1, false)
                .await;
        }
    }
    for (i, s) in subs.iter_mut().enumerate() {
        let got = s.collect(20 + 200).await;
        let own: Vec<String> = got
            .iter()
            .filter(|m| m.topic == format!("fan/{i}"))
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(own, (0..20).map(|n| n.to_string()).collect::<Vec<_>>());
        for j in 0..10 {
            let seq: Vec<String> = got
                .iter()
                .filter(|m| m.topic == format!("fan/all/{j}"))
                .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
                .collect();
            assert_eq!(
                seq,
                (0..20).map(|n| n.to_string()).collect::<Vec<_>>(),
                "sub {i} from pub {j}"
            );
        }
        s.nothing_for(Duration::from_millis(100)).await;
    }
}

#[test]
fn offline_persistent_session_queues_qos0_by_default() {
    let b = Broker::start(&[]);
    let (mut s, _) = RawClient::mqtt(b.addr(), "q0-offline", false);
    assert_eq!(s.subscribe(1, "q0/t", 0), 0);
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let (mut p, _) = RawClient::mqtt(b.addr(), "q0-pub", true);
    for n in 0..3u8 {
        p.send(&publish_packet("q0/t", &[n], 0, 0, false, false));
    }
    assert!(p.ping());
    let (mut back, present) = RawClient::mqtt(b.addr(), "q0-offline", false);
    assert!(present);
    for n in 0..3u8 {
        assert_eq!(back.recv(WAIT).expect("queued QoS 0").publish().2, vec![n]);
    }
}

#[test]
fn offline_qos0_is_not_queued_when_disabled() {
    let b = Broker::start(&[("MQTT__QUEUE_QOS0", "false")]);
    let (mut s, _) = RawClient::mqtt(b.addr(), "q0-off", false);
    assert_eq!(s.subscribe(1, "q0/t", 0), 0);
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let (mut p, _) = RawClient::mqtt(b.addr(), "q0-off-pub", true);
    p.send(&publish_packet("q0/t", b"x", 0, 0, false, false));
    assert!(p.ping());
    let (mut back, _) = RawClient::mqtt(b.addr(), "q0-off", false);
    assert!(back.recv(Duration::from_millis(500)).is_none());
}

#[test]
fn inflight_window_limits_unacknowledged_deliveries() {
    let b = Broker::start(&[("MQTT__MAX_INFLIGHT", "5")]);
    let (mut s, _) = RawClient::mqtt(b.addr(), "window-sub", true);
    assert_eq!(s.subscribe(1, "win/t", 1), 1);
    let (mut p, _) = RawClient::mqtt(b.addr(), "window-pub", true);
    for n in 0..10u16 {
        p.send(&publish_packet(
            "win/t",
            &n.to_be_bytes(),
            1,
            n + 1,
            false,
            false,
        ));
    }
    let mut first = Vec::new();
    while let Some(m) = s.recv(Duration::from_millis(400)) {
        first.push(m);
    }
    assert_eq!(first.len(), 5, "at most max_inflight unacknowledged");
    // One PUBACK lets exactly one more through; nothing was dropped.
    s.send(&ack_packet(0x40, first[0].publish().1));
    let mut more = Vec::new();
    while let Some(m) = s.recv(Duration::from_millis(400)) {
        more.push(m);
    }
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].publish().2, 5u16.to_be_bytes().to_vec());
}
