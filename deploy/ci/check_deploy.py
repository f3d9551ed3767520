#!/usr/bin/env python3
"""Static checks of the deploy/ artefacts, run by .ci/deploy-checks.sh.

    check_deploy.py k8s-split RENDERED OUT_BUILTIN OUT_CRDS
    check_deploy.py k8s-policy RENDERED
    check_deploy.py servicemonitor CRDS_YAML
    check_deploy.py kustomize-files KUSTOMIZE_DIR
    check_deploy.py dockerfile DOCKERFILE RENDERED
    cargo metadata --no-deps --format-version 1 | check_deploy.py cargo-targets REPO_ROOT
    check_deploy.py grafana DASHBOARD_JSON PROVISIONING_DIR
    check_deploy.py compose COMPOSE_YAML
    check_deploy.py metric-names RULES_YAML DASHBOARD_JSON
    check_deploy.py kserve KSERVE_DIR

Needs PyYAML and jsonschema (installed into the CI venv). Each subcommand
prints what it verified and exits 1 on the first list of problems.
"""
import json
import os
import re
import sys

import yaml

# Metric names the server exposes (the binding contract). Histograms expand
# to _bucket/_sum/_count.
COUNTERS_GAUGES = {
    "mcd_requests_total", "mcd_mode_checks_total", "mcd_mode_violations_total",
    "mcd_inflight_requests", "mcd_held_cost", "mcd_rejected_requests_total", "mcd_model_info", "mcd_ready",
    "mcd_model_load_failures", "mcd_model_reloads_total", "mcd_auth_failures_total",
    "mcd_internal_panics_total", "mcd_drift_p_value", "mcd_drift_ks_statistic", "mcd_drift_windows_total",
    "mcd_drift_window_rows", "mcd_drift_consecutive_windows", "mcd_drift_windows_dropped_total",
}
HISTOGRAMS = {
    "mcd_request_duration_seconds", "mcd_inference_duration_seconds",
    "mcd_mc_samples", "mcd_predictive_entropy", "mcd_model_load_duration_seconds",
    "mcd_pass_memory_bytes", "mcd_batch_rows", "mcd_queue_duration_seconds",
}
PROM_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}


def quantity_bytes(q):
    """A Kubernetes memory quantity (1Gi, 512Mi, 1000000) in bytes."""
    m = re.fullmatch(r"(\d+)([KMG]i?)?", str(q))
    if not m:
        raise ValueError(f"memory quantity {q!r}")
    return int(m.group(1)) * UNITS.get(m.group(2) or "", 1)


# The pod memory rule (README, Memory; docs/deploy.md): the limit holds the request budget,
# the idle process with request bodies and allocator slack (BASE_BYTES), and the models as
# they load, LOAD_FACTOR times their files' bytes. Measured load peaks on tract (AMD EPYC
# Zen 4, AVX-512), whole process: BERT-base 1,475 MiB for 438 MB of files (3.4x), ResNet-50 552 MiB
# for 94 MB, DenseNet121 215 MiB for 29 MB; models load one after another.
LOAD_FACTOR = 4
BASE_BYTES = 256 << 20
MODEL_BYTES_ANNOTATION = "mcd-serve/model-bytes"


def model_files_bytes(folder):
    """Bytes of the models a folder serves: its .onnx files and their external data."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".onnx") or f.endswith(".onnx.data"))


def memory_budget(where, env, resources, p, model_bytes=0):
    """MCD_MAX_MEMORY_BYTES is set, at most half the container's memory limit, and the limit
    holds the budget, BASE_BYTES and LOAD_FACTOR times the model files (docs/deploy.md)."""
    limit = resources.get("limits", {}).get("memory")
    budget = env.get("MCD_MAX_MEMORY_BYTES")
    if limit is None or budget is None:
        p.append(f"{where}: MCD_MAX_MEMORY_BYTES and a memory limit must both be set")
        return
    if int(budget) * 2 > quantity_bytes(limit):
        p.append(f"{where}: MCD_MAX_MEMORY_BYTES {budget} is over half the memory limit {limit}")
    need = int(budget) + BASE_BYTES + LOAD_FACTOR * model_bytes
    if quantity_bytes(limit) < need:
        p.append(f"{where}: memory limit {limit} is under the budget {budget} + {BASE_BYTES >> 20} MiB + "
                 f"{LOAD_FACTOR} x {model_bytes} bytes of model files = {need} bytes")


BUILTIN_KINDS = {
    ("v1", "ServiceAccount"), ("v1", "ConfigMap"), ("v1", "Service"),
    ("apps/v1", "Deployment"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
}
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def fail(what, problems):
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    print(f"{what}: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --------------------------------------------------------------------------
def k8s_split(rendered, out_builtin, out_crds):
    docs = load_all(rendered)
    builtin, crds, problems = [], [], []
    for d in docs:
        key = (d.get("apiVersion"), d.get("kind"))
        if key in BUILTIN_KINDS:
            builtin.append(d)
        elif key in CRD_KINDS:
            crds.append(d)
        else:
            problems.append(f"unexpected kind {key} (add it to BUILTIN_KINDS or CRD_KINDS)")
    if problems:
        fail("k8s-split", problems)
    with open(out_builtin, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
    with open(out_crds, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(crds, f, sort_keys=False)
    print(f"k8s-split: {len(builtin)} built-in, {len(crds)} CRD resources")


def _env_from_configmaps(docs):
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def k8s_policy(rendered):
    docs = load_all(rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    p = []
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "ConfigMap", "ServiceMonitor"):
        if len(by_kind.get(kind, [])) != 1:
            p.append(f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    if p:
        fail("k8s-policy", p)
    dep = by_kind["Deployment"][0]
    svc = by_kind["Service"][0]
    hpa = by_kind["HorizontalPodAutoscaler"][0]
    pdb = by_kind["PodDisruptionBudget"][0]
    sm = by_kind["ServiceMonitor"][0]
    cms = _env_from_configmaps(docs)

    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    if spec.get("replicas", 1) < 2:
        p.append("Deployment replicas < 2")
    if not all(pod_labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()):
        p.append("Deployment selector does not match its pod template labels")
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        p.append("pod securityContext.runAsNonRoot is not true")
    if not psc.get("runAsUser"):
        p.append("pod securityContext.runAsUser unset/0 (runAsNonRoot needs a numeric non-root UID)")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        p.append("pod seccompProfile is not RuntimeDefault")

    containers = pod["containers"]
    if len(containers) != 1:
        p.append("expected one container")
    c = containers[0]
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        p.append("readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        p.append("allowPrivilegeEscalation is not false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        p.append("capabilities.drop is not [ALL]")
    res = c.get("resources", {})
    for k in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(k, {}):
                p.append(f"resources.{k}.{r} missing")
    ports = {pt["name"]: pt["containerPort"] for pt in c.get("ports", [])}
    if ports.get("http") != 8080:
        p.append("container port 'http' is not 8080")

    def probe(name, path):
        pr = c.get(name)
        if not pr:
            p.append(f"{name} missing")
            return
        hg = pr.get("httpGet", {})
        if hg.get("path") != path:
            p.append(f"{name} path is {hg.get('path')!r}, want {path!r}")
        if hg.get("port") not in ("http", 8080):
            p.append(f"{name} port is {hg.get('port')!r}")
    probe("livenessProbe", "/health/live")
    probe("readinessProbe", "/health/ready")
    probe("startupProbe", "/health/ready")

    pre = c.get("lifecycle", {}).get("preStop", {})
    cmd = pre.get("exec", {}).get("command", [])
    pre_sleep = 0
    if cmd and cmd[0] == "sleep":
        pre_sleep = int(cmd[1])
    elif "sleep" in pre:
        pre_sleep = int(pre["sleep"]["seconds"])
    if pre_sleep <= 0:
        p.append("no preStop sleep")

    env = {}
    for ef in c.get("envFrom", []):
        name = ef.get("configMapRef", {}).get("name")
        if name not in cms:
            p.append(f"envFrom references ConfigMap {name!r}, not in the rendered output")
        else:
            env.update(cms[name])
    for k in ("MCD_MODELS", "MCD_ADDR", "MCD_REQUEST_TIMEOUT_SECS"):
        if k not in env:
            p.append(f"{k} not set through the ConfigMap")
    if not all(k.startswith("MCD_") for k in env):
        p.append(f"ConfigMap has non-MCD_ keys: {sorted(k for k in env if not k.startswith('MCD_'))}")
    timeout = int(env.get("MCD_REQUEST_TIMEOUT_SECS", 30))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= timeout + pre_sleep:
        p.append(f"terminationGracePeriodSeconds {grace} <= preStop {pre_sleep}s + request timeout {timeout}s")
    if not env.get("MCD_ADDR", "").endswith(":8080"):
        p.append("MCD_ADDR does not listen on 8080")
    # The Deployment serves the models the image carries (the Dockerfile copies models/).
    if env.get("MCD_MODELS") != "/app/models":
        p.append("MCD_MODELS is not the image's /app/models: the memory rule cannot size its models")
    bundled = model_files_bytes(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
    memory_budget("Deployment", env, res, p, bundled)

    # Service -> pods, port name
    if not all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
        p.append("Service selector does not select the pods")
    if "http" not in [pt.get("name") for pt in svc["spec"]["ports"]]:
        p.append("Service has no port named http")
    # HPA
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", dep["metadata"]["name"]):
        p.append("HPA does not target the Deployment")
    if hpa["spec"].get("minReplicas", 1) < 2:
        p.append("HPA minReplicas < 2")
    if not any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]):
        p.append("HPA has no CPU resource metric")
    # PDB
    if not all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()):
        p.append("PDB selector does not select the pods")
    # ServiceMonitor -> Service
    svc_labels = svc["metadata"].get("labels", {})
    if not all(svc_labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
        p.append("ServiceMonitor selector does not select the Service")
    for ep in sm["spec"].get("endpoints") or [{}]:
        if ep.get("port") != "http" or ep.get("path") != "/metrics":
            p.append("ServiceMonitor endpoint is not port http, path /metrics")
    job_label = sm["spec"].get("jobLabel")
    if job_label and svc_labels.get(job_label) != "mcd-serve":
        p.append(f"ServiceMonitor jobLabel {job_label} does not give job=mcd-serve (rules expect it)")
    if p:
        fail("k8s-policy", p)
    print(f"k8s-policy: replicas={spec['replicas']}, grace={grace}s > preStop {pre_sleep}s + timeout {timeout}s, "
          f"probes/securityContext/resources/selectors/HPA/PDB/ServiceMonitor consistent")


# Subset of the prometheus-operator ServiceMonitor CRD schema (v1), strict on
# the fields this repository uses; enough to catch typos and wrong types.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                           "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                             "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                            "matchExpressions": {"type": "array"}}},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
                        },
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                    },
                },
            },
        },
    },
}


def servicemonitor(path):
    import jsonschema
    docs = load_all(path)
    p = []
    v = jsonschema.Draft7Validator(SERVICEMONITOR_SCHEMA)
    for d in docs:
        for e in v.iter_errors(d):
            p.append(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}: {'/'.join(map(str, e.path))}: {e.message}")
    if not docs:
        p.append("no ServiceMonitor found")
    if p:
        fail("servicemonitor", p)
    print(f"servicemonitor: {len(docs)} ServiceMonitor(s) valid against the bundled v1 subset schema")


def kustomize_files(kdir):
    """Fallback when no kustomize/kubectl is available: every file that the
    kustomization lists exists, and every YAML manifest is listed."""
    with open(os.path.join(kdir, "kustomization.yaml"), encoding="utf-8") as f:
        k = yaml.safe_load(f)
    listed = set(k.get("resources", []))
    for g in k.get("configMapGenerator", []):
        listed.update(g.get("envs", []))
        listed.update(x.split("=", 1)[-1] for x in g.get("files", []))
    p = [f"{r} listed but missing" for r in sorted(listed) if not os.path.exists(os.path.join(kdir, r))]
    for fn in sorted(os.listdir(kdir)):
        if fn.endswith((".yaml", ".yml")) and fn != "kustomization.yaml" and fn not in listed:
            p.append(f"{fn} exists but is not listed in kustomization.yaml")
    if p:
        fail("kustomize-files", p)
    print(f"kustomize-files: {len(listed)} listed files present, no unlisted manifests")


def dockerfile(path, rendered):
    """The image and the Kubernetes manifests agree (user, port, model dir)."""
    text = open(path, encoding="utf-8").read()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    p = []
    if len(froms) < 2:
        p.append("not a multi-stage build")
    if not any("rust:1.95" in f for f in froms[:-1]):
        p.append("builder is not rust:1.95*")
    if not re.match(r"FROM (debian:bookworm-slim|gcr.io/distroless/cc-debian12)", froms[-1] if froms else ""):
        p.append(f"runtime base is {froms[-1] if froms else None!r}")
    if not re.search(r"cargo build --release --locked", text):
        p.append("no `cargo build --release --locked`")
    final = text[text.rfind("\nFROM "):]
    runs = " ".join(re.findall(r"^RUN (.*)$", re.sub(r"\\\n", " ", final), re.M))
    for bad in ("cargo", "rustc", "apt-get install", "gcc", "build-essential", "curl", "wget"):
        if re.search(r"\b" + re.escape(bad) + r"\b", runs):
            p.append(f"runtime stage runs/installs {bad}")
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    uid = user[-1].split(":")[0] if user else None
    if not uid or not uid.isdigit() or uid == "0":
        p.append(f"runtime USER is {uid!r}, want a numeric non-root UID")
    if not re.search(r"^EXPOSE 8080 8081\s*$", final, re.M):
        p.append("no EXPOSE 8080 8081 (REST and gRPC)")
    if not re.search(r'HEALTHCHECK .*CMD \["/usr/local/bin/mcd-serve", ?"healthcheck"', re.sub(r"\\\n\s*", " ", final)):
        p.append("HEALTHCHECK does not run `mcd-serve healthcheck`")
    if not re.search(r'ENTRYPOINT \["/usr/local/bin/mcd-serve"\]', final):
        p.append("ENTRYPOINT is not the mcd-serve binary")
    m = re.search(r"MCD_MODELS=(\S+)", final)
    models_dir = m.group(1) if m else None
    if not re.search(r"^COPY .*models\s+" + re.escape(models_dir or "/nonexistent") + r"\s*$", final, re.M):
        p.append(f"models/ is not copied to MCD_MODELS ({models_dir})")
    docs = load_all(rendered)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = dep["spec"]["template"]["spec"]
    if uid and str(pod.get("securityContext", {}).get("runAsUser")) != uid:
        p.append(f"Dockerfile USER {uid} != Deployment runAsUser {pod.get('securityContext', {}).get('runAsUser')}")
    if cm.get("data", {}).get("MCD_MODELS") != models_dir:
        p.append(f"ConfigMap MCD_MODELS {cm.get('data', {}).get('MCD_MODELS')} != image {models_dir}")
    if p:
        fail("dockerfile", p)
    print(f"dockerfile: multi-stage ({len(froms)} stages), USER {uid} == runAsUser, EXPOSE 8080 8081, HEALTHCHECK, "
          f"models at {models_dir} == ConfigMap")


def cargo_targets(root):
    """Every target of the package lives where the Dockerfile copies sources
    from (src/, benches/), and every bench has a stub in its dependency layer."""
    meta = json.load(sys.stdin)
    pkg = [x for x in meta["packages"] if x["name"] == "mcd-serve"][0]
    p = []
    for t in pkg["targets"]:
        rel = os.path.relpath(t["src_path"], os.path.abspath(root))
        kinds = t["kind"]
        if "custom-build" in kinds:
            # The build script compiles proto/: both must reach the dependency layer.
            docker = open(os.path.join(root, "Dockerfile"), encoding="utf-8").read()
            layer = docker[:docker.find("COPY src")]
            if not re.search(r"^COPY Cargo\.toml Cargo\.lock " + re.escape(rel) + r" \./$", layer, re.M) \
                    or not re.search(r"^COPY proto \./proto$", layer, re.M):
                p.append(f"build script {rel}: the Dockerfile must COPY it and proto/ before the dependency build")
        elif any(k in kinds for k in ("bin", "lib", "bench")) and not rel.startswith(("src/", "benches/")):
            p.append(f"{kinds} target {rel} is outside src/ and benches/ (not copied by the Dockerfile)")
        elif "bench" in kinds and rel != "benches/engine.rs":
            p.append(f"bench {rel} has no stub in the Dockerfile dependency layer")
    # Explicit [[example]]/[[test]] tables must exist even for `cargo build
    # --bin`, and the Dockerfile copies neither examples/ nor tests/.
    import tomllib
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        manifest = tomllib.load(f)
    for kind in ("example", "test"):
        for t in manifest.get(kind, []):
            p.append(f"explicit [[{kind}]] {t.get('name')!r}: the Dockerfile copies no {kind}s; copy or stub it")
    if manifest.get("package", {}).get("build") not in (None, "build.rs"):
        p.append("package.build names another script: the Dockerfile must COPY it")
    if p:
        fail("cargo-targets", p)
    print(f"cargo-targets: stub layer resolves with --locked; {len(pkg['targets'])} targets, "
          f"bins/lib/benches all under src/ or benches/")


# --------------------------------------------------------------------------
REQUIRED_PANELS = {
    # panel purpose -> metric that must be queried by some panel
    "traffic": "mcd_requests_total",
    "latency by mode": "mcd_request_duration_seconds_bucket",
    "MC sample counts": "mcd_mc_samples",
    "entropy heatmap": "mcd_predictive_entropy_bucket",
    "mode checks": "mcd_mode_checks_total",
    "mode violations": "mcd_mode_violations_total",
    "inflight": "mcd_inflight_requests",
    "rejections": "mcd_rejected_requests_total",
    "dataset shift": "mcd_drift_p_value",
}


def _panels(d):
    for p in d.get("panels", []):
        yield p
        yield from _panels(p)


def grafana(path, prov_dir):
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    p = []
    for k in ("title", "uid", "panels", "schemaVersion", "templating"):
        if k not in d:
            p.append(f"dashboard has no {k!r}")
    panels = [x for x in _panels(d) if x.get("type") != "row"]
    ids = [x.get("id") for x in _panels(d)]
    if len(ids) != len(set(ids)):
        p.append("duplicate panel ids")
    exprs = {}
    for x in panels:
        for t in x.get("targets", []):
            exprs.setdefault(t.get("expr", ""), x)
        if not x.get("targets"):
            p.append(f"panel {x.get('title')!r} has no queries")
        if x.get("datasource", {}).get("uid") != "${datasource}":
            p.append(f"panel {x.get('title')!r} does not use the $datasource variable")
        gp = x.get("gridPos", {})
        if not all(k in gp for k in ("h", "w", "x", "y")) or gp.get("x", 0) + gp.get("w", 0) > 24:
            p.append(f"panel {x.get('title')!r} has a bad gridPos {gp}")
    for purpose, metric in REQUIRED_PANELS.items():
        if not any(metric in e for e in exprs):
            p.append(f"no panel for {purpose} (no query uses {metric})")
    # latency panel must show p50 and p99 by mode
    lat = [e for e in exprs if "mcd_request_duration_seconds_bucket" in e]
    for q in ("0.5", "0.99"):
        if not any(f"histogram_quantile({q}" in e and "mode" in e for e in lat):
            p.append(f"no request latency quantile {q} by mode")
    heat = [x for x in panels if x.get("type") == "heatmap"]
    if not any(any("mcd_predictive_entropy_bucket" in t.get("expr", "") and t.get("format") == "heatmap"
                   for t in x["targets"]) for x in heat):
        p.append("no heatmap panel over mcd_predictive_entropy_bucket with format=heatmap")
    for e in exprs:
        if e.count("(") != e.count(")") or e.count("{") != e.count("}"):
            p.append(f"unbalanced brackets in {e!r}")
    vars_ = {v["name"] for v in d.get("templating", {}).get("list", [])}
    if "datasource" not in vars_:
        p.append("no datasource template variable")

    # provisioning
    ds = yaml.safe_load(open(os.path.join(prov_dir, "datasources", "prometheus.yml"), encoding="utf-8"))
    if not any(x.get("type") == "prometheus" for x in ds.get("datasources", [])):
        p.append("datasource provisioning has no prometheus datasource")
    db = yaml.safe_load(open(os.path.join(prov_dir, "dashboards", "mcd-serve.yml"), encoding="utf-8"))
    if not db.get("providers") or not db["providers"][0].get("options", {}).get("path"):
        p.append("dashboard provisioning has no provider path")
    if p:
        fail("grafana", p)
    print(f"grafana: valid JSON, {len(panels)} panels ({len(heat)} heatmap), all required panels present, provisioning OK")


# --------------------------------------------------------------------------
def compose(path):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        c = yaml.safe_load(f)
    p = []
    svcs = c.get("services", {})
    for s in ("mcd-serve", "prometheus", "grafana"):
        if s not in svcs:
            p.append(f"service {s} missing")
    if p:
        fail("compose", p)
    b = svcs["mcd-serve"].get("build", {})
    ctx = os.path.join(base, b.get("context", "."))
    if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))):
        p.append("mcd-serve build context/dockerfile not found")
    for name, s in svcs.items():
        img = s.get("image", "")
        if name != "mcd-serve" and (":" not in img or img.endswith(":latest")):
            p.append(f"{name}: image {img!r} is not pinned to a tag")
        for v in s.get("volumes", []):
            src = v.split(":", 1)[0]
            if src.startswith(("./", "../", "/")):
                if not os.path.exists(os.path.join(base, src)):
                    p.append(f"{name}: volume source {src} does not exist")
            elif src not in (c.get("volumes") or {}):
                p.append(f"{name}: named volume {src} not declared")
        for dep in s.get("depends_on", []):
            if dep not in svcs:
                p.append(f"{name}: depends_on unknown service {dep}")
    # prometheus scrapes the compose service name on the server's port
    prom_cfg = os.path.join(base, "prometheus", "prometheus.yml")
    cfg = yaml.safe_load(open(prom_cfg, encoding="utf-8"))
    targets = [t for sc in cfg["scrape_configs"] if sc["job_name"] == "mcd-serve"
               for st in sc.get("static_configs", []) for t in st["targets"]]
    if targets != ["mcd-serve:8080"]:
        p.append(f"prometheus.yml mcd-serve targets are {targets}, want ['mcd-serve:8080']")
    ds = yaml.safe_load(open(os.path.join(base, "grafana/provisioning/datasources/prometheus.yml"), encoding="utf-8"))
    if ds["datasources"][0]["url"] != "http://prometheus:9090":
        p.append("grafana datasource does not point at http://prometheus:9090")
    if p:
        fail("compose", p)
    print(f"compose: services {sorted(svcs)}, build context, bind mounts, pinned images, scrape target consistent")


# --------------------------------------------------------------------------
METRIC_RE = re.compile(r"\b(mcd_[a-z_]+|up)\b(?!\s*\()")


def metric_names(rules_path, dash_path):
    rules = yaml.safe_load(open(rules_path, encoding="utf-8"))
    known = set(COUNTERS_GAUGES) | PROM_BUILTIN
    for h in HISTOGRAMS:
        known |= {h + "_bucket", h + "_sum", h + "_count"}
    exprs = []
    records = set()
    for g in rules["groups"]:
        for r in g["rules"]:
            exprs.append(r["expr"])
            if "record" in r:
                records.add(r["record"])
    with open(dash_path, encoding="utf-8") as f:
        d = json.load(f)
    for x in _panels(d):
        exprs += [t.get("expr", "") for t in x.get("targets", [])]
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            exprs.append(q.get("query", ""))
    p = []
    used = set()
    for e in exprs:
        # strip label matchers and strings, where words like "mcd-serve" live
        e2 = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', '""', e))
        for m in METRIC_RE.findall(e2):
            used.add(m)
            if m not in known:
                p.append(f"unknown metric {m!r} in {e.strip()[:80]!r}")
        for m in re.findall(r"\bmcd:[a-z0-9_:]+", e2):
            used.add(m)
            if m not in records:
                p.append(f"recording rule {m!r} used but not defined")
    if p:
        fail("metric-names", sorted(set(p)))
    print(f"metric-names: {len(used)} metric names used by rules and dashboard, all in the server contract or recorded")


def strict(schema):
    """A CRD schema as the API server's strict field validation reads it: an object that
    lists its properties accepts no others, unless it says it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


def kserve(kdir):
    """deploy/kserve against KServe's own CRD schemas (vendored, see crd-schemas/), with
    strict fields, and the settings the runtime needs to be picked and reached."""
    import gzip
    import jsonschema
    p, seen = [], {}
    for fn in sorted(os.listdir(kdir)):
        if not fn.endswith(".yaml"):
            continue
        for d in load_all(os.path.join(kdir, fn)):
            kind, version = d["kind"], d["apiVersion"].split("/")[-1]
            path = os.path.join(kdir, "crd-schemas", f"{kind}.{version}.schema.json.gz")
            if not os.path.exists(path):
                p.append(f"{fn}: no KServe schema for {kind} {version}")
                continue
            schema = strict(json.loads(gzip.open(path).read()))
            for e in jsonschema.Draft7Validator(schema).iter_errors(d):
                p.append(f"{fn}: {kind}: {'/'.join(map(str, e.path))}: {e.message}")
            seen.setdefault(kind, []).append(d)
    for kind in ("ServingRuntime", "ClusterServingRuntime"):
        for rt in seen.get(kind, []):
            spec = rt["spec"]
            onnx = [f for f in spec.get("supportedModelFormats", []) if f.get("name") == "onnx"]
            if not onnx or onnx[0].get("autoSelect") is not False:
                p.append(f"{kind}: onnx must be supported with autoSelect: false")
            if spec.get("protocolVersions") != ["v2", "grpc-v2"]:
                p.append(f"{kind}: protocolVersions must be [v2, grpc-v2]")
            c = {x["name"]: x for x in spec.get("containers", [])}.get("kserve-container")
            if c is None:
                p.append(f"{kind}: no container named kserve-container")
                continue
            ports = {x.get("name"): x.get("containerPort") for x in c.get("ports", [])}
            if ports != {"http": 8080, "h2c": 8081}:
                p.append(f"{kind}: ports must be http 8080 and h2c 8081, got {ports}")
            if "--models=/mnt/models" not in c.get("args", []):
                p.append(f"{kind}: the server must read its models from /mnt/models")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            memory_budget(kind, env, c.get("resources", {}), p)
    runtimes = {r["metadata"]["name"]: r for k in ("ServingRuntime", "ClusterServingRuntime") for r in seen.get(k, [])}
    for isvc in seen.get("InferenceService", []):
        name = isvc["metadata"]["name"]
        m = isvc["spec"]["predictor"].get("model", {})
        if m.get("runtime") not in runtimes or m.get("protocolVersion") != "v2" or m.get("modelFormat", {}).get("name") != "onnx":
            p.append(f"InferenceService {name}: needs runtime in {sorted(runtimes)}, protocolVersion v2, modelFormat onnx")
            continue
        # The runtime cannot see the model behind storageUri: the InferenceService states
        # its files' size, and the memory rule holds for the resources it runs with (its
        # own, else the runtime's).
        declared = isvc["metadata"].get("annotations", {}).get(MODEL_BYTES_ANNOTATION)
        if declared is None or not str(declared).isdigit():
            p.append(f"InferenceService {name}: annotation {MODEL_BYTES_ANNOTATION} (the model files' bytes) must be set")
            continue
        rt = {x["name"]: x for x in runtimes[m["runtime"]]["spec"].get("containers", [])}.get("kserve-container", {})
        env = {e["name"]: e.get("value") for e in rt.get("env", [])}
        env.update({e["name"]: e.get("value") for e in m.get("env", [])})
        memory_budget(f"InferenceService {name}", env, m.get("resources") or rt.get("resources", {}), p, int(declared))
    for kind in ("ServingRuntime", "ClusterServingRuntime", "InferenceService"):
        if kind not in seen:
            p.append(f"no {kind} in {kdir}")
    if p:
        fail("kserve", p)
    print(f"kserve: {sum(map(len, seen.values()))} manifests valid against KServe's CRD schemas (strict fields)")


def main(argv):
    cmds = {
        "k8s-split": k8s_split, "k8s-policy": k8s_policy, "servicemonitor": servicemonitor,
        "kustomize-files": kustomize_files, "dockerfile": dockerfile, "cargo-targets": cargo_targets, "grafana": grafana, "compose": compose,
        "metric-names": metric_names, "kserve": kserve,
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    cmds[argv[1]](*argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
