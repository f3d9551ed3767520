"""Benchmark driver for bench/run: mcd-serve's engine against onnxruntime, MC cost growth,
and HTTP load against the server, the build before (issue 11's "today"), the FastAPI +
onnxruntime service a team would write instead (bench/fastapi_service.py) and a bare-axum
baseline, with issue 11's targets computed under the table.

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
  thread, against 127.0.0.1 only. Every bundled model, eval and MC-50, at 1, 16 and 64
  connections, for every target; all servers run for the whole section and the order of
  the targets rotates from cell to cell. Before any load the harness checks that the
  FastAPI service's eval answers match mcd-serve's (float tolerance) and its MC answers
  have the same fields, and aborts when they do not.
"""

import argparse
import datetime
import importlib.metadata
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
# Where the lead keeps the build of main before issue 11 ("today" for the targets).
DEFAULT_BEFORE = Path("/work/bench-before/mcd-serve")


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


def proc_tree(pid):
    """pid and every live descendant (uvicorn's workers are children of its master)."""
    children = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    """CPU seconds (user + system) of pid and its live descendants."""
    total = 0.0
    for p in proc_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree_status(pid):
    """VmHWM and VmRSS summed over pid and its descendants (one process for mcd-serve)."""
    hwm = rss = n = 0
    for p in proc_tree(pid):
        try:
            s = proc_status(p)
        except (OSError, AttributeError):
            continue
        hwm += s["hwm_kb"]
        rss += s["rss_kb"]
        n += 1
    return {"hwm_kb": hwm, "rss_kb": rss, "processes": n}


def stop(proc, timeout=30):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


HTTP_MODES = [("eval", ""), ("MC-50", "?mc_samples=50&seed=1")]
HTTP_CONNS = (1, 16, 64)
NEW, BEFORE, FASTAPI, BARE = "mcd-serve", "mcd-serve before", "FastAPI + ORT", "bare axum"


class Target:
    """A server under test: its process, base URL and the routes of a model."""

    def __init__(self, name, cmd, ready_path="/health/ready", env=None, cwd=None, log_path=None):
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [c.replace("{PORT}", str(self.port)) for c in cmd]
        log(f"http: starting {name}: {' '.join(cmd)}")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=open(log_path, "w") if log_path else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.ready_path = ready_path

    def wait(self):
        try:
            wait_ready(self.base + self.ready_path, self.proc)
        except RuntimeError as e:
            tail = Path(self.log_path).read_text()[-2000:] if self.log_path else ""
            raise RuntimeError(f"{self.name}: {e}\n{tail}") from None

    def url(self, model, query=""):
        return f"{self.base}/models/{model}/predict{query}"

    def stop(self):
        stop(self.proc)


def mcd_target(name, exe, tmp):
    """An mcd-serve build with the bundled models. Its gRPC listener is off (or on a free
    port for the build under test, for the protocol rows); a build too old to know
    --grpc-addr gets only the flags every build knows."""
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    cmd = [str(exe), "--models", str(ROOT / "models"), "--addr", "127.0.0.1:{PORT}"]
    grpc_port = None
    if "--grpc-addr" in help_text:
        if name == NEW:
            grpc_port = free_port()
            cmd += ["--grpc-addr", f"127.0.0.1:{grpc_port}"]
        else:
            cmd += ["--grpc-addr="]
    t = Target(name, cmd, log_path=tmp / f"{name.replace(' ', '_')}.log")
    t.grpc_port = grpc_port
    return t


def answer_tree(v):
    """The key structure of a JSON answer (dict keys, recursively; lists by their first item)."""
    if isinstance(v, dict):
        return {k: answer_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [answer_tree(v[0])] if v and isinstance(v[0], dict) else "list"
    return type(v).__name__ if not isinstance(v, (int, float)) or isinstance(v, bool) else "number"


def check_answers(ref, other, name, model, mode, tol):
    """Aborts the run when `other` does not give `ref`'s eval answer (within tol) or an MC
    answer of the same shape: the comparison is only honest between equal answers."""
    a, b = json.loads(ref), json.loads(other)
    if mode == "eval":
        if set(a["outputs"]) != set(b["outputs"]):
            raise SystemExit(f"ABORT: {name} answers outputs {sorted(b['outputs'])} for {model}, "
                             f"mcd-serve {sorted(a['outputs'])}")
        worst = 0.0
        for k in a["outputs"]:
            x, y = np.asarray(a["outputs"][k], dtype=np.float64), np.asarray(b["outputs"][k], dtype=np.float64)
            if x.shape != y.shape or not np.allclose(x, y, rtol=tol["rtol"], atol=tol["atol"]):
                raise SystemExit(f"ABORT: {name}'s eval answer for {model} differs from mcd-serve's "
                                 f"({k}: {y.tolist()} vs {x.tolist()}; rtol {tol['rtol']}, atol {tol['atol']})")
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-30))))
        return worst
    ta, tb = answer_tree(a), answer_tree(b)
    ta.pop("seed", None), tb.pop("seed", None)
    if ta != tb:
        raise SystemExit(f"ABORT: {name}'s MC answer for {model} is not shaped like mcd-serve's:\n"
                         f"  {json.dumps(tb)}\n  vs\n  {json.dumps(ta)}")
    # live dropout: an MC answer whose samples do not differ (e.g. ORT with EliminateDropout
    # left on) would be an eval answer at MC prices
    spread = max(float(np.max(np.asarray(o["std"], dtype=np.float64))) for o in b["outputs"].values())
    if not spread > 0:
        raise SystemExit(f"ABORT: {name}'s MC-50 answer for {model} has zero spread: its dropout is not live")
    return None


def measure(t, url, body, c, duration):
    cpu0 = cpu_seconds(t.proc.pid)
    r = wrk(url, body, c, duration)
    r["server_cpu"] = (cpu_seconds(t.proc.pid) - cpu0) / (r["duration_us"] / 1e6)
    return r


def section_http(tmp, duration, out, facts, before=None, fastapi=True, protocols=True):
    """Every bundled model, eval and MC-50, at 1, 16 and 64 connections, against mcd-serve,
    the before build, the FastAPI service and bare axum. All servers run from the start; each
    cell runs the targets back to back in an order that rotates from cell to cell, so drift
    on the shared machine does not always hit the same target."""
    out.append("## HTTP load: mcd-serve, the build before, FastAPI + onnxruntime and bare axum\n")
    bodies = {}
    for name in BUNDLED:
        bodies[name] = tmp / f"{name}.body.json"
        write_body(bundled_input(name), bodies[name])
    new = mcd_target(NEW, ROOT / "target/release/mcd-serve", tmp)
    targets = [new]
    answers_dir = tmp / "answers"
    answers_dir.mkdir()
    results = {}  # (model, mode, conns, target) -> wrk result
    mem = {}
    checks = []
    try:
        new.wait()
        mem[(NEW, "idle")] = tree_status(new.proc.pid)
        answers = {}
        for name in BUNDLED:
            for mode, query in HTTP_MODES:
                status, answer = post(new.url(name, query), bodies[name].read_bytes())
                assert status == 200, (name, mode, status, answer)
                answers[(name, mode)] = answer
                (answers_dir / f"{name}.{'eval' if mode == 'eval' else 'mc'}.json").write_bytes(answer)
        if before:
            targets.append(mcd_target(BEFORE, before, tmp))
        if fastapi:
            uvicorn = Path(sys.executable).parent / "uvicorn"
            targets.append(Target(
                FASTAPI,
                [str(uvicorn), "bench.fastapi_service:app", "--workers", "2", "--host", "127.0.0.1",
                 "--port", "{PORT}", "--no-access-log", "--log-level", "warning"],
                env=dict(os.environ, MCD_MODELS=str(ROOT / "models")), cwd=str(ROOT),
                log_path=tmp / "fastapi.log",
            ))
        bare_exe = ROOT / "target/release/examples/bare_axum"
        targets.append(Target(BARE, [str(bare_exe), "127.0.0.1:{PORT}", str(answers_dir)],
                              log_path=tmp / "bare_axum.log"))
        for t in targets[1:]:
            t.wait()
            if t.name != BARE:
                mem[(t.name, "idle")] = tree_status(t.proc.pid)

        # Same answers, or no comparison: eval within float tolerance (tract vs onnxruntime
        # kernels), MC of the same shape (the samples differ: other random streams).
        tol = {"rtol": 1e-4, "atol": 1e-5}
        for t in targets[1:]:
            for name in BUNDLED:
                for mode, query in HTTP_MODES:
                    status, answer = post(t.url(name, query), bodies[name].read_bytes())
                    if status != 200:
                        raise SystemExit(f"ABORT: {t.name} answered {status} for {name} {mode}: {answer[:300]!r}")
                    if t.name == BARE:
                        if len(answer) != len(answers[(name, mode)]):
                            raise SystemExit(f"ABORT: bare axum's {name} {mode} answer is {len(answer)} bytes, "
                                             f"mcd-serve's {len(answers[(name, mode)])}")
                        continue
                    worst = check_answers(answers[(name, mode)], answer, t.name, name, mode, tol)
                    if mode == "eval":
                        checks.append((t.name, name, worst, len(answer), len(answers[(name, mode)])))
                    else:
                        checks.append((t.name, name + " MC-50", None, len(answer), len(answers[(name, mode)])))
        log("http: answers agree (eval within tolerance, MC answers of the same shape)")

        cell = 0
        warm = min(2, duration)
        for name in BUNDLED:
            for mode, query in HTTP_MODES:
                for t in targets:  # warm-up, not recorded
                    wrk(t.url(name, query), bodies[name], 16, warm)
                for c in HTTP_CONNS:
                    k = cell % len(targets)
                    order = targets[k:] + targets[:k]
                    cell += 1
                    for t in order:
                        log(f"http: {t.name} {name} {mode} c={c}")
                        results[(name, mode, c, t.name)] = measure(t, t.url(name, query), bodies[name], c, duration)
        for t in targets:
            if t.name != BARE:
                mem[(t.name, "after")] = tree_status(t.proc.pid)
        proto = section_protocols(new, tmp, duration) if protocols and new.grpc_port else []
    finally:
        for t in reversed(targets):
            t.stop()
    names = [t.name for t in targets]

    out.append(
        f"`wrk -t1 -c C -d {duration}s --timeout 10s` with `bench/wrk_post.lua` (POST, `Content-Type: "
        "application/json`) to `/models/NAME/predict` (eval) and `/models/NAME/predict?mc_samples=50&seed=1` "
        "(MC-50), after a warm-up at 16 connections. Bodies: one row each: breast_cancer "
        f"({bodies['breast_cancer'].stat().st_size} bytes, 30 floats), diabetes "
        f"({bodies['diabetes'].stat().st_size} bytes, 10 floats), digits_cnn "
        f"({bodies['digits_cnn'].stat().st_size} bytes, one 8×8 image).\n"
    )
    out.append("- **mcd-serve**: `target/release/mcd-serve --models models` (this tree), default settings.")
    if before:
        out.append(f"- **mcd-serve before**: `{before}`"
                   + (f" (commit {Path(before).with_name('COMMIT').read_text().strip()[:7]})"
                      if Path(before).with_name("COMMIT").exists() else "")
                   + ", the same flags.")
    if fastapi:
        out.append("- **FastAPI + ORT**: `bench/fastapi_service.py` on uvicorn[standard], 2 workers, "
                   "onnxruntime 1 thread per session, MC as one batched pass with `EliminateDropout` "
                   "disabled, numpy statistics and the same calibration fields.")
    out.append("- **bare axum**: `examples/bare_axum.rs`, same tokio runtime, reads and drops the body and "
               "answers mcd-serve's real answer for that model and mode, byte for byte (captured at the start).")
    out.append("\nAll servers run for the whole section; in each cell the targets run back to back, in an "
               "order that rotates from cell to cell. Errors = connect + read + write + timeout + non-2xx. "
               "\"server CPU\" = the target's CPU seconds (all its processes) per wall second "
               "(2.0 = both cores); wrk runs on the same 2 cores.\n")
    out.append("| model | request | conns | target | req/s | p50 | p99 | errors | server CPU | CPU per request |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for name in BUNDLED:
        for mode, _ in HTTP_MODES:
            for c in HTTP_CONNS:
                for who in names:
                    r = results[(name, mode, c, who)]
                    out.append(
                        f"| {name} | {mode} | {c} | {who} | {r['rps']:.0f} | {fmt_t(r['p50_us'] / 1e6)} | "
                        f"{fmt_t(r['p99_us'] / 1e6)} | {r['errors']} | {r['server_cpu']:.2f} | "
                        f"{fmt_t(r['server_cpu'] / r['rps']) if r['rps'] else 'n/a'} |"
                    )
    out.append("")
    out.append("Throughput at 64 connections, req/s (share of bare axum):\n")
    out.append("| model | request | " + " | ".join(names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for name in BUNDLED:
        for mode, _ in HTTP_MODES:
            bare = results[(name, mode, 64, BARE)]["rps"]
            out.append(f"| {name} | {mode} | " + " | ".join(
                f"{results[(name, mode, 64, w)]['rps']:,.0f} ({results[(name, mode, 64, w)]['rps'] / bare * 100:.0f}%)"
                for w in names) + " |")
    out.append("")
    if checks:
        out.append("Answers checked before the load (the run aborts when they disagree): eval outputs "
                   f"within rtol {tol['rtol']:g} / atol {tol['atol']:g} of mcd-serve's, MC answers with "
                   "the same fields; answer sizes in bytes (other / mcd-serve):\n")
        out.append("| target | request | largest relative difference | answer bytes |")
        out.append("|---|---|---|---|")
        for who, what, worst, nb, na in checks:
            out.append(f"| {who} | {what}{'' if worst is None else ' eval'} | "
                       f"{'same fields' if worst is None else f'{worst:.2g}'} | {nb} / {na} |")
        out.append("")
    out.extend(targets_lines(results, names))
    out.extend(proto)
    facts["http"] = results

    out.append("## Server memory\n")
    out.append("`/proc/PID/status` (summed over the FastAPI service's processes: the uvicorn master, "
               "its 2 workers and multiprocessing's resource tracker; VmHWM summed is an upper bound "
               "of their joint peak), with the three "
               "bundled models loaded: ready before traffic, and after all the load above.\n")
    out.append("| target | processes | ready: VmHWM | ready: VmRSS | after load: VmHWM | after load: VmRSS |")
    out.append("|---|---|---|---|---|---|")
    for who in names:
        if (who, "idle") not in mem:
            continue
        a, b = mem[(who, "idle")], mem[(who, "after")]
        out.append(f"| {who} | {b['processes']} | {a['hwm_kb'] / 1024:.1f} MiB | {a['rss_kb'] / 1024:.1f} MiB | "
                   f"{b['hwm_kb'] / 1024:.1f} MiB | {b['rss_kb'] / 1024:.1f} MiB |")
    out.append("")


def targets_lines(results, names):
    """Issue 11's targets, computed from the table: MET / MISSED with the figures."""
    lines = ["### Targets (issue 11)\n"]
    verdicts = []

    def line(ok, text):
        verdicts.append(ok)
        lines.append(f"- **{'MET' if ok else 'MISSED'}** {text}")

    r = lambda m, mode, c, who: results[(m, mode, c, who)]
    for m in BUNDLED:
        ours, bare = r(m, "eval", 64, NEW)["rps"], r(m, "eval", 64, BARE)["rps"]
        share = ours / bare
        line(share >= 0.6,
             f"eval throughput at c=64 ≥ 60% of bare axum, {m}: {ours:,.0f} vs {bare:,.0f} req/s = "
             f"{share * 100:.0f}%" + (f" (missed by {60 - share * 100:.0f} points: {0.6 / share:.2f}× the "
                                      "throughput needed)" if share < 0.6 else "")
             + f"; stretch 80%: {'met' if share >= 0.8 else 'not met'}")
    if BEFORE in names:
        for m in ("breast_cancer", "digits_cnn"):
            ours, old = r(m, "MC-50", 64, NEW)["rps"], r(m, "MC-50", 64, BEFORE)["rps"]
            x = ours / old
            line(x >= 2, f"MC-50 throughput at c=64 ≥ 2× before, {m}: {ours:,.0f} vs {old:,.0f} req/s = {x:.2f}×"
                 + (f" (missed: {2 / x:.2f}× more needed)" if x < 2 else ""))
        for m in BUNDLED:
            for mode, _ in HTTP_MODES:
                ours, old = r(m, mode, 16, NEW)["p99_us"], r(m, mode, 16, BEFORE)["p99_us"]
                line(ours <= old, f"p99 at c=16 no worse than before, {m} {mode}: {fmt_t(ours / 1e6)} vs "
                     f"{fmt_t(old / 1e6)} ({ours / old:.2f}×)")
    else:
        lines.append("- **n/a** MC-50 2× before and p99 at c=16 vs before: no before binary (`--before-bin`)")
    errs = {(m, mode, c): r(m, mode, c, NEW)["errors"] for m in BUNDLED for mode, _ in HTTP_MODES for c in HTTP_CONNS}
    bad = {k: v for k, v in errs.items() if v}
    line(not bad, "zero errors, mcd-serve, every cell: " + (
        "0 in all " + str(len(errs)) if not bad else
        ", ".join(f"{m} {mode} c={c}: {v}" for (m, mode, c), v in bad.items())))
    others = {w: sum(r(m, mode, c, w)["errors"] for m in BUNDLED for mode, _ in HTTP_MODES for c in HTTP_CONNS)
              for w in names if w != NEW}
    lines.append(f"- (errors of the others, for reference: "
                 + ", ".join(f"{w} {n}" for w, n in others.items()) + ")")
    lines.append(f"\n**{sum(verdicts)} of {len(verdicts)} targets met**"
                 + ("" if BEFORE in names else " (8 more need a before binary: `--before-bin`)") + ".\n")
    return lines


def section_protocols(new, tmp, duration):
    """OIP REST (JSON and binary) and OIP gRPC against the native route, breast_cancer, c=64:
    whether every front end gets what the core does."""
    x = bundled_input("breast_cancer")
    oip = f"{new.base}/v2/models/breast_cancer/infer"
    rows = []
    for label, params in [("eval", {}), ("MC-50", {"mc_samples": 50, "seed": 1})]:
        for form in ("JSON", "binary"):
            b, headers = oip_body(tmp, x, params, form == "binary")
            status, answer = post(oip, b.read_bytes(), headers)
            assert status == 200, (status, answer)
            log(f"http: OIP {label} {form} c=64")
            cpu0 = cpu_seconds(new.proc.pid)
            r = wrk(oip, b, 64, duration, headers=wrk_env(headers))
            r["server_cpu"] = (cpu_seconds(new.proc.pid) - cpu0) / (r["duration_us"] / 1e6)
            rows.append((f"OIP REST {label}, {form}", r))
    rows_json = tmp / "bc_rows.json"
    rows_json.write_text(json.dumps(np.asarray(x).tolist()))
    for label, mc in [("eval", None), ("MC-50", 50)]:
        log(f"http: gRPC {label} c=64")
        cpu0 = cpu_seconds(new.proc.pid)
        r = grpc_load(f"http://127.0.0.1:{new.grpc_port}", rows_json, 64, duration, mc)
        r["server_cpu"] = (cpu_seconds(new.proc.pid) - cpu0) / (r["duration_us"] / 1e6)
        rows.append((f"OIP gRPC {label}", r))
    out = ["## Protocols: OIP REST and gRPC, mcd-serve, breast_cancer, 64 connections\n",
           "The same row as above over OIP v2 REST (JSON both ways, and the binary tensor data extension "
           "both ways, no Content-Type, as tritonclient sends it) and over OIP gRPC "
           "(`examples/grpc_load.rs`: closed loop, one HTTP/2 connection per caller). Compare with the "
           "native breast_cancer rows at 64 connections above.\n",
           "| request | req/s | p50 | p99 | errors | server CPU per request |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        out.append(f"| {label} | {r['rps']:.0f} | {fmt_t(r['p50_us'] / 1e6)} | {fmt_t(r['p99_us'] / 1e6)} | "
                   f"{r.get('errors', 0)} | {fmt_t(r['server_cpu'] / r['rps']) if r['rps'] else 'n/a'} |")
    out.append("")
    return out


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
    pkgs = {}
    for name in ("fastapi", "uvicorn", "uvloop", "httptools", "orjson"):
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkgs[name] = "missing"
    out.append("| FastAPI service: " + " / ".join(pkgs) + " | " + " / ".join(pkgs.values()) + " |")
    out.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results.md"))
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timing rounds per model and section")
    ap.add_argument("--http-seconds", type=int, default=5, help="seconds of wrk per HTTP cell")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--before-bin", "--before", dest="before_bin", default=None,
                    help="the mcd-serve binary the targets compare with (\"before\"); default "
                         f"{DEFAULT_BEFORE} when it exists; \"\" for none")
    ap.add_argument("--skip-fastapi", action="store_true", help="leave the FastAPI service out of the HTTP table")
    ap.add_argument("--skip-protocols", action="store_true", help="leave out the OIP REST / gRPC rows")
    ap.add_argument("--skip-light", action="store_true")
    ap.add_argument("--skip-engine", action="store_true", help="leave out the engine and MC growth sections")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="wait up to this many seconds for other processes to leave the CPU idle")
    args = ap.parse_args()
    if args.before_bin is None:
        args.before_bin = str(DEFAULT_BEFORE) if DEFAULT_BEFORE.is_file() else ""
    if args.before_bin and not os.access(args.before_bin, os.X_OK):
        ap.error(f"--before-bin {args.before_bin}: not an executable")
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
        if not args.skip_engine:
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
            section_http(tmp, args.http_seconds, out, facts, args.before_bin or None,
                         fastapi=not args.skip_fastapi, protocols=not args.skip_protocols)
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
                   f"{max(shares, default=0) * 100:.0f}% during it). "
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
