"""Small, timeout-bounded wrappers around paho-mqtt 2.x and the mosquitto command-line clients.

Every wait here has a timeout, so a broker that misbehaves fails a test instead of hanging it.
"""

from __future__ import annotations

import queue
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

# Default time to wait for one broker response (CONNACK, SUBACK, a message, ...).
WAIT = 5.0


def client_id(tag: str) -> str:
    """A unique client id of at most 23 characters (the MQTT 3.1 limit)."""
    return f"{tag[:12]}-{secrets.token_hex(4)}"


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: object = None

    @property
    def text(self) -> str:
        return self.payload.decode()


@dataclass
class ConnAck:
    reason_code: object
    session_present: bool
    properties: object = None


class Client:
    """A paho client running its network loop in a thread, with blocking, bounded helpers."""

    def __init__(
        self,
        broker,
        tag: str = "client",
        *,
        protocol: int = mqtt.MQTTv311,
        clean_session: bool = True,
        cid: str | None = None,
        keepalive: int = 30,
    ):
        self.broker = broker
        self.protocol = protocol
        self.clean_session = clean_session
        self.keepalive = keepalive
        self.id = cid or client_id(tag)
        kwargs = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean_session
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.id,
            protocol=protocol,
            # Never reconnect behind a test's back: a dropped connection must be seen as one.
            reconnect_on_failure=False,
            **kwargs,
        )
        self.messages: queue.Queue[Message] = queue.Queue()
        self._connacks: queue.Queue[ConnAck] = queue.Queue()
        self._acks: dict[int, object] = {}
        self._cond = threading.Condition()
        self.disconnected = threading.Event()
        self.disconnect_reason = None
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_unsubscribe = self._on_unsubscribe
        self.paho.on_publish = self._on_publish
        self.paho.on_disconnect = self._on_disconnect
        self._loop_running = False

    # -- callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, _c, _u, flags, reason_code, properties):
        self._connacks.put(ConnAck(reason_code, bool(flags.session_present), properties))

    def _on_message(self, _c, _u, msg):
        self.messages.put(
            Message(
                msg.topic,
                bytes(msg.payload),
                msg.qos,
                bool(msg.retain),
                getattr(msg, "properties", None),
            )
        )

    def _ack(self, mid, value):
        with self._cond:
            self._acks[mid] = value
            self._cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, reason_codes, _properties):
        self._ack(mid, list(reason_codes))

    def _on_unsubscribe(self, _c, _u, mid, reason_codes, _properties):
        self._ack(mid, reason_codes)

    def _on_publish(self, _c, _u, mid, reason_code, _properties):
        self._ack(("pub", mid), reason_code)

    def _on_disconnect(self, _c, _u, _flags, reason_code, _properties):
        self.disconnect_reason = reason_code
        self.disconnected.set()

    def _wait_ack(self, key, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.id}: no {what} within {timeout}s")
                self._cond.wait(left)
            return self._acks.pop(key)

    # -- operations ----------------------------------------------------------------------------
    def will(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False):
        self.paho.will_set(topic, payload, qos=qos, retain=retain)
        return self

    def connect(self, timeout: float = WAIT, *, clean_start=None, properties=None) -> ConnAck:
        """Connects and waits for CONNACK; fails the test unless the connection is accepted."""
        kwargs = {}
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = True if clean_start is None else clean_start
            kwargs["properties"] = properties
        self.paho.connect(self.broker.host, self.broker.port, self.keepalive, **kwargs)
        self.paho.loop_start()
        self._loop_running = True
        try:
            ack = self._connacks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.id}: no CONNACK within {timeout}s") from None
        assert not ack.reason_code.is_failure, f"{self.id}: connection refused: {ack.reason_code}"
        return ack

    def subscribe(self, topic_or_list, qos: int = 0, timeout: float = WAIT, options=None):
        """Subscribes and waits for SUBACK; returns the granted QoS (or v5 reason codes)."""
        if options is not None:
            result, mid = self.paho.subscribe(topic_or_list, options=options)
        else:
            result, mid = self.paho.subscribe(topic_or_list, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"{self.id}: subscribe failed locally: {result}"
        codes = self._wait_ack(mid, "SUBACK", timeout)
        for code in codes:
            assert not code.is_failure, f"{self.id}: subscription refused: {codes}"
        return codes

    def unsubscribe(self, topic: str, timeout: float = WAIT):
        result, mid = self.paho.unsubscribe(topic)
        assert result == mqtt.MQTT_ERR_SUCCESS
        return self._wait_ack(mid, "UNSUBACK", timeout)

    def publish(
        self,
        topic,
        payload,
        qos: int = 0,
        retain: bool = False,
        properties=None,
        wait: bool = True,
        timeout: float = WAIT,
    ):
        """Publishes; with wait, blocks until the QoS flow completes (PUBACK/PUBCOMP)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.id}: publish failed locally: {info.rc}"
        if wait:
            info.wait_for_publish(timeout)
            assert info.is_published(), (
                f"{self.id}: publish to {topic} not acknowledged in {timeout}s"
            )
        return info

    def puback_reason(self, mid: int, timeout: float = WAIT):
        return self._wait_ack(("pub", mid), "publish acknowledgement", timeout)

    def disconnect(self, timeout: float = WAIT):
        """Clean disconnect: sends DISCONNECT and waits for the socket to close."""
        if not self._loop_running:
            return
        self.paho.disconnect()
        if not self.disconnected.wait(timeout):
            raise AssertionError(f"{self.id}: disconnect did not complete within {timeout}s")
        self.paho.loop_stop()
        self._loop_running = False

    def kill(self):
        """Abnormal close: stops the network loop and resets the TCP connection, no DISCONNECT."""
        sock = self.paho.socket()
        if self._loop_running:
            self.paho.loop_stop()
            self._loop_running = False
        if sock is not None:
            try:
                # SO_LINGER 0: close() sends a RST at once, like a crashed client.
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            except OSError:
                pass
            sock.close()

    def close(self):
        """Best-effort teardown, for fixtures."""
        try:
            if self._loop_running and self.paho.is_connected():
                self.disconnect(timeout=2)
        except Exception:
            pass
        if self._loop_running:
            self.paho.loop_stop()
            self._loop_running = False

    # -- receiving -----------------------------------------------------------------------------
    def get(self, timeout: float = WAIT) -> Message:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.id}: no message within {timeout}s") from None

    def collect(self, n: int, timeout: float = WAIT) -> list[Message]:
        """Exactly n messages (fails if fewer arrive within timeout)."""
        deadline = time.monotonic() + timeout
        got: list[Message] = []
        while len(got) < n:
            left = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.id}: got {len(got)} of {n} messages within {timeout}s: "
                    f"{[(m.topic, m.payload[:40]) for m in got[:10]]}"
                ) from None
        return got

    def drain(self, quiet: float = 0.3) -> list[Message]:
        """Everything that arrives until nothing has come for `quiet` seconds."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return got

    def assert_no_message(self, wait: float = 0.5):
        extra = self.drain(wait)
        assert not extra, f"{self.id}: unexpected messages {[(m.topic, m.payload) for m in extra]}"


def v5_options(qos: int, **kw) -> SubscribeOptions:
    return SubscribeOptions(qos=qos, **kw)


def publish_properties(**props) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    for k, v in props.items():
        setattr(p, k, v)
    return p


# ---------------------------------------------------------------------------------------------
# mosquitto_pub / mosquitto_sub


def _cli_base(tool: str, broker, extra) -> list[str]:
    return [tool, "-h", broker.host, "-p", str(broker.port), *extra]


def mosquitto_pub(broker, *args, input: str | None = None, timeout: float = WAIT):
    """Runs mosquitto_pub and fails the test if it does not succeed within timeout."""
    cmd = _cli_base("mosquitto_pub", broker, args)
    try:
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}"
    return r


# What mosquitto_sub prints per message: "MSG|qos|retain|topic|payload" (-F in mosquitto_sub(1)).
_SUB_FORMAT = "MSG|%q|%r|%t|%p"


@dataclass
class CliMessage:
    qos: int
    retain: bool
    topic: str
    payload: str


@dataclass
class MosquittoSub:
    """A background mosquitto_sub whose SUBACK can be awaited before publishing."""

    cmd: list[str]
    proc: subprocess.Popen = None
    lines: queue.Queue = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def start(self):
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            if "received SUBACK" in line:
                self.subscribed.set()
            if line.startswith("MSG|"):
                self.lines.put(line)

    def wait_subscribed(self, timeout: float = WAIT):
        if not self.subscribed.wait(timeout):
            self.stop()
            raise AssertionError(
                f"mosquitto_sub got no SUBACK within {timeout}s; output: {self.output[-10:]}"
            )

    def messages(self) -> list[CliMessage]:
        out = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            _, q, r, topic, payload = line.split("|", 4)
            out.append(CliMessage(int(q), r == "1", topic, payload))

    def wait(self, timeout: float = WAIT) -> int:
        """Waits for the process to exit by itself (e.g. after -C N messages)."""
        try:
            status = self.proc.wait(timeout=timeout)
            # Its last lines may still be in the pipe: the reader ends at end of file.
            self.reader.join(timeout=2)
            return status
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"mosquitto_sub did not exit within {timeout}s; output: {self.output[-10:]}"
            ) from None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def mosquitto_sub(broker, *args) -> MosquittoSub:
    """Starts mosquitto_sub in debug mode (-d, to see SUBACK) with a parseable output format."""
    cmd = _cli_base("mosquitto_sub", broker, ["-d", "-F", _SUB_FORMAT, *args])
    # Its debug lines are block-buffered on a pipe: line-buffer them so SUBACK is seen at once.
    if shutil.which("stdbuf"):
        cmd = ["stdbuf", "-oL", *cmd]
    return MosquittoSub(cmd).start()
