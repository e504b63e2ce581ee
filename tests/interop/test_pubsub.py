"""Publish/subscribe with paho-mqtt: QoS round trips, protocol versions, wildcards, $-topics."""

import paho.mqtt.client as mqtt
import pytest


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_roundtrip(clients, prefix, qos):
    sub = clients("sub")
    sub.connect()
    assert sub.subscribe(f"{prefix}/t", qos)[0].value == qos

    pub = clients("pub")
    pub.connect()
    for i in range(10):
        pub.publish(f"{prefix}/t", f"m{i}", qos=qos)

    got = sub.collect(10)
    assert [m.text for m in got] == [f"m{i}" for i in range(10)]
    assert all(m.topic == f"{prefix}/t" and m.qos == qos and not m.retain for m in got)
    sub.assert_no_message(0.2)


def test_client_receives_own_publish(clients, prefix):
    c = clients("self")
    c.connect()
    c.subscribe(f"{prefix}/loop", 1)
    c.publish(f"{prefix}/loop", b"\x00\x01binary\xff", qos=1)
    m = c.get()
    assert m.payload == b"\x00\x01binary\xff" and m.qos == 1


def test_delivered_qos_is_min_of_publish_and_subscription(clients, prefix):
    subs = []
    for sq in (0, 1, 2):
        s = clients(f"sub{sq}")
        s.connect()
        s.subscribe(f"{prefix}/q", sq)
        subs.append(s)
    pub = clients("pub")
    pub.connect()
    for pq in (0, 1, 2):
        pub.publish(f"{prefix}/q", f"p{pq}", qos=pq)
    for sq, s in enumerate(subs):
        got = sorted((m.text, m.qos) for m in s.collect(3))
        assert got == [(f"p{pq}", min(pq, sq)) for pq in (0, 1, 2)], f"subscription QoS {sq}"


def test_empty_and_large_payloads(clients, prefix):
    sub = clients("sub")
    sub.connect()
    sub.subscribe(f"{prefix}/#", 1)
    pub = clients("pub")
    pub.connect()
    big = bytes(range(256)) * 1024  # 256 KiB, under the default 1 MiB packet limit
    pub.publish(f"{prefix}/empty", b"", qos=1)
    pub.publish(f"{prefix}/big", big, qos=1)
    got = {m.topic: m.payload for m in sub.collect(2)}
    assert got == {f"{prefix}/empty": b"", f"{prefix}/big": big}


def test_unsubscribe_stops_delivery(clients, prefix):
    sub = clients("sub")
    sub.connect()
    sub.subscribe(f"{prefix}/u", 1)
    pub = clients("pub")
    pub.connect()
    pub.publish(f"{prefix}/u", "before", qos=1)
    assert sub.get().text == "before"
    sub.unsubscribe(f"{prefix}/u")
    pub.publish(f"{prefix}/u", "after", qos=1)
    sub.assert_no_message(0.5)


def test_mqtt31_connect_and_pubsub(clients, prefix):
    c = clients("v31", protocol=mqtt.MQTTv31)
    ack = c.connect()
    assert not ack.session_present
    c.subscribe(f"{prefix}/v31", 1)

    other = clients("v311")  # 3.1 and 3.1.1 clients talk to each other
    other.connect()
    other.subscribe(f"{prefix}/v31", 1)

    for i in range(3):
        c.publish(f"{prefix}/v31", f"old-{i}", qos=1)
    c.publish(f"{prefix}/v31", "q0", qos=0)
    for s in (c, other):
        got = s.collect(4)
        assert [m.text for m in got] == ["old-0", "old-1", "old-2", "q0"]
        assert [m.qos for m in got] == [1, 1, 1, 0]
    c.disconnect()


def test_wildcards(clients, prefix):
    p = prefix
    filters = {
        f"{p}/sport/+/player1": {f"{p}/sport/tennis/player1", f"{p}/sport/golf/player1"},
        f"{p}/sport/#": {
            f"{p}/sport",
            f"{p}/sport/tennis/player1",
            f"{p}/sport/tennis/player2",
            f"{p}/sport/golf/player1",
            f"{p}/sport/tennis/x/player1",
        },
        f"{p}/+": {f"{p}/sport", f"{p}/finance"},
        f"{p}/+/tennis/#": {
            f"{p}/sport/tennis/player1",
            f"{p}/sport/tennis/player2",
            f"{p}/sport/tennis/x/player1",
        },
        f"{p}/sport/tennis/player1": {f"{p}/sport/tennis/player1"},
    }
    topics = sorted(set().union(*filters.values()) | {f"{p}/finance/stock", f"{p}/sportx/a"})

    subscribers = {}
    for i, f in enumerate(filters):
        s = clients(f"wild{i}")
        s.connect()
        s.subscribe(f, 1)
        subscribers[f] = s

    pub = clients("pub")
    pub.connect()
    for t in topics:
        pub.publish(t, t, qos=1)

    for f, expected in filters.items():
        got = subscribers[f].collect(len(expected))
        got += subscribers[f].drain(0.2)
        assert sorted(m.topic for m in got) == sorted(expected), f"filter {f}"
        assert all(m.text == m.topic for m in got)


def test_dollar_topics_not_matched_by_wildcards(clients, prefix):
    # "#" and "+" at the first level must not match topics starting with "$" (MQTT-4.7.2-1).
    hash_sub = clients("hash")
    hash_sub.connect()
    hash_sub.subscribe("#", 0)
    plus_sub = clients("plus")
    plus_sub.connect()
    plus_sub.subscribe("+/#", 0)
    hash_sub.drain(0.3)  # retained messages of other tests or runs, if any
    plus_sub.drain(0.1)

    sys_sub = clients("sys")
    sys_sub.connect()
    sys_sub.subscribe("$SYS/#", 0)

    # A client publish to a "$" topic: the broker may route it or refuse it, but "#" never sees it.
    pub = clients("pub")
    pub.connect()
    dollar_topic = f"$shardmq-it/{prefix}"
    pub.publish(dollar_topic, "dollar", qos=0)
    marker = f"{prefix}/marker"
    pub.publish(marker, "marker", qos=1)

    for s in (hash_sub, plus_sub):
        seen = []
        while True:
            m = s.get()
            seen.append(m)
            if m.topic == marker:
                break
        seen += s.drain(0.3)
        dollar = [m.topic for m in seen if m.topic.startswith("$")]
        assert not dollar, f"{s.id} received $-topics: {dollar}"

    # Whatever the broker publishes under $SYS goes to $SYS/# subscribers only.
    for m in sys_sub.drain(0.3):
        assert m.topic.startswith("$SYS/")
