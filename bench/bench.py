"""Benchmark driver for bench/run: mcd-serve's engine against onnxruntime, MC cost growth,
and HTTP load against the real server and a bare-axum baseline.

Run through `bench/run` (it makes the venv and builds the binaries). Writes markdown to
bench/results.md and prints it.

Method
- Engine: one long-lived `examples/bench_engine` process answers timing commands on a pipe;
  onnxruntime runs in this process. Each round runs every variant of both engines, ORT and
  ours alternating (which goes first flips every round), so drift on a shared machine hits
  both alike. Reported: medians over all timed repetitions.
- onnxruntime: CPUExecutionProvider, intra_op_num_threads=1, inter_op_num_threads=1
  (our engine runs one inference per worker thread). Eval uses ORT's default optimisations
  (which delete Dropout: right for eval). MC uses a second session built with
  disabled_optimizers=["EliminateDropout"], so torch-style Dropout(training_mode=true)
  stays live; MC-50 is timed both as 50 single passes and as one pass over the input tiled
  50 times along the batch axis. ORT times are sess.run() wall times from Python, so they
  include the binding's per-call overhead; ours are in-process Rust times and include
  mask sampling, input tiling and the summary statistics (mean/var/std/entropies).
- HTTP: wrk (Debian) with a Lua script for the POST body, fixed duration per run, one wrk
  thread, against 127.0.0.1 only.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ["breast_cancer", "diabetes", "digits_cnn"]
LIGHT_DIR = ROOT.parent / "shared" / "real-models" / "onnx-light-models"
LIGHT = ["bvlc_alexnet", "inception_v1", "squeezenet", "vgg19"]
GROWTH_N = [2, 10, 50, 100, 500]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])


def cpu_snapshot():
    """(wall, machine busy CPU-seconds, CPU-seconds of this process and its waited-for
    children). The difference between the two CPU figures over an interval is what other
    processes on the machine used."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system


def others_share(a, b):
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (wall * (os.cpu_count() or 1)))


def load_str(la=None):
    la = la or loadavg()
    return " / ".join(f"{x:.2f}" for x in la)


# --------------------------------------------------------------------------- engines


class Ours:
    """The long-lived examples/bench_engine process."""

    def __init__(self, exe):
        self.p = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        answer = json.loads(self.p.stdout.readline())
        if not answer.get("ok"):
            raise RuntimeError(f"bench_engine: {line!r}: {answer.get('error')}")
        return answer

    def time(self, name, variant, reps):
        return [u / 1e6 for u in self.cmd(f"time {name} {variant} {reps}")["us"]]

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()


def ort_session(path, mc):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    kw = {"disabled_optimizers": ["EliminateDropout"]} if mc else {}
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)


class OrtModel:
    def __init__(self, path, x):
        self.eval = ort_session(path, mc=False)
        self.mc = ort_session(path, mc=True)
        inp = self.eval.get_inputs()[0]
        self.input_name = inp.name
        self.batchable = not isinstance(inp.shape[0], int)
        self.x = x
        self.tiled = {}

    def tile(self, n):
        if n not in self.tiled:
            self.tiled[n] = {self.input_name: np.repeat(self.x, n, axis=0)}
        return self.tiled[n]

    def run(self, variant):
        """One timed repetition of a variant; returns seconds."""
        feed = {self.input_name: self.x}
        if variant == "eval":
            t = time.perf_counter()
            self.eval.run(None, feed)
            return time.perf_counter() - t
        kind, n = variant.split(":")
        n = int(n)
        if kind == "loop":
            t = time.perf_counter()
            for _ in range(n):
                self.mc.run(None, feed)
            return time.perf_counter() - t
        if kind == "batch":
            tiled = self.tile(n)
            t = time.perf_counter()
            self.mc.run(None, tiled)
            return time.perf_counter() - t
        raise ValueError(variant)

    def time(self, variant, reps):
        return [self.run(variant) for _ in range(reps)]

    def mc_spread(self, n):
        """Max over output elements of the std across n MC samples, for the loop and the
        batch form, and the noise floor (same statistic from the eval session on the
        tiled batch: float rounding differences between rows, no dropout)."""
        feed = {self.input_name: self.x}
        loop = np.stack([self.mc.run(None, feed)[0] for _ in range(n)])
        res = {"loop_std": float(loop.std(axis=0).max()), "loop_mean": loop.mean(axis=0)}
        if self.batchable:
            tiled = self.tile(n)
            b = self.mc.run(None, tiled)[0]
            res["batch_std"] = float(b.std(axis=0).max())
            res["floor_std"] = float(self.eval.run(None, tiled)[0].std(axis=0).max())
        else:
            res["batch_std"] = None
            res["floor_std"] = 0.0
        return res


def calibrate(fn, target_s, cap):
    """Reps per round so one variant takes about target_s per round (after a warm-up)."""
    fn(1)
    one = min(fn(1))
    return max(1, min(cap, int(target_s / max(one, 1e-9))))


def interleaved(ort_variants, our_variants, ort_model, ours, name, budget_s, min_rounds, target_s=0.02, cap=400):
    """Runs rounds until budget_s has passed (and at least min_rounds). Returns
    {("ort"|"ours", variant): [seconds...]}."""
    fns = {}
    for v in ort_variants:
        fns[("ort", v)] = lambda r, v=v: ort_model.time(v, r)
    for v in our_variants:
        fns[("ours", v)] = lambda r, v=v: ours.time(name, v, r)
    reps = {k: calibrate(f, target_s, cap) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    start = time.monotonic()
    rnd = 0
    while rnd < min_rounds or time.monotonic() - start < budget_s:
        keys = [k for k in fns if k[0] == "ort"], [k for k in fns if k[0] == "ours"]
        a, b = keys if rnd % 2 == 0 else keys[::-1]
        # alternate engine by engine, variant by variant
        order = [k for pair in zip_longest_(a, b) for k in pair if k is not None]
        for k in order:
            samples[k].extend(fns[k](reps[k]))
        rnd += 1
        if rnd >= 1000:
            break
    return samples, rnd


def zip_longest_(a, b):
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def med(xs):
    return statistics.median(xs) if xs else None


def fmt_t(s):
    if s is None:
        return "n/a"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_r(a, b):
    if a is None or b is None:
        return "n/a"
    return f"{a / b:.2f}×"


# --------------------------------------------------------------------------- inputs


def bundled_input(name):
    refs = json.loads((ROOT / "tests/fixtures/reference_outputs.json").read_text())
    return np.array([refs[name]["inputs"][0]], dtype=np.float32)


def light_input():
    n = 3 * 224 * 224
    return (np.arange(n, dtype=np.float32) / np.float32(n)).reshape(1, 3, 224, 224)


def write_body(x, path):
    # float32 -> Python float is exact, and repr round-trips, so both engines see the same bits
    path.write_text(json.dumps({"inputs": x.astype(np.float64).tolist()}))


# --------------------------------------------------------------------------- sections


def section_engine(ours, tmp, budget, out):
    out.append("## Engine: mcd-serve (tract) vs onnxruntime, one thread each\n")
    out.append(
        "Batch of one row. ORT: `sess.run` from Python, `intra_op_num_threads=1`, "
        "`inter_op_num_threads=1`; eval with default graph optimisations, MC with "
        "`disabled_optimizers=[\"EliminateDropout\"]`. Ours: one inference thread, as each "
        "server worker runs one inference at a time; MC times include mask sampling, "
        "tiling and the summary statistics. Medians of interleaved rounds; "
        "ratio = ours / ORT (below 1 = we are faster). \"best\" = the faster of ORT's two MC-50 forms.\n"
    )
    rows = []
    checks = []
    load_rows = []
    for name in BUNDLED + LIGHT:
        light = name in LIGHT
        path = (LIGHT_DIR / f"light_{name}.onnx") if light else (ROOT / f"models/{name}.onnx")
        if not path.exists():
            log(f"skipping {name}: {path} missing")
            rows.append(f"| {name} | missing | | | | | | | | |")
            continue
        log(f"engine: {name}")
        x = light_input() if light else bundled_input(name)
        body = tmp / f"{name}.json"
        write_body(x, body)
        t = time.perf_counter()
        om = OrtModel(path, x)
        ort_load = time.perf_counter() - t
        info = ours.cmd(f"load {name} {path}")
        ours.cmd(f"input {name} {body}")
        load_rows.append((name, ort_load, info["load_ms"] / 1e3))
        n_check = 5 if light else 50
        spread = om.mc_spread(n_check)
        ort_std = max(s for s in (spread["loop_std"], spread["batch_std"]) if s is not None)
        ort_live = ort_std > 0 and ort_std > 100 * spread["floor_std"]
        our_std = ours.cmd(f"stats {name} 50 7")["max_std"] if info["mc"] else None
        checks.append(
            f"| {name} | {n_check} | {spread['loop_std']:.3g} | "
            + (f"{spread['batch_std']:.3g}" if spread["batch_std"] is not None else "n/a")
            + f" | {spread['floor_std']:.3g} | {'live' if ort_live else '**void**'} | "
            + (f"{our_std:.3g}" if our_std is not None else "refused: " + (info["mc_reason"] or ""))
            + " |"
        )
        ort_v = ["eval"]
        our_v = ["eval"]
        mc = ort_live and info["mc"]
        if mc:
            ort_v += ["loop:50"] + (["batch:50"] if om.batchable else [])
            our_v += ["mc:50", "mcseq:50"]
        samples, rounds = interleaved(
            ort_v, our_v, om, ours, name,
            budget_s=budget * (1.5 if light else 1),
            min_rounds=5 if light else 10,
            target_s=0.02,
        )
        m = {k: med(v) for k, v in samples.items()}
        oe, ol, ob = m.get(("ort", "eval")), m.get(("ort", "loop:50")), m.get(("ort", "batch:50"))
        ue, ub, us = m.get(("ours", "eval")), m.get(("ours", "mc:50")), m.get(("ours", "mcseq:50"))
        best = min(v for v in (ol, ob) if v is not None) if mc else None
        if mc:
            rows.append(
                f"| {name} | {fmt_t(oe)} | {fmt_t(ue)} | {fmt_r(ue, oe)} | {fmt_t(ol)} | "
                f"{fmt_t(ob) if om.batchable else 'n/a (fixed batch)'} | {fmt_t(ub)} | {fmt_t(us)} | "
                f"{fmt_r(ub, best)} | {rounds} |"
            )
        else:
            why = "MC void: ORT's samples do not differ" if not ort_live else "MC refused by mcd-serve"
            rows.append(
                f"| {name} | {fmt_t(oe)} | {fmt_t(ue)} | {fmt_r(ue, oe)} | {why} | n/a | n/a | n/a | n/a | {rounds} |"
            )
        del om
    out.append(
        "| model | ORT eval b=1 | ours eval b=1 | eval ours/ORT | ORT MC-50 loop of 50 | "
        "ORT MC-50 one batch of 50 | ours MC-50 batched | ours MC-50 sequential | "
        "MC-50 ours/ORT best | rounds |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    out.extend(rows)
    out.append("")
    out.append("### Are the MC samples really different?\n")
    out.append(
        "Max over output elements of the standard deviation across the samples. "
        "\"floor\" is the same statistic from ORT's eval session on the tiled batch "
        "(no dropout: only float rounding between rows). ORT's MC counts as live when its "
        "spread is > 0 and > 100 × floor; when it is not, the MC comparison is void and only "
        "eval is compared. The light models are checked with 5 samples (VGG19 takes ~1 s a pass).\n"
    )
    out.append("| model | samples | ORT std, loop | ORT std, batch | floor | ORT MC | ours std (MC-50) |")
    out.append("|---|---|---|---|---|---|---|")
    out.extend(checks)
    out.append("")
    out.append("### Load times (one-off, not in the tables above)\n")
    out.append("| model | ORT: both sessions | ours: load + self-checks |")
    out.append("|---|---|---|")
    out.extend(f"| {n} | {fmt_t(a)} | {fmt_t(b)} |" for n, a, b in load_rows)
    out.append("")


def section_growth(ours, tmp, budget, out):
    out.append("## MC cost growth: MC-N latency, one row, batched\n")
    out.append(
        "Ours: `McSession::run` (one forward pass of N rows plus masks and statistics). "
        "ORT: one `sess.run` over the row tiled N times (forward pass only). "
        "Ratio = ours MC-N / ours eval b=1. Medians of interleaved rounds.\n"
    )
    header = "| model | ours eval b=1 | " + " | ".join(f"N={n}" for n in GROWTH_N) + " |"
    out.append(header)
    out.append("|---|---|" + "---|" * len(GROWTH_N))
    for name in BUNDLED:
        log(f"growth: {name}")
        path = ROOT / f"models/{name}.onnx"
        x = bundled_input(name)
        om = OrtModel(path, x)
        # the engine process already has the model and its input from section_engine
        samples, _ = interleaved(
            [f"batch:{n}" for n in GROWTH_N],
            ["eval"] + [f"mc:{n}" for n in GROWTH_N],
            om, ours, name, budget_s=budget, min_rounds=7, target_s=0.01, cap=200,
        )
        m = {k: med(v) for k, v in samples.items()}
        e = m[("ours", "eval")]
        cells = []
        for n in GROWTH_N:
            u = m[("ours", f"mc:{n}")]
            o = m[("ort", f"batch:{n}")]
            cells.append(f"{fmt_t(u)} ({u / e:.1f}×; ORT {fmt_t(o)})")
        out.append(f"| {name} | {fmt_t(e)} | " + " | ".join(cells) + " |")
    out.append("")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


def proc_status(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1))
    return {"hwm_kb": get("VmHWM"), "rss_kb": get("VmRSS")}


def wrk(url, body_path, conns, duration, threads=1, headers=None):
    assert url.startswith("http://127.0.0.1:"), url
    env = dict(os.environ, WRK_BODY=str(body_path), **(headers or {}))
    cmd = [
        "wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--timeout", "10s",
        "-s", str(ROOT / "bench/wrk_post.lua"), url,
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    line = next((l for l in p.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stdout}\n{p.stderr}")
    r = json.loads(line[len("WRKJSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return r


def oip_body(tmp, x, params, binary):
    """An OIP infer body for one row, as a file, and the headers it needs."""
    x = np.asarray(x, dtype=np.float32)
    inp = {"name": "features", "shape": list(x.shape), "datatype": "FP32"}
    header = {"parameters": dict(params), "inputs": [inp]}
    if not binary:
        inp["data"] = x.ravel().tolist()
        path = tmp / f"oip_json_{len(params)}.json"
        path.write_bytes(json.dumps(header).encode())
        return path, {"Content-Type": "application/json"}
    raw = x.tobytes()
    inp["parameters"] = {"binary_data_size": len(raw)}
    header["parameters"]["binary_data_output"] = True
    js = json.dumps(header).encode()
    path = tmp / f"oip_bin_{len(params)}.bin"
    path.write_bytes(js + raw)
    return path, {"Inference-Header-Content-Length": str(len(js))}


def grpc_load(url, rows_json, conns, duration, mc=None):
    cmd = [str(ROOT / "target/release/examples/grpc_load"), url, "breast_cancer", str(rows_json),
           str(conns), str(duration)] + ([str(mc)] if mc else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    line = next((l for l in p.stdout.splitlines() if l.startswith("GRPCJSON ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"grpc_load failed ({p.returncode}): {p.stdout}\n{p.stderr}")
    r = json.loads(line[len("GRPCJSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def wrk_env(headers):
    return {
        "WRK_CONTENT_TYPE": headers.get("Content-Type", ""),
        "WRK_HEADER_LENGTH": headers.get("Inference-Header-Content-Length", ""),
    }


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc, timeout=30):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def native_load(base, srv, tag, body, duration, results):
    """Native eval and MC-50 at concurrency 1, 8 and 64, with the server's CPU share."""
    for label, path in [("eval", "/predict"), ("MC-50", "/predict?mc_samples=50&seed=1")]:
        for c in (1, 8, 64):
            log(f"http: {tag} {label} c={c}")
            cpu0 = cpu_seconds(srv.pid)
            r = wrk(base + path, body, c, duration)
            r["server_cpu"] = (cpu_seconds(srv.pid) - cpu0) / (r["duration_us"] / 1e6)
            results.append((tag, label, c, r, loadavg()))


def native_rows(exe, tag, tmp, body, duration, results):
    """Native eval and MC-50 rows for another build of the server (before/after)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log(f"http: starting {tag} ({exe}) on {base}")
    # An older build may predate --grpc-addr; give it only the flags every build knows.
    srv = subprocess.Popen([str(exe), "--models", str(ROOT / "models"), "--addr", f"127.0.0.1:{port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"{base}/health/ready", srv)
        wrk(f"{base}/predict", body, 8, 2)
        native_load(base, srv, tag, body, duration, results)
    finally:
        stop(srv)


def section_http(tmp, duration, out, facts, before=None):
    out.append("## HTTP load: wrk against the server and a bare-axum baseline\n")
    server_exe = ROOT / "target/release/mcd-serve"
    bare_exe = ROOT / "target/release/examples/bare_axum"
    body = tmp / "bc_row.json"
    write_body(bundled_input("breast_cancer"), body)
    logs = tmp / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log(f"http: starting the server on {base}")
    grpc_port = free_port()
    srv = subprocess.Popen(
        [str(server_exe), "--models", str(ROOT / "models"), "--addr", f"127.0.0.1:{port}",
         "--grpc-addr", f"127.0.0.1:{grpc_port}"],
        stdout=open(logs, "w"), stderr=subprocess.STDOUT,
    )
    results = []
    try:
        wait_ready(f"{base}/health/ready", srv)
        rss_idle = proc_status(srv.pid)
        status, answer = post(f"{base}/predict", body.read_bytes())
        assert status == 200, (status, answer)
        answer_path = tmp / "eval_answer.json"
        answer_path.write_bytes(answer)
        status, mc_answer = post(f"{base}/predict?mc_samples=50&seed=1", body.read_bytes())
        assert status == 200 and b"mc_dropout" in mc_answer, (status, mc_answer)
        facts["eval_answer_bytes"] = len(answer)
        facts["mc_answer_bytes"] = len(mc_answer)
        # warm-up, not recorded
        wrk(f"{base}/predict", body, 8, 2)
        native_load(base, srv, "mcd-serve", body, duration, results)
        # The same row over OIP v2 REST: JSON both ways, and the binary tensor data
        # extension both ways (tritonclient's default: no Content-Type).
        oip = f"{base}/v2/models/breast_cancer/infer"
        for label, params in [("OIP eval", {}), ("OIP MC-50", {"mc_samples": 50, "seed": 1})]:
            for form in ("JSON", "binary"):
                b, headers = oip_body(tmp, bundled_input("breast_cancer"), params, form == "binary")
                status, oip_answer = post(oip, b.read_bytes(), headers)
                assert status == 200, (status, oip_answer)
                for c in (1, 64):
                    log(f"http: server {label} {form} c={c}")
                    cpu0 = cpu_seconds(srv.pid)
                    r = wrk(oip, b, c, duration, headers=wrk_env(headers))
                    r["server_cpu"] = (cpu_seconds(srv.pid) - cpu0) / (r["duration_us"] / 1e6)
                    results.append(("mcd-serve", f"{label}, {form}", c, r, loadavg()))
        # OIP gRPC beside REST, at 16 and 64 concurrent callers (examples/grpc_load.rs, raw
        # contents as tritonclient sends them).
        rows_json = tmp / "bc_rows.json"
        rows_json.write_text(json.dumps(np.asarray(bundled_input("breast_cancer")).tolist()))
        for label, mc in [("gRPC eval", None), ("gRPC MC-50", 50)]:
            for c in (16, 64):
                log(f"http: server {label} c={c}")
                cpu0 = cpu_seconds(srv.pid)
                r = grpc_load(f"http://127.0.0.1:{grpc_port}", rows_json, c, duration, mc)
                r["server_cpu"] = (cpu_seconds(srv.pid) - cpu0) / (r["duration_us"] / 1e6)
                results.append(("mcd-serve", label, c, r, loadavg()))
        for label, path in [("eval", "/predict"), ("MC-50", "/predict?mc_samples=50&seed=1")]:
            log(f"http: server {label} c=16")
            cpu0 = cpu_seconds(srv.pid)
            r = wrk(base + path, body, 16, duration)
            r["server_cpu"] = (cpu_seconds(srv.pid) - cpu0) / (r["duration_us"] / 1e6)
            results.append(("mcd-serve", label, 16, r, loadavg()))
        # a burst of the other models so every model has run, then read the high-water mark
        for name in ("diabetes", "digits_cnn"):
            b = tmp / f"{name}.json"
            write_body(bundled_input(name), b)
            for _ in range(20):
                status, _ = post(f"{base}/models/{name}/predict?mc_samples=100", b.read_bytes())
                assert status == 200, (name, status)
        rss_after = proc_status(srv.pid)
        facts["rss_idle"] = rss_idle
        facts["rss_after"] = rss_after
    finally:
        stop(srv)
    if before:
        native_rows(before, "mcd-serve before", tmp, body, duration, results)
    bport = free_port()
    bbase = f"http://127.0.0.1:{bport}"
    log(f"http: starting bare_axum on {bbase}")
    bare = subprocess.Popen([str(bare_exe), f"127.0.0.1:{bport}", str(answer_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"{bbase}/health/ready", bare, timeout_s=30)
        status, bare_answer = post(f"{bbase}/predict", body.read_bytes())
        assert status == 200 and len(bare_answer) == len(answer), (status, bare_answer)
        wrk(f"{bbase}/predict", body, 8, 2)
        for c in (1, 8, 64):
            log(f"http: bare_axum c={c}")
            cpu0 = cpu_seconds(bare.pid)
            r = wrk(f"{bbase}/predict", body, c, duration)
            r["server_cpu"] = (cpu_seconds(bare.pid) - cpu0) / (r["duration_us"] / 1e6)
            results.append(("bare axum", "eval-sized answer", c, r, loadavg()))
    finally:
        stop(bare, timeout=10)

    out.append(
        f"`wrk -t1 -c C -d {duration}s` with `bench/wrk_post.lua` (POST, `Content-Type: application/json`), "
        f"body = one breast_cancer row ({body.stat().st_size} bytes). Server: `target/release/mcd-serve "
        "--models models` with its defaults (workers = cores). Bare axum: `examples/bare_axum.rs`, "
        f"same tokio runtime, reads and drops the body, answers a fixed {facts['eval_answer_bytes']}-byte "
        "JSON copied from the server's real eval answer. Errors = connect + read + write + timeout "
        "+ non-2xx. \"server CPU\" = the target process's CPU seconds per wall second "
        "(2.0 = both cores); wrk runs on the same 2 cores.\n"
    )
    out.append("| target | request | conns | req/s | p50 | p99 | errors | server CPU | server CPU per request | load avg after |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for who, label, c, r, la in results:
        out.append(
            f"| {who} | {label} | {c} | {r['rps']:.0f} | {fmt_t(r['p50_us'] / 1e6)} | "
            f"{fmt_t(r['p99_us'] / 1e6)} | {r['errors']} | {r['server_cpu']:.2f} | "
            f"{fmt_t(r['server_cpu'] / r['rps'])} | {la[0]:.2f} |"
        )
    out.append("")
    bare = {c: r for who, _, c, r, _ in results if who == "bare axum"}
    ev = {c: r for who, label, c, r, _ in results if who == "mcd-serve" and label == "eval"}
    out.append("Server eval throughput as a share of bare axum: " + ", ".join(
        f"c={c}: {ev[c]['rps'] / bare[c]['rps'] * 100:.0f}%" for c in (1, 8, 64)) + ". "
        "Server CPU per eval request vs bare axum's: " + ", ".join(
        f"c={c}: {(ev[c]['server_cpu'] / ev[c]['rps']) / (bare[c]['server_cpu'] / bare[c]['rps']):.1f}×"
        for c in (1, 8, 64)) + ".\n")
    facts["http"] = results
    out.append("## Server memory\n")
    out.append(
        "`/proc/PID/status` of the server with the three bundled models loaded: after start-up "
        "(ready, no traffic) and after all the load above plus 20 MC-100 requests to each other model.\n"
    )
    out.append("| when | VmHWM (peak RSS) | VmRSS |")
    out.append("|---|---|---|")
    for label, s in [("ready, before traffic", facts["rss_idle"]), ("after the load tests", facts["rss_after"])]:
        out.append(f"| {label} | {s['hwm_kb'] / 1024:.1f} MiB | {s['rss_kb'] / 1024:.1f} MiB |")
    out.append("")


def machine(out, start_load, idle_busy):
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    ver = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    tract = re.search(r'name = "tract-onnx"\nversion = "([^"]+)"', (ROOT / "Cargo.lock").read_text())
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml"],
                           capture_output=True, text=True).stdout.strip()
    out.append("## Machine\n")
    out.append("| | |")
    out.append("|---|---|")
    out.append(f"| date | {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} |")
    out.append(f"| cores (`nproc`) | {os.cpu_count()} ({subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} usable) |")
    out.append(f"| CPU | {cpu} |")
    out.append(f"| memory | {mem / 1024 / 1024:.1f} GiB |")
    out.append(f"| kernel | {platform.release()} |")
    out.append(f"| load average at start (1/5/15 min) | {load_str(start_load)} |")
    out.append(f"| CPU used by other processes just before the start | {idle_busy * 100:.0f}% |")
    out.append(f"| commit | {git}{' + uncommitted changes in src/ or Cargo.toml' if dirty else ''} |")
    out.append(f"| rustc | {ver('rustc', '--version')} |")
    out.append(f"| tract-onnx | {tract.group(1) if tract else '?'} |")
    out.append(f"| onnxruntime / numpy / Python | {ort.__version__} / {np.__version__} / {platform.python_version()} |")
    out.append(f"| wrk | {ver('wrk', '-v') if shutil.which('wrk') else 'missing'} |")
    out.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results.md"))
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timing rounds per model and section")
    ap.add_argument("--http-seconds", type=int, default=10)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--before", help="another mcd-serve binary whose native HTTP figures to add (before/after)")
    ap.add_argument("--skip-light", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="wait up to this many seconds for other processes to leave the CPU idle")
    args = ap.parse_args()
    if args.skip_light:
        LIGHT.clear()

    # Wait (bounded) until other processes leave the CPU mostly idle: measured over 5 s from
    # /proc/stat, since the load average lags a finished build by minutes.
    deadline = time.monotonic() + args.wait_idle
    while True:
        a = cpu_snapshot()
        time.sleep(5)
        busy = others_share(a, cpu_snapshot())
        if busy < 0.15 or time.monotonic() >= deadline:
            break
        log(f"other processes use {busy * 100:.0f}% of the CPU (load {load_str()}): waiting "
            f"for the machine to quieten (up to {args.wait_idle:.0f} s in all)")
    facts_idle = busy
    start_load = loadavg()
    t0 = time.monotonic()
    out = ["# mcd-serve benchmarks\n", "Produced by `bench/run`; see docs/performance.md for how to read it.\n"]
    machine(out, start_load, facts_idle)
    facts = {}
    loads = [("start", start_load)]
    snaps = [("start", cpu_snapshot())]
    with tempfile.TemporaryDirectory(prefix="mcd-bench-") as d:
        tmp = Path(d)
        ours = Ours(ROOT / "target/release/examples/bench_engine")
        try:
            section_engine(ours, tmp, args.budget, out)
            loads.append(("after engine", loadavg()))
            section_growth(ours, tmp, args.budget * 0.75, out)
            loads.append(("after growth", loadavg()))
        finally:
            ours.close()
        snaps.append(("engine + growth", cpu_snapshot()))
        if not args.skip_http:
            section_http(tmp, args.http_seconds, out, facts, args.before)
            loads.append(("after HTTP", loadavg()))
            snaps.append(("HTTP", cpu_snapshot()))
    out.append("## Load average during the run\n")
    out.append("| point | 1 / 5 / 15 min |")
    out.append("|---|---|")
    out.extend(f"| {p} | {load_str(l)} |" for p, l in loads)
    out.append("")
    out.append("The load average counts the benchmark itself (up to ~2 while it runs). What other "
               "processes took, from /proc/stat minus this run's own processes:\n")
    out.append("| section | CPU used by other processes (share of the 2 cores) |")
    out.append("|---|---|")
    shares = []
    for (_, a), (label, b) in zip(snaps, snaps[1:]):
        shares.append(others_share(a, b))
        out.append(f"| {label} | {shares[-1] * 100:.0f}% |")
    out.append("")
    if facts_idle > 0.15 or any(x > 0.10 for x in shares):
        out.append("**Warning:** the machine was busy with other work during this run (other processes "
                   f"used {facts_idle * 100:.0f}% of the CPU just before the start and up to "
                   f"{max(shares) * 100:.0f}% during it). "
                   "Engine ratios are interleaved and hold up; absolute times and HTTP numbers suffer. "
                   "Re-run when quieter.\n")
    else:
        out.append("Other processes stayed below 10% of the CPU throughout: a quiet run. (The load "
                   "average lags by minutes, so it can read high at the start after a build.)\n")
    out.append(f"Benchmark wall time (excluding builds): {time.monotonic() - t0:.0f} s.\n")
    text = "\n".join(out)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
