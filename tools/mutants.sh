#!/usr/bin/env bash
# Mutation testing of the modules where a wrong number is silent: the uncertainty
# statistics (src/engine/uncertainty.rs), the mask sampler (src/engine/masks.rs) and the
# dropout-site analysis of the graph surgery (analyse() and its helpers in
# src/engine/onnx_graph.rs; the rewriting half, Surgery::*, is left out).
#
#   tools/mutants.sh                 # run (tens of minutes: one release build per mutant)
#   tools/mutants.sh --list          # list the mutants only
#   MUTANTS_TESTS="--lib --test engine" tools/mutants.sh    # a wider test command
#
# On demand only, not in .ci/run: it takes too long for every push. Needs cargo-mutants
# (`cargo install cargo-mutants`, 27.x). Results land in mutants.out/ (outcomes.json,
# caught.txt, missed.txt, timeout.txt, unviable.txt); record the counts in docs/testing.md.
#
# It builds in release, like the test suite, and in place in a copy of this tree that
# keeps target/'s timestamps (cp -a), so the dependencies (tract) are not rebuilt: only
# this crate is, once per mutant. MUTANTS_WORK sets where the copy goes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${MUTANTS_WORK:-/tmp/mcd-mutants}"
TESTS="${MUTANTS_TESTS:---lib}"
command -v cargo-mutants >/dev/null || { echo "cargo-mutants is not installed: cargo install cargo-mutants" >&2; exit 1; }

mkdir -p "$WORK"
# The sources, and the warm target dir once, with timestamps (a plain copy would rebuild
# every dependency).
for f in Cargo.toml Cargo.lock rustfmt.toml src tests models benches examples; do
  rm -rf "${WORK:?}/$f"
  [[ -e "$ROOT/$f" ]] && cp -a "$ROOT/$f" "$WORK/$f"
done
[[ -d "$WORK/target" ]] || cp -a "$ROOT/target" "$WORK/target"

# The dropout-site analysis: analyse() and what it calls, not the graph rewriting.
SITE_ANALYSIS='analyse|DropoutSite::samples|opset|is_default_domain|node_name|refuse_dropout_in_subgraphs(::scan)?|subgraphs|consumed_names(::walk)?|constant_tensors|scalar_f32'

# The test targets, for the build and the test run alike (cargo-mutants builds all
# targets unless told).
TEST_ARGS=()
for a in $TESTS; do TEST_ARGS+=("--cargo-arg=$a"); done

cd "$WORK"
# shellcheck disable=SC2086
nice -n 19 cargo mutants --in-place --profile release \
  --file src/engine/uncertainty.rs --file src/engine/masks.rs --file src/engine/onnx_graph.rs \
  --re "^src/engine/(uncertainty|masks)\.rs|(in|replace) ($SITE_ANALYSIS)\b" \
  --timeout 60 --build-timeout 600 \
  --output "$WORK" "${TEST_ARGS[@]}" "$@"
[[ " $* " == *" --list "* ]] || { rm -rf "$ROOT/mutants.out"; cp -a "$WORK/mutants.out" "$ROOT/mutants.out"; echo "results: $ROOT/mutants.out"; }
