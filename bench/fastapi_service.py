"""The service a team would write instead of mcd-serve: FastAPI on uvicorn, onnxruntime with
live dropout for MC, numpy statistics. bench/run load-tests it beside mcd-serve.

    MCD_MODELS=models uvicorn bench.fastapi_service:app --workers 2 --host 127.0.0.1 \
        --port 8000 --no-access-log --log-level warning

(run from the repository root; bench/bench.py starts it exactly like that, with uvicorn
from bench/.venv, which pins fastapi, uvicorn[standard] (uvloop + httptools) and
onnxruntime).

It speaks mcd-serve's native API for what the benchmark sends: `POST /models/{name}/predict`
with `{"inputs": [[...]]}` (one-input models) and `?mc_samples=N&seed=S`, and answers with
the same JSON: eval `{"model", "mode": "eval", "outputs": {name: rows}}`; MC `{"model",
"mode": "mc_dropout", "mc_samples", "seed", "outputs": {name: {"mean", "variance", "std"
[, "predictive_entropy", "expected_entropy", "mutual_information"] + the calibration's
"intervals" or "prediction_sets"/"refer"...}}}`, so both servers do the same work per
request and send answers of about the same size.

Design choices, as a competent team would make them for these models:
- One process per core (`--workers 2`), each with its own onnxruntime sessions, built once
  at start-up, `intra_op_num_threads=1` and `inter_op_num_threads=1`: the parallelism is
  the processes, and ORT threads would only fight them for the same 2 cores.
- Two sessions per model per worker. Eval: ORT's default graph optimisations, whose
  `EliminateDropout` deletes the Dropout nodes (right for eval). MC: the same file with
  `disabled_optimizers=["EliminateDropout"]`, so the torch-style
  `Dropout(training_mode=true)` stays live and samples a fresh mask per element per run
  (bench.py checks that ORT's samples really differ). One session cannot do both: the
  bundled models' `training_mode` is a Constant in the graph, not an input.
- MC-N is one batched pass: the request's rows tiled N times along the batch axis, then
  numpy mean / unbiased variance / std in float64 and, for probability outputs, the
  entropies in nats (predictive = H[mean], expected = mean H[p_s], mutual information =
  their difference), as mcd-serve computes them.
- `seed`: `onnxruntime.set_seed(seed)` right before the MC pass makes ORT's Dropout masks
  reproducible in this process (checked: same seed, same samples). Without one a seed is
  drawn and reported, as mcd-serve does. The handler never awaits between set_seed and
  run, so no other request can interleave.
- `async def` handlers that run inference inline on the event loop, not `def` handlers
  (which Starlette sends to a thread pool): a pass takes 10-200 µs here, less than the
  thread hand-off, and with one worker process per core there is no idle core for a pool
  thread to use anyway.
- The body is read as bytes and parsed with orjson straight into numpy, not declared as a
  pydantic model: validating `list[list[float]]` in pydantic costs per element and checks
  nothing that numpy's conversion plus a shape check does not, and FastAPI's docs point to
  `Request` + a custom response class for exactly this. Answers go out through orjson
  (`ORJSONResponse`'s serializer with OPT_SERIALIZE_NUMPY) from float64 arrays, so floats
  print with the same round-trip precision as mcd-serve's.
- The calibration file next to each model (`<stem>.calibration.json`, written by
  `mcd-serve calibrate`) is read the same way the server applies it: split-conformal
  intervals for regression outputs, LAC prediction sets and entropy-threshold referral for
  probability outputs. That is a few numpy operations per request.
- Errors are JSON `{"error", "error_type"}` with mcd-serve's statuses for what a client
  can get wrong here (unknown model 404, bad body 400, bad parameter 422).
"""

import json
import os
import random
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

MODELS_DIR = Path(os.environ.get("MCD_MODELS", "models"))
MC_MAX = 1000
SEED_MAX = 1 << 53  # as mcd-serve: drawn seeds stay exact in JavaScript
ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=ORJSON_OPTS)


def error(status, error_type, message):
    return JsonResponse({"error": message, "error_type": error_type}, status_code=status)


def session(path, mc):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    kw = {"disabled_optimizers": ["EliminateDropout"]} if mc else {}
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)


class Model:
    def __init__(self, path: Path):
        self.name = path.stem
        self.eval = session(path, mc=False)
        self.mc = session(path, mc=True)
        inputs = self.eval.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: this service serves one-input models only")
        self.input_name = inputs[0].name
        # [batch, fixed dims...]; the first axis is the batch
        self.fixed = [d if isinstance(d, int) else None for d in inputs[0].shape[1:]]
        self.outputs = [o.name for o in self.eval.get_outputs()]
        meta_path = path.with_suffix(".model.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.probability_outputs = set(meta.get("probability_outputs", []))
        self.refer_target = float(meta.get("refer_target_error", 0.02))
        cal_path = path.with_name(f"{path.stem}.calibration.json")
        self.calibration = json.loads(cal_path.read_text())["outputs"] if cal_path.exists() else {}

    def parse(self, body: bytes):
        """The request's input as float32 [batch, ...], or an error response."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return error(400, "malformed_json", f"the body is not JSON: {e}")
        if not isinstance(doc, dict) or "inputs" not in doc:
            return error(400, "malformed_json", 'expected an object {"inputs": [...]}')
        inputs = doc["inputs"]
        if isinstance(inputs, dict):
            if set(inputs) != {self.input_name}:
                return error(400, "unknown_input", f"the model's one input is '{self.input_name}'")
            inputs = inputs[self.input_name]
        try:
            x = np.asarray(inputs, dtype=np.float32)
        except (ValueError, TypeError) as e:
            return error(400, "invalid_value", f"input '{self.input_name}': {e}")
        want = "[batch, " + ", ".join("?" if d is None else str(d) for d in self.fixed) + "]"
        if x.ndim != len(self.fixed) + 1 or x.shape[0] < 1 or any(
            d is not None and d != n for d, n in zip(self.fixed, x.shape[1:])
        ):
            return error(400, "shape_mismatch",
                         f"input '{self.input_name}': expected shape {want}, got {list(x.shape)}")
        if not np.isfinite(x).all():
            return error(400, "invalid_value", f"input '{self.input_name}': non-finite value")
        return x

    def run_eval(self, x):
        ys = self.eval.run(None, {self.input_name: x})
        return {name: y.astype(np.float64) for name, y in zip(self.outputs, ys)}

    def run_mc(self, x, n, seed):
        b = x.shape[0]
        tiled = np.tile(x, (n,) + (1,) * (x.ndim - 1))  # sample s = rows s*b .. (s+1)*b
        ort.set_seed(seed)
        ys = self.mc.run(None, {self.input_name: tiled})
        out = {}
        for name, y in zip(self.outputs, ys):
            s = y.astype(np.float64).reshape((n, b) + y.shape[1:])
            mean = s.mean(axis=0)
            var = s.var(axis=0, ddof=1)
            o = {"mean": mean, "variance": var, "std": np.sqrt(var)}
            if name in self.probability_outputs:
                pe = entropy(mean)
                ee = entropy(s).mean(axis=0)
                o["predictive_entropy"] = pe
                o["expected_entropy"] = ee
                o["mutual_information"] = pe - ee
            self.calibrate(name, o)
            out[name] = o
        return out

    def calibrate(self, name, o):
        cal = self.calibration.get(name)
        if cal is None:
            return
        if cal["kind"] == "regression":
            noise = np.asarray(cal["noise_variance"], dtype=np.float64)
            total = np.sqrt(o["std"] ** 2 + noise)  # broadcasts over the last axis
            intervals = {}
            for level in cal["intervals"]:
                q = level["quantile"]
                if any(v is None for v in q):
                    qa = np.array([np.nan if v is None else v for v in q])
                else:
                    qa = np.asarray(q, dtype=np.float64)
                half = qa * total
                lower, upper = o["mean"] - half, o["mean"] + half
                intervals[fmt_level(level["level"])] = {
                    "lower": none_where_nan(lower), "upper": none_where_nan(upper),
                }
            o["intervals"] = intervals
        else:
            mean = o["mean"].reshape(-1, o["mean"].shape[-1])
            # classes from most to least probable, ties: lower index first (stable sort)
            order = np.argsort(-mean, axis=1, kind="stable")
            ranked = np.take_along_axis(mean, order, axis=1)
            sets = {}
            for level in cal["sets"]:
                t = level["threshold"]
                if t is None:
                    sets[fmt_level(level["level"])] = order.tolist()
                    continue
                keep = (1.0 - ranked) <= t
                keep[:, 0] = True
                # a prefix of the ranking: stop at the first class outside the threshold
                count = np.where(keep.all(axis=1), keep.shape[1], np.argmin(keep, axis=1))
                sets[fmt_level(level["level"])] = [order[i, :c].tolist() for i, c in enumerate(count)]
            o["prediction_sets"] = sets
            ref = next(r for r in cal["referral"] if abs(r["target_error"] - self.refer_target) < 1e-12)
            t = ref["threshold"]
            pe = o["predictive_entropy"]
            o["refer"] = np.ones(pe.shape, dtype=bool) if t is None else pe > t
            o["refer_threshold"] = t
            o["refer_target_error"] = self.refer_target


def entropy(p):
    """Entropy in nats over the last axis, 0·log 0 = 0."""
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def fmt_level(x):
    return str(float(x))  # "0.8", "0.95": the keys mcd-serve uses


def none_where_nan(a):
    if not np.isnan(a).any():
        return a
    return np.where(np.isnan(a), None, a).tolist()


MODELS = {}


@asynccontextmanager
async def lifespan(app):
    # each worker process loads its own sessions before it accepts a connection
    for path in sorted(MODELS_DIR.glob("*.onnx")):
        MODELS[path.stem] = Model(path)
    yield


app = FastAPI(title="MC dropout on onnxruntime", lifespan=lifespan,
              openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/health/ready")
async def ready():
    return JsonResponse({"ready": bool(MODELS)}, status_code=200 if MODELS else 503)


@app.post("/models/{name}/predict")
async def predict(name: str, request: Request):
    model = MODELS.get(name)
    if model is None:
        return error(404, "model_not_found", f"no model '{name}'")
    q = request.query_params
    unknown = set(q) - {"mc_samples", "seed"}
    if unknown:
        return error(422, "invalid_parameter", f"unknown query parameter(s): {sorted(unknown)}")
    x = model.parse(await request.body())
    if isinstance(x, Response):
        return x
    if "mc_samples" not in q:
        if "seed" in q:
            return error(422, "mode_mismatch", "'seed' only applies to MC dropout: add mc_samples=N")
        return JsonResponse({"model": name, "mode": "eval", "outputs": model.run_eval(x)})
    try:
        n = int(q["mc_samples"])
        if not 2 <= n <= MC_MAX:
            raise ValueError
    except ValueError:
        return error(422, "invalid_parameter", f"mc_samples must be an integer in [2, {MC_MAX}]")
    if "seed" in q:
        try:
            seed = int(q["seed"])
            if not 0 <= seed < 1 << 64:
                raise ValueError
        except ValueError:
            return error(422, "invalid_parameter", "seed must be an unsigned 64-bit integer")
    else:
        seed = random.randrange(SEED_MAX)
    # ORT's set_seed takes a signed 64-bit value
    outputs = model.run_mc(x, n, seed if seed < 1 << 63 else seed - (1 << 64))
    return JsonResponse({"model": name, "mode": "mc_dropout", "mc_samples": n, "seed": seed, "outputs": outputs})
