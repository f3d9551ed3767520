"""Renders deploy/kubernetes for `podman kube play` on this machine (.ci/kube-play.sh).

    python3 .ci/kube-render.py DEPLOY_DIR OUT_DIR IMAGE NAME HTTP_PORT GRPC_PORT

Reads the kustomization the way `kubectl apply -k` would for what a pod needs: the
Deployment, the ConfigMap its envFrom names (made from the configMapGenerator's env file),
and the Service and ServiceMonitor that say where /metrics is scraped. Writes
OUT_DIR/deployment.yaml and OUT_DIR/configmap.yaml for podman, and OUT_DIR/facts.json: what
the manifest asks for (probes, user, read-only root, limits, preStop, grace period), resolved
to this run's ports, for the script to check the running pod against.

kustomize's labels: and images: are not applied: the labels do not change how the pod runs,
and the image is the one given. Only what cannot run here as written is rewritten; each
rewrite says why. Everything else
(args, env, probes, securityContext, resources, volumes) goes to podman as it is.
"""

import json
import os
import re
import sys

import yaml

deploy_dir, out_dir, image, name, http_port, grpc_port = sys.argv[1:7]
http_port, grpc_port = int(http_port), int(grpc_port)


def die(msg):
    sys.exit(f"kube-render: {msg}")


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


kust = load_all(os.path.join(deploy_dir, "kustomization.yaml"))[0]
docs = []
for res in kust.get("resources", []):
    docs += load_all(os.path.join(deploy_dir, res))


def one(kind):
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        die(f"want one {kind} in the kustomization's resources, found {len(found)}")
    return found[0]


deployment, service, monitor = one("Deployment"), one("Service"), one("ServiceMonitor")


# --- ConfigMaps, as kustomize's configMapGenerator makes them --------------------------
def env_file(path):
    """kustomize's env-file format: KEY=VALUE lines; blank lines and # comments skipped."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                die(f"{path}:{n}: not KEY=VALUE: {line!r}")
            k, v = line.split("=", 1)
            out[k] = v
    return out


config_maps = {}
for gen in kust.get("configMapGenerator", []):
    data = {}
    for env in gen.get("envs", []):
        data.update(env_file(os.path.join(deploy_dir, env)))
    for lit in gen.get("literals", []):
        k, v = lit.split("=", 1)
        data[k] = v
    if gen.get("files"):
        die(f"configMapGenerator {gen['name']}: files: is not handled here")
    # kustomize appends a content hash to the name and rewrites the Deployment's reference
    # to match; without kustomize both keep the base name, which is the same pairing.
    config_maps[gen["name"]] = data

spec = deployment["spec"]
pod = spec["template"]["spec"]
if len(pod["containers"]) != 1:
    die(f"want one container in the pod, found {len(pod['containers'])}")
ctr = pod["containers"][0]
named_ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}

env_sources = [e["configMapRef"]["name"] for e in ctr.get("envFrom", []) if "configMapRef" in e]
for src in env_sources:
    if src not in config_maps:
        die(f"envFrom names ConfigMap {src}, which the kustomization does not generate")
if len(env_sources) != 1:
    die(f"want one envFrom ConfigMap, found {env_sources}")
env = config_maps[env_sources[0]]

# The server listens where MCD_ADDR and MCD_GRPC_ADDR say; the probes, the Service and the
# ServiceMonitor reach it through the container's named ports. They must agree, or the
# kubelet probes a port nothing listens on.
listeners = {"MCD_ADDR": "http", "MCD_GRPC_ADDR": "grpc"}
for var, port_name in listeners.items():
    if var not in env:
        die(f"{var} is not in the ConfigMap: the server would use its built-in default")
    port = int(env[var].rsplit(":", 1)[1])
    if named_ports.get(port_name) != port:
        die(f"{var}={env[var]} but the container's port '{port_name}' is {named_ports.get(port_name)}")
if env.get("MCD_METRICS_ADDR"):
    die("MCD_METRICS_ADDR is set: this script does not yet give /metrics a port of its own")

# --- the rewrites ----------------------------------------------------------------------
# 1. The pods are named after the Deployment (podman: NAME-pod-0), and other runs on this
#    machine may play the same manifest at the same time: a name of this run's own.
deployment["metadata"]["name"] = name
# 2. One pod: podman plays each replica as a pod of its own, on the same host network,
#    where two would contend for the same ports (the HPA, not podman, owns scaling).
spec["replicas"] = 1
# 3. The image CI built, instead of the name the kustomization's images: would set.
ctr["image"] = image
# 4. Ports: the pod runs on the host's network (no container network stack here), where
#    8080 and 8081 may be taken: free ports picked at run time, on 127.0.0.1, not every
#    interface, for the listeners (MCD_ADDR, MCD_GRPC_ADDR) and so for the named ports the
#    probes, the Service and the ServiceMonitor use (resolved below, as the kubelet would).
# 5. No ports: list for podman. Podman 4.3 publishes every containerPort as a host port,
#    which host networking refuses ("PortMappings can only be used with Bridge or
#    slirp4netns networking"); on the host's network the server's ports are the host's
#    without it. The kubelet's probes are made by kube-play.sh, which resolves the names.
new_ports = {"http": http_port, "grpc": grpc_port}
if set(named_ports) != set(new_ports):
    die(f"the container's named ports are {sorted(named_ports)}, want {sorted(new_ports)}")
for var, port_name in listeners.items():
    env[var] = f"127.0.0.1:{new_ports[port_name]}"
by_number = {named_ports[n]: new_ports[n] for n in named_ports}  # a probe may give a number
named_ports = new_ports
del ctr["ports"]
# 6. Volumes named after this run: podman 4.3 makes each emptyDir a volume of the
#    machine's, named as in the pod spec ("tmp"), which another run's pod would share.
renamed = {}
for v in pod.get("volumes", []):
    if "emptyDir" in v:
        renamed[v["name"]] = v["name"] = f"{name}-{v['name']}"
for m in ctr.get("volumeMounts", []):
    m["name"] = renamed.get(m["name"], m["name"])

with open(os.path.join(out_dir, "deployment.yaml"), "w") as f:
    yaml.safe_dump(deployment, f, sort_keys=False)
with open(os.path.join(out_dir, "configmap.yaml"), "w") as f:
    yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": env_sources[0]}, "data": env}, f, sort_keys=False)


# --- what the running pod is checked against -------------------------------------------
def port_of(port):
    return named_ports[port] if isinstance(port, str) else by_number.get(port, port)


def probe(kind):
    p = ctr.get(kind)
    if not p:
        die(f"the container has no {kind}")
    if "httpGet" not in p:
        die(f"{kind} is not an httpGet probe: not handled here")
    g = p["httpGet"]
    # The kubelet's defaults for what the manifest leaves out.
    url = f"{g.get('scheme', 'HTTP').lower()}://{g.get('host', '127.0.0.1')}:{port_of(g['port'])}{g.get('path', '/')}"
    return {"url": url, "period": p.get("periodSeconds", 10), "timeout": p.get("timeoutSeconds", 1),
            "failure": p.get("failureThreshold", 3), "success": p.get("successThreshold", 1),
            "initial_delay": p.get("initialDelaySeconds", 0)}


# The ServiceMonitor scrapes a Service port by name; the Service sends it to a target port,
# a container port's name. Follow that chain to the port Prometheus would scrape.
endpoint = monitor["spec"]["endpoints"][0]
svc_port = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
if not svc_port:
    die(f"the ServiceMonitor scrapes port '{endpoint['port']}', which the Service does not have")
target = svc_port[0]["targetPort"]
if isinstance(target, str) and target not in named_ports:
    die(f"the Service's port '{endpoint['port']}' targets '{target}', which the container does not name")


def quantity(q):
    """A Kubernetes quantity: 1Gi, 256Mi, 500m, 2."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(m.group(1)) * units[m.group(2)]


sc, psc = ctr.get("securityContext", {}), pod.get("securityContext", {})
limits = ctr.get("resources", {}).get("limits", {})
facts = {
    "pod": f"{name}-pod-0",
    "container": f"{name}-pod-0-{ctr['name']}",
    "probes": {k: probe(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")},
    "metrics_url": f"http://127.0.0.1:{port_of(target)}{endpoint.get('path', '/metrics')}",
    "http_base": f"http://127.0.0.1:{named_ports['http']}",
    "grpc_port": named_ports["grpc"],
    "run_as_user": sc.get("runAsUser", psc.get("runAsUser")),
    "run_as_group": sc.get("runAsGroup", psc.get("runAsGroup")),
    "run_as_non_root": sc.get("runAsNonRoot", psc.get("runAsNonRoot", False)),
    "read_only_root": sc.get("readOnlyRootFilesystem", False),
    "no_new_privileges": sc.get("allowPrivilegeEscalation") is False,
    "cap_drop": sc.get("capabilities", {}).get("drop", []),
    "memory_limit": int(quantity(limits["memory"])) if "memory" in limits else None,
    "cpu_limit": quantity(limits["cpu"]) if "cpu" in limits else None,
    "mounts": [m["mountPath"] for m in ctr.get("volumeMounts", [])],
    "grace_seconds": pod.get("terminationGracePeriodSeconds", 30),
    "pre_stop": ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command"),
    "env": env,
}
with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(facts, f, indent=1)
