#!/usr/bin/env python3
"""Triton's and KServe's real Python clients against the release binary, over OIP v2 REST
and gRPC.

The clients run unchanged, with their defaults: tritonclient.http sends binary tensors,
no Content-Type, and asks for binary outputs; KServe's InferenceRESTClient sends JSON;
tritonclient.grpc sends raw_input_contents and reads raw_output_contents; KServe's
InferenceGRPCClient sends typed contents for JSON-style data.
Each check compares what a client reads with the server's own native answer to the same
request (eval, and MC dropout for the same seed), and checks that a mode violation and a
wrong shape come back as client errors.

    python tests/clients/oip_clients.py target/release/mcd-serve

Prints one line per check and closes with "N passed, N failed"; exits 1 on any failure.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np

# Each check runs in a process of its own: tritonclient.grpc and kserve both register the
# protocol's `inference.*` messages in protobuf's default pool, so one process cannot
# import both. The imports are therefore inside the checks.

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE = json.load(open(os.path.join(ROOT, "tests/fixtures/reference_outputs.json")))
ROWS = np.asarray(REFERENCE["breast_cancer"]["inputs"], dtype=np.float32)  # [8, 30]
DIGITS = np.asarray(REFERENCE["digits_cnn"]["inputs"], dtype=np.float32)  # [8, 1, 8, 8]


def start_server(binary):
    """The release binary on 127.0.0.1:0 (REST and gRPC), its addresses read from its JSON log."""
    env = dict(os.environ, MCD_ADDR="127.0.0.1:0", MCD_GRPC_ADDR="127.0.0.1:0", MCD_LOG_FORMAT="json",
               MCD_MODELS=os.path.join(ROOT, "models"))
    proc = subprocess.Popen([binary], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    for line in proc.stdout:
        try:
            fields = json.loads(line).get("fields", {})
        except ValueError:
            continue
        if "addr" in fields:
            addr, grpc_addr = fields["addr"], fields["grpc_addr"]
            break
    else:
        raise SystemExit("the server exited before listening")
    # Keep draining its log so it never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://{addr}/health/ready") as r:
                if r.status == 200:
                    return proc, addr, grpc_addr
        except Exception:
            pass
        import time
        time.sleep(0.1)
    raise SystemExit("the server never became ready")


def native(addr, path, inputs):
    req = urllib.request.Request(f"http://{addr}{path}", data=json.dumps({"inputs": inputs}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def assert_equal(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or not np.array_equal(got, want):
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


# --- tritonclient.http ---------------------------------------------------------------

@check
def triton_health_and_metadata(addr):
    import tritonclient.http as triton
    c = triton.InferenceServerClient(url=addr)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("breast_cancer") and not c.is_model_ready("nope")
    meta = c.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"] and "mc_dropout" in meta["extensions"], meta
    m = c.get_model_metadata("breast_cancer")
    assert m["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}], m
    names = [o["name"] for o in m["outputs"]]
    assert names[:3] == ["probabilities", "probabilities.variance", "probabilities.std"], names


def triton_input(x, binary=True):
    import tritonclient.http as triton
    i = triton.InferInput("features", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


@check
def triton_eval_equals_native(addr):
    import tritonclient.http as triton
    c = triton.InferenceServerClient(url=addr)
    want = np.asarray(native(addr, "/predict", ROWS.tolist())["outputs"]["probabilities"], dtype=np.float32)
    # Defaults: binary input, binary output.
    r = c.infer("breast_cancer", [triton_input(ROWS)])
    assert_equal(r.as_numpy("probabilities"), want, "binary eval")
    assert r.get_response()["parameters"]["mode"] == "eval"
    # JSON both ways.
    r = c.infer("breast_cancer", [triton_input(ROWS, binary=False)],
                outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    assert_equal(r.as_numpy("probabilities"), want, "JSON eval")
    # A CNN input of rank 4 on a named model.
    d = triton.InferInput("image", list(DIGITS.shape), "FP32")
    d.set_data_from_numpy(DIGITS)
    want = native(addr, "/models/digits_cnn/predict", DIGITS.tolist())["outputs"]["probabilities"]
    assert_equal(c.infer("digits_cnn", [d]).as_numpy("probabilities"), np.asarray(want, dtype=np.float32), "CNN")


@check
def triton_mc_through_parameters_equals_native(addr):
    import tritonclient.http as triton
    c = triton.InferenceServerClient(url=addr)
    want = native(addr, "/predict?mc_samples=50&seed=7&return_samples=true", ROWS.tolist())["outputs"]["probabilities"]
    for count in (50, 50.0):  # a Python float travels as a JSON double
        r = c.infer("breast_cancer", [triton_input(ROWS)],
                    parameters={"mc_samples": count, "seed": 7, "return_samples": True})
        params = r.get_response()["parameters"]
        assert params == {"mode": "mc_dropout", "mc_samples": 50, "seed": 7}, params
        assert_equal(r.as_numpy("probabilities"), np.asarray(want["mean"], dtype=np.float32), "mean")
        for key in ("variance", "std", "predictive_entropy", "expected_entropy", "mutual_information", "samples"):
            assert_equal(r.as_numpy(f"probabilities.{key}"), np.asarray(want[key], dtype=np.float64), key)


@check
def triton_mode_violation_and_wrong_shape_are_client_errors(addr):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException
    c = triton.InferenceServerClient(url=addr)
    for params, status, words in (
        ({"seed": 7}, "422", "seed"),
        ({"return_samples": True}, "422", "return_samples"),
        ({"mc_sample": 50}, "422", "mc_sample"),
    ):
        try:
            c.infer("breast_cancer", [triton_input(ROWS)], parameters=params)
            raise AssertionError(f"{params} was served")
        except InferenceServerException as e:
            assert e.status() == status and words in e.message(), (e.status(), e.message())
    try:
        c.infer("breast_cancer", [triton_input(ROWS[:, :29])])
        raise AssertionError("a [8, 29] input was served")
    except InferenceServerException as e:
        assert e.status() == "400" and "features" in e.message() and "30" in e.message(), e.message()


# --- KServe InferenceRESTClient --------------------------------------------------------

def kserve_request(x, params=None):
    from kserve import InferInput, InferRequest
    i = InferInput("features", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=False)
    return InferRequest(model_name="breast_cancer", infer_inputs=[i], parameters=params)


async def kserve_checks(addr):
    import httpx
    from kserve import InferenceRESTClient, RESTConfig
    base = f"http://{addr}"
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        assert await client.is_server_live(base)
        assert await client.is_server_ready(base)
        assert await client.is_model_ready(base, "breast_cancer")
        assert not await client.is_model_ready(base, "nope")

        want = native(addr, "/predict", ROWS.tolist())["outputs"]["probabilities"]
        r = await client.infer(base, kserve_request(ROWS), model_name="breast_cancer")
        assert r.model_name == "breast_cancer"
        out = {o.name: o for o in r.outputs}
        assert_equal(out["probabilities"].as_numpy(), np.asarray(want, dtype=np.float32), "eval")

        want = native(addr, "/predict?mc_samples=40&seed=11", ROWS.tolist())["outputs"]["probabilities"]
        r = await client.infer(base, kserve_request(ROWS, {"mc_samples": 40, "seed": 11}), model_name="breast_cancer")
        assert r.parameters["mode"] == "mc_dropout" and r.parameters["seed"] == 11, r.parameters
        out = {o.name: o for o in r.outputs}
        assert_equal(out["probabilities"].as_numpy(), np.asarray(want["mean"], dtype=np.float32), "mean")
        for key in ("variance", "std", "predictive_entropy", "mutual_information"):
            assert_equal(out[f"probabilities.{key}"].as_numpy(), np.asarray(want[key]), key)

        for req, status, words in (
            (kserve_request(ROWS, {"seed": 3}), 422, "seed"),
            (kserve_request(ROWS[:, :29]), 400, "features"),
        ):
            try:
                await client.infer(base, req, model_name="breast_cancer")
                raise AssertionError("served")
            except httpx.HTTPStatusError as e:
                # KServe's client puts our message in its error when the answer is JSON.
                assert e.response.status_code == status and words in str(e), str(e)
    finally:
        await client.close()


@check
def kserve_rest_client(addr):
    asyncio.run(kserve_checks(addr))


# --- tritonclient.grpc -----------------------------------------------------------------

def triton_grpc_input(x):
    import tritonclient.grpc as triton_grpc
    i = triton_grpc.InferInput("features", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


@check
def triton_grpc_eval_mc_and_errors(addr, grpc_addr):
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException
    c = triton_grpc.InferenceServerClient(url=grpc_addr)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("breast_cancer")
    m = c.get_model_metadata("breast_cancer")
    assert m.inputs[0].name == "features" and list(m.inputs[0].shape) == [-1, 30], m
    want = native(addr, "/predict", ROWS.tolist())["outputs"]["probabilities"]
    r = c.infer("breast_cancer", [triton_grpc_input(ROWS)])
    assert_equal(r.as_numpy("probabilities"), np.asarray(want, dtype=np.float32), "eval")
    want = native(addr, "/predict?mc_samples=50&seed=7", ROWS.tolist())["outputs"]["probabilities"]
    for count in (50, 50.0):  # int64_param, and double_param for a Python float
        r = c.infer("breast_cancer", [triton_grpc_input(ROWS)], parameters={"mc_samples": count, "seed": 7})
        assert_equal(r.as_numpy("probabilities"), np.asarray(want["mean"], dtype=np.float32), "mean")
        for key in ("variance", "std", "predictive_entropy", "expected_entropy", "mutual_information"):
            assert_equal(r.as_numpy(f"probabilities.{key}"), np.asarray(want[key]), key)
    for params, inputs, code, words in (
        ({"seed": 7}, [triton_grpc_input(ROWS)], "StatusCode.INVALID_ARGUMENT", "seed"),
        (None, [triton_grpc_input(ROWS[:, :29])], "StatusCode.INVALID_ARGUMENT", "features"),
    ):
        try:
            c.infer("breast_cancer", inputs, parameters=params)
            raise AssertionError("served")
        except InferenceServerException as e:
            assert e.status() == code and words in e.message(), (e.status(), e.message())
    try:
        c.infer("nope", [triton_grpc_input(ROWS)])
        raise AssertionError("served")
    except InferenceServerException as e:
        assert e.status() == "StatusCode.NOT_FOUND", e.status()


# --- KServe InferenceGRPCClient --------------------------------------------------------

async def kserve_grpc_checks(addr, grpc_addr):
    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    client = InferenceGRPCClient(url=grpc_addr)
    try:
        assert await client.is_server_ready() and await client.is_server_live()
        assert await client.is_model_ready("breast_cancer")
        want = native(addr, "/predict?mc_samples=30&seed=4", ROWS.tolist())["outputs"]["probabilities"]
        for binary in (False, True):  # typed contents for lists, raw for numpy
            i = InferInput("features", list(ROWS.shape), "FP32")
            i.set_data_from_numpy(ROWS, binary_data=binary)
            r = await client.infer(InferRequest(model_name="breast_cancer", infer_inputs=[i],
                                                parameters={"mc_samples": 30, "seed": 4}))
            out = {o.name: o for o in r.outputs}
            assert_equal(out["probabilities"].as_numpy(), np.asarray(want["mean"], dtype=np.float32), "mean")
            assert_equal(out["probabilities.std"].as_numpy(), np.asarray(want["std"]), "std")
        i = InferInput("features", list(ROWS.shape), "FP32")
        i.set_data_from_numpy(ROWS, binary_data=False)
        try:
            await client.infer(InferRequest(model_name="breast_cancer", infer_inputs=[i], parameters={"seed": 4}))
            raise AssertionError("served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "seed" in e.details(), e
    finally:
        await client.close()


@check
def kserve_grpc_client(addr, grpc_addr):
    asyncio.run(kserve_grpc_checks(addr, grpc_addr))


def run_one(name, addr, grpc_addr):
    """The child process: one check; exit 0 when it passes."""
    fn = next(f for f in CHECKS if f.__name__ == name)
    fn(addr, grpc_addr) if fn.__code__.co_argcount == 2 else fn(addr)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--check":
        run_one(*sys.argv[2:])
        return
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/mcd-serve")
    proc, addr, grpc_addr = start_server(binary)
    passed = failed = 0
    try:
        for fn in CHECKS:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--check", fn.__name__, addr, grpc_addr],
                               timeout=300)
            if r.returncode == 0:
                passed += 1
                print(f"ok   {fn.__name__}", flush=True)
            else:
                failed += 1
                print(f"FAIL {fn.__name__}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        if code != 0:
            failed += 1
            print(f"FAIL the server exited with {code} on SIGTERM")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
