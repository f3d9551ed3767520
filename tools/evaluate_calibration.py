#!/usr/bin/env python3
"""Measure the bundled models' calibrated answers on their held-out test split.

Queries a running mcd-serve (the models/ folder, with the bundled calibrations) over the
test split of tools/train_models.py (sklearn ``train_test_split(test_size=0.2,
random_state=0)``, stratified for the classifiers): one MC request per row, as a client
asking about one case would send it. Prints, per model and level, coverage and mean
interval width or set size; for the classifiers the referral rate and the error among
accepted rows at the model's referral target; and the counts ``mc_samples=auto`` chose.

Usage (from the repository root, a server on localhost:8080):
  tools/.venv/bin/python tools/evaluate_calibration.py [--url http://localhost:8080] [--mc-samples 100]

Only the standard library and the training script's data loaders are used.
"""

import argparse
import json
import os
import sys
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_models  # noqa: E402

LEVELS = ["0.8", "0.9", "0.95", "0.99"]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def answers(base, model, X, query):
    for i, x in enumerate(X):
        yield post(f"{base}/models/{model}/predict?{query}&seed={i}", {"inputs": [x.tolist()]})


def regression(base, model, X, y, samples):
    covered = {l: 0 for l in LEVELS}
    width = {l: 0.0 for l in LEVELS}
    naive = 0
    for a, t in zip(answers(base, model, X, f"mc_samples={samples}"), y):
        o = a["outputs"]["prediction"]
        m, s = o["mean"][0][0], o["std"][0][0]
        naive += m - 1.96 * s <= t <= m + 1.96 * s
        for l in LEVELS:
            lo, hi = o["intervals"][l]["lower"][0][0], o["intervals"][l]["upper"][0][0]
            covered[l] += lo <= t <= hi
            width[l] += hi - lo
    n = len(y)
    rows = [{"level": l, "coverage": covered[l] / n, "mean_width": width[l] / n} for l in LEVELS]
    return {"n": n, "levels": rows, "naive_mean_1.96_std_coverage": naive / n}


def classification(base, model, X, y, samples):
    covered = {l: 0 for l in LEVELS}
    size = {l: 0 for l in LEVELS}
    referred = accepted = accepted_wrong = 0
    target = threshold = None
    for a, t in zip(answers(base, model, X, f"mc_samples={samples}"), y):
        o = a["outputs"]["probabilities"]
        for l in LEVELS:
            s = o["prediction_sets"][l][0]
            covered[l] += int(t) in s
            size[l] += len(s)
        target, threshold = o["refer_target_error"], o["refer_threshold"]
        if o["refer"][0]:
            referred += 1
        else:
            accepted += 1
            accepted_wrong += int(np.argmax(o["mean"][0])) != int(t)
    n = len(y)
    rows = [{"level": l, "coverage": covered[l] / n, "mean_set_size": size[l] / n} for l in LEVELS]
    return {"n": n, "levels": rows, "refer_target_error": target, "refer_threshold": threshold,
            "referral_rate": referred / n, "accepted": accepted,
            "accepted_errors": accepted_wrong, "accepted_error": accepted_wrong / max(accepted, 1)}


def auto_counts(base, model, X, se):
    counts, converged = [], 0
    for a in answers(base, model, X, f"mc_samples=auto&mc_se={se}"):
        counts.append(a["mc_samples"])
        converged += a["mc_converged"]
    c = np.array(counts)
    return {"mc_se": se, "median": float(np.median(c)), "p90": float(np.percentile(c, 90)),
            "min": int(c.min()), "max": int(c.max()), "converged": converged / len(c)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://localhost:8080")
    ap.add_argument("--mc-samples", type=int, default=100)
    args = ap.parse_args()
    report = {}
    _, Xte, _, yte = train_models.load_diabetes_split()
    report["diabetes"] = regression(args.url, "diabetes", Xte, yte, args.mc_samples)
    report["diabetes"]["auto"] = [auto_counts(args.url, "diabetes", Xte, se) for se in (1.0, 2.0)]
    _, Xte, _, yte = train_models.load_breast_cancer_split()
    report["breast_cancer"] = classification(args.url, "breast_cancer", Xte, yte, args.mc_samples)
    report["breast_cancer"]["auto"] = [auto_counts(args.url, "breast_cancer", Xte, se) for se in (0.01, 0.02)]
    _, Xte, _, yte = train_models.load_digits_split()
    report["digits_cnn"] = classification(args.url, "digits_cnn", Xte, yte, args.mc_samples)
    report["digits_cnn"]["auto"] = [auto_counts(args.url, "digits_cnn", Xte, se) for se in (0.01, 0.02)]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
