#!/usr/bin/env python3
"""Derive a short-window copy of the production alerting/recording rules.

    make_test_rules.py SRC DST [--window 2m]

Every PromQL range `[<dur>]` and `offset <dur>` becomes the test window and
every `for: <dur>` becomes `for: 0s`, so a live test with a 1s scrape and 1s
evaluation interval sees rules fire within seconds, while the expressions
stay the production ones. Standard library only (used by
.ci/prometheus-live.sh and .ci/deploy-checks.sh).
"""
import argparse
import re
import sys

DUR = r"\d+(?:ms|[smhdwy])"


def transform(text: str, window: str) -> tuple[str, dict]:
    counts = {}
    text, counts["ranges"] = re.subn(r"\[" + DUR + r"\]", f"[{window}]", text)
    text, counts["offsets"] = re.subn(r"\boffset\s+" + DUR, f"offset {window}", text)
    text, counts["for"] = re.subn(r"^(\s*)for:\s*" + DUR + r"\s*$", r"\1for: 0s", text, flags=re.M)
    # Subqueries `[1h:5m]` would not be rewritten above: refuse them loudly.
    if re.search(r"\[" + DUR + ":", text):
        raise SystemExit("make_test_rules: subqueries are not supported")
    return text, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--window", default="2m")
    a = ap.parse_args()
    with open(a.src, encoding="utf-8") as f:
        text = f.read()
    out, counts = transform(text, a.window)
    header = (f"# GENERATED from {a.src} by deploy/ci/make_test_rules.py "
              f"(window {a.window}, for: 0s). Do not edit.\n")
    with open(a.dst, "w", encoding="utf-8") as f:
        f.write(header + out)
    print(f"make_test_rules: {counts['ranges']} ranges, {counts['offsets']} offsets, "
          f"{counts['for']} for-clauses rewritten -> {a.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
