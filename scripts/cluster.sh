#!/usr/bin/env bash
# Brings up (or tears down) a 3-node shardmq cluster on this host, as in docs/clustering.md.
#   scripts/cluster.sh up     start n1, n2, n3 and join n2 and n3 to n1
#   scripts/cluster.sh status cluster status as seen by n1
#   scripts/cluster.sh down   stop the three nodes (SIGTERM)
# Ports: MQTT 1883/1884/1885, cluster 4370/4371/4372, management API 18083/18084/18085.
# Data and logs live in ./cluster-data/ under the current directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${SHARDMQ_BIN:-$ROOT/target/release/shardmq}"
WORK="${CLUSTER_DATA_DIR:-$PWD/cluster-data}"

start_node() {
    local i=$1
    local dir="$WORK/n$i"
    mkdir -p "$dir"
    SHARDMQ_NODE__NAME="n$i@127.0.0.1" \
    SHARDMQ_NODE__DATA_DIR="$dir/data" \
    SHARDMQ_LISTENERS__TCP__DEFAULT__BIND="0.0.0.0:$((1882 + i))" \
    SHARDMQ_CLUSTER__BIND="127.0.0.1:$((4369 + i))" \
    SHARDMQ_MANAGEMENT__BIND="127.0.0.1:$((18082 + i))" \
        nohup "$BIN" start >"$dir/shardmq.log" 2>&1 &
    echo $! >"$dir/pid"
    echo "n$i@127.0.0.1: mqtt :$((1882 + i)), cluster :$((4369 + i)), api :$((18082 + i)), pid $!"
}

wait_api() {
    local port=$1
    for _ in $(seq 1 50); do
        if "$BIN" ctl --api "127.0.0.1:$port" stats >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "node with API port $port did not start; see $WORK/*/shardmq.log" >&2
    return 1
}

case "${1:-}" in
up)
    [[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --release)
    for i in 1 2 3; do start_node "$i"; done
    for port in 18083 18084 18085; do wait_api "$port"; done
    "$BIN" ctl --api 127.0.0.1:18084 cluster join n1@127.0.0.1:4370 >/dev/null
    "$BIN" ctl --api 127.0.0.1:18085 cluster join n1@127.0.0.1:4370 >/dev/null
    sleep 1.5
    "$BIN" ctl --api 127.0.0.1:18083 cluster status
    ;;
status)
    "$BIN" ctl --api 127.0.0.1:18083 cluster status
    ;;
down)
    for i in 1 2 3; do
        pidfile="$WORK/n$i/pid"
        if [[ -f "$pidfile" ]]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    echo "stopped; data and logs kept in $WORK"
    ;;
*)
    sed -n '2,7p' "$0" >&2
    exit 2
    ;;
esac
