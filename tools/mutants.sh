#!/usr/bin/env bash
# Mutation testing of the modules where a wrong number is silent: the uncertainty
# statistics (src/engine/uncertainty.rs), the mask sampler (src/engine/masks.rs) and the
# dropout-site analysis of the graph surgery (analyse() and its helpers in
# src/engine/onnx_graph/ but for rewrite.rs, the rewriting half).
#
#   tools/mutants.sh                 # run (tens of minutes: one release build per mutant)
#   tools/mutants.sh --list          # list the mutants only
#   tools/mutants.sh --iterate       # again, skipping the mutants caught last time
#   MUTANTS_TESTS="--lib --test engine" tools/mutants.sh    # a wider test command
#   MUTANTS_REV=ef0c602 MUTANTS_WORK=/tmp/mcd-mutants-before tools/mutants.sh   # an older commit
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
# MUTANTS_REV=<commit> takes the sources (code and tests) of that commit instead of the
# work tree: how the "before" score was measured.
for f in Cargo.toml Cargo.lock rustfmt.toml src tests models benches examples; do
  rm -rf "${WORK:?}/$f"
  if [[ -n "${MUTANTS_REV:-}" ]]; then
    git -C "$ROOT" archive "$MUTANTS_REV" "$f" 2>/dev/null | tar -x -C "$WORK" || true
  elif [[ -e "$ROOT/$f" ]]; then
    cp -a "$ROOT/$f" "$WORK/$f"
  fi
done
[[ -d "$WORK/target" ]] || cp -a "$ROOT/target" "$WORK/target"
# Sources newer than anything built before: copies keep older times (git archive uses the
# commit's), and target/ may hold a build of the last mutant of an earlier run.
find "$WORK/src" "$WORK/tests" -type f -exec touch {} +

# The dropout-site analysis: analyse() and what it calls, not the graph rewriting.
SITE_ANALYSIS='analyse|DropoutSite::samples|opset|is_default_domain|node_name|refuse_dropout_in_subgraphs(::scan)?|subgraphs|consumed_names(::walk)?|constant_tensors|scalar_f32'

# The test targets, for the build and the test run alike (cargo-mutants builds all
# targets unless told).
TEST_ARGS=()
for a in $TESTS; do TEST_ARGS+=("--cargo-arg=$a"); done

# A mutant that fails a property test fails it at once; shrinking the counterexample
# only costs time here.
export PROPTEST_MAX_SHRINK_ITERS="${PROPTEST_MAX_SHRINK_ITERS:-0}"
# Incremental release builds of this crate: a mutant changes one function, so most of the
# crate's code generation is reused (about twice as fast per mutant).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-1}"

cd "$WORK"
# Exit status 2 means some mutants were missed: still a result to keep.
rc=0
nice -n 19 cargo mutants --in-place --profile release \
  --file src/engine/uncertainty.rs --file src/engine/masks.rs --file src/engine/onnx_graph/sites.rs --file src/engine/onnx_graph/analyse.rs --file src/engine/onnx_graph/proto.rs \
  --re "^src/engine/(uncertainty|masks)\.rs|(in|replace) ($SITE_ANALYSIS)\b" \
  --timeout 20 --build-timeout 600 \
  --output "$WORK" "${TEST_ARGS[@]}" "$@" || rc=$?
OUT="$ROOT/mutants.out${MUTANTS_REV:+.$MUTANTS_REV}"
[[ " $* " == *" --list "* ]] || { rm -rf "$OUT"; cp -a "$WORK/mutants.out" "$OUT"; echo "results: $OUT"; }
exit "$rc"
