#!/usr/bin/env python3
"""Extracts the served schemas of KServe's CRDs into gzipped JSON, for .ci's offline check.

    python deploy/kserve/crd-schemas/extract.py KSERVE_CHECKOUT/config/crd/full

Writes <kind>.<version>.schema.json.gz beside this script for ServingRuntime,
ClusterServingRuntime and InferenceService: each is the CRD's `openAPIV3Schema`,
unchanged, taken from the kserve/kserve repository (Apache-2.0).
"""
import gzip
import json
import os
import sys

import yaml

FILES = ["serving.kserve.io_servingruntimes.yaml", "serving.kserve.io_clusterservingruntimes.yaml",
         "serving.kserve.io_inferenceservices.yaml"]


def main(src):
    here = os.path.dirname(os.path.abspath(__file__))
    for name in FILES:
        crd = yaml.safe_load(open(os.path.join(src, name), encoding="utf-8"))
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if not v.get("served"):
                continue
            out = os.path.join(here, f"{kind}.{v['name']}.schema.json.gz")
            data = json.dumps(v["schema"]["openAPIV3Schema"], sort_keys=True, separators=(",", ":")).encode()
            with gzip.GzipFile(out, "wb", mtime=0) as f:
                f.write(data)
            print(f"{out}: {len(data)} bytes of schema")


if __name__ == "__main__":
    main(sys.argv[1])
