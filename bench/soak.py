#!/usr/bin/env python3
"""Soak test for mcd-serve (issue 25, item 12): mixed load on all three protocols for a long
run, with reloads and client disconnects, sampling the server's memory and descriptors.

Not run by CI. It starts the binary itself, on free 127.0.0.1 ports, over a temporary copy of
the repository's models/ folder (reloads rewrite files there, never in the repository).

    python3 -m venv /tmp/soak-venv && /tmp/soak-venv/bin/pip install "tritonclient[grpc]" numpy
    nice -n 5 /tmp/soak-venv/bin/python bench/soak.py target/release/mcd-serve \\
        --minutes 30 --workers 6 --out /tmp/soak-run

What runs, for --minutes:
- --workers threads, each looping over a weighted mix of: native eval, native MC
  (`mc_samples` 10-50, a seed), native `mc_samples=auto`, OIP REST eval and MC
  (`parameters.mc_samples`), gRPC ModelInfer eval and MC (tritonclient.grpc), on the three
  bundled models, 1-32 rows per request taken from tools/calibration-data/*.jsonl; and
  client disconnects: a REST request written whole on a raw socket then closed before (or
  while) its answer comes, a REST request closed halfway through its body, and gRPC calls
  cancelled by a client deadline of a few milliseconds.
- every 60 s a SIGHUP (reload); every third reload first changes the folder, in turn:
  rewrites diabetes.model.json (a new description), copies breast_cancer.onnx and its
  model.json in as a fourth model `soak_copy`, replaces diabetes.onnx by a fresh copy
  (new inode, same bytes), rewrites digits_cnn.model.json, removes `soak_copy`. All
  models stay valid: a reload that is not `ok` is a failure.
- every 5 s: VmRSS, VmHWM, Threads (from /proc/PID/status), the count of /proc/PID/fd, and
  the server's `mcd_requests_total` by protocol and status, and its reload counters.

At the end the server gets SIGTERM and must exit 0. Written to --out (a folder):
soak.json (every sample, counts, failures), soak.txt (the summary), server.log.

Exits 1 on any failure: a 5xx, a gRPC INTERNAL/UNKNOWN/UNAVAILABLE, a connection error on a
request that was not meant to be cut, any other non-2xx but 429, a reload not `ok`, a
non-zero exit code; or when the end RSS exceeds the RSS after the 1-minute warm-up by more
than --rss-margin (default 25 %); or when the idle descriptor count after the load (clients
closed) exceeds the idle count before it (after a short warm-up burst).
"""

import argparse
import collections
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import http.client
import urllib.request

import numpy as np
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"breast_cancer": "features", "diabetes": "features", "digits_cnn": "image"}

# Operation mix (weights).
OPS = {
    "native_eval": 12, "native_mc": 12, "native_auto": 6,
    "oip_eval": 10, "oip_mc": 10,
    "grpc_eval": 10, "grpc_mc": 10,
    "disconnect_after_send": 5, "disconnect_mid_body": 3, "grpc_cancel": 3,
}
PROTOCOL = {"native_eval": "native", "native_mc": "native", "native_auto": "native",
            "oip_eval": "oip", "oip_mc": "oip", "grpc_eval": "grpc", "grpc_mc": "grpc",
            "disconnect_after_send": "disconnect", "disconnect_mid_body": "disconnect",
            "grpc_cancel": "grpc_cancel"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def load_rows():
    rows = {}
    for name in MODELS:
        with open(os.path.join(ROOT, "tools/calibration-data", f"{name}.jsonl")) as f:
            rows[name] = [json.loads(line)["inputs"][0] for line in f if line.strip()]
    return rows


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])  # kB
            elif k == "Threads":
                out[k] = int(v)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(addr):
    """mcd_requests_total by (protocol, status), reload results, panics."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    req = collections.Counter()
    reloads = collections.Counter()
    panics = 0
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value = line.partition(" ")
            labels = {}
        else:
            lab, _, value = rest.rpartition("} ")
            labels = dict(LABEL.findall(lab))
        try:
            v = float(value.split()[0])
        except (ValueError, IndexError):
            continue
        if name == "mcd_requests_total":
            req[f'{labels.get("protocol")}/{labels.get("status")}'] += int(v)
        elif name == "mcd_model_reloads_total":
            reloads[labels.get("result")] += int(v)
        elif name == "mcd_internal_panics_total":
            panics += int(v)
    return {"requests": dict(req), "reloads": dict(reloads), "panics": panics}


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()           # "proto/status"
        self.by_op = collections.Counter()            # "op/status"
        self.op = threading.local()
        self.buckets = collections.defaultdict(collections.Counter)  # 5-min bucket -> counter
        self.latency = collections.defaultdict(list)  # proto -> seconds (successful ones)
        self.failures = []
        self.t0 = time.monotonic()

    def record(self, proto, status, latency=None, failure=None):
        key = f"{proto}/{status}"
        with self.lock:
            self.counts[key] += 1
            self.by_op[f"{getattr(self.op, 'name', proto)}/{status}"] += 1
            self.buckets[int((time.monotonic() - self.t0) // 300)][key] += 1
            if latency is not None:
                self.latency[proto].append(latency)
            if failure is not None and len(self.failures) < 1000:
                self.failures.append({"t": round(time.monotonic() - self.t0, 1), "proto": proto,
                                      "status": str(status), "detail": failure[:2000]})


class Worker(threading.Thread):
    def __init__(self, idx, addr, grpc_addr, rows, stats, stop, seed):
        super().__init__(daemon=True)
        self.host, self.port = addr.split(":")
        self.port = int(self.port)
        self.grpc_addr = grpc_addr
        self.rows = rows
        self.stats = stats
        self.stop = stop
        self.rng = random.Random(seed)
        self.conn = None
        self.grpc = None
        self.names = list(OPS)
        self.weights = [OPS[n] for n in self.names]

    def batch(self):
        model = self.rng.choice(list(MODELS))
        rows = self.rows[model]
        n = self.rng.randint(1, 32)
        start = self.rng.randrange(0, len(rows) - n)
        return model, rows[start:start + n]

    # --- REST ------------------------------------------------------------------------
    def http(self, proto, path, body):
        data = json.dumps(body).encode()
        t = time.monotonic()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                self.conn.request("POST", path, data, {"content-type": "application/json"})
                r = self.conn.getresponse()
                payload = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                # A keep-alive connection the server closed between requests is retried once
                # on a new connection (as every HTTP client does); a second failure counts.
                self.conn.close()
                self.conn = None
                if attempt == 1:
                    self.stats.record(proto, "conn_error", failure=f"{path}: {e!r}")
                    return
            except Exception as e:  # timeouts and anything else
                self.conn.close()
                self.conn = None
                self.stats.record(proto, "conn_error", failure=f"{path}: {e!r}")
                return
        dt = time.monotonic() - t
        status = r.status
        if 200 <= status < 300:
            self.stats.record(proto, status, latency=dt)
        elif status == 429:
            self.stats.record(proto, status)
        else:
            self.stats.record(proto, status, failure=f"{path}: {payload[:1500].decode(errors='replace')}")

    def oip_body(self, model, rows, params=None):
        arr = np.asarray(rows, dtype=np.float32)
        body = {"inputs": [{"name": MODELS[model], "shape": list(arr.shape), "datatype": "FP32",
                            "data": arr.ravel().tolist()}]}
        if params:
            body["parameters"] = params
        return body

    # --- gRPC ------------------------------------------------------------------------
    def grpc_infer(self, proto, model, rows, params=None, timeout=None):
        if self.grpc is None:
            self.grpc = tgrpc.InferenceServerClient(url=self.grpc_addr)
        arr = np.asarray(rows, dtype=np.float32)
        inp = tgrpc.InferInput(MODELS[model], list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        t = time.monotonic()
        try:
            self.grpc.infer(model, [inp], parameters=params, client_timeout=timeout)
        except InferenceServerException as e:
            code = (e.status() or "UNKNOWN").replace("StatusCode.", "")
            if timeout is not None and code in ("DEADLINE_EXCEEDED", "CANCELLED"):
                self.stats.record(proto, code)  # the intended cut
            elif code == "RESOURCE_EXHAUSTED":
                self.stats.record(proto, code)  # 429's twin: shedding, not a failure
            else:
                self.stats.record(proto, code, failure=f"{model}: {e.message()}")
            return
        self.stats.record(proto, "OK", latency=time.monotonic() - t)

    # --- disconnects -----------------------------------------------------------------
    def raw(self, mid_body):
        model, rows = self.batch()
        if self.rng.random() < 0.5:
            path = f"/models/{model}/predict?mc_samples={self.rng.randint(10, 50)}&seed={self.rng.randint(0, 1 << 30)}"
            body = json.dumps({"inputs": rows}).encode()
        else:
            path = f"/v2/models/{model}/infer"
            body = json.dumps(self.oip_body(model, rows, {"mc_samples": self.rng.randint(10, 50)})).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        kind = "mid_body" if mid_body else "after_send"
        try:
            s = socket.create_connection((self.host, self.port), timeout=10)
            if mid_body:
                s.sendall(head + body[: max(1, len(body) // 2)])
                time.sleep(self.rng.uniform(0, 0.02))
            else:
                s.sendall(head + body)
                time.sleep(self.rng.choice([0, 0, 0.001, 0.005, 0.02]))
            s.close()
            self.stats.record("disconnect", kind)
        except OSError as e:
            self.stats.record("disconnect", f"{kind}_conn_error", failure=repr(e))

    def run(self):
        while not self.stop.is_set():
            op = self.rng.choices(self.names, self.weights)[0]
            self.stats.op.name = op
            model, rows = self.batch()
            seed = self.rng.randint(0, 1 << 30)
            k = self.rng.randint(10, 50)
            if op == "native_eval":
                self.http("native", f"/models/{model}/predict", {"inputs": rows})
            elif op == "native_mc":
                self.http("native", f"/models/{model}/predict?mc_samples={k}&seed={seed}", {"inputs": rows})
            elif op == "native_auto":
                extra = self.rng.choice(["", "&mc_max=200", "&mc_se=0.02"])
                self.http("native", f"/models/{model}/predict?mc_samples=auto&seed={seed}{extra}", {"inputs": rows})
            elif op == "oip_eval":
                self.http("oip", f"/v2/models/{model}/infer", self.oip_body(model, rows))
            elif op == "oip_mc":
                self.http("oip", f"/v2/models/{model}/infer", self.oip_body(model, rows, {"mc_samples": k, "seed": seed}))
            elif op == "grpc_eval":
                self.grpc_infer("grpc", model, rows)
            elif op == "grpc_mc":
                self.grpc_infer("grpc", model, rows, {"mc_samples": k, "seed": seed})
            elif op == "grpc_cancel":
                self.grpc_infer("grpc_cancel", model, rows, {"mc_samples": 50, "seed": seed},
                                timeout=self.rng.choice([0.001, 0.002, 0.005]))
            elif op == "disconnect_after_send":
                self.raw(mid_body=False)
            elif op == "disconnect_mid_body":
                self.raw(mid_body=True)
        self.close()

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.grpc is not None:
            self.grpc.close()
            self.grpc = None


def wait_ready(addr, proc, seconds=60):
    for _ in range(seconds * 10):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(f"http://{addr}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit("server never became ready")


def mutate_folder(folder, step, log):
    """One change to the models folder, in turn; every model stays valid."""
    action = step % 5
    if action == 0:
        p = os.path.join(folder, "diabetes.model.json")
        meta = json.load(open(p))
        meta["description"] = meta["description"].split(" [soak")[0] + f" [soak rewrite {step}]"
        tmp = p + ".tmp"
        json.dump(meta, open(tmp, "w"), indent=2)
        os.replace(tmp, p)
        what = "rewrote diabetes.model.json"
    elif action == 1:
        shutil.copy(os.path.join(folder, "breast_cancer.model.json"), os.path.join(folder, "soak_copy.model.json"))
        shutil.copy(os.path.join(folder, "breast_cancer.onnx"), os.path.join(folder, ".soak_copy.tmp"))
        os.replace(os.path.join(folder, ".soak_copy.tmp"), os.path.join(folder, "soak_copy.onnx"))
        what = "copied breast_cancer in as soak_copy"
    elif action == 2:
        p = os.path.join(folder, "diabetes.onnx")
        shutil.copy(p, p + ".tmp")
        os.replace(p + ".tmp", p)
        what = "replaced diabetes.onnx by a fresh copy"
    elif action == 3:
        p = os.path.join(folder, "digits_cnn.model.json")
        meta = json.load(open(p))
        meta["description"] = meta["description"].split(" [soak")[0] + f" [soak rewrite {step}]"
        json.dump(meta, open(p + ".tmp", "w"), indent=2)
        os.replace(p + ".tmp", p)
        what = "rewrote digits_cnn.model.json"
    else:
        for f in ("soak_copy.onnx", "soak_copy.model.json"):
            os.remove(os.path.join(folder, f))
        what = "removed soak_copy"
    log.append(what)
    return what


def models_listed(addr):
    try:
        with urllib.request.urlopen(f"http://{addr}/models", timeout=10) as r:
            body = json.load(r)
    except Exception as e:
        return f"error {e!r}"
    items = body.get("models", body) if isinstance(body, dict) else body
    names = []
    for m in items if isinstance(items, list) else []:
        names.append(m.get("name") if isinstance(m, dict) else str(m))
    return sorted(n for n in names if n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--workers", type=int, default=6, help="client threads")
    ap.add_argument("--server-workers", type=int, default=None, help="the server's --workers (default: its own)")
    ap.add_argument("--warmup-secs", type=float, default=60, help="RSS 'start' is taken after this much load")
    ap.add_argument("--rss-margin", type=float, default=0.25)
    ap.add_argument("--reload-secs", type=float, default=60)
    ap.add_argument("--sample-secs", type=float, default=5)
    ap.add_argument("--seed", type=int, default=25)
    ap.add_argument("--out", required=True, help="folder for soak.json, soak.txt, server.log")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    rows = load_rows()
    tmp = tempfile.mkdtemp(prefix="mcd-soak-")
    folder = os.path.join(tmp, "models")
    shutil.copytree(os.path.join(ROOT, "models"), folder)
    port, gport = free_port(), free_port()
    addr, grpc_addr = f"127.0.0.1:{port}", f"127.0.0.1:{gport}"
    cmd = [os.path.abspath(args.binary), "--models", folder, "--addr", addr, "--grpc-addr", grpc_addr]
    if args.server_workers:
        cmd += ["--workers", str(args.server_workers)]
    logf = open(os.path.join(args.out, "server.log"), "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCD_")}
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"[soak] {started:%Y-%m-%dT%H:%M:%SZ} server pid {proc.pid} on {addr} / gRPC {grpc_addr}, models {folder}", flush=True)
    wait_ready(addr, proc)
    idle_ready = proc_status(proc.pid)

    # A short burst of every operation so lazily opened things exist, then the idle baseline.
    stats_warm = Stats()
    stop = threading.Event()
    warm = [Worker(i, addr, grpc_addr, rows, stats_warm, stop, args.seed * 1000 + 900 + i) for i in range(args.workers)]
    for w in warm:
        w.start()
    time.sleep(5)
    stop.set()
    for w in warm:
        w.join()
    time.sleep(3)
    idle_before = proc_status(proc.pid)
    print(f"[soak] idle before load: {idle_before} (just ready: {idle_ready}); warm-up burst {sum(stats_warm.counts.values())} requests", flush=True)

    stats = Stats()
    stop = threading.Event()
    workers = [Worker(i, addr, grpc_addr, rows, stats, stop, args.seed * 1000 + i) for i in range(args.workers)]
    t0 = time.monotonic()
    stats.t0 = t0
    for w in workers:
        w.start()

    samples, reload_log, folder_log, problems = [], [], [], []
    duration = args.minutes * 60
    next_sample, next_reload, reloads = t0, t0 + args.reload_secs, 0
    while True:
        now = time.monotonic()
        if now - t0 >= duration:
            break
        if proc.poll() is not None:
            problems.append(f"server exited with {proc.returncode} during the run")
            break
        if now >= next_reload:
            next_reload += args.reload_secs
            what = None
            if reloads % 3 == 2:
                what = mutate_folder(folder, len(folder_log), folder_log)
            before = scrape(addr)["reloads"]
            os.kill(proc.pid, signal.SIGHUP)
            reloads += 1
            ok = False
            for _ in range(100):
                time.sleep(0.1)
                after = scrape(addr)["reloads"]
                if sum(after.values()) > sum(before.values()):
                    ok = after.get("ok", 0) > before.get("ok", 0)
                    break
            listed = models_listed(addr)
            entry = {"t": round(time.monotonic() - t0, 1), "n": reloads, "change": what, "ok": ok,
                     "reloads_total": after, "models": listed}
            reload_log.append(entry)
            if not ok:
                problems.append(f"reload {reloads} not ok: {entry}")
            print(f"[soak] reload {reloads} at {entry['t']}s ({what or 'no change'}): ok={ok} models={listed}", flush=True)
        if now >= next_sample:
            next_sample += args.sample_secs
            try:
                s = proc_status(proc.pid)
                s["t"] = round(now - t0, 1)
                m = scrape(addr)
                s["server_requests"] = m["requests"]
                s["panics"] = m["panics"]
                with stats.lock:
                    s["client_requests"] = sum(stats.counts.values())
                    s["client_failures"] = len(stats.failures)
                samples.append(s)
                if len(samples) % 12 == 1:
                    print(f"[soak] t={s['t']:.0f}s rss={s['VmRSS']/1024:.1f}MiB hwm={s['VmHWM']/1024:.1f}MiB "
                          f"fds={s['fds']} threads={s['Threads']} requests={s['client_requests']} "
                          f"failures={s['client_failures']}", flush=True)
            except Exception as e:
                problems.append(f"sample failed at {now - t0:.0f}s: {e!r}")
        time.sleep(0.05)

    stop.set()
    for w in workers:
        w.join(timeout=120)
    elapsed = time.monotonic() - t0
    time.sleep(5)
    idle_after = proc_status(proc.pid)
    final_metrics = scrape(addr)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed after 60 s"
    logf.close()
    finished = datetime.datetime.now(datetime.timezone.utc)

    # --- verdicts ----------------------------------------------------------------------
    loaded = [s for s in samples if s["t"] >= args.warmup_secs] or samples
    rss_start = loaded[0]["VmRSS"]
    rss_end = samples[-1]["VmRSS"]
    rss_peak = max(s["VmRSS"] for s in samples)
    fd_start, fd_end = loaded[0]["fds"], samples[-1]["fds"]
    fd_peak = max(s["fds"] for s in samples)
    failures = stats.failures
    server_5xx = {k: v for k, v in final_metrics["requests"].items() if k.split("/")[1].startswith("5")}
    verdict = []
    if failures:
        verdict.append(f"{len(failures)} failed requests (see failures)")
    if server_5xx:
        verdict.append(f"server counted 5xx: {server_5xx}")
    if final_metrics["panics"]:
        verdict.append(f"mcd_internal_panics_total = {final_metrics['panics']}")
    if rss_end > rss_start * (1 + args.rss_margin):
        verdict.append(f"RSS grew {rss_start} -> {rss_end} kB (> {args.rss_margin:.0%})")
    if idle_after["fds"] > idle_before["fds"]:
        verdict.append(f"idle fds grew {idle_before['fds']} -> {idle_after['fds']}")
    if rc != 0:
        verdict.append(f"server exit code {rc}")
    verdict += problems

    intervals = []
    for b in range(int((elapsed + 299) // 300)):
        ss = [s for s in samples if b * 300 <= s["t"] < (b + 1) * 300]
        if not ss:
            continue
        c = stats.buckets.get(b, collections.Counter())
        intervals.append({
            "from_min": b * 5, "to_min": min((b + 1) * 5, round(elapsed / 60, 1)),
            "rss_end_mib": round(ss[-1]["VmRSS"] / 1024, 1), "rss_max_mib": round(max(s["VmRSS"] for s in ss) / 1024, 1),
            "fds_min": min(s["fds"] for s in ss), "fds_max": max(s["fds"] for s in ss), "fds_end": ss[-1]["fds"],
            "threads_max": max(s["Threads"] for s in ss),
            "requests": sum(c.values()),
            "failures": sum(1 for f in failures if b * 300 <= f["t"] < (b + 1) * 300),
        })

    def pct(xs, q):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else None

    by_proto = collections.defaultdict(dict)
    for k, v in sorted(stats.counts.items()):
        p, st = k.split("/", 1)
        by_proto[p][st] = v
    result = {
        "started": f"{started:%Y-%m-%dT%H:%M:%SZ}", "finished": f"{finished:%Y-%m-%dT%H:%M:%SZ}",
        "minutes": round(elapsed / 60, 2), "client_workers": args.workers, "command": cmd,
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "cores": os.cpu_count(),
        "rss_kib": {"start_after_warmup": rss_start, "peak": rss_peak, "end": rss_end,
                    "hwm_end": samples[-1]["VmHWM"], "just_ready": idle_ready["VmRSS"],
                    "idle_before": idle_before["VmRSS"], "idle_after": idle_after["VmRSS"]},
        "fds": {"start_after_warmup": fd_start, "peak": fd_peak, "end": fd_end,
                "just_ready": idle_ready["fds"], "idle_before": idle_before["fds"], "idle_after": idle_after["fds"]},
        "threads": {"idle_before": idle_before["Threads"], "idle_after": idle_after["Threads"],
                    "peak": max(s["Threads"] for s in samples)},
        "client_requests": dict(by_proto), "client_requests_by_operation": dict(sorted(stats.by_op.items())),
        "client_total": sum(stats.counts.values()),
        "latency_ms": {p: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for p, v in stats.latency.items()},
        "server_requests_total": final_metrics["requests"], "server_reloads_total": final_metrics["reloads"],
        "server_panics": final_metrics["panics"],
        "reloads": reloads, "reload_log": reload_log, "folder_changes": folder_log,
        "exit_code": rc, "intervals_5min": intervals, "failures": failures,
        "rss_margin": args.rss_margin, "verdict": verdict or ["pass"], "samples": samples,
    }
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)

    L = []
    L.append(f"mcd-serve soak: {result['started']} .. {result['finished']} ({result['minutes']} min, "
             f"{args.workers} client threads), {result['cpu']} x{result['cores']}")
    r, d = result["rss_kib"], result["fds"]
    L.append(f"RSS MiB: start (after {args.warmup_secs:.0f} s) {r['start_after_warmup']/1024:.1f}, peak {r['peak']/1024:.1f}, "
             f"end {r['end']/1024:.1f} (VmHWM {r['hwm_end']/1024:.1f}); idle before {r['idle_before']/1024:.1f}, "
             f"idle after {r['idle_after']/1024:.1f}")
    L.append(f"fds: start {d['start_after_warmup']}, peak {d['peak']}, end {d['end']}; idle before {d['idle_before']}, "
             f"idle after {d['idle_after']}; threads peak {result['threads']['peak']}")
    L.append(f"reloads: {reloads} SIGHUPs, server counts {final_metrics['reloads']}, folder changes {len(folder_log)}")
    L.append(f"requests (client side), total {result['client_total']}:")
    for p, st in by_proto.items():
        L.append(f"  {p:11s} " + ", ".join(f"{k}: {v}" for k, v in st.items()))
    L.append("by operation: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.by_op.items())))
    L.append("server mcd_requests_total: " + ", ".join(f"{k}: {v}" for k, v in sorted(final_metrics["requests"].items())))
    L.append("latency ms (successful): " + "; ".join(f"{p} p50 {v['p50']} p99 {v['p99']}" for p, v in result["latency_ms"].items()))
    L.append("")
    L.append("| minutes | requests | failures | RSS end MiB | RSS max MiB | fds min-max (end) | threads max |")
    L.append("|---|---|---|---|---|---|---|")
    for iv in intervals:
        L.append(f"| {iv['from_min']}-{iv['to_min']} | {iv['requests']} | {iv['failures']} | {iv['rss_end_mib']} | "
                 f"{iv['rss_max_mib']} | {iv['fds_min']}-{iv['fds_max']} ({iv['fds_end']}) | {iv['threads_max']} |")
    L.append("")
    L.append(f"server exit code after SIGTERM: {rc}")
    L.append("verdict: " + ("; ".join(verdict) if verdict else "pass"))
    for f in failures[:20]:
        L.append(f"  failure t={f['t']}s {f['proto']} {f['status']}: {f['detail'][:300]}")
    text = "\n".join(L) + "\n"
    with open(os.path.join(args.out, "soak.txt"), "w") as f:
        f.write(text)
    print(text, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if verdict else 0)


if __name__ == "__main__":
    main()
