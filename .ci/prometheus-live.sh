#!/usr/bin/env bash
# Live integration test: a real mcd-serve scraped by a real Prometheus.
#
#   bash .ci/prometheus-live.sh [PATH_TO_RELEASE_BINARY]
#
# Binary: $1, else $MCD_BIN, else target/release/mcd-serve. Models: $MCD_MODELS_DIR
# (default models/). Starts mcd-serve and Prometheus (Debian package, installed
# if missing) on free loopback ports, Prometheus with a config derived from
# deploy/prometheus/prometheus.yml (1s scrape and evaluation) and the rules of
# deploy/prometheus/rules with every window shortened to 2m and `for: 0s`.
# Then deploy/ci/prometheus_live.py sends known traffic and asserts counters,
# recording rules, alerts, rule health and graceful shutdown. Only 127.0.0.1
# is contacted; every wait is bounded; both processes are stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BIN="${1:-${MCD_BIN:-target/release/mcd-serve}}"
MODELS_DIR="${MCD_MODELS_DIR:-models}"
FIXTURES="${FIXTURES:-tests/fixtures/reference_outputs.json}"
START_TIME=$SECONDS

die() { echo "prometheus-live: FAIL: $*" >&2; exit 1; }
log() { echo "[prometheus-live] $*" >&2; }

[[ -x "$BIN" ]] || die "server binary '$BIN' not found or not executable (build it with cargo build --release)"
[[ -f "$MODELS_DIR/breast_cancer.onnx" ]] || die "no $MODELS_DIR/breast_cancer.onnx"
[[ -f "$FIXTURES" ]] || die "no $FIXTURES"
command -v curl >/dev/null || die "curl not found"
command -v python3 >/dev/null || die "python3 not found"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  log "installing Debian package prometheus"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null || die "could not install prometheus"
fi

WORK="$(mktemp -d /tmp/mcd-prom-live.XXXXXX)"
MCD_PID=""
PROM_PID=""
KEEP_LOGS=1
cleanup() {
  local rc=$?
  for pid in "$PROM_PID" "$MCD_PID"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  if [[ $rc -ne 0 && $KEEP_LOGS -eq 1 ]]; then
    echo "---- mcd-serve log (tail) ----" >&2; tail -n 40 "$WORK/mcd-serve.log" >&2 2>/dev/null || true
    echo "---- prometheus log (tail) ----" >&2; tail -n 40 "$WORK/prometheus.log" >&2 2>/dev/null || true
  fi
  rm -rf "$WORK"
  echo "prometheus-live: finished in $((SECONDS - START_TIME))s (exit $rc)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL SECONDS: until URL answers 200.
wait_http() {
  local url="$1" secs="$2" i
  for ((i = 0; i < secs * 5; i++)); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)" == 200 ]]; then return 0; fi
    sleep 0.2
  done
  return 1
}

# ---------------------------------------------------------------- server --
MCD_PORT="$(free_port)"
# The shutdown check sends an MC-1000 request of HEAVY_ROWS rows, which must fit the
# admission budget and outlast the drain, and asserts it is in flight at SIGTERM.
DRAIN_SECS=1
HEAVY_ROWS=2048
log "starting $BIN on 127.0.0.1:$MCD_PORT (models: $MODELS_DIR)"
MCD_LOG_FORMAT=text "$BIN" --models "$MODELS_DIR" --addr "127.0.0.1:$MCD_PORT" --grpc-addr "127.0.0.1:0" \
  --shutdown-drain-secs "$DRAIN_SECS" --max-inflight-cost $((HEAVY_ROWS * 1000 + 100000)) >"$WORK/mcd-serve.log" 2>&1 &
MCD_PID=$!
wait_http "http://127.0.0.1:$MCD_PORT/health/ready" 60 \
  || die "mcd-serve not ready on port $MCD_PORT within 60s"
log "mcd-serve ready (pid $MCD_PID) after $((SECONDS - START_TIME))s"
# The binary's own probe must agree.
"$BIN" healthcheck --url "http://127.0.0.1:$MCD_PORT/health/ready" \
  || die "'mcd-serve healthcheck' exited non-zero against a ready server"

# ------------------------------------------------------------ prometheus --
PROM_PORT="$(free_port)"
mkdir -p "$WORK/rules" "$WORK/tsdb"
python3 deploy/ci/make_test_rules.py deploy/prometheus/rules/mcd-serve.rules.yml "$WORK/rules/mcd-serve.rules.yml" --window 2m
# Derive the config from the real one: 1s intervals, loopback target, test rules.
python3 - "$WORK" "$MCD_PORT" <<'PY'
import re, sys
work, port = sys.argv[1], sys.argv[2]
src = open("deploy/prometheus/prometheus.yml").read()
subs = [
    (r"(?m)^(\s*scrape_interval:\s*)\S+", r"\g<1>1s"),
    (r"(?m)^(\s*scrape_timeout:\s*)\S+", r"\g<1>1s"),
    (r"(?m)^(\s*evaluation_interval:\s*)\S+", r"\g<1>1s"),
    (r"(?m)^(\s*-\s*)rules/\*\.rules\.yml\s*$", r"\g<1>" + work + "/rules/*.rules.yml"),
    (r'"mcd-serve:8080"', '"127.0.0.1:' + port + '"'),
]
for pat, rep in subs:
    src, n = re.subn(pat, rep, src)
    if n != 1:
        sys.exit(f"prometheus.yml: expected one match of {pat!r}, found {n}")
open(f"{work}/prometheus.yml", "w").write(src)
PY
promtool check config "$WORK/prometheus.yml" >"$WORK/promtool.log" 2>&1 \
  || { cat "$WORK/promtool.log" >&2; die "generated Prometheus config does not check"; }

log "starting prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}') on 127.0.0.1:$PROM_PORT"
prometheus \
  --config.file="$WORK/prometheus.yml" \
  --storage.tsdb.path="$WORK/tsdb" \
  --storage.tsdb.retention.time=1h \
  --web.listen-address="127.0.0.1:$PROM_PORT" \
  --web.console.templates="$WORK" --web.console.libraries="$WORK" \
  --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 60 || die "prometheus not ready within 60s"

# ---------------------------------------------------- traffic + asserts --
set +e
MCD_URL="http://127.0.0.1:$MCD_PORT" PROM_URL="http://127.0.0.1:$PROM_PORT" \
  MCD_PID="$MCD_PID" FIXTURES="$FIXTURES" DRAIN_SECS="$DRAIN_SECS" HEAVY_ROWS="$HEAVY_ROWS" timeout 300 python3 deploy/ci/prometheus_live.py
RC=$?
set -e
[[ $RC -eq 0 ]] || die "assertions failed (exit $RC)"

# The python side sent SIGTERM to the server and saw it go: collect its status.
set +e
wait "$MCD_PID"
MCD_RC=$?
set -e
MCD_PID=""
[[ $MCD_RC -eq 0 ]] || die "mcd-serve exited with status $MCD_RC after SIGTERM (want 0)"
log "mcd-serve exited 0 after SIGTERM"
# ... and its probe must now fail (nothing listens any more).
if "$BIN" healthcheck --url "http://127.0.0.1:$MCD_PORT/health/ready" >/dev/null 2>&1; then
  die "'mcd-serve healthcheck' exited 0 with the server stopped"
fi
log "'mcd-serve healthcheck' exits non-zero once the server is gone"
KEEP_LOGS=0
echo "prometheus-live: OK"
