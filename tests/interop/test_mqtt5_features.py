"""MQTT 5.0 features, shared subscriptions, $SYS and limits, driven by paho-mqtt 2.x (v5).

Tests that need a non-default configuration start their own shardmq with `configured(...)`.
"""

from __future__ import annotations

import secrets
import socket
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from brokers import start_shardmq, stop
from helpers import Client, publish_properties, v5_options

pytestmark = pytest.mark.shardmq_only
V5 = mqtt.MQTTv5


def uniq(prefix: str) -> str:
    return f"{prefix}/{secrets.token_hex(3)}"


def connect_props(**props) -> Properties:
    p = Properties(PacketTypes.CONNECT)
    for k, v in props.items():
        setattr(p, k, v)
    return p


@pytest.fixture
def configured(tmp_path):
    started = []

    def start(**overrides):
        extra = {f"SHARDMQ_{k}": str(v) for k, v in overrides.items()}
        b = start_shardmq(tmp_path / f"b{len(started)}", extra=extra)
        started.append(b)
        return b

    yield start
    for b in started:
        stop(b)


def v5(broker, tag="v5", **kw) -> Client:
    return Client(broker, tag, protocol=V5, **kw)


def test_session_expiry_keeps_resumes_and_ends_sessions(broker):
    topic = uniq("se")
    cid = f"se-{secrets.token_hex(3)}"
    c = v5(broker, cid=cid)
    c.connect(clean_start=True, properties=connect_props(SessionExpiryInterval=30))
    c.subscribe(topic, 1)
    c.disconnect()
    p = v5(broker, "pub")
    p.connect()
    p.publish(topic, "kept", qos=1)
    c = v5(broker, cid=cid)
    ack = c.connect(clean_start=False, properties=connect_props(SessionExpiryInterval=30))
    assert ack.session_present
    assert c.get().text == "kept"
    # DISCONNECT with Session Expiry Interval 0 ends the session now.
    dp = Properties(PacketTypes.DISCONNECT)
    dp.SessionExpiryInterval = 0
    c.paho.disconnect(properties=dp)
    assert c.disconnected.wait(5)
    c.close()
    c = v5(broker, cid=cid)
    assert not c.connect(clean_start=False, properties=connect_props(SessionExpiryInterval=30)).session_present
    c.close()
    # Expiry 0 (the default): the session ends with the connection.
    z = v5(broker, cid=cid + "z")
    z.connect(clean_start=False)
    z.subscribe(topic, 1)
    z.disconnect()
    z = v5(broker, cid=cid + "z")
    assert not z.connect(clean_start=False).session_present
    z.close()
    p.close()


def test_will_delay_is_cancelled_by_a_timely_resume_and_sent_otherwise(broker):
    topic = uniq("wd")
    w = v5(broker, "watch")
    w.connect()
    w.subscribe(topic + "/#", 1)
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = 2
    # Resumed within the delay: no will.
    cid = f"wd-{secrets.token_hex(3)}"
    c = v5(broker, cid=cid)
    c.paho.will_set(topic + "/resumed", "will", qos=1, properties=wp)
    c.connect(clean_start=True, properties=connect_props(SessionExpiryInterval=60))
    c.kill()
    time.sleep(0.5)
    again = v5(broker, cid=cid)
    assert again.connect(clean_start=False, properties=connect_props(SessionExpiryInterval=60)).session_present
    # Not resumed: the will comes after the delay, not before.
    d = v5(broker, "delayed")
    d.paho.will_set(topic + "/late", "will", qos=1, properties=wp)
    d.connect(clean_start=True, properties=connect_props(SessionExpiryInterval=60))
    d.kill()
    t0 = time.monotonic()
    m = w.get(timeout=5)
    assert m.topic == topic + "/late"
    assert time.monotonic() - t0 >= 1.5, "will sent before its delay"
    w.assert_no_message(0.5)
    again.close()
    w.close()


def test_message_expiry_drops_stale_queued_messages_and_forwards_the_remainder(broker):
    topic = uniq("me")
    cid = f"me-{secrets.token_hex(3)}"
    c = v5(broker, cid=cid)
    c.connect(properties=connect_props(SessionExpiryInterval=60))
    c.subscribe(topic, 1)
    c.disconnect()
    p = v5(broker, "pub")
    p.connect()
    p.publish(topic, "short", qos=1, properties=publish_properties(MessageExpiryInterval=1))
    p.publish(topic, "long", qos=1, properties=publish_properties(MessageExpiryInterval=100))
    time.sleep(2.2)
    c = v5(broker, cid=cid)
    c.connect(clean_start=False, properties=connect_props(SessionExpiryInterval=60))
    m = c.get()
    assert m.text == "long"
    assert 90 <= m.properties.MessageExpiryInterval <= 100
    c.assert_no_message(0.4)
    c.close()
    p.close()


def test_topic_aliases_work_in_both_directions(broker):
    topic = uniq("ta")
    sub = v5(broker, "sub")
    sub.connect(properties=connect_props(TopicAliasMaximum=10))
    sub.subscribe(topic, 0)
    p = v5(broker, "pub")
    p.connect()
    p.publish(topic, "first", qos=1, properties=publish_properties(TopicAlias=3))
    p.publish("", "second", qos=1, properties=publish_properties(TopicAlias=3))
    first, second = sub.get(), sub.get()
    # The broker names the topic once with an alias, then sends the alias alone (paho does not
    # resolve incoming aliases, so the mapping is checked here).
    assert (first.topic, first.text) == (topic, "first")
    alias = first.properties.TopicAlias
    assert 1 <= alias <= 10
    assert (second.topic, second.text, second.properties.TopicAlias) == ("", "second", alias)
    p.close()
    sub.close()


def test_all_matching_subscription_identifiers_are_delivered(broker):
    base = uniq("sid")
    c = v5(broker, "sid")
    c.connect()
    for filt, sid in ((base + "/+", 5), (base + "/#", 7)):
        sp = Properties(PacketTypes.SUBSCRIBE)
        sp.SubscriptionIdentifier = sid
        c.paho.subscribe(filt, options=v5_options(1), properties=sp)
    time.sleep(0.3)
    p = v5(broker, "pub")
    p.connect()
    p.publish(base + "/x", "m", qos=1)
    m = c.get()
    assert sorted(m.properties.SubscriptionIdentifier) == [5, 7]
    c.assert_no_message(0.3)
    c.close()
    p.close()


def test_no_local_retain_as_published_and_retain_handling(broker):
    topic = uniq("opt")
    me = v5(broker, "me")
    me.connect()
    me.subscribe(topic, options=v5_options(1, noLocal=True, retainAsPublished=True))
    other = v5(broker, "other")
    other.connect()
    me.publish(topic, "mine", qos=1)
    other.publish(topic, "theirs", qos=1, retain=True)
    m = me.get()
    assert m.text == "theirs" and m.retain, "retain as published"
    me.assert_no_message(0.3)
    late = v5(broker, "late")
    late.connect()
    late.subscribe(topic, options=v5_options(1, retainHandling=2))
    late.assert_no_message(0.4)
    late2 = v5(broker, "late2")
    late2.connect()
    late2.subscribe(topic, options=v5_options(1, retainHandling=1))
    assert late2.get().text == "theirs"
    late2.subscribe(topic, options=v5_options(1, retainHandling=1))
    late2.assert_no_message(0.4)
    other.publish(topic, "", qos=1, retain=True)
    for c in (me, other, late, late2):
        c.close()


def test_request_response_properties_are_forwarded_unchanged(broker):
    topic = uniq("rr")
    s = v5(broker, "s")
    s.connect()
    s.subscribe(topic, 1)
    p = v5(broker, "p")
    p.connect()
    props = publish_properties(
        ResponseTopic="reply/here",
        CorrelationData=b"\x00\x01corr",
        PayloadFormatIndicator=1,
        ContentType="application/json",
    )
    props.UserProperty = [("a", "1"), ("a", "2"), ("b", "x")]
    p.publish(topic, "{}", qos=1, properties=props)
    m = s.get().properties
    assert m.ResponseTopic == "reply/here"
    assert m.CorrelationData == b"\x00\x01corr"
    assert m.PayloadFormatIndicator == 1
    assert m.ContentType == "application/json"
    assert m.UserProperty == [("a", "1"), ("a", "2"), ("b", "x")]
    s.close()
    p.close()


def test_puback_says_no_matching_subscribers(broker):
    p = v5(broker, "p")
    p.connect()
    info = p.publish(uniq("nobody"), "x", qos=1)
    assert p.puback_reason(info.mid).value == 0x10
    p.close()


def test_message_larger_than_a_clients_maximum_is_skipped_for_it_only(broker):
    topic = uniq("mps")
    small = v5(broker, "small")
    small.connect(properties=connect_props(MaximumPacketSize=200))
    small.subscribe(topic, 0)
    big = v5(broker, "big")
    big.connect()
    big.subscribe(topic, 0)
    p = v5(broker, "p")
    p.connect()
    p.publish(topic, "x" * 1000, qos=1)
    p.publish(topic, "tiny", qos=1)
    assert small.get().text == "tiny"
    assert [big.get().text, big.get().text] == ["x" * 1000, "tiny"]
    for c in (small, big, p):
        c.close()


def test_connack_announces_server_limits_and_keep_alive(configured):
    b = configured(
        MQTT__SERVER_KEEPALIVE_S=7,
        MQTT__MAX_INFLIGHT=4,
        MQTT__MAX_TOPIC_ALIAS=9,
        MQTT__RESPONSE_INFORMATION="replies/",
    )
    c = v5(b, "lim")
    ack = c.connect(properties=connect_props(RequestResponseInformation=1))
    p = ack.properties
    assert p.ServerKeepAlive == 7
    assert p.ReceiveMaximum == 4
    assert p.TopicAliasMaximum == 9
    assert p.ResponseInformation == "replies/"
    c.close()
    # Without the request, no Response Information (MQTT-3.1.2.11.6).
    quiet = v5(b, "noresp")
    assert not hasattr(quiet.connect().properties, "ResponseInformation")
    quiet.close()


def read_packets(sock: socket.socket, quiet: float = 0.5) -> list[tuple[int, bytes]]:
    """Reads until the socket is quiet; returns (first byte, body) of each packet."""
    sock.settimeout(quiet)
    buf = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        pass
    out = []
    while buf:
        length, mult, i = 0, 1, 1
        while True:
            byte = buf[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if byte & 0x80 == 0:
                break
        out.append((buf[0], buf[i : i + length]))
        buf = buf[i + length :]
    return out


def test_receive_maximum_limits_unacknowledged_messages_to_a_client(broker):
    topic = uniq("rm")
    # A raw v5 client with Receive Maximum 2 that withholds its PUBACKs.
    props = bytes([0x21, 0x00, 0x02])
    cid = b"rm-" + secrets.token_hex(3).encode()
    body = b"\x00\x04MQTT\x05\x02\x00\x3c" + bytes([len(props)]) + props + len(cid).to_bytes(2, "big") + cid
    s = socket.create_connection((broker.host, broker.port), timeout=5)
    s.sendall(bytes([0x10, len(body)]) + body)
    sub = topic.encode()
    sb = b"\x00\x01\x00" + len(sub).to_bytes(2, "big") + sub + b"\x01"
    s.sendall(bytes([0x82, len(sb)]) + sb)
    kinds = [first >> 4 for first, _ in read_packets(s)]
    assert kinds == [2, 9], kinds  # CONNACK, SUBACK
    p = v5(broker, "p")
    p.connect()
    for i in range(5):
        p.publish(topic, f"m{i}", qos=1)
    pubs = [(f, b) for f, b in read_packets(s) if f >> 4 == 3]
    assert len(pubs) == 2, f"{len(pubs)} unacknowledged messages sent with Receive Maximum 2"
    # Acknowledge one: exactly one more follows; the rest stay queued, not dropped.
    n = int.from_bytes(pubs[0][1][:2], "big")
    pid = pubs[0][1][2 + n : 4 + n]
    s.sendall(b"\x40\x02" + pid)
    more = [(f, b) for f, b in read_packets(s) if f >> 4 == 3]
    assert len(more) == 1
    s.close()
    p.close()


def test_shared_subscription_round_robin_over_members_including_v311(broker):
    topic = uniq("share")
    members = [v5(broker, "m5a"), v5(broker, "m5b"), Client(broker, "m311")]
    for m in members:
        m.connect()
        m.subscribe(f"$share/grp/{topic}", 1)
    p = v5(broker, "p")
    p.connect()
    for i in range(30):
        p.publish(topic, str(i), qos=1)
    got = [[x.text for x in m.drain(0.5)] for m in members]
    assert sorted(sum(got, []), key=int) == [str(i) for i in range(30)], got
    assert all(len(g) == 10 for g in got), [len(g) for g in got]
    for m in members:
        m.close()
    p.close()


def test_queue_prefix_and_member_leaving_redispatch(broker):
    topic = uniq("q")
    a = Client(broker, "qa")
    a.connect()
    a.subscribe(f"$queue/{topic}", 1)
    b = Client(broker, "qb")
    b.connect()
    b.subscribe(f"$queue/{topic}", 1)
    a.kill()
    p = Client(broker, "p")
    p.connect()
    for i in range(6):
        p.publish(topic, str(i), qos=1)
    assert sorted(m.text for m in b.collect(6)) == [str(i) for i in range(6)]
    b.close()
    p.close()


def test_retained_messages_are_not_sent_to_shared_subscriptions(broker):
    topic = uniq("shret")
    p = Client(broker, "p")
    p.connect()
    p.publish(topic, "ret", qos=1, retain=True)
    s = Client(broker, "s")
    s.connect()
    s.subscribe(f"$share/g/{topic}", 1)
    s.assert_no_message(0.5)
    p.publish(topic, "", qos=1, retain=True)
    s.close()
    p.close()


def test_hash_topic_strategy_keeps_a_topic_on_one_member(configured):
    b = configured(MQTT__SHARED_SUBSCRIPTION_STRATEGY="hash_topic")
    members = [Client(b, f"h{i}") for i in range(3)]
    for m in members:
        m.connect()
        m.subscribe("$share/g/ht/#", 1)
    p = Client(b, "p")
    p.connect()
    for i in range(12):
        p.publish(f"ht/{i % 2}", str(i), qos=1)
    got = [{x.topic for x in m.drain(0.5)} for m in members]
    for t in ("ht/0", "ht/1"):
        assert sum(t in g for g in got) == 1, got


def test_sys_topics_are_published_and_clients_cannot_publish_there(configured):
    b = configured(SYS__INTERVAL_S=1)
    s = Client(b, "sys")
    s.connect()
    s.subscribe("$SYS/brokers/+/#", 0)
    topics = {}
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and len(topics) < 12:
        m = s.get(timeout=2.5)
        topics[m.topic.split("/", 3)[3]] = m.text
    for name in ("version", "uptime", "clients/connected", "messages/received", "subscriptions/count"):
        assert name in topics, topics
    assert int(topics["clients/connected"]) >= 1
    c = Client(b, "forger")
    c.connect()
    c.publish("$SYS/brokers/fake/version", "forged", qos=1)
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        assert s.get(timeout=2).text != "forged"


def test_subscription_limit_answers_quota_exceeded(configured):
    b = configured(MQTT__MAX_SUBSCRIPTIONS=2)
    c = v5(b, "lim")
    c.connect()
    c.subscribe("a/1", 0)
    c.subscribe("a/2", 0)
    result, mid = c.paho.subscribe("a/3", 0)
    codes = c._wait_ack(mid, "SUBACK", 5)
    assert codes[0].value == 0x97
    c.close()


def test_connection_limit_answers_quota_exceeded(configured):
    b = configured(LISTENERS__TCP__DEFAULT__MAX_CONNECTIONS=1)
    # The harness's readiness probes may still hold the one slot for a moment after start-up.
    deadline = time.monotonic() + 5
    while True:
        first = v5(b, "one")
        try:
            first.connect()
            break
        except AssertionError:
            first.close()
            assert time.monotonic() < deadline, "the only connection slot never freed up"
            time.sleep(0.1)
    second = v5(b, "two")
    second.paho.connect(b.host, b.port, 30, clean_start=True)
    second.paho.loop_start()
    ack = second._connacks.get(timeout=5)
    assert ack.reason_code.value == 0x97
    second.close()
    first.close()
