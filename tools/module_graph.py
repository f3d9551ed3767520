#!/usr/bin/env python3
"""The crate's module graph from its own `use crate::...` lines: the largest files, the
arrows between modules, and every import circle.

    python3 tools/module_graph.py [--depth N] [--src DIR]

A module is a file's path under src/ (`engine/model/load.rs` is `engine::model::load`;
`mod.rs` is its folder). An arrow A -> B is any `crate::B...` path named in A (in `use`
lines and in code), cut to --depth segments (default 3), so `crate::engine::model::Dim`
at depth 2 is an arrow to `engine::model`. Test modules count like the rest: a circle that
only tests close is still a circle in the reading order. Circles are the graph's strongly
connected components of more than one module; layer arrows that go up (engine -> core,
engine or core -> front), arrows out of the engine, and arrows into the engine from
outside the core are listed apart. Exits 1 when there is any of them, so CI or a reviewer
can run it.
"""

import argparse
import os
import re
import sys

LAYERS = {"engine": 0, "core": 1, "front": 2}


def module_of(path, src):
    rel = os.path.relpath(path, src)[: -len(".rs")]
    parts = rel.split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def resolve(name, modules, depth):
    """The longest known module that `name` (a crate path) starts with, cut to depth."""
    segs = name.split("::")[:depth]
    while segs:
        cand = "::".join(segs)
        if cand in modules:
            return cand
        segs = segs[:-1]
    return None


def crate_paths(text):
    """Every `crate::a::b` path in the text, with `use crate::a::{b, c::d}` groups expanded."""
    out = set()
    for m in re.finditer(r"crate::([A-Za-z_][\w:]*)(::\{([^;]*?)\})?", text, re.S):
        base = m.group(1).rstrip(":")
        out.add(base)
        if m.group(3):
            for item in re.split(r"[,\s]+", m.group(3)):
                item = item.strip().strip("{}")
                if item and item != "self" and re.match(r"^[A-Za-z_][\w:]*$", item):
                    out.add(f"{base}::{item}")
    # `super::` and `self::` are relative; they stay within a module's own subtree.
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    src = os.path.normpath(args.src)
    files = {}
    for root, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(root, n)
                files[module_of(p, src)] = p
    modules = set(files)
    cut = {m: "::".join(m.split("::")[: args.depth]) for m in modules}
    nodes = set(cut.values())

    edges = {}
    for m, p in files.items():
        text = open(p, encoding="utf-8").read()
        a = cut[m]
        for name in crate_paths(text):
            b = resolve(name, modules, 99)
            if b is None:
                continue
            b = cut[b]
            if b != a and not a.startswith(b + "::") and not b.startswith(a + "::"):
                edges.setdefault(a, set()).add(b)

    sizes = sorted(((sum(1 for _ in open(p, encoding="utf-8")), os.path.relpath(p, src)) for p in files.values()), reverse=True)
    print(f"largest files (lines), of {len(files)}:")
    for n, p in sizes[: args.top]:
        print(f"  {n:5}  src/{p}")

    # Tarjan's strongly connected components.
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    circles = [sorted(c) for c in comps if len(c) > 1]
    print(f"\nimport circles at depth {args.depth}: {len(circles)}")
    for c in circles:
        inner = sorted(f"{a} -> {b}" for a in c for b in edges.get(a, ()) if b in c)
        print("  {" + ", ".join(c) + "}")
        for e in inner:
            print(f"      {e}")

    up = sorted(
        f"{a} -> {b}"
        for a, bs in edges.items()
        for b in bs
        if a.split("::")[0] in LAYERS and b.split("::")[0] in LAYERS and LAYERS[b.split("::")[0]] > LAYERS[a.split("::")[0]]
    )
    print(f"\nupward arrows between layers (engine < core < front): {len(up)}")
    for e in up:
        print(f"  {e}")

    # The engine should stand on its own: any arrow out of it but to itself is listed (the
    # crate's error type carries HTTP and gRPC statuses). Front ends should reach the engine
    # only through the core.
    out_of_engine = sorted(
        f"{a} -> {b}" for a, bs in edges.items() for b in bs if a.split("::")[0] == "engine" and b.split("::")[0] != "engine"
    )
    print(f"\narrows out of the engine: {len(out_of_engine)}")
    for e in out_of_engine:
        print(f"  {e}")
    past_core = sorted(
        f"{a} -> {b}"
        for a, bs in edges.items()
        for b in bs
        if a.split("::")[0] not in ("engine", "core") and b.split("::")[0] == "engine"
    )
    print(f"\narrows into the engine from outside the core: {len(past_core)}")
    for e in past_core:
        print(f"  {e}")
    return 1 if circles or up or out_of_engine or past_core else 0


if __name__ == "__main__":
    sys.exit(main())
