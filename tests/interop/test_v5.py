"""MQTT 5.0 clients."""

import paho.mqtt.client as mqtt

from helpers import publish_properties, v5_options


def test_v5_connect_pubsub_qos(clients, prefix):
    sub = clients("sub5", protocol=mqtt.MQTTv5)
    ack = sub.connect()
    assert ack.reason_code == 0 and not ack.session_present
    codes = sub.subscribe(f"{prefix}/v5", options=v5_options(2))
    assert [c.value for c in codes] == [2]  # Granted QoS 2

    pub = clients("pub5", protocol=mqtt.MQTTv5)
    pub.connect()
    for qos in (0, 1, 2):
        info = pub.publish(f"{prefix}/v5", f"qos{qos}", qos=qos)
        if qos:
            assert not pub.puback_reason(info.mid).is_failure
    got = sub.collect(3)
    assert [(m.text, m.qos) for m in got] == [("qos0", 0), ("qos1", 1), ("qos2", 2)]

    # v3.1.1 and v5 clients interoperate
    old = clients("sub311")
    old.connect()
    old.subscribe(f"{prefix}/v5", 1)
    pub.publish(f"{prefix}/v5", "to-both", qos=1)
    assert (old.get().text, sub.get().text) == ("to-both", "to-both")
    sub.disconnect()


def test_v5_user_properties_forwarded_unchanged(clients, prefix):
    sub = clients("sub5", protocol=mqtt.MQTTv5)
    sub.connect()
    sub.subscribe(f"{prefix}/props", options=v5_options(1))

    # Order and repeated keys must be kept (MQTT-3.3.2-18).
    user_props = [("trace-id", "abc-123"), ("k", "1"), ("k", "2"), ("unicode", "h\u00e9llo \u2713")]
    pub = clients("pub5", protocol=mqtt.MQTTv5)
    pub.connect()
    pub.publish(
        f"{prefix}/props",
        "with-props",
        qos=1,
        properties=publish_properties(UserProperty=user_props),
    )
    pub.publish(f"{prefix}/props", "without-props", qos=1)

    first, second = sub.collect(2)
    assert first.text == "with-props"
    assert first.properties is not None
    assert list(first.properties.UserProperty) == user_props
    assert second.text == "without-props"
    assert not getattr(second.properties, "UserProperty", None)
