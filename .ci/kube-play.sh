#!/usr/bin/env bash
# Runs the Deployment's own pod spec from deploy/kubernetes with `podman kube play` on an
# image CI built: its args, env (the ConfigMap the kustomization generates), probes,
# securityContext (user, read-only root, no privilege escalation, no capabilities) and
# resources. Checks startup and readiness through the manifest's own probes, an MC answer,
# the /metrics port the ServiceMonitor scrapes (parsed as Prometheus text), what podman made
# of the securityContext and limits, then terminates the pod as the kubelet does (preStop,
# then SIGTERM within terminationGracePeriodSeconds), checks the drain in its logs and the
# exit code, and removes it with `podman kube down`.
#
#   bash .ci/kube-play.sh IMAGE      (as root; .ci/container.sh calls it on the image it built)
#
# .ci/kube-render.py makes the manifests podman plays and says, for each rewrite, why it is
# needed here: the Deployment's (so the pod's) name, one replica, the image, free ports on
# 127.0.0.1 for the listeners (host network), no ports: list (podman 4.3 would publish it,
# which host networking refuses) and the emptyDir's name (podman makes it a machine-wide
# volume). The run prints the rewrites as a diff; nothing else in the pod spec changes.
# MCD_KUBE_NAME names the Deployment (the pod is MCD_KUBE_NAME-pod-0); .ci/container.sh sets
# it so that its own cleanup removes the pod too. The pod, and podman's pause image if this
# run built it, are removed on exit, also on failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMAGE="${1:?usage: kube-play.sh IMAGE}"
NAME="${MCD_KUBE_NAME:-mcd-serve-kube-$$}"
DEPLOY=deploy/kubernetes
# Debian's own Python: PyYAML and prometheus_client come from apt (python3-yaml,
# python3-prometheus-client), whatever `python3` is first on PATH.
PY=/usr/bin/python3
# crun fails on this machine's hybrid cgroups; runc works.
PODMAN=(podman --runtime runc)

T_START=$SECONDS
T_STAGE=$SECONDS
stage() {
  printf '[kube-play] %-58s (stage %ss, total %ss)\n' "$*" "$((SECONDS - T_STAGE))" "$((SECONDS - T_START))"
  T_STAGE=$SECONDS
}
log() { printf '[kube-play] %s\n' "$*"; }
die() { printf '[kube-play] FAIL: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root (podman)"

# --- tools -----------------------------------------------------------------------------
# catatonit: podman builds its pods' pause (infra) image from it; without it kube play
# fails with "finding pause binary".
if ! command -v podman >/dev/null || ! command -v catatonit >/dev/null || ! command -v curl >/dev/null \
  || ! "$PY" -c 'import yaml, prometheus_client' 2>/dev/null; then
  log "installing podman runc catatonit curl python3-yaml python3-prometheus-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    podman runc catatonit curl python3 python3-yaml python3-prometheus-client >/dev/null
fi
podman image exists "$IMAGE" || die "no image $IMAGE (build it first: .ci/container.sh does)"

WORK="$(mktemp -d /tmp/mcd-kube-play.XXXXXX)"
# CONTAINERS.md's settings, and the ulimits there as defaults: kube play has no --ulimit,
# and without them the runtime fails with "setrlimit RLIMIT_NOFILE: Operation not permitted".
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits=["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager="cgroupfs"
events_logger="file"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

# podman names the pause image after its own version; a run that builds it removes it.
pause_before="$(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/podman-pause:' || true)"
POD="$NAME-pod-0"
cleanup() {
  local rc=$?
  set +e
  if ((rc)) && [[ -n ${CTR:-} ]] && podman container exists "$CTR"; then
    printf "[kube-play] the container's log, last 30 lines:\n" >&2
    podman logs --tail 30 "$CTR" 2>&1 | sed 's/^/    /' >&2
  fi
  "${PODMAN[@]}" pod rm -f "$POD" >/dev/null 2>&1
  if [[ -z $pause_before ]]; then
    # Without -f: a pod someone else started meanwhile keeps it.
    podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/podman-pause:' \
      | xargs -r podman rmi >/dev/null 2>&1
  fi
  rm -rf "$WORK"
  if ((rc)); then printf '[kube-play] FAILED (exit %s) after %ss\n' "$rc" "$((SECONDS - T_START))" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
stage "tools"

# --- render ----------------------------------------------------------------------------
free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
HTTP_PORT="$(free_port)"
GRPC_PORT="$(free_port)"
[[ $HTTP_PORT != "$GRPC_PORT" ]] || GRPC_PORT="$(free_port)"
"$PY" .ci/kube-render.py "$DEPLOY" "$WORK" "$IMAGE" "$NAME" "$HTTP_PORT" "$GRPC_PORT" \
  || die "could not render $DEPLOY"
# The whole of what was changed, so a reader can see nothing else was.
log "rewritten in $DEPLOY/deployment.yaml (everything else is played as it is):"
"$PY" - "$DEPLOY/deployment.yaml" "$WORK/deployment.yaml" <<'EOF'
import difflib, sys, yaml
a, b = (yaml.safe_dump(yaml.safe_load(open(p)), sort_keys=True).splitlines() for p in sys.argv[1:])
for line in difflib.unified_diff(a, b, "manifest", "played", n=0, lineterm=""):
    if not line.startswith(("---", "+++", "@@")):
        print("    " + line)
EOF
log "ConfigMap from $DEPLOY/mcd-serve.env, MCD_ADDR and MCD_GRPC_ADDR on 127.0.0.1:$HTTP_PORT and :$GRPC_PORT"
fact() { # a value from facts.json by its dotted path (python's str: True/False for booleans)
  "$PY" -c 'import functools, json, sys
v = functools.reduce(lambda d, k: d[k], sys.argv[2].split("."), json.load(open(sys.argv[1])))
print(json.dumps(v) if isinstance(v, (list, dict)) else v)' "$WORK/facts.json" "$1"
}
CTR="$(fact container)"
stage "render"

# --- play ------------------------------------------------------------------------------
# --network host: there is no container network stack here (CONTAINERS.md).
# --build=false: never build an image named in the YAML; play the one given.
"${PODMAN[@]}" kube play --network host --build=false --configmap "$WORK/configmap.yaml" \
  "$WORK/deployment.yaml" >"$WORK/play.log" 2>&1 \
  || { cat "$WORK/play.log" >&2; die "podman kube play failed"; }
log "played pod $POD, container $CTR"

# The kubelet's startup probe: the manifest's URL, timeout and failure threshold. It is
# tried every second here (the kubelet waits periodSeconds between tries) until the
# kubelet would give up: failureThreshold x periodSeconds.
"$PY" - "$WORK/facts.json" "$CTR" <<'EOF' || die "startup probe did not pass"
import json, subprocess, sys, time, urllib.request
facts, ctr = json.load(open(sys.argv[1])), sys.argv[2]
p = facts["probes"]["startupProbe"]
limit = p["initial_delay"] + p["failure"] * p["period"]
t0 = time.monotonic()
while True:
    try:
        with urllib.request.urlopen(p["url"], timeout=p["timeout"]) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    running = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", ctr],
                             capture_output=True, text=True).stdout.strip()
    assert running == "true", f"container is not running (State.Running={running!r})"
    assert time.monotonic() - t0 < limit, f"{p['url']} not 200 within {limit}s"
    time.sleep(1)
print(f"[kube-play] startupProbe {p['url']} passed after {time.monotonic() - t0:.1f}s (limit {limit}s)")
EOF
# Then the readiness and liveness probes, once each, as the kubelet sends them.
for kind in readinessProbe livenessProbe; do
  url="$(fact "probes.$kind.url")"
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time "$(fact "probes.$kind.timeout")" "$url")" || true
  [[ $code == 200 ]] || die "$kind $url answered '$code'"
  log "$kind $url: 200"
done
restarts="$(podman inspect --format '{{.RestartCount}}' "$CTR")"
[[ $restarts == 0 ]] || die "container restarted $restarts times"
# Podman 4.3 makes no healthcheck of readinessProbe or startupProbe; its livenessProbe
# healthcheck runs curl in the container (not in this image) on the port's number (a named
# port becomes 0), so it cannot pass here and is not run: the probes above are the kubelet's.
log "podman's healthcheck from livenessProbe (not run): $(podman inspect --format '{{json .Config.Healthcheck.Test}}' "$CTR")"
stage "kube play until ready"

# --- what podman made of the pod spec ---------------------------------------------------
"$PY" - "$WORK/facts.json" "$CTR" <<'EOF' || die "the container does not run as the manifest says"
import json, subprocess, sys
facts, ctr = json.load(open(sys.argv[1])), sys.argv[2]
c = json.loads(subprocess.run(["podman", "inspect", ctr], check=True, capture_output=True, text=True).stdout)[0]
hc, cfg = c["HostConfig"], c["Config"]
want_user = f"{facts['run_as_user']}:{facts['run_as_group']}"
checks = {
    "user (runAsUser:runAsGroup)": (cfg["User"], want_user),
    "read-only root (readOnlyRootFilesystem)": (hc["ReadonlyRootfs"], facts["read_only_root"]),
    "no-new-privileges (allowPrivilegeEscalation: false)":
        ("no-new-privileges" in (hc.get("SecurityOpt") or []), facts["no_new_privileges"]),
    "effective capabilities (drop: ALL)":
        (c.get("EffectiveCaps") or [], [] if "ALL" in facts["cap_drop"] else c.get("EffectiveCaps")),
    "memory limit (limits.memory)": (hc["Memory"], facts["memory_limit"]),
    "CPU limit (limits.cpu), quota/period": (hc["CpuQuota"] / hc["CpuPeriod"], facts["cpu_limit"]),
    "OCI runtime": (c["OCIRuntime"], "runc"),
    "mounts (volumeMounts)": (sorted(m["Destination"] for m in c["Mounts"]), sorted(facts["mounts"])),
}
env = dict(e.split("=", 1) for e in cfg["Env"])
for k, v in facts["env"].items():
    checks[f"env {k} (ConfigMap)"] = (env.get(k), v)
bad = {k: v for k, v in checks.items() if v[0] != v[1]}
for k, (got, want) in checks.items():
    if not k.startswith("env "):
        print(f"    {k}: {got!r}" + ("" if k not in bad else f"  WANT {want!r}"))
print(f"    env: the ConfigMap's {len(facts['env'])} variables" + ("" if not any(k.startswith("env ") for k in bad) else ": MISMATCH"))
assert not bad, bad
EOF
uid="$(podman exec "$CTR" id -u)"
gid="$(podman exec "$CTR" id -g)"
[[ $uid == "$(fact run_as_user)" && $gid == "$(fact run_as_group)" ]] || die "server runs as $uid:$gid"
# runAsNonRoot is the kubelet's check, which podman does not make: make it here.
[[ $(fact run_as_non_root) != True || $uid != 0 ]] || die "runAsNonRoot, but the server runs as root"
# The host's view of the server process (no user namespace: the same UID outside).
host_uid="$(podman top "$CTR" huser | awk 'NR == 2 {print $1}')"
[[ $host_uid == "$uid" ]] || die "host sees the server as user '$host_uid', want $uid"
if podman exec "$CTR" sh -c ': > /app/probe' 2>/dev/null; then die "root filesystem is writable"; fi
log "server runs as $uid:$gid (host: $host_uid), runAsNonRoot holds, / is read-only"
stage "pod spec as run"

# --- requests --------------------------------------------------------------------------
BASE="$(fact http_base)"
B='[13.46,28.21,85.89,562.1,0.07517,0.04726,0.01271,0.01117,0.1421,0.05763,0.1689,1.15,1.4,14.91,0.004942,0.01203,0.007508,0.005179,0.01442,0.001684,14.69,35.63,97.11,680.6,0.1108,0.1457,0.07934,0.05781,0.2694,0.07061]'
MC_SAMPLES=20
code="$(curl -s -o "$WORK/mc.body" -D "$WORK/mc.headers" -w '%{http_code}' --max-time 10 \
  -H 'content-type: application/json' -d "{\"inputs\": [$B]}" "$BASE/predict?mc_samples=$MC_SAMPLES")" \
  || die "mc: curl failed"
[[ $code == 200 ]] || die "mc: HTTP $code: $(cat "$WORK/mc.body")"
"$PY" - "$WORK/mc.body" "$WORK/mc.headers" "$MC_SAMPLES" <<'EOF' || die "mc: unexpected answer"
import json, sys
a = json.load(open(sys.argv[1]))
headers = {k.strip().lower(): v.strip() for k, v in
           (l.split(":", 1) for l in open(sys.argv[2]).read().splitlines()[1:] if ":" in l)}
assert headers.get("x-inference-mode") == "mc_dropout", headers
assert a["mode"] == "mc_dropout" and a["mc_samples"] == int(sys.argv[3]), a
o = a["outputs"]["probabilities"]
mean, var = o["mean"][0], o["variance"][0]
assert len(mean) == 2 and abs(sum(mean) - 1) < 1e-4 and mean[1] > 0.5, mean  # a held-out benign case
assert all(v >= 0 for v in var), var
print("    mc:", json.dumps(a))
EOF

# The port the ServiceMonitor scrapes (its endpoint's port, through the Service's
# targetPort, to the container port), parsed as Prometheus text exposition.
METRICS_URL="$(fact metrics_url)"
curl -sf --max-time 5 -o "$WORK/metrics.txt" "$METRICS_URL" || die "GET $METRICS_URL failed"
"$PY" - "$WORK/metrics.txt" "$MC_SAMPLES" <<'EOF' || die "$METRICS_URL: not the expected Prometheus text"
import sys
from prometheus_client.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
def samples(family, name, **labels):
    return [s.value for s in fams[family].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
assert samples("mcd_ready", "mcd_ready") == [1.0], samples("mcd_ready", "mcd_ready")
mc = samples("mcd_requests", "mcd_requests_total", model="breast_cancer", mode="mc_dropout",
             status="200", protocol="native")
assert mc == [1.0], mc
assert samples("mcd_mc_samples", "mcd_mc_samples_count", model="breast_cancer") == [1.0]
assert samples("mcd_mc_samples", "mcd_mc_samples_sum", model="breast_cancer") == [float(sys.argv[2])]
assert samples("mcd_model_info", "mcd_model_info", model="breast_cancer") == [1.0]
print(f"    metrics: {len(fams)} families; mcd_ready 1, one MC request of {sys.argv[2]} samples counted")
EOF
"$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()' \
  "$(fact grpc_port)" || die "nothing listens on the grpc port $(fact grpc_port)"
log "MC answer, $METRICS_URL parsed, grpc port $(fact grpc_port) listening"
stage "MC request and metrics"

# --- termination, as the kubelet does it -------------------------------------------------
# The kubelet runs the preStop hook, then sends SIGTERM and waits what is left of
# terminationGracePeriodSeconds. Podman 4.3 does neither: it runs no preStop hook, ignores
# the grace period (its stop timeout stays 10 s), and `kube down` stops with a timeout of 0,
# which is SIGKILL at once, no SIGTERM (exit 137 here; upstream fixed it in 5.1). So the hook
# is run with exec and the pod stopped with what is left of the grace period here, and
# `kube down` then removes what is stopped.
GRACE="$(fact grace_seconds)"
t0=$SECONDS
mapfile -t pre_stop < <("$PY" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["pre_stop"] or []))' "$WORK/facts.json")
if ((${#pre_stop[@]})); then
  "${PODMAN[@]}" exec "$CTR" "${pre_stop[@]}" &
  hook=$!
  # Still serving while the endpoint removal propagates, the point of the hook: readiness
  # is 200 every second until the hook ends.
  ready_probe="$(fact probes.readinessProbe.url)"
  tries=0
  while kill -0 "$hook" 2>/dev/null; do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$ready_probe")" || true
    if [[ $code != 200 ]] && kill -0 "$hook" 2>/dev/null; then
      die "readiness answered '$code' during the preStop hook"
    fi
    tries=$((tries + 1))
    sleep 1
  done
  wait "$hook" || die "preStop hook ${pre_stop[*]} failed"
  log "preStop hook '${pre_stop[*]}' ran in $((SECONDS - t0))s as the pod's user; readiness 200 at each of $tries probes meanwhile"
fi
left=$((GRACE - (SECONDS - t0)))
((left > 0)) || die "the preStop hook used up terminationGracePeriodSeconds ($GRACE s)"
t1=$SECONDS
# (podman's "unable to get systemd connection" about the healthcheck timer is harmless:
# there is no systemd here, and so no timer.)
"${PODMAN[@]}" pod stop -t "$left" "$POD" >"$WORK/stop.log" 2>&1 \
  || { cat "$WORK/stop.log" >&2; die "podman pod stop failed"; }
stop_secs=$((SECONDS - t1))
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "$CTR")"
podman logs "$CTR" >"$WORK/run.log" 2>&1
"${PODMAN[@]}" kube down "$WORK/deployment.yaml" >"$WORK/down.log" 2>&1 \
  || { cat "$WORK/down.log" >&2; die "podman kube down failed"; }
if podman pod exists "$POD"; then die "pod $POD still exists after kube down"; fi
log "run log:"
sed 's/^/    /' "$WORK/run.log"
[[ $exit_code == 0 ]] || die "container exit code $exit_code, want 0"
# The server's own drain lines (src/server.rs), in order, from its JSON log.
"$PY" - "$WORK/run.log" <<'EOF' || die "no drain in the container's log"
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
log "drained: SIGTERM after preStop, all requests finished, exit code 0; SIGTERM to exit ${stop_secs}s (grace left ${left}s); kube down removed the pod"
stage "preStop, SIGTERM, drain, kube down"

log "PASS in $((SECONDS - T_START))s"
