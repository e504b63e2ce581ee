"""Fixtures of the interop suite: the broker under test, per-test timeouts, unique topics.

Which broker is tested:
  * default: the shardmq release binary ($SHARDMQ_BIN, else target/release/shardmq), started here
    on a free loopback port with 2 shards and a temporary data dir, stopped with SIGTERM at the end;
  * SHARDMQ_TEST_EXTERNAL=host:port: a broker that is already running (e.g. mosquitto 2.0 as the
    reference); tests marked `shardmq_only` are skipped;
  * SHARDMQ_TEST_MOSQUITTO=1: a mosquitto started here on a free loopback port (needs the
    `mosquitto` package); `shardmq_only` tests are skipped.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from brokers import STOP_TIMEOUT_S, Broker, start_mosquitto, start_shardmq, stop, wait_ready

TEST_TIMEOUT_S = 10  # no single test may take longer, unless it is marked time_limit
RUN_ID = secrets.token_hex(3)


# ---------------------------------------------------------------------------------------------
# Fixtures and hooks


def parse_external(value: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", value.strip())
    if not m:
        raise pytest.UsageError(f"SHARDMQ_TEST_EXTERNAL must be host:port, got {value!r}")
    return m.group(1), int(m.group(2))


_ACTIVE: Broker | None = None  # the session broker, for the failure report hook


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "shardmq_only: asserts shardmq-specific behaviour; skipped unless the suite runs shardmq",
    )
    config.addinivalue_line(
        "markers",
        "time_limit(seconds): this test's own time budget, for the few that move tens of MiB",
    )


@pytest.fixture(scope="session")
def broker(request):
    """The broker under test for the whole session (see the module docstring)."""
    global _ACTIVE
    external = os.environ.get("SHARDMQ_TEST_EXTERNAL", "").strip()
    if external:
        host, port = parse_external(external)
        b = Broker(host, port, "external")
        try:
            wait_ready(b, timeout=5)
        except RuntimeError as e:
            pytest.exit(f"SHARDMQ_TEST_EXTERNAL={external}: {e}", returncode=1)
        yield b
        return

    workdir = Path(tempfile.mkdtemp(prefix="shardmq-interop-"))
    try:
        if os.environ.get("SHARDMQ_TEST_MOSQUITTO", "0") not in ("", "0"):
            b = start_mosquitto(workdir)
        else:
            b = start_shardmq(workdir)
    except RuntimeError as e:
        # One clear message instead of the same error repeated for every test.
        logs = [p for p in workdir.glob("*.log") if p.stat().st_size > 0]
        where = f"\n(log kept in {workdir})" if logs else ""
        if not logs:
            shutil.rmtree(workdir, ignore_errors=True)
        pytest.exit(f"cannot start the broker under test: {e}{where}", returncode=1)
    _ACTIVE = b
    yield b
    _ACTIVE = None
    status = stop(b)
    failed = request.session.testsfailed > 0
    if status is None:
        pytest.fail(
            f"{b.kind} did not exit within {STOP_TIMEOUT_S}s of SIGTERM (killed); "
            f"log kept at {b.log_path}\n--- log ---\n{b.log_tail()}"
        )
    if failed:
        print(f"\n{b.kind} log kept at {b.log_path}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _per_test_guard(request, broker):
    """Skips shardmq-only tests elsewhere, bounds each test's time, and notices broker crashes."""
    if request.node.get_closest_marker("shardmq_only") and not broker.managed_shardmq:
        pytest.skip(f"shardmq-specific (testing {broker.kind} broker)")

    limit = request.node.get_closest_marker("time_limit")
    budget = limit.args[0] if limit else TEST_TIMEOUT_S

    def on_timeout(_signum, _frame):
        raise TimeoutError(f"test exceeded {budget}s")

    log_start = broker.log_path.stat().st_size if broker.log_path else 0
    previous = signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if broker.proc is not None and broker.proc.poll() is not None:
        pytest.fail(
            f"{broker.kind} exited (status {broker.proc.returncode}) during this test\n"
            f"--- log ---\n{broker.log_tail()}"
        )
    if broker.log_path:
        # A panicking shard thread need not take the process down; the log tells.
        with open(broker.log_path, "rb") as f:
            f.seek(log_start)
            new = f.read().decode(errors="replace")
        if "panicked at" in new:
            pytest.fail(f"{broker.kind} panicked during this test:\n{new[-4000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _ACTIVE is not None and _ACTIVE.log_path:
        tail = _ACTIVE.log_tail(40)
        if tail:
            report.sections.append((f"{_ACTIVE.kind} log (last 40 lines)", tail))


@pytest.fixture
def prefix(request) -> str:
    """A topic prefix unique to this test and run, so tests never see each other's messages."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")
    return f"shardmq-it/{RUN_ID}/{name}"


@pytest.fixture
def clients(broker):
    """Factory for helpers.Client objects that are all closed at the end of the test."""
    from helpers import Client

    made = []

    def make(tag="client", **kw):
        c = Client(broker, tag, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def subs():
    """Factory for background mosquitto_sub processes that are all stopped at the end."""
    from helpers import mosquitto_sub

    made = []

    def make(broker, *args):
        s = mosquitto_sub(broker, *args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
