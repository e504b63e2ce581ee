"""Several clients at once: on shardmq they land on different shards (SO_REUSEPORT)."""

PUBLISHERS = 3
MESSAGES = 100


def test_qos1_many_clients_exactly_once_in_order(clients, prefix):
    subscribers = []
    for i in range(2):
        s = clients(f"sub{i}")
        s.connect()
        s.subscribe(f"{prefix}/#", 1)
        subscribers.append(s)

    publishers = []
    for i in range(PUBLISHERS):
        p = clients(f"pub{i}")
        p.connect()
        publishers.append(p)

    # Interleave the publishers' streams; each publisher's own stream stays ordered.
    pending = []
    for seq in range(MESSAGES):
        for i, p in enumerate(publishers):
            pending.append(p.publish(f"{prefix}/p{i}", f"{i}:{seq}", qos=1, wait=False))
    for info in pending:
        info.wait_for_publish(5)
        assert info.is_published(), "a QoS 1 publish was not acknowledged within 5s"

    for s in subscribers:
        got = s.collect(PUBLISHERS * MESSAGES, timeout=8)
        s.assert_no_message(0.3)  # exactly once: nothing extra
        assert all(m.qos == 1 and not m.retain for m in got)
        streams = {i: [] for i in range(PUBLISHERS)}
        for m in got:
            i, seq = map(int, m.text.split(":"))
            assert m.topic == f"{prefix}/p{i}"
            streams[i].append(seq)
        for i, seqs in streams.items():
            assert seqs == list(range(MESSAGES)), f"{s.id}: publisher {i} out of order or lossy"
