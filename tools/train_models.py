#!/usr/bin/env python3
"""Train the three demo models for mcd-serve and export them to ONNX.

Everything is plain numpy (hand-written forward/backward passes, Adam,
mini-batches, inverted dropout active during training).  The graphs are
built with ``onnx.helper`` and mimic what
``torch.onnx.export(..., training=TrainingMode.TRAINING)`` produces for
dropout: every dropout site is an opset-13+ ``Dropout(x, ratio,
training_mode)`` node whose ``ratio`` (float scalar) and ``training_mode``
(bool scalar, true) inputs are outputs of ``Constant`` nodes, and which, like
torch's export, declares the (unused) boolean ``mask`` output.

Writes into ``models/``:
  breast_cancer.onnx, breast_cancer.model.json
  diabetes.onnx,      diabetes.model.json
  digits_cnn.onnx,    digits_cnn.model.json
and the calibration rows (JSON Lines, as ``mcd-serve calibrate --data`` reads them) into
``tools/calibration-data/<model>.jsonl``.

Splits: the held-out test set is sklearn's ``train_test_split(test_size=0.2,
random_state=0)`` (stratified for the classifiers), as before; the calibration set is
carved out of the other 80% (``CAL_FRACTION`` of it, same seed, stratified likewise), and
the model trains on the rest. Calibrate afterwards with
``mcd-serve calibrate --model <name> --data tools/calibration-data/<name>.jsonl``.

Usage (from the repository root):
  tools/.venv/bin/python tools/train_models.py

The script is deterministic: single-threaded BLAS and fixed seeds, so running
it twice produces byte-identical files.
"""

import os

# Single-threaded BLAS: reproducible float results and it keeps us on one core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(REPO_ROOT, "models")

CAL_DIR = os.path.join(REPO_ROOT, "tools", "calibration-data")
# Share of the training 80% held back for conformal calibration. Large enough that the
# 0.99 level is bounded (n >= 99) and that a 2% referral target can be met with a 95%
# upper bound (at least 149 accepted rows with no error).
CAL_FRACTION = 0.4

OPSET = 17
IR_VERSION = 8
SPLIT_SEED = 0
F32 = np.float32


# --------------------------------------------------------------------------
# Data (shared with tools/make_fixtures.py)
# --------------------------------------------------------------------------

def load_breast_cancer_split():
    """Raw features (float32) and int labels, stratified 80/20 split, seed 0."""
    d = load_breast_cancer()
    return train_test_split(d.data.astype(F32), d.target.astype(np.int64),
                            test_size=0.2, random_state=SPLIT_SEED, stratify=d.target)


def load_diabetes_split():
    """sklearn's (already mean-centred / scaled) features, target in original units."""
    d = load_diabetes()
    return train_test_split(d.data.astype(F32), d.target.astype(F32),
                            test_size=0.2, random_state=SPLIT_SEED)


def load_digits_split():
    """Raw 8x8 images (values 0..16) as float32 [N,1,8,8], stratified 80/20, seed 0."""
    d = load_digits()
    X = d.images.astype(F32)[:, None, :, :]
    return train_test_split(X, d.target.astype(np.int64),
                            test_size=0.2, random_state=SPLIT_SEED, stratify=d.target)


def carve_calibration(Xtr, ytr, stratify):
    """(X_fit, X_cal, y_fit, y_cal): the calibration split out of the training split."""
    return train_test_split(Xtr, ytr, test_size=CAL_FRACTION, random_state=SPLIT_SEED,
                            stratify=ytr if stratify else None)


def _short(v):
    """A float32 as its shortest decimal (what the server parses back to the same f32)."""
    return float(str(F32(v)))


def nested(a):
    return [nested(x) for x in a] if np.ndim(a) > 0 else _short(a)


def write_calibration_rows(name, X, y):
    """One line per row: {"inputs": [row], "target": class index or value}."""
    os.makedirs(CAL_DIR, exist_ok=True)
    with open(os.path.join(CAL_DIR, f"{name}.jsonl"), "w") as f:
        for x, t in zip(X, y):
            target = int(t) if np.issubdtype(np.asarray(t).dtype, np.integer) else _short(t)
            f.write(json.dumps({"inputs": [nested(x)], "target": target}, separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------
# Tiny numpy layer library
# --------------------------------------------------------------------------

class Layer:
    params = ()  # names of trainable attributes

    def forward(self, x, train, rng):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError


class Affine(Layer):
    """y = x @ W.T + b with W stored [out, in] (torch Linear layout -> Gemm transB=1)."""
    params = ("W", "b")

    def __init__(self, name, n_in, n_out, rng):
        self.name = name
        bound = np.sqrt(6.0 / n_in)  # He-uniform (for ReLU nets)
        self.W = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(F32)
        self.b = np.zeros(n_out, dtype=F32)

    def forward(self, x, train, rng):
        self.x = x
        return x @ self.W.T + self.b

    def backward(self, dout):
        self.dW = dout.T @ self.x
        self.db = dout.sum(axis=0)
        return dout @ self.W


class Relu(Layer):
    def __init__(self, name):
        self.name = name

    def forward(self, x, train, rng):
        self.pos = x > 0
        return np.where(self.pos, x, F32(0))

    def backward(self, dout):
        return np.where(self.pos, dout, F32(0))


class Dropout(Layer):
    """Inverted dropout: keep with prob 1-p and scale kept values by 1/(1-p)."""

    def __init__(self, name, ratio):
        self.name = name
        self.ratio = float(ratio)

    def forward(self, x, train, rng):
        if not train:
            self.mask = None
            return x
        keep = rng.random(x.shape) >= self.ratio
        self.mask = keep.astype(F32) / F32(1.0 - self.ratio)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask


class Conv3x3(Layer):
    """3x3 convolution, stride 1, pad 1 (ONNX Conv = cross-correlation), via im2col."""
    params = ("W", "b")

    def __init__(self, name, c_in, c_out, rng):
        self.name = name
        fan_in = c_in * 9
        bound = np.sqrt(6.0 / fan_in)
        self.W = rng.uniform(-bound, bound, size=(c_out, c_in, 3, 3)).astype(F32)
        self.b = np.zeros(c_out, dtype=F32)

    def forward(self, x, train, rng):
        n, c, h, w = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n,c,h,w,3,3
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)
        self.cols, self.xshape = cols, x.shape
        out = cols @ self.W.reshape(self.W.shape[0], -1).T + self.b  # (n*h*w, c_out)
        return np.ascontiguousarray(out.reshape(n, h, w, -1).transpose(0, 3, 1, 2))

    def backward(self, dout):
        n, c, h, w = self.xshape
        c_out = self.W.shape[0]
        d = dout.transpose(0, 2, 3, 1).reshape(n * h * w, c_out)
        self.dW = (d.T @ self.cols).reshape(self.W.shape)
        self.db = d.sum(axis=0)
        dcols = (d @ self.W.reshape(c_out, -1)).reshape(n, h, w, c, 3, 3)
        dxp = np.zeros((n, c, h + 2, w + 2), dtype=F32)
        for i in range(3):
            for j in range(3):
                dxp[:, :, i:i + h, j:j + w] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, 1:-1, 1:-1]


class MaxPool2(Layer):
    """2x2 max pool, stride 2."""

    def __init__(self, name):
        self.name = name

    def forward(self, x, train, rng):
        n, c, h, w = x.shape
        win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self.arg = win.argmax(axis=-1)
        self.xshape = x.shape
        return np.take_along_axis(win, self.arg[..., None], axis=-1)[..., 0]

    def backward(self, dout):
        n, c, h, w = self.xshape
        dwin = np.zeros((n, c, h // 2, w // 2, 4), dtype=F32)
        np.put_along_axis(dwin, self.arg[..., None], dout[..., None], axis=-1)
        return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


class Flatten(Layer):
    def __init__(self, name):
        self.name = name

    def forward(self, x, train, rng):
        self.xshape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self.xshape)


def net_forward(layers, x, train, rng=None):
    for layer in layers:
        x = layer.forward(x, train, rng)
    return x


def net_backward(layers, dout):
    for layer in reversed(layers):
        dout = layer.backward(dout)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Adam:
    def __init__(self, layers, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
        self.layers, self.lr, self.b1, self.b2, self.eps, self.wd = layers, lr, b1, b2, eps, weight_decay
        self.t = 0
        self.m = {}
        self.v = {}
        for li, layer in enumerate(layers):
            for p in layer.params:
                self.m[li, p] = np.zeros_like(getattr(layer, p))
                self.v[li, p] = np.zeros_like(getattr(layer, p))

    def step(self):
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for li, layer in enumerate(self.layers):
            for p in layer.params:
                w = getattr(layer, p)
                g = getattr(layer, "d" + p)
                if self.wd and p == "W":
                    g = g + self.wd * w
                m = self.m[li, p] = self.b1 * self.m[li, p] + (1 - self.b1) * g
                v = self.v[li, p] = self.b2 * self.v[li, p] + (1 - self.b2) * g * g
                upd = self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
                setattr(layer, p, (w - upd).astype(F32))


def train(layers, X, y, loss, epochs, batch_size, lr, seed, weight_decay=0.0):
    """Mini-batch Adam with dropout active. loss in {"xent", "mse"}. Returns final epoch loss."""
    rng = np.random.default_rng(seed)
    opt = Adam(layers, lr=lr, weight_decay=weight_decay)
    n = X.shape[0]
    for _epoch in range(epochs):
        perm = rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb, yb = X[idx], y[idx]
            out = net_forward(layers, xb, train=True, rng=rng)
            if loss == "xent":
                p = softmax(out)
                total += float(-np.log(p[np.arange(len(idx)), yb] + 1e-12).sum())
                dout = p
                dout[np.arange(len(idx)), yb] -= 1
                dout /= len(idx)
            else:
                diff = out[:, 0] - yb
                total += float((diff ** 2).sum())
                dout = (2.0 * diff / len(idx))[:, None]
            net_backward(layers, dout.astype(F32))
            opt.step()
    return total / n


def mc_forward(layers, x, n_samples, seed):
    """Monte-Carlo dropout in numpy (own masks). Returns [n_samples, N, ...] raw outputs."""
    rng = np.random.default_rng(seed)
    return np.stack([net_forward(layers, x, train=True, rng=rng) for _ in range(n_samples)])


# --------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------

class GraphBuilder:
    def __init__(self):
        self.nodes = []
        self.inits = []

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, outputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def dropout(self, x, name, ratio):
        """torch-style training-mode Dropout: Constant ratio, Constant training_mode=true."""
        r = self.node("Constant", [], [f"{name}_ratio"], f"{name}_ratio_const",
                      value=helper.make_tensor("value", TensorProto.FLOAT, [], [float(ratio)]))
        t = self.node("Constant", [], [f"{name}_training_mode"], f"{name}_training_mode_const",
                      value=helper.make_tensor("value", TensorProto.BOOL, [], [True]))
        return self.node("Dropout", [x, r, t], [f"{name}_out", f"{name}_mask"], name)

    def layers(self, layers, x):
        for layer in layers:
            n = layer.name
            if isinstance(layer, Affine):
                x = self.node("Gemm", [x, self.init(f"{n}.weight", layer.W), self.init(f"{n}.bias", layer.b)],
                              [f"{n}_out"], n, alpha=1.0, beta=1.0, transB=1)
            elif isinstance(layer, Conv3x3):
                x = self.node("Conv", [x, self.init(f"{n}.weight", layer.W), self.init(f"{n}.bias", layer.b)],
                              [f"{n}_out"], n, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                              dilations=[1, 1], group=1)
            elif isinstance(layer, Relu):
                x = self.node("Relu", [x], [f"{n}_out"], n)
            elif isinstance(layer, Dropout):
                x = self.dropout(x, n, layer.ratio)
            elif isinstance(layer, MaxPool2):
                x = self.node("MaxPool", [x], [f"{n}_out"], n, kernel_shape=[2, 2], strides=[2, 2])
            elif isinstance(layer, Flatten):
                x = self.node("Flatten", [x], [f"{n}_out"], n, axis=1)
            else:
                raise TypeError(layer)
        return x

    def model(self, graph_name, inputs, outputs, doc):
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="mcd-serve tools/train_models.py", producer_version="1")
        model.ir_version = IR_VERSION
        model.doc_string = doc
        onnx.checker.check_model(model, full_check=True)
        return model


def tensor_info(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch"] + list(dims))


# --------------------------------------------------------------------------
# ORT verification
# --------------------------------------------------------------------------

def verify_with_ort(path, input_name, x, numpy_eval_out, rtol=0.0, atol=1e-5):
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {input_name: x})[0]
    max_abs = float(np.max(np.abs(out - numpy_eval_out)))
    np.testing.assert_allclose(out, numpy_eval_out, rtol=rtol, atol=atol)
    # Again: determinism of the eval session.
    assert np.array_equal(out, sess.run(None, {input_name: x})[0])

    varying = {}
    for label, so in (("ORT_DISABLE_ALL", _so_disable_all()), ("disabled EliminateDropout", None)):
        if so is None:
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=["EliminateDropout"])
        else:
            s = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        a = s.run(None, {input_name: x})[0]
        b = s.run(None, {input_name: x})[0]
        assert not np.array_equal(a, b), f"{path}: {label}: outputs did not vary"
        varying[label] = float(np.max(np.abs(a - b)))
    return max_abs, varying


def _so_disable_all():
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def r6(v):
    return round(float(v), 6)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def build_breast_cancer():
    seed, ratio, epochs, bs, lr = 1, 0.3, 150, 32, 1e-3
    Xtr, Xte, ytr, yte = load_breast_cancer_split()
    Xtr, Xcal, ytr, ycal = carve_calibration(Xtr, ytr, stratify=True)
    write_calibration_rows("breast_cancer", Xcal, ycal)
    mean = Xtr.mean(axis=0).astype(F32)
    std = Xtr.std(axis=0).astype(F32)
    norm = lambda X: ((X - mean) / std).astype(F32)  # noqa: E731  (same ops as the graph)

    rng = np.random.default_rng(seed)
    layers = [Affine("fc1", 30, 64, rng), Relu("relu1"), Dropout("dropout1", ratio),
              Affine("fc2", 64, 32, rng), Relu("relu2"), Dropout("dropout2", ratio),
              Affine("fc3", 32, 2, rng)]
    t0 = time.time()
    final_loss = train(layers, norm(Xtr), ytr, "xent", epochs, bs, lr, seed)
    train_s = time.time() - t0

    p_te = softmax(net_forward(layers, norm(Xte), train=False)).astype(F32)
    acc = float((p_te.argmax(1) == yte).mean())
    mc = softmax(mc_forward(layers, norm(Xte), 200, seed + 100)).mean(axis=0)
    mc_acc = float((mc.argmax(1) == yte).mean())
    train_acc = float((net_forward(layers, norm(Xtr), train=False).argmax(1) == ytr).mean())

    g = GraphBuilder()
    x = g.node("Sub", ["features", g.init("feature_mean", mean)], ["centered"], "standardize_sub")
    x = g.node("Div", [x, g.init("feature_std", std)], ["standardized"], "standardize_div")
    x = g.layers(layers, x)
    g.node("Softmax", [x], ["probabilities"], "softmax", axis=-1)
    model = g.model("breast_cancer_mlp", [tensor_info("features", [30])], [tensor_info("probabilities", [2])],
                    "Breast cancer (sklearn) MLP with MC dropout; input: 30 raw features; "
                    "output: [P(malignant), P(benign)] (class 0 = malignant, 1 = benign).")
    path = os.path.join(MODELS_DIR, "breast_cancer.onnx")
    onnx.save(model, path)
    max_abs, varying = verify_with_ort(path, "features", Xte, p_te)

    metrics = {"test_accuracy": r6(acc), "test_accuracy_mc_mean_200": r6(mc_acc),
               "train_accuracy_eval_mode": r6(train_acc)}
    write_json(os.path.join(MODELS_DIR, "breast_cancer.model.json"), {
        "description": "Breast cancer Wisconsin (sklearn load_breast_cancer) MLP 30-64-32-2 with two "
                       "dropout layers (p=0.3). Input 'features': the 30 raw (unscaled) features; "
                       "standardization is baked into the graph. Output 'probabilities': softmax over "
                       "[malignant, benign] (class 0 = malignant, 1 = benign).",
        "probability_outputs": ["probabilities"],
        "metrics": metrics,
        "training": {"epochs": epochs, "batch_size": bs, "optimizer": "adam", "learning_rate": lr,
                     "loss": "cross_entropy", "dropout_ratio": ratio, "dropout_nodes": ["dropout1", "dropout2"],
                     "seed": seed, "split_seed": SPLIT_SEED, "n_train": int(len(ytr)), "n_calibration": int(len(ycal)), "n_test": int(len(yte)),
                     "final_train_loss": r6(final_loss)},
    })
    return {"name": "breast_cancer", "train_seconds": train_s, "metrics": metrics,
            "ort_eval_max_abs_diff": max_abs, "ort_training_mode_variation": varying}


def build_diabetes():
    seed, ratio, epochs, bs, lr, wd = 2, 0.2, 100, 32, 1e-3, 1e-4
    Xtr, Xte, ytr, yte = load_diabetes_split()
    Xtr, Xcal, ytr, ycal = carve_calibration(Xtr, ytr, stratify=False)
    write_calibration_rows("diabetes", Xcal, ycal)
    mean = Xtr.mean(axis=0).astype(F32)
    std = Xtr.std(axis=0).astype(F32)
    y_mean = F32(ytr.mean())
    y_std = F32(ytr.std())
    norm = lambda X: ((X - mean) / std).astype(F32)  # noqa: E731
    denorm = lambda z: (z * y_std + y_mean).astype(F32)  # noqa: E731  (same ops as the graph)

    rng = np.random.default_rng(seed)
    layers = [Affine("fc1", 10, 32, rng), Relu("relu1"), Dropout("dropout1", ratio),
              Affine("fc2", 32, 16, rng), Relu("relu2"), Dropout("dropout2", ratio),
              Affine("fc3", 16, 1, rng)]
    t0 = time.time()
    final_loss = train(layers, norm(Xtr), ((ytr - y_mean) / y_std).astype(F32), "mse", epochs, bs, lr, seed,
                       weight_decay=wd)
    train_s = time.time() - t0

    pred = denorm(net_forward(layers, norm(Xte), train=False))  # [N,1]
    err = pred[:, 0].astype(np.float64) - yte
    rmse = float(np.sqrt(np.mean(err ** 2)))
    r2 = float(1 - np.sum(err ** 2) / np.sum((yte - yte.mean()) ** 2))
    mc = denorm(mc_forward(layers, norm(Xte), 200, seed + 100))[:, :, 0].astype(np.float64)  # [S,N]
    mc_mean, mc_std = mc.mean(axis=0), mc.std(axis=0)
    lo, hi = mc_mean - 1.96 * mc_std, mc_mean + 1.96 * mc_std
    coverage = float(np.mean((yte >= lo) & (yte <= hi)))
    mc_rmse = float(np.sqrt(np.mean((mc_mean - yte) ** 2)))
    baseline_rmse = float(np.sqrt(np.mean((yte - ytr.mean()) ** 2)))

    g = GraphBuilder()
    x = g.node("Sub", ["features", g.init("feature_mean", mean)], ["centered"], "standardize_sub")
    x = g.node("Div", [x, g.init("feature_std", std)], ["standardized"], "standardize_div")
    x = g.layers(layers, x)
    x = g.node("Mul", [x, g.init("target_std", np.array([y_std], dtype=F32))], ["prediction_scaled"],
               "destandardize_mul")
    g.node("Add", [x, g.init("target_mean", np.array([y_mean], dtype=F32))], ["prediction"], "destandardize_add")
    model = g.model("diabetes_mlp", [tensor_info("features", [10])], [tensor_info("prediction", [1])],
                    "Diabetes (sklearn) regression MLP with MC dropout; input: the 10 features exactly as "
                    "returned by sklearn load_diabetes() (already centred/scaled); output: disease "
                    "progression one year after baseline, original target units.")
    path = os.path.join(MODELS_DIR, "diabetes.onnx")
    onnx.save(model, path)
    # Outputs are ~25..350: compare with a relative tolerance on top of 1e-5 absolute.
    max_abs, varying = verify_with_ort(path, "features", Xte, pred, rtol=1e-6, atol=1e-5)

    metrics = {"test_rmse": r6(rmse), "test_r2": r6(r2), "test_rmse_mc_mean_200": r6(mc_rmse),
               "mc_200_interval_95_coverage": r6(coverage),
               "mc_200_mean_std": r6(mc_std.mean()),
               "mc_200_mean_interval_width": r6((hi - lo).mean()),
               "test_rmse_predict_train_mean": r6(baseline_rmse)}
    write_json(os.path.join(MODELS_DIR, "diabetes.model.json"), {
        "description": "Diabetes progression (sklearn load_diabetes) regression MLP 10-32-16-1 with two "
                       "dropout layers (p=0.2). Input 'features': the 10 features as returned by "
                       "load_diabetes() (already centred and scaled by sklearn); a further standardization "
                       "is baked into the graph. Output 'prediction': disease progression one year after "
                       "baseline in the original target units (the target de-standardization is in the graph).",
        "probability_outputs": [],
        "metrics": metrics,
        "training": {"epochs": epochs, "batch_size": bs, "optimizer": "adam", "learning_rate": lr,
                     "weight_decay": wd, "loss": "mse_on_standardized_target", "dropout_ratio": ratio,
                     "dropout_nodes": ["dropout1", "dropout2"], "seed": seed, "split_seed": SPLIT_SEED,
                     "n_train": int(len(ytr)), "n_calibration": int(len(ycal)), "n_test": int(len(yte)), "final_train_loss": r6(final_loss)},
    })
    return {"name": "diabetes", "train_seconds": train_s, "metrics": metrics,
            "ort_eval_max_abs_diff": max_abs, "ort_training_mode_variation": varying}


def build_digits():
    seed, ratio, epochs, bs, lr = 3, 0.5, 30, 32, 2e-3
    Xtr, Xte, ytr, yte = load_digits_split()
    Xtr, Xcal, ytr, ycal = carve_calibration(Xtr, ytr, stratify=True)
    write_calibration_rows("digits_cnn", Xcal, ycal)
    scale = F32(16.0)
    pre = lambda X: (X / scale).astype(F32)  # noqa: E731

    rng = np.random.default_rng(seed)
    layers = [Conv3x3("conv1", 1, 8, rng), Relu("relu1"),
              Conv3x3("conv2", 8, 16, rng), Relu("relu2"),
              MaxPool2("maxpool"), Flatten("flatten"),
              Affine("fc1", 256, 64, rng), Relu("relu3"), Dropout("dropout1", ratio),
              Affine("fc2", 64, 10, rng)]
    t0 = time.time()
    final_loss = train(layers, pre(Xtr), ytr, "xent", epochs, bs, lr, seed)
    train_s = time.time() - t0

    p_te = softmax(net_forward(layers, pre(Xte), train=False)).astype(F32)
    acc = float((p_te.argmax(1) == yte).mean())
    mc = softmax(mc_forward(layers, pre(Xte), 200, seed + 100)).mean(axis=0)
    mc_acc = float((mc.argmax(1) == yte).mean())
    train_acc = float((net_forward(layers, pre(Xtr), train=False).argmax(1) == ytr).mean())

    g = GraphBuilder()
    x = g.node("Div", ["image", g.init("pixel_scale", np.array(scale, dtype=F32))], ["image_scaled"], "scale_pixels")
    x = g.layers(layers, x)
    g.node("Softmax", [x], ["probabilities"], "softmax", axis=-1)
    model = g.model("digits_cnn", [tensor_info("image", [1, 8, 8])], [tensor_info("probabilities", [10])],
                    "sklearn digits (8x8) CNN with MC dropout in the classifier head; input: raw pixel "
                    "values 0..16 as [batch,1,8,8]; output: softmax over digits 0..9.")
    path = os.path.join(MODELS_DIR, "digits_cnn.onnx")
    onnx.save(model, path)
    max_abs, varying = verify_with_ort(path, "image", Xte, p_te)

    metrics = {"test_accuracy": r6(acc), "test_accuracy_mc_mean_200": r6(mc_acc),
               "train_accuracy_eval_mode": r6(train_acc)}
    write_json(os.path.join(MODELS_DIR, "digits_cnn.model.json"), {
        "description": "sklearn digits (8x8 grayscale, values 0..16) CNN: Conv(1->8,3x3)-ReLU-Conv(8->16,3x3)-"
                       "ReLU-MaxPool2x2-Flatten-Gemm(256->64)-ReLU-Dropout(p=0.5)-Gemm(64->10)-Softmax. "
                       "Input 'image': raw pixel values 0..16, shape [batch,1,8,8] (the /16 scaling is in the "
                       "graph). Output 'probabilities': softmax over digits 0..9.",
        "probability_outputs": ["probabilities"],
        "metrics": metrics,
        "training": {"epochs": epochs, "batch_size": bs, "optimizer": "adam", "learning_rate": lr,
                     "loss": "cross_entropy", "dropout_ratio": ratio, "dropout_nodes": ["dropout1"],
                     "seed": seed, "split_seed": SPLIT_SEED, "n_train": int(len(ytr)), "n_calibration": int(len(ycal)), "n_test": int(len(yte)),
                     "final_train_loss": r6(final_loss)},
    })
    return {"name": "digits_cnn", "train_seconds": train_s, "metrics": metrics,
            "ort_eval_max_abs_diff": max_abs, "ort_training_mode_variation": varying}


def main():
    os.makedirs(MODELS_DIR, exist_ok=True)
    only = set(sys.argv[1:])
    builders = [build_breast_cancer, build_diabetes, build_digits]
    t0 = time.time()
    for b in builders:
        if only and b.__name__.replace("build_", "") not in only:
            continue
        report = b()
        print(json.dumps(report, indent=1))
    print(f"total wall time: {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
