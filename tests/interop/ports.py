"""Picking a port for a broker to listen on; shared by the interop suite (`brokers.py`) and the
benchmark harness (`benches/harness.py`), with the same rule as `free_port` in
`tests/common/mod.rs`."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Lowest port handed out; the kernel's ephemeral range starts above it.
PORT_MIN = 10000

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port for a broker to listen on, below the kernel's ephemeral range: a port the kernel
    picked (bind to 0) can be taken by an outgoing connection, e.g. a cluster link, before the
    broker binds it. Random, so parallel runs rarely collide, never the same twice in one
    process, and checked free by binding it once."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(PORT_MIN, max(low, PORT_MIN + 1))
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")
