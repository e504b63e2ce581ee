"""Persistent sessions and last-will messages."""

from helpers import client_id, mosquitto_pub


def test_persistent_session_queues_qos1(broker, clients, prefix):
    topic = f"{prefix}/queued"
    cid = client_id("persist")

    first = clients("persist", cid=cid, clean_session=False)
    ack = first.connect()
    assert not ack.session_present, "a new client id must not have a session"
    first.subscribe(topic, 1)
    first.disconnect()

    lines = "".join(f"queued-{i}\n" for i in range(5))
    mosquitto_pub(broker, "-q", "1", "-t", topic, "-l", input=lines)

    again = clients("persist", cid=cid, clean_session=False)
    ack = again.connect()
    assert ack.session_present, "the session must survive a clean disconnect"
    got = again.collect(5)  # no new SUBSCRIBE: the session kept the subscription
    assert [m.text for m in got] == [f"queued-{i}" for i in range(5)]
    assert all(m.qos == 1 for m in got)
    again.assert_no_message(0.3)
    again.disconnect()

    # clean_session=True discards the session
    cleaner = clients("persist", cid=cid, clean_session=True)
    assert not cleaner.connect().session_present
    cleaner.disconnect()
    after = clients("persist", cid=cid, clean_session=False)
    assert not after.connect().session_present
    after.disconnect()
    clients("persist", cid=cid, clean_session=True).connect()  # leave nothing behind


def test_clean_session_does_not_queue(broker, clients, prefix):
    topic = f"{prefix}/notqueued"
    cid = client_id("clean")
    c = clients("clean", cid=cid, clean_session=True)
    c.connect()
    c.subscribe(topic, 1)
    c.disconnect()
    mosquitto_pub(broker, "-q", "1", "-t", topic, "-m", "lost")
    c2 = clients("clean", cid=cid, clean_session=True)
    assert not c2.connect().session_present
    c2.subscribe(topic, 1)
    c2.assert_no_message(0.5)


def test_will_sent_on_abnormal_close(clients, prefix):
    topic = f"{prefix}/will"
    watcher = clients("watcher")
    watcher.connect()
    watcher.subscribe(topic, 1)

    doomed = clients("doomed").will(topic, "gone", qos=1)
    doomed.connect()
    watcher.assert_no_message(0.2)
    doomed.kill()  # TCP reset, no DISCONNECT

    m = watcher.get(timeout=5)
    assert (m.topic, m.text, m.qos) == (topic, "gone", 1)
    watcher.assert_no_message(0.3)


def test_will_not_sent_on_clean_disconnect(clients, prefix):
    topic = f"{prefix}/will"
    watcher = clients("watcher")
    watcher.connect()
    watcher.subscribe(topic, 1)

    polite = clients("polite").will(topic, "gone", qos=1)
    polite.connect()
    polite.disconnect()

    # Something published after the disconnect arrives; the will must not arrive before or after.
    other = clients("other")
    other.connect()
    other.publish(topic, "marker", qos=1)
    assert watcher.get().text == "marker"
    watcher.assert_no_message(0.7)
