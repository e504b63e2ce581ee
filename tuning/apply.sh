#!/usr/bin/env bash
# Applies tuning/sysctl.conf and tuning/limits.conf to this host and prints every change.
#   tuning/apply.sh [--dry-run] [--irq-affinity] [--rps] [--governor NAME]
#   --dry-run        change nothing, print what would change (works without root)
#   --irq-affinity   spread NIC interrupts over all CPUs (round robin)
#   --rps            enable RPS/RFS on every receive queue of every NIC
#   --governor NAME  set the cpufreq governor of every CPU (e.g. performance)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRY=0 IRQ=0 RPS=0 GOVERNOR=""
while (( $# )); do
    case "$1" in
    --dry-run) DRY=1 ;;
    --irq-affinity) IRQ=1 ;;
    --rps) RPS=1 ;;
    --governor) GOVERNOR="${2:?--governor needs a name}"; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if (( ! DRY )) && (( EUID != 0 )); then
    echo "apply.sh changes kernel settings and needs root; use --dry-run to see the changes" >&2
    exit 1
fi

say() { if (( DRY )); then echo "would set $*"; else echo "set $*"; fi; }

# 1. sysctl, key by key, so a key this kernel lacks is reported rather than fatal.
while IFS= read -r line; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    key="$(echo "${line%%=*}" | xargs)"
    want="$(echo "${line#*=}" | xargs)"
    path="/proc/sys/${key//./\/}"
    if [[ ! -e "$path" ]]; then
        echo "skip $key: not present on this kernel"
        continue
    fi
    have="$(xargs < "$path")"
    if [[ "$have" == "$want" ]]; then
        continue
    fi
    say "$key: $have -> $want"
    if (( ! DRY )); then
        sysctl -q -w "$key=$want" || echo "failed to set $key" >&2
    fi
done < "$HERE/sysctl.conf"
if (( ! DRY )); then
    install -m 0644 "$HERE/sysctl.conf" /etc/sysctl.d/90-shardmq.conf
    echo "installed /etc/sysctl.d/90-shardmq.conf (applied at boot)"
fi

# 2. Process limits for new sessions.
if ! cmp -s "$HERE/limits.conf" /etc/security/limits.d/90-shardmq.conf 2>/dev/null; then
    say "/etc/security/limits.d/90-shardmq.conf: install (nofile 2097152, memlock unlimited)"
    if (( ! DRY )); then
        install -D -m 0644 "$HERE/limits.conf" /etc/security/limits.d/90-shardmq.conf
    fi
fi

# 3. Optional: interrupts, receive packet steering, CPU frequency.
cpus="$(nproc)"
if (( IRQ )); then
    i=0
    for irq in $(grep -E 'eth|ens|enp|mlx|ixgbe|i40e|virtio.*input' /proc/interrupts | cut -d: -f1 | xargs); do
        f="/proc/irq/$irq/smp_affinity_list"
        [[ -w "$f" || $DRY -eq 1 ]] || continue
        cpu=$(( i % cpus ))
        say "irq $irq affinity: $(cat "$f" 2>/dev/null || echo '?') -> $cpu"
        (( DRY )) || echo "$cpu" > "$f" || echo "failed to set irq $irq" >&2
        i=$(( i + 1 ))
    done
fi
if (( RPS )); then
    mask="$(printf '%x' $(( (1 << cpus) - 1 )))"
    for q in /sys/class/net/*/queues/rx-*; do
        [[ -e "$q/rps_cpus" ]] || continue
        say "$q/rps_cpus: $(cat "$q/rps_cpus") -> $mask"
        if (( ! DRY )); then
            echo "$mask" > "$q/rps_cpus"
            echo 32768 > "$q/rps_flow_cnt"
        fi
    done
    if [[ -e /proc/sys/net/core/rps_sock_flow_entries ]]; then
        say "net.core.rps_sock_flow_entries: $(cat /proc/sys/net/core/rps_sock_flow_entries) -> 32768"
        (( DRY )) || sysctl -q -w net.core.rps_sock_flow_entries=32768
    fi
fi
if [[ -n "$GOVERNOR" ]]; then
    for g in /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor; do
        [[ -e "$g" ]] || { echo "skip governor: no cpufreq on this host"; break; }
        say "$g: $(cat "$g") -> $GOVERNOR"
        (( DRY )) || echo "$GOVERNOR" > "$g"
    done
fi
echo "done$( (( DRY )) && echo ' (dry run, nothing changed)')"
