#!/usr/bin/env bash
# The one test command of shardmq: installs what the tests need, then runs every check CI runs.
#
#   bash scripts/test.sh                      # everything (what CI runs)
#   SHARDMQ_TEST_QUICK=1 bash scripts/test.sh # skip fuzzing, tuning checks and bench builds
#
# Needs: Debian/Ubuntu (apt) for mosquitto-clients, the Rust stable toolchain with rustfmt and
# clippy, and python3 (>= 3.9) with venv and pip. Installs, only when missing: the apt packages
# mosquitto-clients and iproute2 (`ss -K` cuts cluster links in a test) and a Python venv at
# .venv/ with tests/interop/requirements.txt.
# Fails fast: the first failing step stops the run with its name and exit status.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The broker reads every SHARDMQ_* variable as a config override, so this knob is consumed here
# and not passed on to anything this script starts.
case "${SHARDMQ_TEST_QUICK:-0}" in
  "" | 0 | false | no) QUICK=0 ;;
  *) QUICK=1 ;;
esac
unset SHARDMQ_TEST_QUICK

APT_PACKAGES=(mosquitto-clients iproute2)
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
REQUIREMENTS="tests/interop/requirements.txt"

if [[ -t 1 ]]; then
  BOLD=$'\e[1m' RED=$'\e[31m' GREEN=$'\e[32m' YELLOW=$'\e[33m' RESET=$'\e[0m'
else
  BOLD="" RED="" GREEN="" YELLOW="" RESET=""
fi

now_us() { # wall clock in microseconds
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    echo "${EPOCHREALTIME/[.,]/}"
  else
    echo $(($(date +%s%N) / 1000))
  fi
}

fmt_duration() { # microseconds -> "12.3s" or "4m05.2s"
  local ds=$(($1 / 100000)) # tenths of a second
  if ((ds >= 600)); then
    printf '%dm%02d.%ds' $((ds / 600)) $((ds % 600 / 10)) $((ds % 10))
  else
    printf '%d.%ds' $((ds / 10)) $((ds % 10))
  fi
}

die() {
  echo "${RED}${BOLD}error:${RESET} $*" >&2
  exit 1
}

START_US="$(now_us)"
STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
FAILED_STEP=""

summary() {
  local rc=$?
  local i
  echo
  echo "${BOLD}==> Summary${RESET}"
  for i in "${!STEP_NAMES[@]}"; do
    printf '  %-8s %10s  %s\n' "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}" "${STEP_NAMES[$i]}"
  done
  local total
  total="$(fmt_duration $(($(now_us) - START_US)))"
  if [[ -n "$FAILED_STEP" ]]; then
    echo "${RED}${BOLD}FAILED${RESET} at step: ${FAILED_STEP} (exit ${rc})"
  elif ((rc != 0)); then
    echo "${RED}${BOLD}FAILED${RESET} (exit ${rc})"
  else
    echo "${GREEN}${BOLD}All steps passed.${RESET}"
  fi
  echo "Total wall time: ${total}"
}
trap summary EXIT

# run_step NAME COMMAND [ARGS...]: announces, times and runs one step; stops everything if it fails.
run_step() {
  local name=$1
  shift
  echo
  echo "${BOLD}==> ${name}${RESET}"
  if [[ "$(type -t "$1")" != function ]]; then
    echo "    \$ $*"
  fi
  local t0 rc
  t0="$(now_us)"
  set +e
  (
    set -e
    "$@"
  )
  rc=$?
  set -e
  local took
  took="$(fmt_duration $(($(now_us) - t0)))"
  STEP_NAMES+=("$name")
  STEP_TIMES+=("$took")
  if ((rc != 0)); then
    STEP_RESULTS+=("FAILED")
    FAILED_STEP="$name"
    echo "${RED}${BOLD}<== FAILED: ${name}${RESET} (exit ${rc}, after ${took})" >&2
    exit "$rc"
  fi
  STEP_RESULTS+=("ok")
  echo "${GREEN}<== ok: ${name}${RESET} (${took})"
}

skip_step() { # skip_step NAME REASON
  echo
  echo "${BOLD}==> ${1}${RESET}"
  echo "${YELLOW}    skipped: ${2}${RESET}"
  STEP_NAMES+=("$1")
  STEP_RESULTS+=("skipped")
  STEP_TIMES+=("-")
}

# ---------------------------------------------------------------------------------------------
# Setup: system packages and the Python venv, each only when missing.

apt_installed() {
  local status
  status="$(dpkg -s "$1" 2>/dev/null || true)"
  [[ "$status" == *"Status: install ok installed"* ]]
}

ensure_apt_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    apt_installed "$p" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    echo "    apt packages present: ${APT_PACKAGES[*]}"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 ||
    die "missing packages (${missing[*]}) and no apt-get here: install them by hand"
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 ||
      die "missing apt packages (${missing[*]}); run as root or install them by hand"
    sudo=(sudo -n)
  fi
  local log
  log="$(mktemp)"
  echo "    installing apt packages: ${missing[*]}"
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    echo "    first install failed; running apt-get update and retrying"
    if ! { "${sudo[@]}" apt-get update -q >>"$log" 2>&1 &&
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1; }; then
      tail -n 40 "$log" >&2
      rm -f "$log"
      die "apt-get install ${missing[*]} failed (output above)"
    fi
  fi
  rm -f "$log"
}

ensure_venv() {
  local stamp="$VENV/.shardmq-requirements.sha256" want have=""
  if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3)"
    echo "    creating Python venv at .venv/ with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" ||
      die "'$PYTHON -m venv' failed (on Debian's own python3: apt-get install python3-venv)"
  fi
  want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
  [[ -f "$stamp" ]] && have="$(cat "$stamp")"
  if [[ "$want" == "$have" ]] && "$VENV/bin/python" -c 'import paho.mqtt, pytest' >/dev/null 2>&1; then
    echo "    venv up to date: $("$VENV/bin/python" -m pip freeze 2>/dev/null |
      grep -iE '^(paho-mqtt|pytest)==' | tr '\n' ' ')"
    return 0
  fi
  echo "    installing Python packages from $REQUIREMENTS"
  local log
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$REQUIREMENTS" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    die "pip install -r $REQUIREMENTS failed (output above)"
  fi
  rm -f "$log"
  echo "$want" >"$stamp"
}

check_toolchain() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust stable with rustup"
  cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
  cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
  echo "    $(cargo --version)"
}

setup() {
  check_toolchain
  ensure_apt_packages
  local tool
  for tool in mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null 2>&1 ||
      die "$tool not on PATH after installing mosquitto-clients"
  done
  ensure_venv
}

# ---------------------------------------------------------------------------------------------
# Steps

rust_tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    local args=(run --workspace)
    # An empty workspace is not a failure here (nextest >= 0.9.75 fails on "no tests" otherwise).
    local help
    help="$(cargo nextest run --help 2>/dev/null || true)"
    if [[ "$help" == *--no-tests* ]]; then
      args+=(--no-tests=warn)
    fi
    echo "    \$ cargo nextest ${args[*]}"
    cargo nextest "${args[@]}"
    echo "    \$ cargo test --doc --workspace"
    cargo test --doc --workspace
  else
    echo "    \$ cargo test --workspace"
    cargo test --workspace
  fi
}

interop() {
  echo "    \$ .venv/bin/python -m pytest -q tests/interop"
  PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -q tests/interop
}

echo "${BOLD}shardmq test suite${RESET} (root: $ROOT, quick: $QUICK, CI: ${CI:-false})"

run_step "setup: test dependencies (apt, Python venv)" setup
run_step "1. cargo fmt --all -- --check" cargo fmt --all -- --check
run_step "2. cargo clippy --workspace --all-targets -- -D warnings" \
  cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  run_step "3. Rust tests (cargo nextest run --workspace; cargo test --doc)" rust_tests
else
  run_step "3. Rust tests (cargo test --workspace)" rust_tests
fi
run_step "4a. cargo build --release" cargo build --release
run_step "4b. interop suite (pytest tests/interop)" interop

if ((QUICK)); then
  skip_step "5. fuzz (scripts/fuzz.sh 60)" "SHARDMQ_TEST_QUICK=1"
  skip_step "6. tuning checks" "SHARDMQ_TEST_QUICK=1"
  skip_step "7. cargo bench --workspace --no-run" "SHARDMQ_TEST_QUICK=1"
else
  if [[ -f scripts/fuzz.sh ]]; then
    run_step "5. fuzz (scripts/fuzz.sh 60)" bash scripts/fuzz.sh 60
  else
    skip_step "5. fuzz (scripts/fuzz.sh 60)" "scripts/fuzz.sh not present"
  fi
  if [[ -f tuning/check.sh ]]; then
    run_step "6a. bash tuning/check.sh" bash tuning/check.sh
  else
    skip_step "6a. bash tuning/check.sh" "tuning/check.sh not present"
  fi
  if [[ -f tuning/apply.sh ]]; then
    run_step "6b. bash tuning/apply.sh --dry-run" bash tuning/apply.sh --dry-run
  else
    skip_step "6b. bash tuning/apply.sh --dry-run" "tuning/apply.sh not present"
  fi
  run_step "7. cargo bench --workspace --no-run" cargo bench --workspace --no-run
fi
