#!/usr/bin/env bash
# Read-only: compares this host with tuning/sysctl.conf and tuning/limits.conf.
#   tuning/check.sh [--strict]   --strict exits 1 unless every line is OK
# Verdicts: OK, LOW (below the recommendation), HIGH (above it where that matters), MISSING.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STRICT=0
[[ "${1:-}" == "--strict" ]] && STRICT=1
bad=0

row() { printf '%-34s %-28s %-28s %s\n' "$1" "$2" "$3" "$4"; [[ "$4" == OK ]] || bad=$(( bad + 1 )); }

# Numeric comparison of each field: LOW if any field is below the recommendation.
verdict() {
    local have="$1" want="$2" key="$3"
    read -r -a h <<<"$have"
    read -r -a w <<<"$want"
    if [[ "$key" == net.ipv4.ip_local_port_range ]]; then
        # A wider range is fine: the low bound may be lower, the high bound higher.
        (( h[0] <= w[0] && h[1] >= w[1] )) && echo OK || echo LOW
        return
    fi
    if [[ "$key" == net.ipv4.tcp_fin_timeout ]]; then
        (( h[0] <= w[0] )) && echo OK || echo HIGH
        return
    fi
    for i in "${!w[@]}"; do
        [[ "${h[$i]:-}" =~ ^[0-9]+$ ]] || { echo LOW; return; }
        (( h[i] >= w[i] )) || { echo LOW; return; }
    done
    echo OK
}

printf '%-34s %-28s %-28s %s\n' KEY CURRENT RECOMMENDED VERDICT
while IFS= read -r line; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    key="$(echo "${line%%=*}" | xargs)"
    want="$(echo "${line#*=}" | xargs)"
    path="/proc/sys/${key//./\/}"
    if [[ ! -r "$path" ]]; then
        row "$key" "-" "$want" MISSING
        continue
    fi
    have="$(xargs < "$path")"
    row "$key" "$have" "$want" "$(verdict "$have" "$want" "$key")"
done < "$HERE/sysctl.conf"

want_nofile="$(awk '$3 == "nofile" && $2 == "hard" {print $4}' "$HERE/limits.conf")"
for kind in soft hard; do
    flag=$([[ $kind == soft ]] && echo -Sn || echo -Hn)
    have="$(ulimit "$flag")"
    v=OK; [[ "$have" == unlimited ]] || (( have >= want_nofile )) || v=LOW
    row "ulimit nofile ($kind)" "$have" "$want_nofile" "$v"
done
for kind in soft hard; do
    flag=$([[ $kind == soft ]] && echo -Sl || echo -Hl)
    have="$(ulimit "$flag")"
    v=OK; [[ "$have" == unlimited ]] || v=LOW
    row "ulimit memlock ($kind)" "$have" "unlimited" "$v"
done

kernel="$(uname -r)"
major="${kernel%%.*}"
v=OK; (( major >= 6 )) || v=LOW
row "kernel (io_uring multishot)" "$kernel" ">= 6.0" "$v"
if [[ -r /proc/sys/kernel/io_uring_disabled ]]; then
    d="$(cat /proc/sys/kernel/io_uring_disabled)"
    v=OK; [[ "$d" == 0 ]] || v=LOW
    row "kernel.io_uring_disabled" "$d" "0" "$v"
else
    row "kernel.io_uring_disabled" "absent (enabled)" "0" OK
fi
if lsmod 2>/dev/null | grep -q '^nf_conntrack'; then
    echo "note: nf_conntrack is loaded; every MQTT connection costs a conntrack entry"
fi
echo "$bad line(s) differ from the recommendation"
(( STRICT && bad > 0 )) && exit 1
exit 0
