#!/usr/bin/env python3
"""Head-to-head benchmark: the same load against shardmq and mosquitto, in one invocation.

Each broker runs pinned to the same core (taskset), the load generator (shardmq-bench) on the
others. Every scenario prints one table row per broker plus the ratio shardmq / other, and the
table is appended to docs/benchmarks.md with the date, commit and exact commands.

    python3 benches/harness.py                 # all scenarios
    python3 benches/harness.py pairs conn      # some of them
    python3 benches/harness.py --quick         # short runs (smoke test)
    python3 benches/harness.py conn-split      # connect rate as between two hosts (root: netns)

Needs: cargo (builds shardmq and shardmq-bench in release), mosquitto (apt) for the reference.
rumqttd runs too when RUMQTTD_BIN (or a rumqttd on PATH) is set: `cargo install rumqttd --root DIR`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One port rule for the interop suite and the harness (tests/interop/ports.py).
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from ports import free_port  # noqa: E402
BROKER_CORE = "0"
GEN_CORES = "1" if os.cpu_count() == 2 else f"1-{os.cpu_count() - 1}"
GEN_THREADS = max(1, (os.cpu_count() or 2) - 1)
# rumqttd built from crates.io (`cargo install rumqttd --root DIR`); run when present.
RUMQTTD = os.environ.get("RUMQTTD_BIN", shutil.which("rumqttd") or "")
OTHERS = ["mosquitto"] + (["rumqttd"] if RUMQTTD and Path(RUMQTTD).exists() else [])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_s(core: str) -> float:
    """Seconds one core spent on anything but idle (softirq included: in `split` runs that is
    the broker's side of the network)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            f = [int(x) for x in line.split()[1:]]
            return (sum(f[:8]) - f[3] - f[4] - f[7]) / os.sysconf("SC_CLK_TCK")  # - idle, iowait, steal
    return 0.0


def wait_port(port: int, timeout: float = 10, split: "Split | None" = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if split:
            probe = f"import socket; socket.create_connection(('{split.host}', {port}), timeout=0.2)"
            if subprocess.run([*split.gen, sys.executable, "-c", probe],
                              stderr=subprocess.DEVNULL).returncode == 0:
                return
        else:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"broker not listening on {port}")


class Split:
    """Broker and generator in two network namespaces joined by a veth pair, each side's
    receive path steered (RPS) to its own core: as between two hosts, each pays for the
    packets it receives. On loopback the sender's core runs the receiver's whole TCP path,
    so the generator's core paid for both ends of every handshake and capped any broker's
    connect rate at the same figure."""

    host = "10.231.0.1"  # exists only inside the broker's namespace

    def __enter__(self) -> "Split":
        tag = f"{os.getpid() % 100000}"
        self.ns_b, self.ns_g = f"smqh{tag}b", f"smqh{tag}g"
        self.broker = ["ip", "netns", "exec", self.ns_b]
        self.gen = ["ip", "netns", "exec", self.ns_g]
        veth_b, veth_g = f"smqv{tag}b", f"smqv{tag}g"
        steps = [
            ["ip", "netns", "add", self.ns_b],
            ["ip", "netns", "add", self.ns_g],
            ["ip", "link", "add", veth_b, "type", "veth", "peer", "name", veth_g],
            ["ip", "link", "set", veth_b, "netns", self.ns_b],
            ["ip", "link", "set", veth_g, "netns", self.ns_g],
            ["ip", "-n", self.ns_b, "addr", "add", f"{self.host}/24", "dev", veth_b],
            ["ip", "-n", self.ns_g, "addr", "add", "10.231.0.2/24", "dev", veth_g],
            ["ip", "-n", self.ns_b, "link", "set", veth_b, "up"],
            ["ip", "-n", self.ns_g, "link", "set", veth_g, "up"],
            ["ip", "-n", self.ns_b, "link", "set", "lo", "up"],
            [*self.broker, "sh", "-c",
             f"echo {1 << int(BROKER_CORE):x} > /sys/class/net/{veth_b}/queues/rx-0/rps_cpus"],
            [*self.gen, "sh", "-c",
             f"echo {1 << int(GEN_CORES.split('-')[0]):x} > /sys/class/net/{veth_g}/queues/rx-0/rps_cpus"],
            [*self.gen, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"],
        ]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        for ns in (self.ns_b, self.ns_g):  # deleting them deletes the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Broker:
    def __init__(self, kind: str, work: Path, split: Split | None = None):
        self.kind = kind
        self.port = free_port()
        self.work = work
        self.split = split
        self.host = split.host if split else "127.0.0.1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        if self.kind == "shardmq":
            env = dict(os.environ)
            env.update(
                {
                    "SHARDMQ_LISTENERS__TCP__DEFAULT__BIND": f"{self.host}:{self.port}",
                    "SHARDMQ_NODE__SHARDS": "1",
                    "SHARDMQ_NODE__DATA_DIR": str(self.work / "data"),
                    "SHARDMQ_MANAGEMENT__BIND": "",
                    "SHARDMQ_CLUSTER__BIND": "",
                    "SHARDMQ_MQTT__MAX_QUEUED_MESSAGES": "100000",
                    "SHARDMQ_MQTT__MAX_INFLIGHT": "1024",
                }
            )
            cmd = ["taskset", "-c", BROKER_CORE, str(ROOT / "target/release/shardmq"), "start"]
        elif self.kind == "rumqttd":
            conf = self.work / "rumqttd.toml"
            conf.write_text(
                "id = 0\n\n[router]\nid = 0\nmax_connections = 20010\nmax_outgoing_packet_count = 200\n"
                "max_segment_size = 104857600\nmax_segment_count = 10\n\n"
                f"[v4.1]\nname = \"v4-1\"\nlisten = \"{self.host}:{self.port}\"\nnext_connection_delay_ms = 0\n"
                "    [v4.1.connections]\n    connection_timeout_ms = 60000\n    max_payload_size = 20480\n"
                "    max_inflight_count = 100\n    dynamic_filters = true\n"
            )
            cmd = ["taskset", "-c", BROKER_CORE, RUMQTTD, "-c", str(conf)]
            env = dict(os.environ)
        else:
            conf = self.work / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\nallow_anonymous true\nmax_queued_messages 100000\n"
                "max_inflight_messages 1024\nlog_type error\n"
            )
            exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            cmd = ["taskset", "-c", BROKER_CORE, exe, "-c", str(conf)]
            env = dict(os.environ)
        if self.split:
            cmd = [*self.split.broker, *cmd]  # `ip netns exec` execs: the pid stays the broker's
        self.cmd = " ".join(cmd)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, split=self.split)
        time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def bench(port: int, args: list[str], timeout: float) -> dict:
    out = Path(tempfile.mktemp(suffix=".json"))
    cmd = ["taskset", "-c", GEN_CORES, str(ROOT / "target/release/shardmq-bench"), *args,
           "-p", str(port), "--threads", str(GEN_THREADS), "--quiet", "--json", str(out)]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    data = json.loads(out.read_text()) if out.exists() else {}
    out.unlink(missing_ok=True)
    data["cmd"] = "shardmq-bench " + " ".join(a for a in args)
    return data


def scenarios(quick: bool):
    """name -> (generator args without rate, overload rate)."""
    d = "3" if quick else "5"
    out = {}
    for q in ("0", "1"):
        for size in ("16", "1024"):
            # --batch 16: each publisher sends 16 consecutive messages of the schedule in one
            # write, so one generator core is not spent on a syscall per message.
            common = ["-q", q, "-s", size, "--duration", d, "-i", "0", "--batch", "16"]
            out[f"pairs-q{q}-{size}B"] = (["pubsub", "--scenario", "pairs", "--pubs", "50", *common], 2_000_000)
            out[f"fanin-q{q}-{size}B"] = (["pubsub", "--scenario", "fanin", "--pubs", "1000", *common], 2_000_000)
            # Fan-out multiplies each publish by 1000 deliveries.
            out[f"fanout-q{q}-{size}B"] = (["pubsub", "--scenario", "fanout", "--subs", "1000", "--pubs", "1", *common], 2_000)
    return out


def run_once(kind: str, args: list[str], rate: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = Broker(kind, Path(tmp)).start()
        try:
            r = bench(b.port, [*args, "--rate", str(rate)], timeout=120)
            r["rss_mib"] = rss_kib(b.proc.pid) / 1024
        finally:
            b.stop()
    r.update({"broker": kind, "broker_cmd": b.cmd, "rate": rate})
    return r


def peak(kind: str, args: list[str], overload: int, fan: int) -> dict:
    """Highest delivery rate of a broker: one run far above capacity, then a ladder of offered
    rates (x1.3 each) upward from what that run delivered, for as long as the broker delivers
    at least 95% of what is offered; the best delivery of all runs counts. A run far above
    capacity alone measures how the generator copes with overload (its one core then goes to
    sending), not the broker's capacity."""
    best = run_once(kind, args, overload)
    rate = int(best.get("recv_rate", 0) / fan * 1.3)
    for _ in range(8):
        if rate <= 0 or rate >= overload:
            break
        r = run_once(kind, args, rate)
        if r.get("recv_rate", 0) > best.get("recv_rate", 0):
            best = r
        if r.get("recv_rate", 0) < 0.95 * rate * fan:
            break
        rate = int(rate * 1.3)
    return best


def run_load(name: str, args: list[str], overload: int) -> list[dict]:
    """Peak throughput of each broker (see `peak`), then latency of all at half of mosquitto's
    peak rate."""
    rows = {}
    fan = 1000 if "fanout" in name else 1
    for kind in ["shardmq", *OTHERS]:
        r = peak(kind, args, overload, fan)
        r["scenario"] = f"{name} max"
        rows[("max", kind)] = r
    mosq = rows[("max", "mosquitto")]
    rate = max(1, int(mosq.get("recv_rate", 0) / fan / 2))
    for kind in ["shardmq", *OTHERS]:
        r = run_once(kind, args, rate)
        r["scenario"] = f"{name} half"
        rows[("half", kind)] = r
    return list(rows.values())


def start_bench(args: list[str], port: int, out: Path, split: Split | None = None) -> subprocess.Popen:
    """A generator left running (clients held open), on the generator's cores (and namespace)."""
    cmd = [*(split.gen if split else []), "taskset", "-c", GEN_CORES, str(ROOT / "target/release/shardmq-bench"),
           *args, "-p", str(port), "--threads", str(GEN_THREADS), "--quiet", "--json", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_conn(n: int, split: Split | None = None, in_flight: int = 512) -> list[dict]:
    """Connect rate, and RSS per idle connection with every client connected. At most
    `in_flight` handshakes at once: beyond a broker's listen backlog (mosquitto's is 100) the
    kernel drops SYNs and the clients retry after a second, as in a reconnect storm."""
    rows = []
    # The harness itself keeps off the broker's core, whose busy time is measured here (its
    # children are pinned explicitly; the cluster scenario's are not, so this is undone).
    everywhere = os.sched_getaffinity(0)
    gen = GEN_CORES.split("-")
    os.sched_setaffinity(0, range(int(gen[0]), int(gen[-1]) + 1))
    try:
        for kind in ["shardmq", *OTHERS]:
            rows.append(conn_once(kind, n, split, in_flight))
    finally:
        os.sched_setaffinity(0, everywhere)
    return rows


def conn_once(kind: str, n: int, split: Split | None, in_flight: int) -> dict:
    """One broker's row of `run_conn`."""
    with tempfile.TemporaryDirectory() as tmp:
        b = Broker(kind, Path(tmp), split).start()
        base = rss_kib(b.proc.pid)
        cpu_before = cpu_s(b.proc.pid)
        core_before = core_busy_s(BROKER_CORE)
        out = Path(tmp) / "conn.json"
        args = ["conn", "-c", str(n), "-i", "0", "--max-connecting", str(in_flight), "-k", "300", "--duration", "12"]
        if split:
            args += ["-h", split.host]
        hold = start_bench(args, b.port, out, split)
        last, stable = -1, 0
        deadline = time.time() + 11
        while time.time() < deadline and stable < 2:
            time.sleep(0.5)
            now = rss_kib(b.proc.pid)
            # Only once the clients' memory shows: before they start it is stable too.
            grown = (now - base) * 1024 > n * 100
            stable = stable + 1 if now == last and grown else 0
            last = now
        # Measured when the broker's memory stopped growing: the connects are over.
        cpu_used, core_used = cpu_s(b.proc.pid) - cpu_before, core_busy_s(BROKER_CORE) - core_before
        hold.wait(60)
        r = json.loads(out.read_text()) if out.exists() else {}
        r["cmd"] = "shardmq-bench " + " ".join(args)
        r["rss_per_conn_b"] = round((last - base) * 1024 / n)
        r["cpu_per_conn_us"] = round(cpu_used * 1e6 / n, 1)
        r["core_per_conn_us"] = round(core_used * 1e6 / n, 1)
        r["rss_mib"] = last / 1024
        b.stop()
        name = f"conn-{n}" + (" split" if split else "") + (f" {in_flight} in flight" if in_flight != 512 else "")
        r.update({"broker": kind, "scenario": name, "broker_cmd": b.cmd})
        return r


def run_subs(total: int) -> list[dict]:
    """Memory per subscription with `total` distinct filters (10% with a wildcard) from 100
    clients, then the delivery rate with all of them in place."""
    rows = []
    clients = 100
    per = total // clients
    for kind in ["shardmq", *OTHERS]:
        with tempfile.TemporaryDirectory() as tmp:
            b = Broker(kind, Path(tmp)).start()
            base = rss_kib(b.proc.pid)
            sub_json = Path(tmp) / "sub.json"
            args = ["sub", "-c", str(clients), "-i", "0", "-t", "fleet/%i/%k", "--subs-per-client", str(per),
                    "--duration", "120"]
            hold = start_bench(args, b.port, sub_json)
            last, stable = -1, 0
            deadline = time.time() + 55
            while time.time() < deadline and stable < 3:
                time.sleep(1)
                now = rss_kib(b.proc.pid)
                stable = stable + 1 if now == last else 0
                last = now
            pub_args = ["pub", "-c", str(clients), "-t", f"fleet/%i/%rand_{per - 1}", "-q", "0", "-s", "16",
                        "-i", "0", "--rate", "2000000", "--duration", "5"]
            p = bench(b.port, pub_args, timeout=60)
            time.sleep(1)
            hold.terminate()
            hold.wait(30)
            b.stop()
            received = json.loads(sub_json.read_text()).get("received", 0) if sub_json.exists() else 0
            rows.append({"broker": kind, "scenario": f"subs-{total}", "broker_cmd": b.cmd,
                         "cmd": "shardmq-bench " + " ".join(args) + "  +  " + p["cmd"], "rss_mib": last / 1024,
                         "recv_rate": received / max(p.get("duration_s", 5), 0.001),
                         "rss_per_sub_b": round((last - base) * 1024 / total)})
    return rows


def metrics_of(api_port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("shardmq_"):
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            out[name] = float(value)
    return out


def run_cluster(quick: bool) -> list[dict]:
    """Publishers on n1, subscribers on n2 and n3, against the same load on one node."""
    dur = 3 if quick else 6
    rows = []
    for layout in ("single node", "3-node cluster"):
        with tempfile.TemporaryDirectory() as tmp:
            nodes = []
            count = 1 if layout == "single node" else 3
            for i in range(count):
                mqtt, cport, api = free_port(), free_port(), free_port()
                env = dict(os.environ)
                env.update({
                    "SHARDMQ_NODE__NAME": f"n{i + 1}@127.0.0.1",
                    "SHARDMQ_NODE__SHARDS": "1",
                    "SHARDMQ_NODE__DATA_DIR": f"{tmp}/n{i + 1}",
                    "SHARDMQ_LISTENERS__TCP__DEFAULT__BIND": f"127.0.0.1:{mqtt}",
                    "SHARDMQ_CLUSTER__BIND": f"127.0.0.1:{cport}",
                    "SHARDMQ_MANAGEMENT__BIND": f"127.0.0.1:{api}",
                    "SHARDMQ_MQTT__MAX_QUEUED_MESSAGES": "100000",
                })
                proc = subprocess.Popen([str(ROOT / "target/release/shardmq"), "start"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_port(mqtt)
                nodes.append((proc, mqtt, cport, api))
            ctl = str(ROOT / "target/release/shardmq")
            for proc, mqtt, cport, api in nodes[1:]:
                subprocess.run([ctl, "ctl", "--api", f"127.0.0.1:{api}", "cluster", "join",
                                f"n1@127.0.0.1:{nodes[0][2]}"], capture_output=True, timeout=15)
            time.sleep(2)
            sub_hosts = ",".join(f"127.0.0.1:{n[1]}" for n in (nodes[1:] if count > 1 else nodes))
            sub_json, pub_json = Path(tmp) / "sub.json", Path(tmp) / "pub.json"
            bench_bin = str(ROOT / "target/release/shardmq-bench")
            sub_args = ["sub", "-h", sub_hosts, "-c", "50", "-t", "bench/%i", "-q", "1", "-i", "0",
                        "--duration", str(dur + 4)]
            pub_args = ["pub", "-h", f"127.0.0.1:{nodes[0][1]}", "-c", "50", "-t", "bench/%i", "-q", "1",
                        "-s", "16", "-i", "0", "--rate", "2000000", "--duration", str(dur)]
            sub = subprocess.Popen([bench_bin, *sub_args, "--quiet", "--json", str(sub_json)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
            subprocess.run([bench_bin, *pub_args, "--quiet", "--json", str(pub_json)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            sub.wait(60)
            m = metrics_of(nodes[0][3])
            for proc, *_ in nodes:
                proc.terminate()
                proc.wait(10)
            s_r, p_r = json.loads(sub_json.read_text()), json.loads(pub_json.read_text())
            writes = m.get("shardmq_cluster_link_writes_total", 0)
            rows.append({
                "broker": "shardmq", "scenario": f"cluster: {layout}",
                "recv_rate": s_r["received"] / max(p_r["duration_s"], 0.001),
                "latency_us": s_r["latency_us"], "rss_mib": 0,
                "batch": (m.get("shardmq_cluster_forwarded_total", 0) / writes) if writes else 0,
                "cmd": "shardmq-bench " + " ".join(sub_args) + "  +  shardmq-bench " + " ".join(pub_args),
            })
    single, cluster = rows
    rows.append({"broker": "**cluster / single node**", "scenario": "cluster: ratio",
                 "ratio_text": f"throughput x{cluster['recv_rate'] / max(single['recv_rate'], 1):.2f}, "
                               f"{cluster['batch']:.1f} messages per link write"})
    return rows


def fmt(rows: list[dict]) -> list[str]:
    lines = []
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], {})[r["broker"]] = r
    for r in rows:
        if r["scenario"].startswith("cluster"):
            if "ratio_text" in r:
                lines.append(f"| cluster | {r['broker']} | {r['ratio_text']} | | | | |")
            else:
                lat = r["latency_us"]
                lines.append(f"| {r['scenario']} | shardmq | {r['recv_rate']:.0f} | {lat['p50']} | {lat['p99']} | | |")
    for scen, per in by.items():
        if scen.startswith("cluster"):
            continue
        s = per.get("shardmq", {})
        for kind in ["shardmq", *OTHERS]:
            r = per.get(kind)
            if not r:
                continue
            lat = r.get("latency_us", {})
            extra = ""
            if "rss_per_sub_b" in r:
                extra = f"{r['rss_per_sub_b']} B/subscription"
            if "rss_per_conn_b" in r:
                extra = (f"{r['connect_rate']:.0f} conn/s, {r['rss_per_conn_b']} B/conn, "
                         f"broker CPU {r.get('cpu_per_conn_us', 0)} µs/conn, "
                         f"broker core busy {r.get('core_per_conn_us', 0)} µs/conn")
            if scen.endswith(" max") and "rate" in r:
                extra = f"offered {r['rate']} msg/s"
            lines.append(
                f"| {scen} | {kind} | {r.get('recv_rate', 0):.0f} | {lat.get('p50', 0)} | {lat.get('p99', 0)} | "
                f"{r.get('rss_mib', 0):.1f} | {extra} |"
            )
        for other in OTHERS:
            m = per.get(other)
            if not (s and m):
                continue
            if "rss_per_sub_b" in s:
                ratio = (f"memory/subscription x{s['rss_per_sub_b'] / max(m['rss_per_sub_b'], 1):.2f}, "
                         f"delivery rate x{s.get('recv_rate', 0) / max(m.get('recv_rate', 0), 1):.2f}")
            elif "rss_per_conn_b" in s:
                ratio = (f"connect rate x{s['connect_rate'] / max(m['connect_rate'], 1):.2f}, "
                         f"connections per broker CPU-second "
                         f"x{m.get('cpu_per_conn_us', 0) / max(s.get('cpu_per_conn_us', 0), 0.001):.2f}, "
                         f"per broker core-second "
                         f"x{m.get('core_per_conn_us', 0) / max(s.get('core_per_conn_us', 0), 0.001):.2f}, "
                         f"memory/conn x{s['rss_per_conn_b'] / max(m['rss_per_conn_b'], 1):.2f}")
            elif scen.endswith(" half"):
                ratio = (f"at {s.get('rate')} msg/s: p99 "
                         f"x{s.get('latency_us', {}).get('p99', 0) / max(m.get('latency_us', {}).get('p99', 0), 1):.2f}")
            else:
                ratio = f"throughput x{s.get('recv_rate', 0) / max(m.get('recv_rate', 0), 1):.2f}"
            lines.append(f"| {scen} | **shardmq / {other}** | {ratio} | | | | |")
    return lines


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "shardmq", "-p", "shardmq-bench"], cwd=ROOT, check=True)
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        print("mosquitto not installed (apt-get install mosquitto): no reference to compare with", file=sys.stderr)
        return 1
    rows = []
    loads = scenarios(quick)
    wanted = argv or ["pairs", "fanin", "fanout", "conn", "subs", "cluster"]
    if not argv and os.geteuid() == 0 and shutil.which("ip"):
        wanted.append("conn-split")
    for name, (args, overload) in loads.items():
        if any(name.startswith(w) for w in wanted):
            print(f"running {name}", file=sys.stderr)
            rows += run_load(name, args, overload)
    if "conn" in wanted:
        print("running conn", file=sys.stderr)
        rows += run_conn(2000 if quick else 15000)
    if "conn-split" in wanted:
        print("running conn-split", file=sys.stderr)
        with Split() as split:
            rows += run_conn(2000 if quick else 15000, split)
            rows += run_conn(2000 if quick else 15000, split, in_flight=64)
    if "cluster" in wanted:
        print("running cluster", file=sys.stderr)
        rows += run_cluster(quick)
    if "subs" in wanted:
        for total in ([10_000] if quick else [100_000, 1_000_000]):
            print(f"running subs-{total}", file=sys.stderr)
            rows += run_subs(total)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    header = [
        "",
        f"## Run of {datetime.date.today()} at commit {commit}" + (" (quick)" if quick else ""),
        "",
        f"Command: `python3 benches/harness.py {' '.join(sys.argv[1:])}`. Brokers pinned with "
        f"`taskset -c {BROKER_CORE}` (shardmq with `node.shards=1`), generator on cores {GEN_CORES}.",
        "",
        "`max` rows: each broker's peak, msgs/s = what the subscribers received at the offered rate (open loop) "
        "that delivered most: one run far above capacity, then offered rates rising x1.3 from what it delivered "
        "while delivery rises. `half` rows: every broker at half of mosquitto's peak, for latency.",
        "",
        "`split` rows: broker and generator in two network namespaces joined by a veth pair, each "
        "side's receive path steered to its own core, as between two hosts.",
        "",
        f"Reference brokers: {', '.join(OTHERS)}.",
        "",
        "| scenario | broker | msgs/s received | p50 µs | p99 µs | RSS MiB | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    table = header + fmt(rows)
    cmds = sorted({r["cmd"] for r in rows if "cmd" in r})
    table += ["", "Load commands (each also given `-p PORT --threads N --quiet --json FILE`):", ""]
    table += [f"- `{c}`" for c in cmds]
    print("\n".join(table))
    with open(ROOT / "docs/benchmarks.md", "a") as f:
        f.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
