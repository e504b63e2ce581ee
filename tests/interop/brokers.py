"""Starting, probing and stopping the broker under test (shardmq, or mosquitto as a reference)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ports import free_port  # noqa: F401 (the tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10


@dataclass
class Broker:
    host: str
    port: int
    kind: str  # "shardmq", "external" or "mosquitto"
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    workdir: Path | None = None

    @property
    def managed_shardmq(self) -> bool:
        return self.kind == "shardmq"

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty)"


def mqtt_probe(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if an MQTT 3.1.1 CONNECT on host:port is answered with an accepting CONNACK."""
    cid = b"probe-" + secrets.token_hex(4).encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol name, level 4, clean session, keepalive 60
    body = var + len(cid).to_bytes(2, "big") + cid
    packet = bytes([0x10, len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(packet)
            ack = b""
            while len(ack) < 4:
                chunk = s.recv(4 - len(ack))
                if not chunk:
                    return False
                ack += chunk
            ok = ack == b"\x20\x02\x00\x00"
            if ok:
                s.sendall(b"\xe0\x00")  # DISCONNECT
            return ok
    except OSError:
        return False


def shardmq_binary() -> Path:
    if os.environ.get("SHARDMQ_BIN"):
        return Path(os.environ["SHARDMQ_BIN"]).resolve()
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    if not target.is_absolute():
        target = REPO_ROOT / target
    return target / "release" / "shardmq"


def embedded_config(binary: Path) -> str:
    """The binary's embedded default config (`shardmq config`), or "" if it cannot tell."""
    try:
        r = subprocess.run(
            [str(binary), "config"], capture_output=True, text=True, timeout=10, env=broker_env({})
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout if r.returncode == 0 else ""


def broker_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a shardmq process: ours, less the test harness's SHARDMQ_* knobs.

    shardmq reads SHARDMQ_* variables as config overrides and refuses unknown keys; the
    harness's own variables (SHARDMQ_BIN, SHARDMQ_TEST_*) are kept away from it to be safe.
    Other SHARDMQ_* variables (e.g. SHARDMQ_LOG__LEVEL=debug) are passed through on purpose.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k == "SHARDMQ_BIN" or k.startswith("SHARDMQ_TEST_"))
    }
    env.update(extra)
    return env


def wait_ready(broker: Broker, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Waits until the broker answers MQTT CONNECTs (several in a row: one per shard, likely)."""
    deadline = time.monotonic() + timeout
    good = 0
    while time.monotonic() < deadline:
        if broker.proc is not None and broker.proc.poll() is not None:
            raise RuntimeError(
                f"{broker.kind} exited with status {broker.proc.returncode} before accepting "
                f"MQTT connections on {broker.host}:{broker.port}."
                f"\n--- log ---\n{broker.log_tail()}"
            )
        if mqtt_probe(broker.host, broker.port):
            good += 1
            if good >= 4:
                return
            continue
        good = 0
        time.sleep(0.05)
    raise RuntimeError(
        f"{broker.kind} did not accept MQTT connections on {broker.host}:{broker.port} within "
        f"{timeout}s.\n--- log ---\n{broker.log_tail()}"
    )


def start_shardmq(workdir: Path, shards: int = 2, extra: dict[str, str] | None = None) -> Broker:
    binary = shardmq_binary()
    if not binary.is_file():
        raise RuntimeError(
            f"shardmq binary not found at {binary}: run `cargo build --release` first, "
            "or set SHARDMQ_BIN, or test another broker with SHARDMQ_TEST_EXTERNAL=host:port"
        )
    port = free_port()
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "shardmq.log"
    overrides = {
        "SHARDMQ_LISTENERS__TCP__DEFAULT__BIND": f"127.0.0.1:{port}",
        "SHARDMQ_NODE__SHARDS": str(shards),
        "SHARDMQ_NODE__DATA_DIR": str(data_dir),
    }
    # Other listeners of the default config get free loopback ports too, so that several
    # instances (and a broker already running on the defaults) never collide. Only keys the
    # binary knows are set: unknown keys are start-up errors.
    if re.search(r"(?m)^\[management\]", embedded_config(binary)):
        overrides["SHARDMQ_MANAGEMENT__BIND"] = f"127.0.0.1:{free_port()}"
    if re.search(r"(?m)^\[cluster\]", embedded_config(binary)):
        overrides["SHARDMQ_CLUSTER__BIND"] = f"127.0.0.1:{free_port()}"
    overrides.update(extra or {})
    env = broker_env(overrides)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "start"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    broker = Broker("127.0.0.1", port, "shardmq", proc, log_path, workdir)
    try:
        wait_ready(broker)
    except BaseException:
        kill(broker)
        raise
    return broker


def start_mosquitto(workdir: Path) -> Broker:
    # Debian puts the broker in /usr/sbin, which is not on every user's PATH.
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not exe:
        raise RuntimeError("SHARDMQ_TEST_MOSQUITTO=1 needs mosquitto: apt-get install mosquitto")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
    )
    log_path = workdir / "mosquitto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    broker = Broker("127.0.0.1", port, "mosquitto", proc, log_path, workdir)
    try:
        wait_ready(broker)
    except BaseException:
        kill(broker)
        raise
    return broker


def stop(broker: Broker, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Signals the broker and waits for it to exit.

    Returns its exit status, or None if it had to be killed after `timeout` seconds."""
    if broker.proc is None:
        return 0
    if broker.proc.poll() is None:
        broker.proc.send_signal(sig)
        try:
            broker.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(broker)
            return None
    return broker.proc.returncode


def kill(broker: Broker) -> None:
    if broker.proc is not None and broker.proc.poll() is None:
        broker.proc.kill()
        broker.proc.wait()
