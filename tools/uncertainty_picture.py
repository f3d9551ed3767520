#!/usr/bin/env python3
"""Draw docs/uncertainty-map.png from the server's real MC answer for a small U-Net.

What it does, start to end (deterministic: fixed seeds, single-threaded BLAS):

1. Makes synthetic grey-level images with 3 classes per pixel: 0 background, 1 disc,
   2 ring. Shapes have random size and contrast (some faint), the image is blurred and
   noisy, so boundaries, faint shapes and small shapes (a small blurred ring looks like a
   blurred disc) are genuinely uncertain.
2. Trains a small U-Net on 64x64 images with numpy (hand-written forward/backward, Adam,
   inverted dropout active in training; the layers of tools/train_models.py):

     image [batch,1,128,128]
     enc1: Conv3x3 1->8, ReLU, Conv3x3 8->8, ReLU ---------------------------- skip1
     MaxPool 2x2, enc2: Conv3x3 8->16, ReLU ------------------------------- skip2  |
     MaxPool 2x2, bottleneck: Conv3x3 16->32, ReLU, Dropout(0.25)             |    |
     ConvTranspose 2x2/2 32->16, Concat(skip2), Conv3x3 32->16, ReLU, Dropout(0.2)  |
     ConvTranspose 2x2/2 16->8, Concat(skip1), Conv3x3 16->8, ReLU, Conv1x1 8->3
     Softmax(axis=1) -> probabilities [batch,3,128,128]

3. Exports it with onnx.helper like models/ (opset 17, symbolic batch, torch-style
   training-mode Dropout nodes with Constant ratio / training_mode=true), checks it with
   onnx.checker and onnxruntime (the default session, which removes dropout, must match
   the numpy eval pass; with EliminateDropout disabled the outputs must vary).
4. Writes it to a temporary models folder, starts the real server on a free port, waits
   for GET /health/ready, and sends one held-out 128x128 image to
   POST /models/unet_shapes/predict?mc_samples=20&seed=7 (with every statistic named in
   `statistics`). The picture shows the answer's
   own `mean`, `predictive_entropy` and `mutual_information` (not recomputed here); a few
   pixels are cross-checked against the entropy of `mean` computed in numpy, and an eval
   request against the numpy eval pass.
5. Renders docs/uncertainty-map.png: input, mean segmentation (colour = mean class
   probabilities), predictive entropy (nats), mutual information (nats).

Usage (from the repository root; the server binary from `cargo build --release`):
  tools/.venv/bin/python tools/uncertainty_picture.py --server target/release/mcd-serve

Options: --out PATH (default docs/uncertainty-map.png), --keep-model DIR (also write
unet_shapes.onnx and its model.json there). Needs matplotlib (tools/requirements.txt).
Training takes about 100 s of one core (deterministic: the PNG is byte-identical on re-runs).
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_models import (F32, Adam, Conv3x3, Dropout, GraphBuilder, MaxPool2, Relu,  # noqa: E402
                          tensor_info, verify_with_ort, write_json)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "unet_shapes"
CLASSES = ("background", "disc", "ring")
TRAIN_SIZE, TEST_SIZE = 64, 128
SEED = 11
MC_SAMPLES, MC_SEED = 20, 7
STATISTICS = "mean,variance,std,predictive_entropy,expected_entropy,mutual_information,summary"


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------

def blur(img, sigma):
    """Separable Gaussian blur (reflect padding) of a 2-D image."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, r, mode="reflect")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def shape_mask(size, kind, cy, cx, r):
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == 1:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2  # ring: an annulus 2.5 px or 0.45 r wide, hollow inside
    return (d2 <= r * r) & (d2 > (r - max(2.5, 0.45 * r)) ** 2)


def render(size, shapes, rng, noise=0.12, sigma=1.2):
    """shapes: (kind, cy, cx, r, contrast). Returns (image float32 [size,size], labels int64)."""
    gy, gx = rng.uniform(-0.1, 0.1, 2)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.1 + gy * yy + gx * xx
    lab = np.zeros((size, size), dtype=np.int64)
    for kind, cy, cx, r, c in shapes:
        m = shape_mask(size, kind, cy, cx, r)
        img = np.where(m, img + c, img)
        lab[m] = kind
    img = blur(img, sigma) + rng.normal(0, noise, (size, size))
    return img.astype(F32), lab


def random_scene(size, rng):
    shapes = []
    for _ in range(rng.integers(2, 6)):
        for _try in range(20):
            r = rng.uniform(3.5, 9)
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            if all(np.hypot(cy - s[1], cx - s[2]) > r + s[3] + 3 for s in shapes):
                shapes.append((int(rng.integers(1, 3)), cy, cx, r, rng.uniform(0.15, 1.0)))
                break
    return render(size, shapes, rng)


def dataset(n, size, seed):
    rng = np.random.default_rng(seed)
    imgs, labs = zip(*(random_scene(size, rng) for _ in range(n)))
    return np.stack(imgs)[:, None], np.stack(labs)


def picture_scene(seed):
    """The held-out 128x128 image: a 4x4 jittered grid of discs and rings whose contrast
    falls row by row (bright at the top, faint at the bottom) and whose size varies."""
    rng = np.random.default_rng(seed)
    shapes = []
    contrasts = (1.0, 0.6, 0.35, 0.2)
    for i in range(4):
        for j in range(4):
            kind = 1 + (i + j) % 2
            r = (9.0, 7.0, 5.5, 4.0)[(j + 2 * i) % 4]
            cy = 16 + 32 * i + rng.uniform(-3, 3)
            cx = 16 + 32 * j + rng.uniform(-3, 3)
            shapes.append((kind, cy, cx, r, contrasts[i] * rng.uniform(0.9, 1.1)))
    return render(TEST_SIZE, shapes, rng)


# --------------------------------------------------------------------------
# U-Net in numpy (layers from train_models.py, plus these two)
# --------------------------------------------------------------------------

class Conv1x1:
    params = ("W", "b")

    def __init__(self, name, c_in, c_out, rng):
        self.name = name
        bound = np.sqrt(6.0 / c_in)
        self.W = rng.uniform(-bound, bound, size=(c_out, c_in, 1, 1)).astype(F32)
        self.b = np.zeros(c_out, dtype=F32)

    def forward(self, x, train, rng):
        self.x = x
        return np.einsum("oc,nchw->nohw", self.W[:, :, 0, 0], x, optimize=True) + self.b[:, None, None]

    def backward(self, d):
        self.dW = np.einsum("nohw,nchw->oc", d, self.x, optimize=True)[:, :, None, None]
        self.db = d.sum(axis=(0, 2, 3))
        return np.einsum("oc,nohw->nchw", self.W[:, :, 0, 0], d, optimize=True)


class ConvT2:
    """ConvTranspose, kernel 2x2, stride 2 (ONNX weight layout [C_in, C_out, 2, 2])."""
    params = ("W", "b")

    def __init__(self, name, c_in, c_out, rng):
        self.name = name
        bound = np.sqrt(6.0 / c_in)
        self.W = rng.uniform(-bound, bound, size=(c_in, c_out, 2, 2)).astype(F32)
        self.b = np.zeros(c_out, dtype=F32)

    def forward(self, x, train, rng):
        n, c, h, w = x.shape
        o = self.W.shape[1]
        self.cols, self.xshape = x.transpose(0, 2, 3, 1).reshape(-1, c), x.shape
        y = (self.cols @ self.W.reshape(c, o * 4)).reshape(n, h, w, o, 2, 2)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 4, 2, 5).reshape(n, o, 2 * h, 2 * w)) + self.b[:, None, None]

    def backward(self, d):
        n, c, h, w = self.xshape
        o = self.W.shape[1]
        dc = d.reshape(n, o, h, 2, w, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n * h * w, o * 4)
        self.dW = (self.cols.T @ dc).reshape(self.W.shape)
        self.db = d.sum(axis=(0, 2, 3))
        return np.ascontiguousarray((dc @ self.W.reshape(c, o * 4).T).reshape(n, h, w, c).transpose(0, 3, 1, 2))


class UNet:
    def __init__(self, rng):
        self.enc1 = [Conv3x3("enc1_conv1", 1, 8, rng), Relu("enc1_relu1"), Conv3x3("enc1_conv2", 8, 8, rng), Relu("enc1_relu2")]
        self.pool1 = MaxPool2("pool1")
        self.enc2 = [Conv3x3("enc2_conv", 8, 16, rng), Relu("enc2_relu")]
        self.pool2 = MaxPool2("pool2")
        self.bott = [Conv3x3("bottleneck_conv", 16, 32, rng), Relu("bottleneck_relu"), Dropout("dropout1", 0.25)]
        self.up2 = ConvT2("up2", 32, 16, rng)
        self.dec2 = [Conv3x3("dec2_conv", 32, 16, rng), Relu("dec2_relu"), Dropout("dropout2", 0.2)]
        self.up1 = ConvT2("up1", 16, 8, rng)
        self.dec1 = [Conv3x3("dec1_conv", 16, 8, rng), Relu("dec1_relu"), Conv1x1("head", 8, 3, rng)]
        self.all = (self.enc1 + [self.pool1] + self.enc2 + [self.pool2] + self.bott + [self.up2]
                    + self.dec2 + [self.up1] + self.dec1)

    @staticmethod
    def _seq(layers, x, train, rng):
        for layer in layers:
            x = layer.forward(x, train, rng)
        return x

    @staticmethod
    def _seq_back(layers, d):
        for layer in reversed(layers):
            d = layer.backward(d)
        return d

    def forward(self, x, train, rng=None):
        """Logits [N, 3, H, W]."""
        s1 = self._seq(self.enc1, x, train, rng)
        s2 = self._seq(self.enc2, self.pool1.forward(s1, train, rng), train, rng)
        b = self._seq(self.bott, self.pool2.forward(s2, train, rng), train, rng)
        u2 = self.up2.forward(b, train, rng)
        self.c2 = u2.shape[1]
        d2 = self._seq(self.dec2, np.concatenate([u2, s2], axis=1), train, rng)
        u1 = self.up1.forward(d2, train, rng)
        self.c1 = u1.shape[1]
        return self._seq(self.dec1, np.concatenate([u1, s1], axis=1), train, rng)

    def backward(self, d):
        d = self._seq_back(self.dec1, d)
        du1, ds1 = d[:, :self.c1], d[:, self.c1:]
        d = self._seq_back(self.dec2, self.up1.backward(du1))
        du2, ds2 = d[:, :self.c2], d[:, self.c2:]
        d = self.pool2.backward(self._seq_back(self.bott, self.up2.backward(du2)))
        d = self.pool1.backward(self._seq_back(self.enc2, d + ds2))
        self._seq_back(self.enc1, d + ds1)

    def export(self):
        g = GraphBuilder()
        s1 = g.layers(self.enc1, "image")
        x = g.layers([self.pool1] + self.enc2, s1)
        s2 = x
        x = g.layers([self.pool2] + self.bott, x)
        x = self._convt(g, self.up2, x)
        x = g.node("Concat", [x, s2], ["concat2_out"], "concat2", axis=1)
        x = g.layers(self.dec2, x)
        x = self._convt(g, self.up1, x)
        x = g.node("Concat", [x, s1], ["concat1_out"], "concat1", axis=1)
        x = g.layers(self.dec1[:-1], x)
        h = self.dec1[-1]
        x = g.node("Conv", [x, g.init(f"{h.name}.weight", h.W), g.init(f"{h.name}.bias", h.b)], [f"{h.name}_out"],
                   h.name, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
        g.node("Softmax", [x], ["probabilities"], "softmax", axis=1)
        return g.model(MODEL_NAME, [tensor_info("image", [1, TEST_SIZE, TEST_SIZE])],
                       [tensor_info("probabilities", [3, TEST_SIZE, TEST_SIZE])],
                       "Small U-Net segmenting synthetic discs (1) and rings (2) from background (0) in noisy, "
                       "blurred grey images; MC dropout in the bottleneck and decoder. Made by "
                       "tools/uncertainty_picture.py.")

    @staticmethod
    def _convt(g, layer, x):
        n = layer.name
        return g.node("ConvTranspose", [x, g.init(f"{n}.weight", layer.W), g.init(f"{n}.bias", layer.b)],
                      [f"{n}_out"], n, kernel_shape=[2, 2], strides=[2, 2])


def softmax1(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(net, X, y, epochs, batch_size, lr, seed):
    rng = np.random.default_rng(seed)
    params = [layer for layer in net.all if getattr(layer, "params", ())]
    opt = Adam(params, lr=lr)
    n = X.shape[0]
    for epoch in range(epochs):
        perm = rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb, yb = X[idx], y[idx]
            p = softmax1(net.forward(xb, train=True, rng=rng))
            onehot = np.eye(3, dtype=F32)[yb].transpose(0, 3, 1, 2)
            total += float(-np.log((p * onehot).sum(axis=1) + 1e-12).sum())
            d = (p - onehot) / F32(yb.size)
            net.backward(d.astype(F32))
            opt.step()
        print(f"  epoch {epoch + 1:2d}/{epochs}: loss {total / y.size:.4f}", flush=True)
    return total / y.size


def accuracy(net, X, y, batch=50):
    pred = np.concatenate([net.forward(X[i:i + batch], train=False).argmax(axis=1) for i in range(0, len(X), batch)])
    return float((pred == y).mean())


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=120):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_server(binary, models_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(models_dir, "server.log"), "w")
    proc = subprocess.Popen([binary, "--models", models_dir, "--addr", f"127.0.0.1:{port}", "--grpc-addr", "",
                             ], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log: {open(log.name).read()}")
        try:
            status, body = http("GET", base + "/health/ready", timeout=2)
            if status == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server not ready after 120 s; last answer {status}: {body[:500]!r}")


def entropy(p, axis):
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=axis)


# --------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------

COLOURS = np.array([[0.08, 0.08, 0.10], [0.95, 0.55, 0.10], [0.20, 0.60, 1.00]])  # background, disc, ring


def draw(path, img, mean, pe, mi, caption):
    """Four square panels in a row, 1600x450 px; colour bars for the two uncertainty maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    W, H = 16.0, 4.5  # inches, at 100 dpi
    fig = plt.figure(figsize=(W, H), dpi=100)
    rgb = np.clip(np.einsum("chw,ck->hwk", mean, COLOURS), 0, 1)
    mi_top = float(np.quantile(mi, 0.999))  # a handful of pixels would otherwise set the scale
    panels = [
        ("Input (held-out, 128×128)", img, dict(cmap="gray"), None),
        ("Mean segmentation (colour: mean p)", rgb, {}, None),
        ("Predictive entropy (nats)", pe, dict(cmap="magma", vmin=0, vmax=np.log(3)), "neither"),
        ("Mutual information (nats)", mi, dict(cmap="viridis", vmin=0, vmax=mi_top), "max"),
    ]
    side, bottom = 3.35, 0.62
    for k, (title, data, kw, extend) in enumerate(panels):
        left = 0.15 + k * 3.95
        ax = fig.add_axes([left / W, bottom / H, side / W, side / H])
        im = ax.imshow(data, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
        if extend:
            cax = fig.add_axes([(left + side + 0.08) / W, bottom / H, 0.13 / W, side / H])
            bar = fig.colorbar(im, cax=cax, extend=extend)
            bar.ax.tick_params(labelsize=9)
        if k == 1:
            ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(COLOURS, CLASSES)], loc="upper center",
                      bbox_to_anchor=(0.5, -0.01), ncol=3, fontsize=10, frameon=False, handlelength=1)
    fig.text(0.5, 0.03, caption, ha="center", fontsize=9.5, color="0.3")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", required=True, help="the mcd-serve binary (e.g. target/release/mcd-serve)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "docs", "uncertainty-map.png"))
    ap.add_argument("--keep-model", help="also write unet_shapes.onnx and its model.json into this folder")
    args = ap.parse_args()

    # Data: train and held-out sets of 64x64 scenes, and the picture's 128x128 scene.
    Xtr, ytr = dataset(600, TRAIN_SIZE, SEED)
    Xte, yte = dataset(200, TRAIN_SIZE, SEED + 1)
    img, lab = picture_scene(SEED + 2)

    epochs, bs, lr = 12, 16, 3e-3
    net = UNet(np.random.default_rng(SEED))
    t0, c0 = time.time(), time.process_time()
    final_loss = train(net, Xtr, ytr, epochs, bs, lr, SEED)
    train_s, train_cpu = time.time() - t0, time.process_time() - c0
    train_acc, test_acc = accuracy(net, Xtr, ytr), accuracy(net, Xte, yte)
    print(f"training: {train_s:.1f} s wall, {train_cpu:.1f} s CPU ({epochs} epochs of {len(Xtr)} images {TRAIN_SIZE}x{TRAIN_SIZE}), "
          f"final loss {final_loss:.4f}; pixel accuracy (eval) train {train_acc:.4f}, held-out {test_acc:.4f}")

    x = img[None, None]
    p_eval = softmax1(net.forward(x, train=False)).astype(F32)
    tmp = tempfile.mkdtemp(prefix="mcd-picture-")
    proc = None
    try:
        path = os.path.join(tmp, f"{MODEL_NAME}.onnx")
        onnx.save(net.export(), path)
        max_abs, varying = verify_with_ort(path, "image", x, p_eval)
        print(f"onnx: {os.path.getsize(path)} bytes; ORT eval vs numpy eval max abs diff {max_abs:.2e}; "
              f"dropout live in ORT: {varying}")
        write_json(os.path.join(tmp, f"{MODEL_NAME}.model.json"), {
            "description": "Synthetic-shapes U-Net (tools/uncertainty_picture.py): classes background, disc, ring",
            "background_class": 0,
            "metrics": {"train_pixel_accuracy": round(train_acc, 4), "heldout_pixel_accuracy": round(test_acc, 4)},
        })
        if args.keep_model:
            os.makedirs(args.keep_model, exist_ok=True)
            for f in (f"{MODEL_NAME}.onnx", f"{MODEL_NAME}.model.json"):
                shutil.copy(os.path.join(tmp, f), args.keep_model)

        proc, base = start_server(args.server, tmp)
        status, raw = http("GET", f"{base}/models/{MODEL_NAME}")
        info = json.loads(raw)
        print(f"server: GET /models/{MODEL_NAME}: output_kinds {json.dumps(info.get('output_kinds'))}; dropout sites "
              f"{[(d.get('node'), d.get('kind'), d.get('ratio')) for d in info.get('dropout_sites', [])]}")
        body = json.dumps({"inputs": x.tolist()}).encode()
        url = f"{base}/models/{MODEL_NAME}/predict"
        status, raw = http("POST", url, body)  # eval: checks the served graph against numpy
        assert status == 200, (status, raw[:500])
        served_eval = np.array(json.loads(raw)["outputs"]["probabilities"], dtype=np.float64)
        eval_diff = float(np.abs(served_eval - p_eval).max())
        t0 = time.time()
        # Every statistic by name: a map's default answer leaves variance, std and expected
        # entropy out, and the checks below use them.
        status, raw = http("POST", f"{url}?mc_samples={MC_SAMPLES}&seed={MC_SEED}&statistics={STATISTICS}", body)
        latency = time.time() - t0
        assert status == 200, (status, raw[:500])
        answer = json.loads(raw)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    out = answer["outputs"]["probabilities"]
    mean = np.array(out["mean"], dtype=np.float64)[0]
    pe = np.array(out["predictive_entropy"], dtype=np.float64)[0]
    ee = np.array(out["expected_entropy"], dtype=np.float64)[0]
    mi = np.array(out["mutual_information"], dtype=np.float64)[0]
    assert mean.shape == (3, TEST_SIZE, TEST_SIZE) and pe.shape == mi.shape == (TEST_SIZE, TEST_SIZE), \
        (mean.shape, pe.shape, mi.shape)
    print(f"server: eval answer vs numpy eval max abs diff {eval_diff:.2e}; MC-{MC_SAMPLES} answer "
          f"{len(raw)} bytes in {latency * 1000:.0f} ms (mode {answer['mode']}, seed {answer['seed']})")
    print(f"  summary: {json.dumps(out.get('summary'))}")

    # Sanity: the answer's entropy is the entropy of its own mean; PE = EE + MI.
    local_pe = entropy(mean, axis=0)
    for (i, j) in ((int(pe.argmax() // TEST_SIZE), int(pe.argmax() % TEST_SIZE)), (0, 0), (64, 64), (16, 16)):
        print(f"  pixel ({i:3d},{j:3d}): mean p {np.round(mean[:, i, j], 4).tolist()}, server PE {pe[i, j]:.6f}, "
              f"numpy H(mean) {local_pe[i, j]:.6f}, MI {mi[i, j]:.6f}")
    pe_diff = float(np.abs(local_pe - pe).max())
    split_diff = float(np.abs(ee + mi - pe).max())
    print(f"  max |H(mean) - PE| over all pixels {pe_diff:.2e}; max |EE + MI - PE| {split_diff:.2e}; "
          f"min MI {mi.min():.2e}")
    assert pe_diff < 1e-4 and split_diff < 1e-6, (pe_diff, split_diff)
    sum_diff = float(np.abs(mean.sum(axis=0) - 1).max())
    std_diff = float(np.abs(np.array(out["std"])[0] ** 2 - np.array(out["variance"])[0]).max())
    print(f"  max |sum_c mean - 1| {sum_diff:.2e}; max |std^2 - variance| {std_diff:.2e}")
    assert sum_diff < 1e-5 and std_diff < 1e-9, (sum_diff, std_diff)
    mc_acc = float((mean.argmax(axis=0) == lab).mean())
    wrong = mean.argmax(axis=0) != lab
    print(f"  picture: MC-mean pixel accuracy {mc_acc:.4f}; mean PE on wrong pixels {pe[wrong].mean():.3f} "
          f"vs right {pe[~wrong].mean():.3f} nats; mean MI wrong {mi[wrong].mean():.4f} vs right "
          f"{mi[~wrong].mean():.4f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    draw(args.out, img, mean, pe, mi,
         f"mcd-serve's answer to POST /models/{MODEL_NAME}/predict?mc_samples={MC_SAMPLES}&seed={MC_SEED} "
         f"(its mean, predictive_entropy and mutual_information) for a small U-Net; shapes fainter row by row. "
         f"Made by tools/uncertainty_picture.py.")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
