"""Writes the real-size benchmark models (issue 23, item 6) into OUTDIR.

    python bench/realsize/make_models.py [OUTDIR]        # default /work/realsize-models

Needs bench/realsize/requirements.txt (torch, monai, transformers, onnx, onnxscript,
onnxruntime, numpy) in a venv; used by bench/realsize/run.py, not by CI. The files are
large (30-440 MB): never commit them.

Random weights from a fixed seed (nothing is downloaded: BertConfig() gives
bert-base-uncased's shape, not its weights), exported as the README's "Exporting from
PyTorch" says: model.eval(), the dropout modules alone put back in train mode, torch's
default (dynamo) exporter with its default opset and external data, the batch axis dynamic
(named "batch"); the final Sigmoid/Softmax is part of the graph. This mirrors how
../shared/real-models/medical/ was made (MANIFEST.md there).

- densenet121_chexnet: MONAI DenseNet121(spatial_dims=2, in_channels=3, out_channels=14,
  dropout_prob=0.2): MONAI's dense layer uses nn.Dropout2d (a channel dropout) at
  spatial_dims=2, in every one of the 58 dense layers; the exporter writes each as random
  ops (RandomUniformLike -> Less -> Cast -> Div -> Mul), no Dropout node, as in
  ../shared/real-models/medical/monai_densenet_multilabel.onnx. Sigmoid over the 14
  labels (CheXNet's form). Input "image" [N, 3, 224, 224].
- resnet50_head_dropout: MONAI resnet50(spatial_dims=2, n_input_channels=3,
  num_classes=14, conv1_t_stride=2) (conv1_t_stride=2 gives the ImageNet stem, 7x7
  stride 2 then max-pool: MONAI's default stride 1 would quadruple the work), its fc
  replaced by nn.Sequential(nn.Dropout(0.5), fc); Softmax over the 14 classes.
  Input "image" [N, 3, 224, 224].
- bert_base_cls: transformers BertForSequenceClassification(BertConfig(num_labels=2)),
  eager attention, hidden and attention-probability dropout 0.1 (and the classifier's
  dropout, 0.1): 38 Dropout nodes. Transformers applies the attention-probability dropout
  only when the attention module itself is in train mode, so the BertSelfAttention
  modules are put in train mode too (they hold nothing else that train mode changes);
  with the dropout modules alone, the file would have 26 (no attention dropout).
  Softmax over the 2 labels. Inputs int64 "input_ids" and
  "attention_mask" [N, seq], seq dynamic too (as ../shared/real-models/medical/
  bert_tiny_cls.onnx); the benchmark sends seq 128.

BatchNorm: a randomly initialised CNN's BatchNorm has running mean 0 and variance 1, so
in eval mode the activations grow layer by layer and the sigmoid/softmax saturate (every
probability exactly 0 or 1, and MC samples that cannot differ). Before export the running
statistics are therefore set from a few seeded random batches in train mode (what
training would have left there); the weights themselves stay random.

Per model it also writes <stem>.reference.json: the input (in <stem>.inputs.npz, two
rows: the benchmark sends the first), PyTorch's eval output, onnxruntime's eval output of
the exported file and their largest difference. onnxruntime's eval session removes Dropout
nodes but not random ops, so for a file with random ops (the DenseNet) an eval-mode export
(no dropout at all) is written to OUTDIR/ort-eval/<stem>.onnx for onnxruntime's eval.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SEED = 0
SEQ = 128
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
RANDOM_OPS = ("RandomUniformLike", "RandomUniform", "RandomNormalLike", "RandomNormal", "Bernoulli")


def log(msg):
    print(f"[make_models {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class WithActivation(nn.Module):
    def __init__(self, net, act):
        super().__init__()
        self.net, self.act = net, act

    def forward(self, image):
        return self.act(self.net(image))


class BertProbabilities(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        logits = self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.softmax(logits, dim=-1)


def set_bn_statistics(model, shape, batches=4, batch_size=8):
    """Running BatchNorm statistics from seeded random images (train mode, no gradients)."""
    g = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand((batch_size, *shape), generator=g))
    model.eval()


def densenet121():
    from monai.networks.nets import DenseNet121

    torch.manual_seed(SEED)
    net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=14, dropout_prob=0.2)
    set_bn_statistics(net, (3, 224, 224))
    return WithActivation(net, nn.Sigmoid())


def resnet50():
    from monai.networks.nets import resnet50 as monai_resnet50

    torch.manual_seed(SEED)
    net = monai_resnet50(spatial_dims=2, n_input_channels=3, num_classes=14, conv1_t_stride=2)
    net.fc = nn.Sequential(nn.Dropout(0.5), net.fc)
    set_bn_statistics(net, (3, 224, 224))
    return WithActivation(net, nn.Softmax(dim=1))


def bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    cfg = BertConfig(num_labels=2, attn_implementation="eager")  # bert-base-uncased's shape
    assert cfg.hidden_dropout_prob == 0.1 and cfg.attention_probs_dropout_prob == 0.1
    return BertProbabilities(BertForSequenceClassification(cfg))


def image_inputs():
    rng = np.random.default_rng(SEED)
    return {"image": rng.random((2, 3, 224, 224), dtype=np.float32)}


def bert_inputs():
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1000, 30000, size=(2, SEQ), dtype=np.int64)
    ids[:, 0] = 101  # [CLS]
    ids[:, -1] = 102  # [SEP]
    mask = np.ones((2, SEQ), dtype=np.int64)
    mask[1, 100:] = 0  # the second row padded
    return {"input_ids": ids, "attention_mask": mask}


MODELS = {
    # stem: (builder, inputs, output name, kind, description)
    "densenet121_chexnet": (densenet121, image_inputs, "y", "bernoulli",
                            "MONAI DenseNet121, dropout_prob 0.2 in every dense layer, sigmoid over 14 labels (CheXNet's form)"),
    "resnet50_head_dropout": (resnet50, image_inputs, "y", "categorical",
                              "MONAI ResNet-50 (ImageNet stem), Dropout(0.5) before its fc, softmax over 14 classes"),
    "bert_base_cls": (bert_base, bert_inputs, "y", "categorical",
                      "transformers BERT-base (BertConfig()), eager attention, hidden and attention dropout 0.1, softmax over 2 labels"),
}


def export(stem, out_dir):
    build, make_inputs, out_name, kind, description = MODELS[stem]
    log(f"{stem}: building")
    model = build()
    inputs = make_inputs()
    names = list(inputs)
    args = tuple(torch.from_numpy(inputs[n]) for n in names)

    model.eval()
    with torch.no_grad():
        eval_out = model(*args).numpy()
    n_dropout = sum(isinstance(m, DROPOUTS) for m in model.modules())

    # As the README's "Exporting from PyTorch": eval, then the dropout modules alone in train mode.
    model.eval()
    for m in model.modules():
        if isinstance(m, DROPOUTS):
            m.train()
        # transformers' BertSelfAttention applies its attention-probability dropout as
        # F.dropout(p=0.0 if not self.training else self.dropout.p): with only its
        # nn.Dropout module in train mode, the export would hold no attention dropout. Its
        # own train mode changes nothing else (it holds Linear layers and that dropout).
        if type(m).__name__ == "BertSelfAttention":
            m.train()
    batch = torch.export.Dim("batch", min=1, max=4096)
    if stem.startswith("bert"):
        seq = torch.export.Dim("seq", min=2, max=512)
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        dyn = {"image": {0: batch}}
    path = out_dir / f"{stem}.onnx"
    log(f"{stem}: exporting ({n_dropout} dropout modules) to {path}")
    t = time.perf_counter()
    torch.onnx.export(model, args, str(path), input_names=names, output_names=[out_name],
                      dynamic_shapes=dyn)
    export_s = time.perf_counter() - t
    model.eval()

    m = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    ops = [n.op_type for n in m.graph.node]
    dropout_nodes = ops.count("Dropout")
    random_nodes = sum(op in RANDOM_OPS for op in ops)
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(m.graph.input) + list(m.graph.output)
    }
    data = path.with_name(path.name + ".data")

    # onnxruntime's EliminateDropout removes Dropout nodes in eval, but not the random ops
    # that Dropout1d/2d/3d and AlphaDropout export as: for such a file, its eval baseline
    # is an export of the model with every module in eval mode (no dropout), in ort-eval/
    # (a subfolder, so that a server pointed at OUTDIR does not load it as a model).
    eval_path = path
    if random_nodes:
        (out_dir / "ort-eval").mkdir(exist_ok=True)
        eval_path = out_dir / "ort-eval" / f"{stem}.onnx"
        log(f"{stem}: {random_nodes} random ops: exporting the eval-mode model to {eval_path} for onnxruntime's eval")
        torch.onnx.export(model, args, str(eval_path), input_names=names, output_names=[out_name],
                          dynamic_shapes=dyn)

    sess = ort.InferenceSession(str(eval_path), providers=["CPUExecutionProvider"])
    ort_out = sess.run(None, inputs)[0]
    diff = float(np.max(np.abs(ort_out - eval_out)))
    log(f"{stem}: opset {opset}, {dropout_nodes} Dropout nodes, {random_nodes} random ops, shapes {shapes}, "
        f"ORT vs PyTorch eval max |diff| {diff:.3g}, eval row 0 {np.round(eval_out[0], 4).tolist()}")
    if diff > 1e-4:
        raise SystemExit(f"{stem}: onnxruntime's eval differs from PyTorch's by {diff}")
    if dropout_nodes + random_nodes != n_dropout:
        raise SystemExit(f"{stem}: {n_dropout} dropout modules but {dropout_nodes} Dropout nodes "
                         f"and {random_nodes} random ops in the file: a dropout was lost in export")
    # MC-dropout is live in the file: 20 rows of the first input through onnxruntime with
    # EliminateDropout off must differ (a saturated output would not).
    so = ort.SessionOptions()
    mc = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                              disabled_optimizers=["EliminateDropout"])
    tiled = {k: np.repeat(v[:1], 20, axis=0) for k, v in inputs.items()}
    mc_out = mc.run(None, tiled)[0]
    mc_std = float(mc_out.std(axis=0).max())
    log(f"{stem}: onnxruntime MC-20 max std {mc_std:.3g}, mean row {np.round(mc_out.mean(axis=0), 4).tolist()}")
    if not mc_std > 0:
        raise SystemExit(f"{stem}: MC samples do not differ")

    np.savez(out_dir / f"{stem}.inputs.npz", **inputs)
    ref = {
        "model": stem,
        "description": description,
        "exporter": f"torch {torch.__version__} default (dynamo) exporter; model.eval(), dropout modules"
                    + (" and BertSelfAttention modules" if stem.startswith("bert") else "") + " in train mode",
        "opset": opset,
        "external_data": data.name if data.exists() else None,
        "dropout_modules": n_dropout,
        "dropout_nodes": dropout_nodes,
        "random_op_nodes": random_nodes,
        "ort_eval_file": str(eval_path.relative_to(out_dir)),
        "onnxruntime_mc20_max_std": mc_std,
        "shapes": shapes,
        "inputs_file": f"{stem}.inputs.npz",
        "input_dtypes": {n: str(inputs[n].dtype) for n in names},
        "output": out_name,
        "kind": kind,
        "seed": SEED,
        "eval": eval_out.astype(np.float64).tolist(),
        "onnxruntime_eval": ort_out.astype(np.float64).tolist(),
        "max_abs_diff_onnxruntime_vs_torch": diff,
        "export_seconds": round(export_s, 1),
        "file_bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
    }
    (out_dir / f"{stem}.reference.json").write_text(json.dumps(ref, indent=1))
    return ref


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/realsize-models")
    only = sys.argv[2:] or list(MODELS)
    out_dir.mkdir(parents=True, exist_ok=True)
    versions = {}
    for mod in ("torch", "monai", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy"):
        versions[mod] = __import__(mod).__version__
    log(f"versions: {versions}")
    for stem in only:
        ref = export(stem, out_dir)
        log(f"{stem}: {ref['file_bytes'] / 1e6:.0f} MB written")
    (out_dir / "VERSIONS.json").write_text(json.dumps(versions, indent=1))


if __name__ == "__main__":
    main()
