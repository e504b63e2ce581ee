"""shardmq-specific behaviour: skipped when the suite tests another broker."""

import signal
import tempfile
from pathlib import Path

import pytest

from brokers import kill, start_shardmq, stop
from helpers import Client


@pytest.mark.shardmq_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully(sig, prefix):
    """A second shardmq (1 shard, own port and data dir) exits 0 soon after SIGTERM/SIGINT,
    also with a client connected."""
    with tempfile.TemporaryDirectory(prefix="shardmq-sig-") as tmp:
        b = start_shardmq(Path(tmp), shards=1)
        c = Client(b, "sig")
        try:
            c.connect()
            c.subscribe(f"{prefix}/x", 1)
            status = stop(b, sig, timeout=6)
            assert status is not None, f"shardmq still running 6s after {sig.name}:\n{b.log_tail()}"
            assert status == 0, f"shardmq exited {status} after {sig.name}:\n{b.log_tail()}"
            assert c.disconnected.wait(2), "the client's connection was not closed"
        finally:
            c.close()
            kill(b)
