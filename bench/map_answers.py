"""Answer sizes and latencies of a 256x256 three-class segmentation map at MC-20.

Builds a small fully convolutional segmenter (three convolutions, two training-mode Dropout
nodes, Softmax over axis 1; seeded random weights: the sizes and the encoding costs do not
depend on what the weights learned), serves it with the real server, and sends one image
per request over every protocol and statistic choice, timing each 7 times (median).

    python bench/map_answers.py --server target/release/mcd-serve

Needs numpy, onnx and tritonclient[grpc,http] (the CI client venv plus onnx will do:
tests/clients/requirements.txt and `pip install onnx`).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE, CLASSES, SAMPLES, REPEATS = 256, 3, 20, 7
ALL = "mean,variance,std,predictive_entropy,expected_entropy,mutual_information,summary"


def model_bytes():
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name, x, c_in, c_out, k):
        w = (rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32)
        b = np.zeros(c_out, np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], pads=[k // 2] * 4))
        return name

    def dropout(name, x):
        inits.append(numpy_helper.from_array(np.array(0.2, np.float32), f"{name}_ratio"))
        inits.append(numpy_helper.from_array(np.array(True), f"{name}_training"))
        nodes.append(helper.make_node("Dropout", [x, f"{name}_ratio", f"{name}_training"], [name]))
        return name

    h = conv("c1", "image", 1, 8, 3)
    nodes.append(helper.make_node("Relu", [h], ["r1"]))
    h = dropout("d1", "r1")
    h = conv("c2", h, 8, 8, 3)
    nodes.append(helper.make_node("Relu", [h], ["r2"]))
    h = dropout("d2", "r2")
    h = conv("c3", h, 8, CLASSES, 1)
    nodes.append(helper.make_node("Softmax", [h], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES, SIZE, SIZE])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        data = r.read()
        assert r.status == 200, (r.status, data[:300])
    return time.perf_counter() - t0, len(data)


def timed(f):
    runs = [f() for _ in range(REPEATS)]
    return statistics.median(t for t, _ in runs), runs[0][1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="target/release/mcd-serve")
    args = ap.parse_args()
    import tritonclient.grpc as grpcclient

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "segmenter.onnx"), "wb") as f:
        f.write(model_bytes())
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [args.server, "--models", folder, "--addr", f"127.0.0.1:{http_port}", "--grpc-addr", f"127.0.0.1:{grpc_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{base}/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.1)
        image = np.random.default_rng(1).random((1, 1, SIZE, SIZE), dtype=np.float32)
        native_body = json.dumps({"inputs": image.tolist()}).encode()
        mc = f"mc_samples={SAMPLES}&seed=1"
        rows = []

        def native(query, what):
            t, n = timed(lambda: post(f"{base}/models/segmenter/predict?{query}", native_body))
            rows.append((what, n, t))

        native("", "native, eval")
        native(mc, "native, MC-20, default (mean, predictive entropy, mutual information, summary)")
        native(f"{mc}&statistics={ALL}", "native, MC-20, every statistic")
        native(f"{mc}&statistics=summary", "native, MC-20, statistics=summary")

        def oip(binary, what):
            header = json.dumps({
                "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, SIZE, SIZE],
                            "parameters": {"binary_data_size": image.nbytes}}],
                "parameters": {"mc_samples": SAMPLES, "seed": 1, "binary_data_output": binary},
            }).encode()
            body = header + image.tobytes()
            headers = {"Inference-Header-Content-Length": str(len(header))}
            t, n = timed(lambda: post(f"{base}/v2/models/segmenter/infer", body, headers))
            rows.append((what, n, t))

        oip(False, "OIP REST, MC-20, default, JSON data")
        oip(True, "OIP REST, MC-20, default, binary data")

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        inp = grpcclient.InferInput("image", [1, 1, SIZE, SIZE], "FP32")
        inp.set_data_from_numpy(image)

        def grpc_call():
            t0 = time.perf_counter()
            r = client.infer("segmenter", [inp], parameters={"mc_samples": SAMPLES, "seed": 1})
            return time.perf_counter() - t0, r.get_response().ByteSize()

        t, n = timed(grpc_call)
        rows.append(("gRPC, MC-20, default (raw contents)", n, t))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"| {SIZE}x{SIZE}, {CLASSES} classes, one image | answer bytes | median latency |")
    print("|---|---|---|")
    for what, n, t in rows:
        print(f"| {what} | {n / 1e6:.2f} MB | {t * 1e3:.0f} ms |")


if __name__ == "__main__":
    sys.exit(main())
