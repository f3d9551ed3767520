"""Real-size benchmark (issue 23, item 6): MONAI DenseNet121 (CheXNet's form), MONAI
ResNet-50 with a dropout head and BERT-base, served by the real mcd-serve on its tract and
onnxruntime backends, against onnxruntime in-process from Python.

    python bench/realsize/make_models.py /work/realsize-models
    python bench/realsize/run.py --server /work/bin/mcd-serve-ort \\
        --models /work/realsize-models --ort-lib "$(bash .ci/onnxruntime-lib.sh)"

Needs the venv of bench/realsize/requirements.txt (onnxruntime and numpy are all run.py
imports). Writes bench/realsize/results.md and prints it. Targets 127.0.0.1 only.

Method (bench/bench.py's, at a larger scale)
- Each backend gets its own server process, started one after the other (not at once, so
  they do not slow each other's loading): `--models DIR --addr 127.0.0.1:PORT --grpc-addr=
  --backend B [--ort-lib L] --request-timeout-secs 600` (BERT-base MC-20 can take longer
  than the default 30 s on a busy machine), every other setting the default (workers =
  cores, --max-memory-bytes 512 MiB, --pass-threads = cores) unless --server-arg says
  otherwise. Load time: process start to `GET /health/ready` = 200
  (every model loaded and self-checked); per model, the server's log line for it when it
  has one. Memory: VmRSS / VmHWM of the server process from /proc, after load and at the end.
- onnxruntime in-process ("ORT Python"): per model an eval session (default optimisations,
  which delete Dropout) and an MC session (disabled_optimizers=["EliminateDropout"], so
  Dropout stays live), CPUExecutionProvider, intra_op_num_threads=1 and
  inter_op_num_threads=1 (as each server worker runs one pass on one thread). MC-20 is one
  run over the input tiled 20 times along the batch axis (forward pass only, no
  statistics). Its memory is this Python process's (numpy + onnxruntime included; the
  figure before any session is shown).
- Before any timing, each server's eval answer must equal ORT Python's within rtol 1e-4,
  atol 1e-5 (and PyTorch's from <stem>.reference.json), and its MC-20 answer must have a
  non-zero spread; otherwise the run stops.
- Latency: one row (b=1), native route `POST /models/{name}/predict` with a JSON body
  (`?mc_samples=20&seed=R` for MC-20), wall time from this client over a new connection
  (includes HTTP and JSON both ways: a 224x224 RGB image is ~3 MB of JSON). Rounds are
  interleaved: each round times every engine once per model, and the engines' order
  rotates from round to round, so drift on a shared machine hits all of them. Medians.
- Throughput: eval, one row a request, closed loop with C client threads (C = 1 and 4)
  for a fixed duration; requests completed / time until the last one finished. Engines
  run back to back per cell, in an order that rotates. ORT Python: C threads calling the
  one eval session (sess.run releases the GIL; intra-op 1 thread each).
"""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MC_N = 20
TOL = {"rtol": 1e-4, "atol": 1e-5}
ORDER = ["densenet121_chexnet", "resnet50_head_dropout", "bert_base_cls"]


def log(msg):
    print(f"[realsize {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_snapshot(pids=()):
    """(wall, machine busy CPU-seconds, CPU-seconds of this process, its waited-for children
    and the live processes pids: the servers). The difference over an interval is what
    other processes used."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    mine = t.user + t.system + t.children_user + t.children_system + sum(proc_cpu(p) for p in pids)
    return time.monotonic(), busy, mine


def others_share(a, b):
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (wall * (os.cpu_count() or 1))) * 100


def proc_cpu(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024
    return {"rss": get("VmRSS"), "hwm": get("VmHWM")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt_t(s):
    if s is None:
        return "n/a"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_mb(b):
    return "n/a" if b is None else f"{b / 1e6:.0f} MB"


def med(xs):
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------- models


class Model:
    def __init__(self, models_dir, stem):
        self.stem = stem
        self.path = models_dir / f"{stem}.onnx"
        # onnxruntime's eval: the same file (EliminateDropout removes its Dropout nodes), or,
        # where dropout was exported as random ops that onnxruntime would run, the eval-mode
        # export make_models.py wrote to ort-eval/
        self.ref = json.loads((models_dir / f"{stem}.reference.json").read_text())
        npz = np.load(models_dir / self.ref["inputs_file"])
        self.inputs2 = {k: npz[k] for k in npz.files}  # two rows, for the answer check
        self.inputs = {k: v[:1] for k, v in self.inputs2.items()}  # the benchmark's row
        self.output = self.ref["output"]
        self.eval_path = models_dir / self.ref.get("ort_eval_file", f"{stem}.onnx")

    def body(self, inputs=None):
        inputs = inputs if inputs is not None else self.inputs
        # float32 -> Python float is exact and json writes a repr that round-trips
        conv = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v).tolist() for k, v in inputs.items()}
        return json.dumps({"inputs": conv}).encode()


class OrtPython:
    """onnxruntime in this process, one thread per run."""

    name = "ORT Python"

    def __init__(self, model):
        self.model = model
        t = time.perf_counter()
        self.eval = self.session(False)
        self.mc = self.session(True)
        self.load_s = time.perf_counter() - t
        self.tiled = {k: np.repeat(v, MC_N, axis=0) for k, v in model.inputs.items()}

    def session(self, mc):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        kw = {"disabled_optimizers": ["EliminateDropout"]} if mc else {}
        path = self.model.path if mc else self.model.eval_path
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)

    def time_eval(self):
        t = time.perf_counter()
        self.eval.run(None, self.model.inputs)
        return time.perf_counter() - t

    def time_mc(self, seed):
        t = time.perf_counter()
        self.mc.run(None, self.tiled)
        return time.perf_counter() - t

    def mc_spread(self):
        out = self.mc.run(None, self.tiled)[0]
        return float(out.std(axis=0).max())


class Server:
    def __init__(self, exe, models_dir, backend, ort_lib, tmp, extra):
        self.name = f"mcd-serve {backend}"
        self.backend = backend
        self.port = free_port()
        self.log_path = tmp / f"server-{backend}.log"
        cmd = [str(exe), "--models", str(models_dir), "--addr", f"127.0.0.1:{self.port}", "--grpc-addr=",
               "--backend", backend, "--request-timeout-secs", "600", "--log-format", "json"] + extra
        if backend == "onnxruntime":
            cmd += ["--ort-lib", str(ort_lib)]
        self.cmd = cmd
        log(f"starting {self.name}: {' '.join(cmd)}")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s=900):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                st, _ = self.request("GET", "/health/ready", timeout=5)
                if st == 200:
                    self.ready_s = time.monotonic() - self.t0
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name} not ready after {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    def request(self, method, path, body=None, timeout=900):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def predict(self, model, body, mc_seed=None, extra=""):
        q = f"?mc_samples={MC_N}&seed={mc_seed}{extra}" if mc_seed is not None else ""
        st, data = self.request("POST", f"/models/{model}/predict{q}", body)
        if st != 200:
            raise SystemExit(f"{self.name}: {model}{q} answered {st}: {data[:500]!r}")
        return data

    def time_eval(self, model):
        t = time.perf_counter()
        self.predict(model.stem, model.body_cache)
        return time.perf_counter() - t

    def tp_eval(self, model):
        """One eval request for the throughput loop: True if answered, False if refused
        with 429 (at capacity: counted, and the client waits 10 ms before the next)."""
        st, data = self.request("POST", f"/models/{model.stem}/predict", model.body_cache)
        if st == 429:
            time.sleep(0.01)
            return False
        if st != 200:
            raise SystemExit(f"{self.name}: {model.stem} answered {st}: {data[:500]!r}")
        return True

    def time_mc(self, model, seed):
        t = time.perf_counter()
        self.predict(model.stem, model.body_cache, mc_seed=seed)
        return time.perf_counter() - t

    def per_model_load(self):
        """Per-model load seconds from the server's "model loaded" log lines (JSON logs)."""
        out = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            f = rec.get("fields", rec)
            if f.get("message") == "model loaded" and "seconds" in f:
                out[str(f.get("model"))] = float(f["seconds"])
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- checks


def check_answers(server, model, ortp):
    """The server's eval (two rows: the batch axis too) against ORT Python and PyTorch, and
    a live MC-20. Returns the largest relative difference to ORT."""
    ans = json.loads(server.predict(model.stem, model.body(model.inputs2)))
    got = np.asarray(ans["outputs"][model.output], dtype=np.float64)
    want = ortp.eval.run(None, model.inputs2)[0].astype(np.float64)
    torch_eval = np.asarray(model.ref["eval"], dtype=np.float64)
    for what, ref in (("onnxruntime in-process", want), ("PyTorch (reference.json)", torch_eval)):
        if got.shape != ref.shape or not np.allclose(got, ref, **TOL):
            raise SystemExit(f"ABORT: {server.name}'s eval answer for {model.stem} differs from {what}: "
                             f"{got.tolist()} vs {ref.tolist()}")
    worst = float(np.max(np.abs(got - want)))
    # (a row of labels answers mean, entropies and summary by default: ask for std)
    mc = json.loads(server.predict(model.stem, model.body_cache, mc_seed=1, extra="&statistics=mean,std"))
    std = float(np.max(np.asarray(mc["outputs"][model.output]["std"], dtype=np.float64)))
    if not std > 0:
        raise SystemExit(f"ABORT: {server.name}'s MC-{MC_N} answer for {model.stem} has zero spread")
    return worst, std


# --------------------------------------------------------------------------- throughput


def closed_loop(fn, conns, duration):
    """conns threads call fn() back to back until duration has passed; returns requests
    completed per second (up to the last completion), the count, and how many fn refused
    (returned False: a 429)."""
    stop_at = time.monotonic() + duration
    counts = [0] * conns
    refused = [0] * conns
    last = [0.0] * conns
    errors = []
    start = time.monotonic()

    def worker(i):
        try:
            while time.monotonic() < stop_at:
                if fn() is False:
                    refused[i] += 1
                    continue
                counts[i] += 1
                last[i] = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    n = sum(counts)
    end = max(last) if n else time.monotonic()
    return n / (end - start) if n else 0.0, n, sum(refused)


# --------------------------------------------------------------------------- main


def machine_rows(args, server_version):
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return [
        "| | |", "|---|---|",
        f"| date | {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} |",
        f"| CPU | {cpu}, {os.cpu_count()} cores (`nproc`) |",
        f"| memory | {mem / 1024 / 1024:.1f} GiB |",
        f"| kernel | {platform.release()} |",
        f"| server | `{args.server}` ({server_version}); bench commit {git} |",
        f"| onnxruntime (Python) / numpy / Python | {ort.__version__} / {np.__version__} / {platform.python_version()} |",
        f"| ORT library for the server | `{args.ort_lib}` |",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="/work/bin/mcd-serve-ort")
    ap.add_argument("--models", default="/work/realsize-models")
    ap.add_argument("--ort-lib", default=None, help="libonnxruntime.so for --backend onnxruntime "
                    "(default: the one in this venv's onnxruntime wheel)")
    ap.add_argument("--backends", default="tract,onnxruntime")
    ap.add_argument("--only", default=",".join(ORDER), help="models, comma-separated")
    ap.add_argument("--eval-rounds", type=int, default=7)
    ap.add_argument("--mc-rounds", type=int, default=3)
    ap.add_argument("--tp-seconds", type=float, default=6.0, help="seconds per throughput cell")
    ap.add_argument("--conns", default="1,4")
    ap.add_argument("--max-memory-bytes", default=str(512 << 20),
                    help="the servers' --max-memory-bytes (default: the server's own, 512 MiB)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--skip-python", action="store_true", help="leave ORT Python out")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args()
    if args.ort_lib is None:
        cands = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
        args.ort_lib = str(cands[0]) if cands else ""
    backends = [b for b in args.backends.split(",") if b]
    conns = [int(c) for c in args.conns.split(",")]
    models_dir = Path(args.models)
    stems = [s for s in args.only.split(",") if s]
    ver = "not run"
    if backends:
        help_text = subprocess.run([args.server, "--help"], capture_output=True, text=True).stdout
        if "--backend" not in help_text:
            log("this server has no --backend flag: tract only")
            backends = ["tract"]
        ver = subprocess.run([args.server, "--version"], capture_output=True, text=True).stdout.strip() or "?"

    loads = [("start", loadavg())]
    snaps = [("start", cpu_snapshot())]
    t_start = time.monotonic()
    models = [Model(models_dir, s) for s in stems]
    for m in models:
        m.body_cache = m.body()

    tmp = Path(tempfile.mkdtemp(prefix="realsize-"))
    servers = []
    pids = lambda: [s.pid for s in servers]
    mem = {}
    ortps = {}
    try:
        # -- loading, one engine after the other
        for b in backends:
            s = Server(args.server, models_dir, b, args.ort_lib, tmp,
                       ["--max-memory-bytes", args.max_memory_bytes] + args.server_arg)
            servers.append(s)
            s.wait_ready()
            mem[(s.name, "after load")] = proc_mem(s.pid)
            log(f"{s.name}: ready after {s.ready_s:.1f} s, RSS {fmt_mb(mem[(s.name, 'after load')]['rss'])}")
            s.load_per_model = s.per_model_load()
            s.info = {}
            for m in models:
                st, data = s.request("GET", f"/models/{m.stem}")
                s.info[m.stem] = json.loads(data) if st == 200 else {"status": st}
        py_base = proc_mem(os.getpid())
        for m in models:
            ortps[m.stem] = OrtPython(m)
        mem[("ORT Python", "after load")] = proc_mem(os.getpid())
        loads.append(("after loading", loadavg()))
        snaps.append(("loading", cpu_snapshot(pids())))

        # -- answers agree before anything is timed
        checks = []
        for m in models:
            ortp = ortps[m.stem]
            for s in servers:
                worst, std = check_answers(s, m, ortp)
                checks.append((s.name, m.stem, worst, std))
                log(f"check: {s.name} {m.stem}: eval within {worst:.2g} of ORT, MC-{MC_N} max std {std:.3g}")
            checks.append(("ORT Python", m.stem, 0.0, ortp.mc_spread()))

        engines = list(servers) + ([] if args.skip_python else ["py"])

        def eng_name(e):
            return "ORT Python" if e == "py" else e.name

        # warm-up: one eval and one MC each
        for m in models:
            for e in engines:
                if e == "py":
                    ortps[m.stem].time_eval(), ortps[m.stem].time_mc(0)
                else:
                    e.time_eval(m), e.time_mc(m, 0)

        # -- latency, interleaved rounds
        lat = {}
        for kind, rounds in (("eval", args.eval_rounds), ("mc", args.mc_rounds)):
            for r in range(rounds):
                order = engines[r % len(engines):] + engines[:r % len(engines)]
                for m in models:
                    for e in order:
                        if e == "py":
                            p = ortps[m.stem]
                            t = p.time_eval() if kind == "eval" else p.time_mc(r + 1)
                        else:
                            t = e.time_eval(m) if kind == "eval" else e.time_mc(m, r + 1)
                        lat.setdefault((eng_name(e), m.stem, kind), []).append(t)
                log(f"latency {kind} round {r + 1}/{rounds} done (load {loadavg()})")
        loads.append(("after latency", loadavg()))
        snaps.append(("latency", cpu_snapshot(pids())))

        # -- throughput, eval, closed loop
        tp = {}
        cell = 0
        for m in models:
            for c in conns:
                order = engines[cell % len(engines):] + engines[:cell % len(engines)]
                cell += 1
                for e in order:
                    fn = ortps[m.stem].time_eval if e == "py" else (lambda e=e, m=m: e.tp_eval(m))
                    rps, n, refused = closed_loop(fn, c, args.tp_seconds)
                    tp[(eng_name(e), m.stem, c)] = (rps, n, refused)
                    log(f"throughput {eng_name(e)} {m.stem} c={c}: {rps:.2f} req/s ({n} requests, {refused} refused 429)")
        loads.append(("after throughput", loadavg()))
        snaps.append(("throughput", cpu_snapshot(pids())))
        for s in servers:
            mem[(s.name, "end")] = proc_mem(s.pid)
        mem[("ORT Python", "end")] = proc_mem(os.getpid())
    finally:
        for s in reversed(servers):
            s.stop()

    # -- report
    names = [s.name for s in servers] + ([] if args.skip_python else ["ORT Python"])
    out = ["# Real-size models: mcd-serve (tract, onnxruntime) and onnxruntime in-process\n",
           "Produced by `bench/realsize/run.py` (models from `bench/realsize/make_models.py`); "
           "method in run.py's docstring.\n", "## Machine\n"]
    out += machine_rows(args, ver)
    out.append("")
    out.append("## Models\n")
    out.append("| model | file | opset | dropout sites in the file | input | output |")
    out.append("|---|---|---|---|---|---|")
    for m in models:
        r = m.ref
        ins = ", ".join(f"{k} {r['shapes'][k]}" for k in r["input_dtypes"])
        out.append(f"| {m.stem} | {r['file_bytes'] / 1e6:.0f} MB{' (external data)' if r['external_data'] else ''} | "
                   f"{r['opset']} | {dropout_cell(r)} | {ins} | {r['output']} {r['shapes'][r['output']]}, {r['kind']} |")
    out.append("")
    out.append(f"## Latency, one row: eval and MC-{MC_N} (medians of interleaved rounds)\n")
    out.append(f"Servers: HTTP round trip from Python over a new connection, native JSON route. "
               f"ORT Python: `sess.run` alone, 1 intra-op thread; MC-{MC_N} = one run over the row tiled {MC_N}×, "
               f"in a session with `disabled_optimizers=[\"EliminateDropout\"]`. "
               f"{args.eval_rounds} eval rounds, {args.mc_rounds} MC rounds.\n")
    out.append("| model | " + " | ".join(f"{n} eval" for n in names) + " | "
               + " | ".join(f"{n} MC-{MC_N}" for n in names) + " |")
    out.append("|---|" + "---:|" * (2 * len(names)))
    for m in models:
        cells = [fmt_t(med(lat.get((n, m.stem, "eval"), []))) for n in names]
        cells += [fmt_t(med(lat.get((n, m.stem, "mc"), []))) for n in names]
        out.append(f"| {m.stem} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"## Throughput, eval, one row a request ({args.tp_seconds:g} s closed loop per cell)\n")
    out.append("Requests completed per second. Servers: default `--workers` (= cores, 2 here). "
               "ORT Python: C threads sharing one eval session, 1 intra-op thread each.\n")
    out.append("| model | " + " | ".join(f"{n} c={c}" for n in names for c in conns) + " |")
    out.append("|---|" + "---:|" * (len(names) * len(conns)))
    for m in models:
        cells = []
        for n in names:
            for c in conns:
                rps, cnt, refused = tp.get((n, m.stem, c), (None, 0, 0))
                cells.append("n/a" if rps is None else f"{rps:.2f} ({cnt}{f', {refused}×429' if refused else ''})")
        out.append(f"| {m.stem} | " + " | ".join(cells) + " |")
    out.append("\n(in brackets: requests completed, and requests refused with 429 `overloaded`, after which "
               "that client waited 10 ms and sent the next; refused requests are not counted as done)\n")
    out.append("## Load time and resident memory\n")
    out.append("Servers: one process with all three models; load = process start to `/health/ready` 200 "
               "(every model loaded and self-checked). ORT Python: both sessions of each model; its memory is "
               f"this Python process (numpy + onnxruntime, {fmt_mb(py_base['rss'])} before any session).\n")
    for sv in servers:
        out.append(f"- {sv.name}: `{' '.join(sv.cmd)}`")
    out.append("")
    out.append("| engine | load, all models | per model | RSS after load | RSS at the end | peak (VmHWM) |")
    out.append("|---|---:|---|---:|---:|---:|")
    for s in servers:
        per = ", ".join(f"{k} {v:.1f} s" for k, v in s.load_per_model.items()) or "not in the log"
        out.append(f"| {s.name} | {s.ready_s:.1f} s | {per} | {fmt_mb(mem[(s.name, 'after load')]['rss'])} | "
                   f"{fmt_mb(mem[(s.name, 'end')]['rss'])} | {fmt_mb(mem[(s.name, 'end')]['hwm'])} |")
    if not args.skip_python:
        total = sum(p.load_s for p in ortps.values())
        per = ", ".join(f"{k} {p.load_s:.1f} s" for k, p in ortps.items())
        out.append(f"| ORT Python | {total:.1f} s | {per} | {fmt_mb(mem[('ORT Python', 'after load')]['rss'])} | "
                   f"{fmt_mb(mem[('ORT Python', 'end')]['rss'])} | {fmt_mb(mem[('ORT Python', 'end')]['hwm'])} |")
    out.append("")
    out.append("## Answers checked before timing\n")
    out.append(f"Eval of two rows against onnxruntime in-process and PyTorch (rtol {TOL['rtol']}, atol {TOL['atol']}); "
               f"MC-{MC_N}'s largest std over the outputs (must be > 0).\n")
    out.append(f"| engine | model | eval max abs diff to ORT Python | MC-{MC_N} max std |")
    out.append("|---|---|---:|---:|")
    for name, stem, worst, std in checks:
        out.append(f"| {name} | {stem} | {worst:.2g} | {std:.3g} |")
    out.append("")
    out.append("## Self-checks and MC form per server (`GET /models/{name}`)\n")
    for s in servers:
        for m in models:
            info = s.info.get(m.stem, {})
            out.append(f"- {s.name}, {m.stem}: " + summarize_info(info))
    out.append("")
    out.append("## Machine load during the run\n")
    out.append("| point | load average 1 / 5 / 15 min |")
    out.append("|---|---|")
    out.extend(f"| {p} | {l} |" for p, l in loads)
    out.append("")
    out.append("CPU used by other processes (from /proc/stat, minus this run and its servers), share of all cores:\n")
    out.append("| section | others |")
    out.append("|---|---|")
    for (_, a), (label, b) in zip(snaps, snaps[1:]):
        out.append(f"| {label} | {others_share(a, b):.0f}% |")
    out.append("")
    out.append(f"Wall time: {time.monotonic() - t_start:.0f} s.\n")
    text = "\n".join(out)
    Path(args.out).write_text(text)
    print(text)


def dropout_cell(r):
    parts = []
    if r.get("dropout_nodes"):
        parts.append(f"{r['dropout_nodes']} Dropout nodes")
    if r.get("random_op_nodes"):
        parts.append(f"{r['random_op_nodes']} written as random ops (Dropout2d: a channel mask)")
    return ", ".join(parts) or "none"


def summarize_info(info):
    """backend, dropout sites by kind, MC availability and the self-checks' outcomes."""
    parts = [f"backend {info.get('backend', '?')}"]
    sites = info.get("dropout_sites")
    if isinstance(sites, list):
        kinds = {}
        for site in sites:
            kinds[site.get("kind", "?")] = kinds.get(site.get("kind", "?"), 0) + 1
        parts.append("dropout sites " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    parts.append("MC available" if info.get("mc_available") else f"MC unavailable: {info.get('mc_unavailable_reason')}")
    for c in info.get("self_checks") or []:
        if isinstance(c, dict):
            detail = c.get("detail") or ""
            short = (": " + detail[:160] + ("…" if len(detail) > 160 else "")) if c.get("result") not in ("pass", "passed") and detail else ""
            parts.append(f"`{c.get('check')}` {c.get('result')}{short}")
    if info.get("graph_fixes"):
        parts.append(f"{len(info['graph_fixes'])} graph fixes")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
