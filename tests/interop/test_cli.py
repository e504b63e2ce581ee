"""Interop with the mosquitto command-line clients (mosquitto_pub / mosquitto_sub)."""

import pytest

from helpers import client_id, mosquitto_pub


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_to_paho(broker, clients, prefix, qos):
    sub = clients("sub")
    sub.connect()
    sub.subscribe(f"{prefix}/cli", 2)
    for i in range(3):
        mosquitto_pub(broker, "-q", str(qos), "-t", f"{prefix}/cli", "-m", f"from-cli-{i}")
    got = sub.collect(3)
    assert [m.text for m in got] == [f"from-cli-{i}" for i in range(3)]
    assert all(m.qos == qos for m in got)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_to_mosquitto_sub(broker, clients, subs, prefix, qos):
    n = 5
    s = subs(broker, "-q", "2", "-t", f"{prefix}/cli", "-C", str(n), "-W", "8")
    s.wait_subscribed()
    pub = clients("pub")
    pub.connect()
    for i in range(n):
        pub.publish(f"{prefix}/cli", f"to-cli-{i}", qos=qos)
    assert s.wait(timeout=8) == 0, s.output[-10:]
    got = s.messages()
    assert [m.payload for m in got] == [f"to-cli-{i}" for i in range(n)]
    assert all(m.qos == qos and m.topic == f"{prefix}/cli" for m in got)


def test_mosquitto_pub_lines_to_mosquitto_sub(broker, subs, prefix):
    s = subs(broker, "-q", "1", "-t", f"{prefix}/lines", "-C", "4", "-W", "8")
    s.wait_subscribed()
    mosquitto_pub(broker, "-q", "1", "-t", f"{prefix}/lines", "-l", input="a\nb\nc\nd\n")
    assert s.wait(timeout=8) == 0, s.output[-10:]
    assert [m.payload for m in s.messages()] == ["a", "b", "c", "d"]


def test_retained_set_get_clear(broker, clients, subs, prefix):
    topic = f"{prefix}/retained"
    try:
        # set: a later subscriber gets it, with the retain flag
        mosquitto_pub(broker, "-r", "-q", "1", "-t", topic, "-m", "v1")
        s = subs(broker, "-t", topic, "-C", "1", "-W", "5")
        assert s.wait(timeout=6) == 0, s.output[-10:]
        [m] = s.messages()
        assert (m.payload, m.retain) == ("v1", True)

        # replace: only the newest is kept; a wildcard subscription gets it too
        mosquitto_pub(broker, "-r", "-q", "1", "-t", topic, "-m", "v2")
        s = subs(broker, "-q", "1", "-t", f"{prefix}/#", "-C", "1", "-W", "5")
        assert s.wait(timeout=6) == 0, s.output[-10:]
        [m] = s.messages()
        assert (m.topic, m.payload, m.retain) == (topic, "v2", True)

        # paho subscribers see it as retained; live deliveries to existing subscribers are not
        live = clients("live")
        live.connect()
        live.subscribe(topic, 1)
        m = live.get()
        assert (m.text, m.retain) == ("v2", True)
        mosquitto_pub(broker, "-r", "-q", "1", "-t", topic, "-m", "v3")
        m = live.get()
        assert (m.text, m.retain) == ("v3", False)

        # clear: an empty retained message deletes it
        mosquitto_pub(broker, "-r", "-q", "1", "-t", topic, "-n")
        live.get()  # the (empty) clearing message itself is delivered to live subscribers
        s = subs(broker, "-t", topic)
        s.wait_subscribed()
        late = clients("late")
        late.connect()
        late.subscribe(topic, 1)
        late.assert_no_message(1.0)
        s.stop()
        assert s.messages() == []
    finally:
        mosquitto_pub(broker, "-r", "-t", topic, "-n")


def test_mosquitto_sub_v5_and_v31(broker, subs, prefix):
    for version in ("mqttv5", "mqttv31"):
        # MQTT 3.1 needs a client id (1-23 characters); the others let the broker assign one
        sub_id = ["-i", client_id("sub31")] if version == "mqttv31" else []
        pub_id = ["-i", client_id("pub31")] if version == "mqttv31" else []
        topic = f"{prefix}/{version}"
        s = subs(broker, "-V", version, *sub_id, "-q", "1", "-t", topic, "-C", "1", "-W", "5")
        s.wait_subscribed()
        mosquitto_pub(broker, "-V", version, *pub_id, "-q", "1", "-t", topic, "-m", version)
        assert s.wait(timeout=6) == 0, s.output[-10:]
        assert [m.payload for m in s.messages()] == [version]
