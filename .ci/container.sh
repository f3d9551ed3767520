#!/usr/bin/env bash
# Builds the shipped Dockerfile with podman (no Docker engine here), runs the image
# read-only as UID 10001, waits for the image's own HEALTHCHECK, sends an eval, an MC and
# an OIP request, runs it again with the onnxruntime backend (same MC answer), then stops
# the first and checks the drain in its logs and the exit code. Then
# plays the Kubernetes Deployment's own pod spec on the same image (.ci/kube-play.sh).
#
#   bash .ci/container.sh      (as root; ../shared/CONTAINERS.md explains every setting)
#
# Idempotent. There is no registry, so the two base images the Dockerfile names are made
# locally with debootstrap (and the machine's own Rust toolchain for the builder) and kept
# under those names: a later run skips them. The container, the built image and the
# build's intermediate images are removed on exit, also on failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUNTIME_BASE=docker.io/library/debian:bookworm-slim
BUILDER_BASE=docker.io/library/rust:1.95.0-slim-bookworm
IMAGE=localhost/mcd-serve:ci
NAME="mcd-serve-ci-$$"
# The same image with the onnxruntime backend chosen (its library is in the image).
ORT_NAME="mcd-serve-ci-ort-$$"
# The Deployment's name in .ci/kube-play.sh; podman names its pod KUBE_NAME-pod-0.
KUBE_NAME="mcd-serve-kube-$$"
SUITE=bookworm
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
# crun fails on this machine's hybrid cgroups; runc works.
PODMAN=(podman --runtime runc)

T_START=$SECONDS
T_STAGE=$SECONDS
stage() {
  printf '[container] %-58s (stage %ss, total %ss)\n' "$*" "$((SECONDS - T_STAGE))" "$((SECONDS - T_START))"
  T_STAGE=$SECONDS
}
log() { printf '[container] %s\n' "$*"; }
die() { printf '[container] FAIL: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, podman)"

# --- tools -----------------------------------------------------------------------------
missing=()
for cmd in podman buildah runc debootstrap newuidmap catatonit curl python3; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if ((${#missing[@]})); then
  log "installing podman buildah runc debootstrap uidmap catatonit curl (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    podman buildah runc debootstrap uidmap catatonit curl python3 ca-certificates >/dev/null
fi
podman --version
stage "tools"

WORK="$(mktemp -d /tmp/mcd-container.XXXXXX)"
# Settings without which the runtime fails here (CONTAINERS.md): no default ulimits
# (setrlimit is not permitted), cgroupfs (no systemd), events to a file (no journald).
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits=[]
[engine]
cgroup_manager="cgroupfs"
events_logger="file"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

images_before="$WORK/images-before"
cleanup() {
  local rc=$?
  set +e
  "${PODMAN[@]}" rm -f --time 0 "$NAME" >/dev/null 2>&1
  "${PODMAN[@]}" rm -f --time 0 "$ORT_NAME" >/dev/null 2>&1
  "${PODMAN[@]}" pod rm -f "$KUBE_NAME-pod-0" >/dev/null 2>&1
  "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1
  # The build's intermediate (stage and layer) images: whatever is new since the build began,
  # but podman's pause image, which pods of other runs may use (kube-play.sh removes it
  # when it built it and no pod uses it).
  if [[ -f $images_before ]]; then
    comm -13 <(sort -u "$images_before") \
      <(podman images -aq --no-trunc --filter 'reference!=localhost/podman-pause' | sort -u) \
      | xargs -r podman rmi -f >/dev/null 2>&1
  fi
  rm -rf "$WORK"
  if ((rc)); then printf '[container] FAILED (exit %s) after %ss\n' "$rc" "$((SECONDS - T_START))" >&2; fi
  exit "$rc"
}
trap cleanup EXIT

# --- base images -----------------------------------------------------------------------
# The machine's own Debian mirror, never a host name written here.
MIRROR="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"

bootstrap() { # DIR [debootstrap options...]
  local dir="$1"; shift
  [[ -n $MIRROR ]] || die "no URIs: line in /etc/apt/sources.list.d/debian.sources"
  debootstrap --variant=minbase "$@" "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1 \
    || { tail -n 30 "$dir.log" >&2; die "debootstrap $dir failed"; }
  # What debootstrap leaves behind that no image needs (the slim images drop it too).
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/debootstrap
}

build_runtime_base() {
  local dir="$WORK/runtime-root"
  bootstrap "$dir"
  tar -C "$dir" -c . | podman import -q - "$RUNTIME_BASE" >/dev/null
}

build_builder_base() {
  local dir="$WORK/builder-root" sysroot
  sysroot="$(rustc --print sysroot)"
  bootstrap "$dir" --include=gcc,libc6-dev,ca-certificates
  mkdir -p "$dir/usr/local/rust"
  cp -a "$sysroot"/{bin,lib,libexec,etc} "$dir/usr/local/rust/"
  # Registries are reached through a TLS proxy that only the machine's bundle trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
  tar -C "$dir" -c . | podman import -q \
    --change 'ENV PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    - "$BUILDER_BASE" >/dev/null
}

pids=()
if podman image exists "$RUNTIME_BASE"; then log "$RUNTIME_BASE present: skipped"
else log "bootstrapping $RUNTIME_BASE from $MIRROR"; build_runtime_base & pids+=($!); fi
if podman image exists "$BUILDER_BASE"; then log "$BUILDER_BASE present: skipped"
else log "bootstrapping $BUILDER_BASE from $MIRROR"; build_builder_base & pids+=($!); fi
# Both bootstraps mostly wait on the network and dpkg: run them side by side.
for pid in "${pids[@]}"; do wait "$pid" || die "a base image failed to bootstrap"; done
stage "base images"

# --- build -----------------------------------------------------------------------------
podman images -aq --no-trunc >"$images_before"
# Docker format: the OCI image format has no HEALTHCHECK, and podman would drop it.
nice -n 10 "${PODMAN[@]}" build --pull=never --network host --format docker "${ULIMITS[@]}" \
  -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log" >&2; die "podman build failed"; }
grep -E '^(STEP|COMMIT|Successfully)|Finished' "$WORK/build.log" | sed 's/^/    build: /'
stage "image build"

user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
[[ $user == 10001:10001 ]] || die "image USER is '$user', want 10001:10001"
health_cmd="$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")"
[[ $health_cmd == *healthcheck* ]] || die "image has no HEALTHCHECK (got: $health_cmd)"
size_bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"

# --- run -------------------------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
PORT="$(free_port)"
GRPC_PORT="$(free_port)"
[[ $PORT != "$GRPC_PORT" ]] || GRPC_PORT="$(free_port)"
BASE="http://127.0.0.1:$PORT"
"${PODMAN[@]}" run -d --name "$NAME" --read-only --user 10001:10001 --network host "${ULIMITS[@]}" \
  -e MCD_ADDR="127.0.0.1:$PORT" -e MCD_GRPC_ADDR="127.0.0.1:$GRPC_PORT" \
  -e MCD_HEALTHCHECK_URL="$BASE/health/ready" \
  "$IMAGE" >/dev/null
log "started $NAME on 127.0.0.1:$PORT (gRPC $GRPC_PORT)"

# The image's own HEALTHCHECK command, run by podman on demand: there is no systemd here to
# run its timer (hence podman's "unable to get systemd connection" errors above and at
# stop, which are harmless). Exit 0 means healthy.
deadline=$((SECONDS + 60))
until "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; do
  if [[ "$(podman inspect --format '{{.State.Running}}' "$NAME")" != true ]]; then
    podman logs "$NAME" >&2 || true
    die "container exited before becoming healthy"
  fi
  ((SECONDS < deadline)) || { podman logs "$NAME" >&2; die "HEALTHCHECK did not pass within 60s"; }
  sleep 0.5
done
health="$(podman inspect --format '{{.State.Health.Status}}' "$NAME" 2>/dev/null || podman inspect --format '{{.State.Healthcheck.Status}}' "$NAME")"
[[ $health == healthy ]] || die "State.Health.Status is '$health' after a passing healthcheck run"
log "HEALTHCHECK passed: State.Health.Status=$health"
stage "start until healthy"

uid="$(podman exec "$NAME" id -u)"
[[ $uid == 10001 ]] || die "server runs as uid '$uid', want 10001"
# podman top reads the host's view of the process: the same UID outside (no user namespace).
host_uid="$(podman top "$NAME" huser | awk 'NR == 2 {print $1}')"
[[ $host_uid == 10001 ]] || die "host sees the server as user '$host_uid', want 10001"
if podman exec "$NAME" sh -c ': > /app/probe' 2>/dev/null; then die "root filesystem is writable"; fi
log "runs as uid $uid (host: $host_uid), root filesystem read-only"

# post NAME URL BODY: POST JSON, require 200, keep headers and body under $WORK/NAME.*
post() {
  local name="$1" url="$2" body="$3" code
  code="$(curl -s -o "$WORK/$name.body" -D "$WORK/$name.headers" -w '%{http_code}' --max-time 10 \
    -H 'content-type: application/json' -d "$body" "$url")" || die "$name: curl failed"
  [[ $code == 200 ]] || die "$name: HTTP $code: $(cat "$WORK/$name.body")"
}
mode_header() { tr -d '\r' <"$WORK/$1.headers" | awk -F': ' 'tolower($1) == "x-inference-mode" {print $2}'; }

B='[13.46,28.21,85.89,562.1,0.07517,0.04726,0.01271,0.01117,0.1421,0.05763,0.1689,1.15,1.4,14.91,0.004942,0.01203,0.007508,0.005179,0.01442,0.001684,14.69,35.63,97.11,680.6,0.1108,0.1457,0.07934,0.05781,0.2694,0.07061]'
MC_SAMPLES=30

post eval "$BASE/predict" "{\"inputs\": [$B]}"
[[ "$(mode_header eval)" == eval ]] || die "eval: x-inference-mode is '$(mode_header eval)'"
python3 - "$WORK/eval.body" <<'EOF' || die "eval: unexpected answer"
import json, sys
a = json.load(open(sys.argv[1]))
p = a["outputs"]["probabilities"]
assert a["mode"] == "eval" and len(p) == 1 and len(p[0]) == 2, a
assert abs(sum(p[0]) - 1) < 1e-4 and p[0][1] > 0.5, p  # a held-out benign case
print("    eval:", json.dumps(a))
EOF

post mc "$BASE/predict?mc_samples=$MC_SAMPLES&seed=1" "{\"inputs\": [$B]}"
[[ "$(mode_header mc)" == mc_dropout ]] || die "mc: x-inference-mode is '$(mode_header mc)'"
python3 - "$WORK/mc.body" "$MC_SAMPLES" <<'EOF' || die "mc: unexpected answer"
import json, sys
a = json.load(open(sys.argv[1]))
o = a["outputs"]["probabilities"]
assert a["mode"] == "mc_dropout" and a["mc_samples"] == int(sys.argv[2]) and a["seed"] == 1, a
mean, var = o["mean"][0], o["variance"][0]
assert len(mean) == 2 and abs(sum(mean) - 1) < 1e-4, mean
assert all(v >= 0 for v in var), var
print("    mc:", json.dumps(a))
EOF

oip="{\"inputs\": [{\"name\": \"features\", \"shape\": [1, 30], \"datatype\": \"FP32\", \"data\": $B}]}"
post oip "$BASE/v2/models/breast_cancer/infer" "$oip"
python3 - "$WORK/oip.body" <<'EOF' || die "oip: unexpected answer"
import json, sys
a = json.load(open(sys.argv[1]))
out = {o["name"]: o for o in a["outputs"]}
p = out["probabilities"]
assert a["model_name"] == "breast_cancer" and p["shape"] == [1, 2], a
assert abs(sum(p["data"]) - 1) < 1e-4, p
print("    oip:", json.dumps(a))
EOF
stage "eval, MC and OIP requests"

# --- the onnxruntime backend in the image -------------------------------------------------
# The image carries libonnxruntime (MCD_ORT_LIB is set): MCD_BACKEND=onnxruntime must load
# every model on it, and answer the same seeded MC request as the tract container above.
ORT_PORT="$(free_port)"
ORT_BASE="http://127.0.0.1:$ORT_PORT"
"${PODMAN[@]}" run -d --name "$ORT_NAME" --read-only --user 10001:10001 --network host "${ULIMITS[@]}" \
  -e MCD_ADDR="127.0.0.1:$ORT_PORT" -e MCD_GRPC_ADDR= -e MCD_BACKEND=onnxruntime \
  "$IMAGE" >/dev/null
deadline=$((SECONDS + 60))
until curl -sf -o /dev/null "$ORT_BASE/health/ready"; do
  if [[ "$(podman inspect --format '{{.State.Running}}' "$ORT_NAME")" != true ]]; then
    podman logs "$ORT_NAME" >&2 || true
    die "the onnxruntime container exited before becoming ready"
  fi
  ((SECONDS < deadline)) || { podman logs "$ORT_NAME" >&2; die "the onnxruntime container was not ready within 60s"; }
  sleep 0.5
done
curl -sf -o "$WORK/ort-meta.body" "$ORT_BASE/models/breast_cancer" || die "ort: GET /models/breast_cancer failed"
post ort-mc "$ORT_BASE/predict?mc_samples=$MC_SAMPLES&seed=1" "{\"inputs\": [$B]}"
python3 - "$WORK/ort-meta.body" "$WORK/ort-mc.body" "$WORK/mc.body" <<'EOF' || die "ort: unexpected answer"
import json, sys
meta, a, b = (json.load(open(f)) for f in sys.argv[1:4])
assert meta["backend"] == "onnxruntime" and meta["healthy"], meta
# Same seed, same masks: the samples agree within float rounding (tests/onnxruntime_backend.rs).
for k in ("mean", "variance"):
    for x, y in zip(a["outputs"]["probabilities"][k][0], b["outputs"]["probabilities"][k][0]):
        assert abs(x - y) <= 1e-5 * max(abs(y), 1), (k, x, y)
print("    onnxruntime mc:", json.dumps(a))
EOF
"${PODMAN[@]}" rm -f --time 5 "$ORT_NAME" >/dev/null
stage "the onnxruntime backend (MCD_BACKEND=onnxruntime)"

# --- stop and drain --------------------------------------------------------------------
t0=$SECONDS
"${PODMAN[@]}" stop -t 20 "$NAME" >/dev/null
stop_secs=$((SECONDS - t0))
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME")"
podman logs "$NAME" >"$WORK/run.log" 2>&1
log "run log:"
sed 's/^/    /' "$WORK/run.log"
[[ $exit_code == 0 ]] || die "container exit code $exit_code, want 0"
# The server's own drain lines (src/server.rs), in order, from its JSON log.
python3 - "$WORK/run.log" <<'EOF' || die "no drain in the container's log"
import json, sys
msgs = []
for line in open(sys.argv[1]):
    try:
        msgs.append(json.loads(line)["fields"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
want = ["shutdown requested: readiness is now 503; finishing in-flight requests",
        "all requests finished; exiting"]
idx = [msgs.index(w) if w in msgs else -1 for w in want]
assert all(i >= 0 for i in idx) and idx[0] < idx[1], (idx, msgs)
EOF
log "drained: shutdown requested, then all requests finished; exit code 0; stop took ${stop_secs}s"
stage "stop and drain"

# --- the Kubernetes pod spec on the same image --------------------------------------------
MCD_KUBE_NAME="$KUBE_NAME" bash .ci/kube-play.sh "$IMAGE" || die "the Deployment's pod spec did not pass"
stage "Kubernetes pod spec (kube-play.sh)"

log "image $IMAGE: $(python3 -c "print(f'{$size_bytes / 1e6:.1f}')") MB ($size_bytes bytes)"
log "PASS in $((SECONDS - T_START))s"
