#!/usr/bin/env bash
# Schemathesis against the live release binary: every operation of /openapi.json, with
# generated valid and invalid requests, checking that no answer is a 5xx and that every
# answer (status, content type, headers, body) conforms to the document.
#
#   .ci/schemathesis.sh [path/to/mcd-serve]
#
# Deterministic (fixed seed, derandomized generation, no example database), bounded by
# --max-examples per operation. Prints the operations, test cases and failures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-target/release/mcd-serve}"
VENV="${MCD_SCHEMATHESIS_VENV:-/tmp/mcd-schemathesis-venv}"
VERSION=4.32.5
MAX_EXAMPLES="${MCD_SCHEMATHESIS_EXAMPLES:-60}"

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$VERSION"
fi

work=$(mktemp -d)
log="$work/server.log"
# Several models and a default: every route has something to serve. The port is the
# kernel's choice; the server logs it.
"$BIN" --models models --default-model breast_cancer --addr 127.0.0.1:0 --grpc-addr '' \
    --log-format json --max-mc-samples 50 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

addr=""
for _ in $(seq 300); do
    addr=$(python3 -c 'import json,sys
for line in open(sys.argv[1]):
    try: a = json.loads(line).get("fields", {}).get("addr")
    except ValueError: continue
    if a: print(a); break' "$log" 2>/dev/null || true)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "the server exited"; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { cat "$log"; echo "the server logged no address"; exit 1; }
base="http://$addr"
# Python rather than curl: the CI machine is only promised Python.
python3 - "$base/health/ready" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit("the server never became ready")
PY

report="$work/report.json"
status=0
# From the scratch folder: schemathesis keeps a .schemathesis/ cache in its working directory.
(cd "$work" && "$VENV/bin/schemathesis" run "$base/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" --seed 13 --generation-deterministic \
    --request-timeout 10 --workers 2 --no-color \
    --report json --report-json-path "$report") || status=$?

# The counts, from the run's own report.
python3 - "$report" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
ops, cases = r["operations"], r["test_cases"]
print(f"schemathesis: {ops['tested']} of {ops['total']} operations, {cases['generated']} test cases, "
      f"{cases['with_failures']} with failures ({cases['unique_failures']} unique), {cases['errored']} errored")
EOF

kill -0 "$pid" || { echo "the server died during the run"; cat "$log" | tail -20; exit 1; }
exit "$status"
