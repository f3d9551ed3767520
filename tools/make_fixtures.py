#!/usr/bin/env python3
"""Build the small hand-made ONNX fixtures and JSON reference data for the Rust tests.

Writes into ``tests/fixtures/`` (see tests/fixtures/README.md for what each file
tests).  ``reference_outputs.json`` needs the trained models in ``models/``
(run tools/train_models.py first).

Usage (from the repository root):
  tools/.venv/bin/python tools/make_fixtures.py

Deterministic: fixed seeds / hand-written weights; byte-identical on re-runs.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_models  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(REPO_ROOT, "models")
FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
F32 = np.float32
IR_VERSION = 8
FLOAT, BOOL, INT64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def vi(name, elem_type, dims):
    return helper.make_tensor_value_info(name, elem_type, dims)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def const_node(out, value, elem_type):
    return helper.make_node("Constant", [], [out], name=f"{out}_const",
                            value=helper.make_tensor("value", elem_type, [], [value]))


def dropout_nodes(name, x, ratio, out=None, mask=None):
    """Constant ratio + Constant training_mode(true) + Dropout(x, ratio, training_mode)."""
    outputs = [out or f"{name}_out"] + ([mask] if mask else [])
    return [const_node(f"{name}_ratio", float(ratio), FLOAT),
            const_node(f"{name}_training_mode", True, BOOL),
            helper.make_node("Dropout", [x, f"{name}_ratio", f"{name}_training_mode"], outputs, name=name)]


def make_model(nodes, name, inputs, outputs, inits=(), opset=17, doc=""):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="mcd-serve tools/make_fixtures.py", producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model, fname):
    path = os.path.join(FIXTURES_DIR, fname)
    onnx.save(model, path)
    return path


def write_json(fname, obj):
    path = os.path.join(FIXTURES_DIR, fname)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    size = os.path.getsize(path)
    assert size < 200_000, f"{fname} is {size} bytes"
    return path


def ort_session(path, training_dropout=False):
    if training_dropout:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def f32list(a):
    """float32 array -> nested python lists whose floats are exactly the float32 values."""
    return np.asarray(a, dtype=F32).tolist()


def to_eval(model):
    """Copy of `model` in inference mode: every Dropout (also inside If/Loop/Scan bodies) becomes
    Identity (its mask output, if declared, becomes an all-true tensor), and BatchNormalization with
    training_mode=1 becomes training_mode=0 with a single output.  This is the reference semantics of
    "eval": it does NOT rely on onnxruntime's EliminateDropout optimizer, which only removes a Dropout
    when it has exactly one input edge (so not when the Dropout reads a graph input, nor when its output
    is a graph output, nor when its mask is used)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def fix_graph(g):
        new_nodes = []
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        fix_graph(sub)
            if n.op_type == "Dropout":
                new_nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=f"{n.name}_eval"))
                if len(n.output) > 1 and n.output[1]:
                    new_nodes.append(helper.make_node("Shape", [n.input[0]], [f"{n.name}_eval_shape"],
                                                      name=f"{n.name}_eval_shape"))
                    new_nodes.append(helper.make_node(
                        "ConstantOfShape", [f"{n.name}_eval_shape"], [n.output[1]], name=f"{n.name}_eval_mask",
                        value=helper.make_tensor("value", BOOL, [1], [True])))
            elif n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in n.attribute):
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name != "training_mode"}
                new_nodes.append(helper.make_node("BatchNormalization", list(n.input), [n.output[0]],
                                                  name=f"{n.name}_eval", **attrs))
            else:
                new_nodes.append(n)
        # Drop the Constant nodes that only fed the removed Dropouts (ratio / training_mode).
        used = {i for n in new_nodes for i in n.input} | {o.name for o in g.output}
        for n in new_nodes:
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    used |= {i for sn in sub.node for i in sn.input}
        new_nodes = [n for n in new_nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
        del g.node[:]
        g.node.extend(new_nodes)

    fix_graph(m.graph)
    onnx.checker.check_model(m, full_check=True)
    return m


# Eval-mode sample inputs + eval outputs (ORT on the to_eval() copy) for every fixture with a defined eval.
EVAL_OUTPUTS = {}


def record_eval(fname, feeds, note=""):
    """Run the eval copy of a fixture in ORT; also record whether ORT's *default* session on the original
    file happens to give the same (deterministic) result, i.e. whether EliminateDropout removed every
    Dropout."""
    path = os.path.join(FIXTURES_DIR, fname)
    eval_sess = ort.InferenceSession(to_eval(onnx.load(path)).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in eval_sess.get_outputs()]
    outs = eval_sess.run(None, feeds)
    default_sess = ort_session(path)
    same = all(all(np.array_equal(a, b) for a, b in zip(default_sess.run(None, feeds), outs)) for _ in range(5))
    entry = {"inputs": {k: np.asarray(v).tolist() if np.asarray(v).dtype != F32 else f32list(v)
                        for k, v in feeds.items()},
             "outputs": {n: (f32list(o) if o.dtype == F32 else o.tolist()) for n, o in zip(names, outs)},
             "ort_default_session_equals_eval": bool(same)}
    if note:
        entry["note"] = note
    EVAL_OUTPUTS[fname] = entry
    return outs


def assert_varies(fname, feeds):
    """With all graph optimizations disabled ORT keeps Dropout in training mode -> outputs vary."""
    sess = ort_session(os.path.join(FIXTURES_DIR, fname), training_dropout=True)
    first = sess.run(None, feeds)[0]
    assert any(not np.array_equal(first, sess.run(None, feeds)[0]) for _ in range(50)), \
        f"{fname}: training-mode outputs did not vary"


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

def reference_outputs():
    out = {}
    specs = [
        ("breast_cancer", "features", "probabilities", train_models.load_breast_cancer_split),
        ("diabetes", "features", "prediction", train_models.load_diabetes_split),
        ("digits_cnn", "image", "probabilities", train_models.load_digits_split),
    ]
    for stem, in_name, out_name, loader in specs:
        _xtr, xte, _ytr, yte = loader()
        x = np.ascontiguousarray(xte[:8], dtype=F32)
        sess = ort_session(os.path.join(MODELS_DIR, f"{stem}.onnx"))
        y = sess.run([out_name], {in_name: x})[0]
        labels = yte[:8].tolist() if yte.dtype != F32 else f32list(yte[:8])
        out[stem] = {"model": f"models/{stem}.onnx", "input_name": in_name, "input_shape": list(x.shape),
                     "inputs": f32list(x), "output_name": out_name, "output_shape": list(y.shape),
                     "outputs": f32list(y), "labels": labels}
    write_json("reference_outputs.json", out)


# Shared by linear_dropout and dropconnect, whose outputs have the same closed forms.
LINEAR_P = 0.3
LINEAR_W = np.array([[0.5, -1.0, 2.0],
                     [1.5, 0.25, -0.5],
                     [-2.0, 1.0, 0.75],
                     [0.125, -0.75, 1.0]], dtype=F32)


def save_linear(name, dropped, doc):
    """y = x @ W with Dropout(LINEAR_P) on `dropped` (x or W), saved as `<name>.onnx`."""
    matmul_inputs = [f"{n}_dropped" if n == dropped else n for n in ("x", "W")]
    nodes = dropout_nodes("dropout", dropped, LINEAR_P, out=f"{dropped}_dropped")
    nodes.append(helper.make_node("MatMul", matmul_inputs, ["y"], name="matmul"))
    model = make_model(nodes, name, [vi("x", FLOAT, ["batch", 4])], [vi("y", FLOAT, ["batch", 3])],
                       [init("W", LINEAR_W)], opset=13, doc=doc)
    save(model, f"{name}.onnx")


def linear_dropout():
    p, W = LINEAR_P, LINEAR_W
    save_linear("linear_dropout", "x", "y = Dropout_p(x) @ W, p = 0.3 (Constant), training_mode true")

    x = np.array([[1.0, 2.0, -1.0, 0.5],
                  [0.0, -3.0, 2.0, 4.0],
                  [0.5, 0.5, 0.5, 0.5]], dtype=F32)
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    mean = x64 @ W64
    var = p / (1 - p) * (x64 ** 2) @ (W64 ** 2)
    write_json("linear_dropout.json", {
        "model": "linear_dropout.onnx", "input_name": "x", "output_name": "y",
        "ratio": p, "ratio_as_float32": float(F32(p)), "W": f32list(W), "x": f32list(x),
        "expected_mean": mean.tolist(), "expected_var": var.tolist(), "expected_std": np.sqrt(var).tolist(),
        "formula": "y = (x * m / (1-p)) @ W with m_j ~ Bernoulli(1-p) iid; mean_k = sum_j x_j W_jk; "
                   "var_k = p/(1-p) * sum_j x_j^2 W_jk^2 (computed in float64)",
    })
    outs = record_eval("linear_dropout.onnx", {"x": x})
    np.testing.assert_allclose(outs[0], mean, rtol=1e-6, atol=1e-6)
    assert_varies("linear_dropout.onnx", {"x": x})


BN_C = 3
BN_EPS = 1e-5
BN_MOMENTUM = 0.9
BN_SCALE = np.array([1.5, 0.5, -2.0], dtype=F32)
BN_BIAS = np.array([0.25, -0.5, 1.0], dtype=F32)
BN_MEAN = np.array([0.5, -1.0, 2.0], dtype=F32)
BN_VAR = np.array([4.0, 0.25, 9.0], dtype=F32)


def bn_graph(name, expose_running_mean):
    """x[batch,3,2,2] -> BatchNormalization(training_mode=1, 3 outputs) -> Dropout(0.25) -> Relu -> y."""
    nodes = [helper.make_node("BatchNormalization", ["x", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                              ["bn_out", "bn_running_mean_out", "bn_running_var_out"], name="bn",
                              epsilon=BN_EPS, momentum=BN_MOMENTUM, training_mode=1)]
    nodes += dropout_nodes("dropout", "bn_out", 0.25)
    nodes.append(helper.make_node("Relu", ["dropout_out"], ["y"], name="relu"))
    outputs = [vi("y", FLOAT, ["batch", BN_C, 2, 2])]
    if expose_running_mean:
        outputs.append(vi("bn_running_mean_out", FLOAT, [BN_C]))
    inits = [init("bn.weight", BN_SCALE), init("bn.bias", BN_BIAS),
             init("bn.running_mean", BN_MEAN), init("bn.running_var", BN_VAR)]
    return make_model(nodes, name, [vi("x", FLOAT, ["batch", BN_C, 2, 2])], outputs, inits, opset=15,
                      doc="BatchNormalization exported in training mode (training_mode=1, 3 outputs) + Dropout")


def bn_fixtures():
    save(bn_graph("bn_training_mode", False), "bn_training_mode.onnx")
    save(bn_graph("bn_training_extra_output_used", True), "bn_training_extra_output_used.onnx")

    rng = np.random.default_rng(5)
    # Batch statistics deliberately far from the running statistics.
    x = (rng.normal(size=(4, BN_C, 2, 2)) * np.array([1.0, 2.0, 0.5])[None, :, None, None]
         + np.array([3.0, 1.0, -1.0])[None, :, None, None]).astype(F32)
    x = np.round(x, 3).astype(F32)
    b = lambda v: v.astype(np.float64)[None, :, None, None]  # noqa: E731
    x64 = x.astype(np.float64)
    eval_y = np.maximum((x64 - b(BN_MEAN)) / np.sqrt(b(BN_VAR) + BN_EPS) * b(BN_SCALE) + b(BN_BIAS), 0.0)
    bmean = x64.mean(axis=(0, 2, 3))
    bvar = x64.var(axis=(0, 2, 3))  # biased (population) variance, as BN uses for normalization
    batch_y = np.maximum((x64 - b(bmean)) / np.sqrt(b(bvar) + BN_EPS) * b(BN_SCALE) + b(BN_BIAS), 0.0)
    assert np.max(np.abs(eval_y - batch_y)) > 0.5
    write_json("bn_training_mode.json", {
        "model": "bn_training_mode.onnx", "input_name": "x", "output_name": "y",
        "epsilon": BN_EPS, "momentum": BN_MOMENTUM, "dropout_ratio": 0.25,
        "scale": f32list(BN_SCALE), "bias": f32list(BN_BIAS),
        "running_mean": f32list(BN_MEAN), "running_var": f32list(BN_VAR),
        "x": f32list(x),
        "expected_eval_output": eval_y.tolist(),
        "batch_mean": bmean.tolist(), "batch_var": bvar.tolist(),
        "batch_stats_output": batch_y.tolist(),
        "formula": "eval: y = relu((x - running_mean)/sqrt(running_var + eps) * scale + bias), dropout = identity; "
                   "batch_stats_output uses the per-channel mean/biased variance of x over (N,H,W) instead. "
                   "Computed in float64.",
    })
    # What does a plain ORT session do with BatchNormalization(training_mode=1)?
    sess = ort_session(os.path.join(FIXTURES_DIR, "bn_training_mode.onnx"))
    got = sess.run(None, {"x": x})[0]
    d_eval = float(np.max(np.abs(got - eval_y)))
    d_batch = float(np.max(np.abs(got - batch_y)))
    note = (f"ORT default session on the original file: max|ort-eval|={d_eval:.3g}, "
            f"max|ort-batch_stats_output|={d_batch:.3g}")
    outs = record_eval("bn_training_mode.onnx", {"x": x},
                       note="eval = BN with running statistics (training_mode=0), Dropout = Identity. "
                            "ORT's default session on the original file instead normalizes with the BATCH "
                            "statistics (training_mode=1 is honoured), see bn_training_mode.json")
    np.testing.assert_allclose(outs[0], eval_y, rtol=1e-5, atol=1e-5)
    return note


def dropout_in_subgraph():
    def branch(name, ratio):
        nodes = dropout_nodes(f"{name}_dropout", "x", ratio, out=f"{name}_out")
        return helper.make_graph(nodes, name, [], [vi(f"{name}_out", FLOAT, ["batch", 4])])

    nodes = [helper.make_node("ReduceMean", ["x"], ["x_mean"], name="reduce_mean", keepdims=0),
             helper.make_node("Greater", ["x_mean", "zero"], ["cond"], name="greater"),
             helper.make_node("If", ["cond"], ["y"], name="if",
                              then_branch=branch("then_branch", 0.5), else_branch=branch("else_branch", 0.2))]
    model = make_model(nodes, "dropout_in_subgraph", [vi("x", FLOAT, ["batch", 4])], [vi("y", FLOAT, ["batch", 4])],
                       [init("zero", np.array(0.0, dtype=F32))],
                       doc="If(mean(x) > 0) whose then/else branches each contain a training-mode Dropout")
    save(model, "dropout_in_subgraph.onnx")
    x = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]], dtype=F32)
    outs = record_eval("dropout_in_subgraph.onnx", {"x": x})
    np.testing.assert_array_equal(outs[0], x)


def dropout_mask_used():
    nodes = dropout_nodes("dropout", "x", 0.5, out="y", mask="mask")
    nodes.append(helper.make_node("Cast", ["mask"], ["mask_float"], name="cast_mask", to=FLOAT))
    model = make_model(nodes, "dropout_mask_used", [vi("x", FLOAT, ["batch", 16])],
                       [vi("y", FLOAT, ["batch", 16]), vi("mask_float", FLOAT, ["batch", 16])],
                       doc="Dropout whose boolean mask output is consumed (Cast -> graph output mask_float)")
    save(model, "dropout_mask_used.onnx")
    x = np.arange(32, dtype=F32).reshape(2, 16) / 4 - 2
    record_eval("dropout_mask_used.onnx", {"x": x})
    assert_varies("dropout_mask_used.onnx", {"x": x})


def dropout_ratio_input():
    nodes = [const_node("dropout_training_mode", True, BOOL),
             helper.make_node("Dropout", ["x", "ratio", "dropout_training_mode"], ["y"], name="dropout")]
    model = make_model(nodes, "dropout_ratio_input", [vi("x", FLOAT, ["batch", 8]), vi("ratio", FLOAT, [])],
                       [vi("y", FLOAT, ["batch", 8])], doc="Dropout whose ratio is a graph input (not a constant)")
    save(model, "dropout_ratio_input.onnx")
    x = np.linspace(-1, 1, 16, dtype=F32).reshape(2, 8)
    feeds = {"x": x, "ratio": np.array(0.4, dtype=F32)}
    record_eval("dropout_ratio_input.onnx", feeds)
    assert_varies("dropout_ratio_input.onnx", feeds)


SMALL_W = np.array([[0.5, -0.25, 1.0],
                    [-1.0, 0.75, 0.5],
                    [0.25, 1.25, -0.5],
                    [1.5, -0.5, 0.25]], dtype=F32)
SMALL_B = np.array([0.1, -0.2, 0.05], dtype=F32)
SMALL_X = np.array([[1.0, 0.5, -0.5, 2.0],
                    [0.0, -1.0, 1.5, 0.25],
                    [2.0, 2.0, 2.0, 2.0]], dtype=F32)


def no_dropout():
    nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1)]
    model = make_model(nodes, "no_dropout", [vi("x", FLOAT, ["batch", 4])], [vi("probabilities", FLOAT, ["batch", 3])],
                       [init("fc.weight", SMALL_W), init("fc.bias", SMALL_B)], doc="4 -> 3 softmax, no Dropout")
    save(model, "no_dropout.onnx")
    record_eval("no_dropout.onnx", {"x": SMALL_X})


def zero_ratio():
    nodes = dropout_nodes("dropout", "x", 0.0)
    nodes += [helper.make_node("MatMul", ["dropout_out", "W"], ["logits"], name="matmul"),
              helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1)]
    model = make_model(nodes, "zero_ratio", [vi("x", FLOAT, ["batch", 4])], [vi("probabilities", FLOAT, ["batch", 3])],
                       [init("W", SMALL_W)], doc="Dropout with ratio 0.0 (degenerate MC) -> MatMul -> Softmax")
    save(model, "zero_ratio.onnx")
    record_eval("zero_ratio.onnx", {"x": SMALL_X})


def dead_dropout():
    """y = 1 + 1e-6 * Dropout_0.5(x): dropout fires, but moves y by a few float32 ulps of
    its scale. Its MC variance is not zero (rounding), yet there is no uncertainty to
    report: the mc_live self-check must refuse it (probe finding h)."""
    nodes = dropout_nodes("dropout", "x", 0.5)
    nodes += [helper.make_node("Mul", ["dropout_out", "tiny"], ["scaled"], name="scale_down"),
              helper.make_node("Add", ["scaled", "one"], ["y"], name="offset")]
    model = make_model(nodes, "dead_dropout", [vi("x", FLOAT, ["batch", 4])], [vi("y", FLOAT, ["batch", 4])],
                       [init("tiny", np.array(1e-6, dtype=F32)), init("one", np.array(1.0, dtype=F32))],
                       doc="y = 1 + 1e-6 * Dropout(x): dropout moves y by float rounding only")
    save(model, "dead_dropout.onnx")


def batch_dependent():
    nodes = dropout_nodes("dropout", "x", 0.2)
    nodes += [helper.make_node("MatMul", ["dropout_out", "W"], ["h"], name="matmul"),
              helper.make_node("ReduceMean", ["h"], ["h_batch_mean"], name="batch_mean", axes=[0], keepdims=1),
              helper.make_node("Sub", ["h", "h_batch_mean"], ["y"], name="center_over_batch")]
    model = make_model(nodes, "batch_dependent", [vi("x", FLOAT, ["batch", 4])], [vi("y", FLOAT, ["batch", 3])],
                       [init("W", SMALL_W)], doc="y = h - mean_over_batch(h), h = Dropout(x) @ W: rows depend on "
                                                 "each other")
    save(model, "batch_dependent.onnx")
    outs = record_eval("batch_dependent.onnx", {"x": SMALL_X})
    single = ort_session(os.path.join(FIXTURES_DIR, "batch_dependent.onnx")).run(None, {"x": SMALL_X[:1]})[0]
    assert not np.allclose(single[0], outs[0][0])  # row 0 alone != row 0 within the batch


def dropconnect():
    """y = x @ Dropout_p(W): the mask has no batch axis (one weight mask per pass, shared by
    the rows), so samples must not share a batched pass. Same closed forms as linear_dropout."""
    save_linear("dropconnect", "W", "y = x @ Dropout_p(W), p = 0.3 (Constant), training_mode true")
    W = LINEAR_W
    x = np.array([[1.0, 2.0, -1.0, 0.5],
                  [0.0, -3.0, 2.0, 4.0]], dtype=F32)
    outs = record_eval("dropconnect.onnx", {"x": x})
    np.testing.assert_allclose(outs[0], x.astype(np.float64) @ W.astype(np.float64), rtol=1e-6, atol=1e-6)
    assert_varies("dropconnect.onnx", {"x": x})


MIXED_P = (0.1, 0.5)


def mixed_ratios():
    """Two Dropout sites with different ratios in one model, side by side on the same x:
    low = Dropout_0.1(x) @ W, high = Dropout_0.5(x) @ W. Each output has the closed forms
    of linear_dropout at its own ratio, so a sampler that drew every site at one site's
    ratio gets one of them wrong."""
    W = LINEAR_W
    nodes = []
    outputs = []
    for name, p in zip(("low", "high"), MIXED_P):
        nodes += dropout_nodes(f"dropout_{name}", "x", p, out=f"x_{name}")
        nodes.append(helper.make_node("MatMul", [f"x_{name}", "W"], [name], name=f"matmul_{name}"))
        outputs.append(vi(name, FLOAT, ["batch", 3]))
    model = make_model(nodes, "mixed_ratios", [vi("x", FLOAT, ["batch", 4])], outputs, [init("W", W)], opset=13,
                       doc="low = Dropout_0.1(x) @ W, high = Dropout_0.5(x) @ W (Constant ratios, training_mode true)")
    save(model, "mixed_ratios.onnx")
    x = np.array([[1.0, 2.0, -1.0, 0.5],
                  [0.0, -3.0, 2.0, 4.0]], dtype=F32)
    outs = record_eval("mixed_ratios.onnx", {"x": x})
    for o in outs:
        np.testing.assert_allclose(o, x.astype(np.float64) @ W.astype(np.float64), rtol=1e-6, atol=1e-6)
    assert_varies("mixed_ratios.onnx", {"x": x})


def fixed_batch():
    rng = np.random.default_rng(7)
    W1 = np.round(rng.normal(size=(8, 5)), 3).astype(F32)
    b1 = np.round(rng.normal(size=8) * 0.1, 3).astype(F32)
    W2 = np.round(rng.normal(size=(3, 8)), 3).astype(F32)
    b2 = np.zeros(3, dtype=F32)
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
             helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1")]
    nodes += dropout_nodes("dropout1", "relu1_out", 0.3)
    nodes += [helper.make_node("Gemm", ["dropout1_out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
              helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1)]
    model = make_model(nodes, "fixed_batch", [vi("x", FLOAT, [1, 5])], [vi("probabilities", FLOAT, [1, 3])],
                       [init("fc1.weight", W1), init("fc1.bias", b1), init("fc2.weight", W2), init("fc2.bias", b2)],
                       doc="MLP 5-8-3 with Dropout whose batch dim is fixed at 1")
    save(model, "fixed_batch.onnx")
    x = np.array([[0.5, -1.0, 2.0, 0.0, 1.0]], dtype=F32)
    record_eval("fixed_batch.onnx", {"x": x})
    assert_varies("fixed_batch.onnx", {"x": x})


def int_input():
    nodes = [helper.make_node("Cast", ["ids"], ["ids_float"], name="cast_ids", to=FLOAT),
             helper.make_node("MatMul", ["ids_float", "W"], ["h"], name="matmul")]
    nodes += dropout_nodes("dropout", "h", 0.5)
    nodes.append(helper.make_node("Softmax", ["dropout_out"], ["probabilities"], name="softmax", axis=-1))
    model = make_model(nodes, "int_input", [vi("ids", INT64, ["batch", 4])], [vi("probabilities", FLOAT, ["batch", 3])],
                       [init("W", SMALL_W * F32(0.5))], doc="INT64 input -> Cast -> MatMul -> Dropout(0.5) -> Softmax")
    save(model, "int_input.onnx")
    ids = np.array([[1, 0, 2, 3], [4, 1, 0, 0]], dtype=np.int64)
    record_eval("int_input.onnx", {"ids": ids})
    assert_varies("int_input.onnx", {"ids": ids})


def two_inputs():
    W = np.array([[0.5, -0.5], [1.0, 0.25], [-0.75, 1.0], [0.2, 0.4], [-1.0, 0.6]], dtype=F32)
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], name="concat", axis=1),
             helper.make_node("MatMul", ["ab", "W"], ["h"], name="matmul")]
    nodes += dropout_nodes("dropout", "h", 0.3, out="y")
    nodes.append(helper.make_node("Softmax", ["y"], ["z"], name="softmax", axis=-1))
    model = make_model(nodes, "two_inputs", [vi("a", FLOAT, ["batch", 3]), vi("b", FLOAT, ["batch", 2])],
                       [vi("y", FLOAT, ["batch", 2]), vi("z", FLOAT, ["batch", 2])], [init("W", W)],
                       doc="Concat(a, b) -> MatMul -> Dropout(0.3) -> y; z = Softmax(y)")
    save(model, "two_inputs.onnx")
    feeds = {"a": np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], dtype=F32),
             "b": np.array([[0.5, -0.5], [2.0, 1.0]], dtype=F32)}
    record_eval("two_inputs.onnx", feeds)
    assert_varies("two_inputs.onnx", feeds)


# --------------------------------------------------------------------------
# dropout written as random ops, as PyTorch's default (dynamo) exporter writes it
# --------------------------------------------------------------------------

CHANNEL_KEEP = 0.6
CHANNEL_X = np.array([[[1.0, 2.0, -1.0], [0.5, 0.5, 0.5], [-2.0, 1.0, 3.0], [0.25, -0.75, 1.5]],
                      [[0.0, -1.0, 2.0], [1.0, 1.0, -1.0], [0.5, -0.5, 0.25], [2.0, 0.0, -2.0]]], dtype=F32)
CHANNEL_W = np.array([[0.5, -1.0], [1.0, 0.25], [-0.5, 0.75],
                      [1.5, -0.5], [0.25, 1.0], [-1.0, 0.5],
                      [0.75, 0.25], [-0.25, -1.5], [1.0, 1.0],
                      [0.5, 2.0], [-1.5, 0.5], [0.25, -0.25]], dtype=F32)


def channel_dropout():
    """PyTorch's Dropout1d as its default exporter writes it (compare torch/conv1d_dropout1d_dynamo
    in ../shared/real-models): Shape/Concat/ConstantOfShape give the mask shape [batch, C, 1], then
    RandomUniformLike -> Less(keep) -> Cast -> Div(keep) -> Mul(x, .), here followed by a linear map,
    so that every output is y_k = sum_c m_c S_ck with one mask value m_c per (row, channel)."""
    C, L = CHANNEL_X.shape[1:]
    nodes = [helper.make_node("Shape", ["x"], ["batch_dim"], name="shape_x", start=0, end=1),
             helper.make_node("Concat", ["batch_dim", "channels", "one"], ["mask_shape"], name="concat_shape",
                              axis=0),
             helper.make_node("ConstantOfShape", ["mask_shape"], ["mask_like"], name="constant_of_shape"),
             helper.make_node("RandomUniformLike", ["mask_like"], ["rands"], name="draw", low=0.0, high=1.0),
             helper.make_node("Less", ["rands", "keep"], ["sampled"], name="less"),
             helper.make_node("Cast", ["sampled"], ["bernoulli"], name="cast", to=FLOAT),
             helper.make_node("Div", ["bernoulli", "keep"], ["noise"], name="div"),
             helper.make_node("Mul", ["x", "noise"], ["dropped"], name="mul"),
             helper.make_node("Reshape", ["dropped", "flat_shape"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "W"], ["y"], name="matmul")]
    inits = [init("keep", np.array(CHANNEL_KEEP, dtype=F32)), init("channels", np.array([C], dtype=np.int64)),
             init("one", np.array([1], dtype=np.int64)), init("flat_shape", np.array([-1, C * L], dtype=np.int64)),
             init("W", CHANNEL_W)]
    model = make_model(nodes, "channel_dropout", [vi("x", FLOAT, ["batch", C, L])], [vi("y", FLOAT, ["batch", 2])],
                       inits, opset=17, doc="y = flatten(x * m) @ W, m[batch, C, 1] = Bernoulli(0.6)/0.6 per "
                                            "(row, channel), written as PyTorch's exporter writes Dropout1d")
    save(model, "channel_dropout.onnx")

    q = float(F32(CHANNEL_KEEP))
    x64, W64 = CHANNEL_X.astype(np.float64), CHANNEL_W.astype(np.float64)
    S = np.einsum("bcl,clk->bck", x64, W64.reshape(C, L, 2))  # per-channel partial sums S[b, c, k]
    mean = S.sum(axis=1)
    var = (1 - q) / q * (S ** 2).sum(axis=1)
    var_elementwise = (1 - q) / q * np.einsum("bcl,clk->bk", x64 ** 2, W64.reshape(C, L, 2) ** 2)
    write_json("channel_dropout.json", {
        "model": "channel_dropout.onnx", "input_name": "x", "output_name": "y",
        "keep": CHANNEL_KEEP, "keep_as_float32": q, "W": f32list(CHANNEL_W), "x": f32list(CHANNEL_X),
        "channel_sums": S.tolist(), "expected_mean": mean.tolist(), "expected_var": var.tolist(),
        "elementwise_var": var_elementwise.tolist(),
        "formula": "y_k = sum_c m_c S_ck with S_ck = sum_l x_cl W_(cL+l)k and m_c in {0, 1/q} iid, P(1/q) = q; "
                   "mean_k = sum_c S_ck; var_k = (1-q)/q * sum_c S_ck^2. elementwise_var is what one draw per "
                   "element would give: (1-q)/q * sum_cl x_cl^2 W_(cL+l)k^2 (float64)",
    })
    # onnxruntime runs the random ops: its samples must be channel-dropout samples.
    sess = ort_session(os.path.join(FIXTURES_DIR, "channel_dropout.onnx"))
    masks = np.array(np.meshgrid(*[[0.0, 1 / q]] * C)).reshape(C, -1).T  # every mask of one row
    outs = [sess.run(None, {"x": CHANNEL_X})[0] for _ in range(200)]
    for y in outs:
        for b in range(CHANNEL_X.shape[0]):
            assert np.min(np.abs(masks @ S[b] - y[b]).max(axis=1)) < 1e-5, "not a channel-dropout sample"
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


ALPHA_P = 0.2
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def alpha_dropout():
    """PyTorch's AlphaDropout(0.2) as its default exporter writes it (compare
    torch/selu_alphadropout_dynamo): a keep indicator k = Cast(Less(RandomUniformLike, 1-p)), then
    y = x * (k*a) + ((k-1)*alpha*a + alpha*a*p), with alpha = SELU's -(negative saturation) and
    a = ((1-p)(1 + p alpha^2))^-1/2, the constants computed in float64 and stored in float32 as
    PyTorch does. The activation is the graph input, so y's closed forms are exact."""
    p = ALPHA_P
    alpha = SELU_ALPHA * SELU_SCALE
    a = ((1 - p) * (1 + p * alpha ** 2)) ** -0.5
    D = 64
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape_x", start=0),
             helper.make_node("Expand", ["zero", "x_shape"], ["empty_like"], name="empty_like"),
             helper.make_node("RandomUniformLike", ["empty_like"], ["rands"], name="draw", low=0.0, high=1.0),
             helper.make_node("Less", ["rands", "keep"], ["sampled"], name="less"),
             helper.make_node("Cast", ["sampled"], ["bernoulli"], name="cast", to=FLOAT),
             helper.make_node("Add", ["bernoulli", "minus_one"], ["k_minus_one"], name="add_minus_one"),
             helper.make_node("Mul", ["k_minus_one", "alpha_a"], ["b_part"], name="mul_alpha_a"),
             helper.make_node("Add", ["b_part", "alpha_a_p"], ["b"], name="add_alpha_a_p"),
             helper.make_node("Mul", ["bernoulli", "a"], ["k_a"], name="mul_a"),
             helper.make_node("Mul", ["x", "k_a"], ["x_scaled"], name="mul_x"),
             helper.make_node("Add", ["x_scaled", "b"], ["y"], name="add_b")]
    inits = [init("zero", np.array(0.0, dtype=F32)), init("keep", np.array(1 - p, dtype=F32)),
             init("minus_one", np.array(-1.0, dtype=F32)), init("alpha_a", np.array(alpha * a, dtype=F32)),
             init("alpha_a_p", np.array(alpha * a * p, dtype=F32)), init("a", np.array(a, dtype=F32))]
    model = make_model(nodes, "alpha_dropout", [vi("x", FLOAT, ["batch", D])], [vi("y", FLOAT, ["batch", D])],
                       inits, opset=17, doc="AlphaDropout(0.2) written as PyTorch's exporter writes it")
    save(model, "alpha_dropout.onnx")

    # Row 0: +-1, so mean 0 and mean square 1 exactly (the SELU fixed point the correction keeps);
    # row 1: a ramp, for the per-element closed forms away from that point.
    x = np.stack([np.where(np.arange(D) % 2 == 0, 1.0, -1.0), np.linspace(-3, 2, D)]).astype(F32)
    write_json("alpha_dropout.json", {
        "model": "alpha_dropout.onnx", "input_name": "x", "output_name": "y", "p": p,
        "saturation": alpha, "a": a, "x": f32list(x),
        "formula": "kept (probability 1-p): a*x + alpha*a*p; dropped: -alpha*a*(1-p). Per element: "
                   "mean = a(1-p)x, var = p(1-p) a^2 (x + alpha)^2. For a row with mean 0 and mean square 1, "
                   "each sample's row mean has expectation 0 and its mean square expectation 1.",
    })
    sess = ort_session(os.path.join(FIXTURES_DIR, "alpha_dropout.onnx"))
    ys = np.array([sess.run(None, {"x": x})[0] for _ in range(2000)], dtype=np.float64)
    kept, dropped = a * x + alpha * a * p, -alpha * a * (1 - p)
    assert np.all(np.minimum(np.abs(ys - kept), np.abs(ys - dropped)) < 1e-5), "not an alpha-dropout sample"
    # Mean square of row 0 over 2000 x 64 draws: 1 within a few standard errors.
    assert abs(np.mean(ys[:, 0] ** 2) - 1) < 0.05 and abs(np.mean(ys[:, 0])) < 0.05


def random_normal_like():
    """y = x + 0.1 * RandomNormalLike(x): a random op that is no dropout. The node's name ends in
    "Like" on purpose: tract 0.23.9 picks its Random/RandomLike op by the node's *name*, so it
    builds and runs this one; the server must refuse it by itself."""
    nodes = [helper.make_node("RandomNormalLike", ["x"], ["noise"], name="noise_RandomNormalLike",
                              mean=0.0, scale=1.0),
             helper.make_node("Mul", ["noise", "noise_scale"], ["scaled_noise"], name="scale_noise"),
             helper.make_node("Add", ["x", "scaled_noise"], ["y"], name="add_noise")]
    model = make_model(nodes, "random_normal_like", [vi("x", FLOAT, ["batch", 4])], [vi("y", FLOAT, ["batch", 4])],
                       [init("noise_scale", np.array(0.1, dtype=F32))],
                       doc="y = x + 0.1 * RandomNormalLike(x): an unrecognised random op")
    save(model, "random_normal_like.onnx")
    sess = ort_session(os.path.join(FIXTURES_DIR, "random_normal_like.onnx"))
    x = np.ones((2, 4), dtype=F32)
    assert not np.array_equal(sess.run(None, {"x": x})[0], sess.run(None, {"x": x})[0])


def main():
    os.makedirs(FIXTURES_DIR, exist_ok=True)
    reference_outputs()
    linear_dropout()
    bn_note = bn_fixtures()
    dropout_in_subgraph()
    dropout_mask_used()
    dropout_ratio_input()
    no_dropout()
    zero_ratio()
    dead_dropout()
    batch_dependent()
    fixed_batch()
    dropconnect()
    mixed_ratios()
    int_input()
    two_inputs()
    channel_dropout()
    alpha_dropout()
    random_normal_like()
    # ORT can load/run every fixture file (those not run by record_eval: just this one).
    extra = ort_session(os.path.join(FIXTURES_DIR, "bn_training_extra_output_used.onnx"))
    assert [o.name for o in extra.get_outputs()] == ["y", "bn_running_mean_out"]
    extra.run(None, {"x": np.ones((2, BN_C, 2, 2), dtype=F32)})
    write_json("fixture_eval_outputs.json", EVAL_OUTPUTS)
    print("bn_training_mode:", bn_note)
    for f in sorted(os.listdir(FIXTURES_DIR)):
        print(f"{os.path.getsize(os.path.join(FIXTURES_DIR, f)):8d}  {f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        # Only the named fixtures, e.g. `make_fixtures.py dropconnect`; their eval outputs
        # are merged into the existing fixture_eval_outputs.json.
        for fixture_name in sys.argv[1:]:
            globals()[fixture_name]()
        with open(os.path.join(FIXTURES_DIR, "fixture_eval_outputs.json")) as f:
            merged = json.load(f)
        merged.update(EVAL_OUTPUTS)
        write_json("fixture_eval_outputs.json", merged)
    else:
        main()
