"""One hostile SUBSCRIBE against a shardmq binary, with a pinger on the same shard (issue 9).

Usage: python3 benches/subscribe_stall.py BINARY N [R]
  N filters f/0..f/N-1 in one SUBSCRIBE; with R, first R retained messages r/0.. and N copies
  of "#" instead. Prints the SUBACK time, the retained messages received and the pinger's
  PINGREQ -> PINGRESP latencies (p50, p99, max). The broker runs with node.shards = 1 and
  mqtt.max_packet_size = 4 MiB; CAP=<n> sets mqtt.max_subscribe_filters (a binary that does not
  know the key refuses to start with it).
"""
import socket, struct, subprocess, sys, threading, time, os, tempfile
BIN, N = sys.argv[1], int(sys.argv[2]); R = int(sys.argv[3]) if len(sys.argv) > 3 else 0
port = 20000 + os.getpid() % 10000
d = tempfile.mkdtemp()
env = dict(os.environ, SHARDMQ_LISTENERS__TCP__DEFAULT__BIND=f"127.0.0.1:{port}", SHARDMQ_NODE__SHARDS="1",
           SHARDMQ_NODE__DATA_DIR=d, SHARDMQ_MANAGEMENT__BIND="", SHARDMQ_CLUSTER__BIND="",
           SHARDMQ_MQTT__MAX_PACKET_SIZE="4194304")
if os.environ.get("CAP"): env["SHARDMQ_MQTT__MAX_SUBSCRIBE_FILTERS"] = os.environ["CAP"]
p = subprocess.Popen([BIN, "start"], env=env, stdout=subprocess.DEVNULL, stderr=open(d + "/log", "w"))
def varint(n):
    out = b""
    while True:
        b = n % 128; n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n: return out
def pkt(first, body): return bytes([first]) + varint(len(body)) + body
def field(s): return struct.pack(">H", len(s)) + s
def conn(cid):
    for _ in range(200):
        try: s = socket.create_connection(("127.0.0.1", port)); break
        except OSError: time.sleep(0.05)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(pkt(0x10, field(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 600) + field(cid)))
    read(s); return s
def readn(s, n):
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x: raise EOFError
        b += x
    return b
def read(s):
    h = readn(s, 1)[0]; l = 0; m = 1
    while True:
        b = readn(s, 1)[0]; l += (b & 127) * m; m *= 128
        if b < 128: break
    return h, readn(s, l)
try:
    if R:
        pub = conn(b"retainer")
        pub.sendall(b"".join(pkt(0x31, field(b"r/%d" % i) + b"v") for i in range(R)))
        pub.sendall(b"\xc0\x00"); read(pub)
    big = conn(b"big"); pinger = conn(b"pinger")
    rtts = []; stop = False
    def ping():
        while not stop:
            t = time.monotonic(); pinger.sendall(b"\xc0\x00"); read(pinger); rtts.append(time.monotonic() - t); time.sleep(0.002)
    th = threading.Thread(target=ping); th.start(); time.sleep(0.1)
    filters = [b"#"] * N if R else [b"f/%d" % i for i in range(N)]
    t = time.monotonic()
    big.sendall(pkt(0x82, b"\x00\x01" + b"".join(field(f) + b"\x00" for f in filters)))
    h, body = read(big); suback = time.monotonic() - t
    got = 0
    if R:
        big.settimeout(30)
        try:
            while got < R * 2:
                big.settimeout(2 if got >= R else 60)
                read(big); got += 1
        except (socket.timeout, EOFError): pass
    total = time.monotonic() - t
    stop = True; th.join()
    rtts.sort()
    print(f"N={N} R={R}: SUBACK {suback*1000:.0f} ms ({len(body)-2} codes), retained received {got}, all {total*1000:.0f} ms; "
          f"pings {len(rtts)} p50 {rtts[len(rtts)//2]*1000:.1f} ms p99 {rtts[int(len(rtts)*0.99)]*1000:.1f} ms max {rtts[-1]*1000:.1f} ms")
finally:
    p.terminate(); p.wait()
