//! The load-time self-checks: a model proves, on a seeded probe input, that it runs in the
//! mode each route asks for before the server reports it ready.

use serde::Serialize;
use tract_onnx::prelude::*;

use super::*;
use crate::engine::masks::MaskSampler;
use session::Trunk;

/// Samples drawn by the load-time liveness check.
const PROBE_MC_SAMPLES: usize = 4;
/// Rows of the load-time probe batch.
const PROBE_ROWS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Skipped,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The load-time self-checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Two eval passes on the probe are bit-identical.
    EvalDeterministic,
    /// Each probe row alone gives its row of the batch answer (BatchNorm on batch
    /// statistics fails it).
    EvalRowIndependent,
    /// The shared-trunk MC graph equals the full one with the same masks.
    McSharedTrunk,
    /// The MC plan with keep-all masks reproduces eval.
    McMatchesEval,
    /// MC samples differ by more than float rounding.
    McLive,
    /// A row's answer does not depend on what else shares its pass (`invariance`).
    BatchInvariant,
}

impl Check {
    /// The name in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::EvalDeterministic => "eval_deterministic",
            Check::EvalRowIndependent => "eval_row_independent",
            Check::McSharedTrunk => "mc_shared_trunk",
            Check::McMatchesEval => "mc_matches_eval",
            Check::McLive => "mc_live",
            Check::BatchInvariant => "batch_invariant",
        }
    }

    /// Whether failing it keeps the model from serving. A failed `mc_live` only refuses
    /// MC, and a failed `batch_invariant` only keeps the model's requests in passes of
    /// their own.
    pub fn gates_health(self) -> bool {
        !matches!(self, Check::McLive | Check::BatchInvariant)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub check: Check,
    pub result: Outcome,
    pub detail: String,
}

impl LoadedModel {
    pub(super) fn probe_batch(&self, rows: usize, seed: u64) -> anyhow::Result<InputRows> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = vec![];
        for spec in &self.inputs {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Symbol(s) if Some(s) == self.batch_symbol.as_ref() => rows,
                    Dim::Symbol(s) => self.config.probe_dims.get(s).copied().unwrap_or(1),
                })
                .collect();
            let len: usize = shape.iter().product();
            let floats: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let t = Tensor::from_shape(&shape, &floats)?;
            // Integer and boolean inputs are often indices or flags: zeros are always valid.
            let t = if spec.datum.is_float() {
                t.cast_to_dt(spec.datum)?.into_owned()
            } else {
                Tensor::zero_dt(spec.datum, &shape)?
            };
            tensors.push(t);
        }
        self.input_rows(tensors).map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub(super) fn self_check(&mut self) {
        let mut checks = vec![];
        let probe = self.probe_batch(PROBE_ROWS, 0x6d6364);
        let probe = match probe {
            Ok(p) => p,
            Err(e) => {
                for check in [
                    Check::EvalDeterministic,
                    Check::EvalRowIndependent,
                    Check::McMatchesEval,
                    Check::McLive,
                ] {
                    checks.push(CheckResult {
                        check,
                        result: Outcome::Fail,
                        detail: format!("could not build a probe input: {e}"),
                    });
                }
                self.checks = checks;
                return;
            }
        };
        let eval = self.eval_session().run(&probe);
        checks.push(match &eval {
            Err(e) => fail(Check::EvalDeterministic, format!("eval failed on the probe input: {e}")),
            Ok(first) => match self.eval_session().run(&probe) {
                Err(e) => fail(Check::EvalDeterministic, format!("second eval failed: {e}")),
                Ok(second) => {
                    let same = first
                        .iter()
                        .zip(&second)
                        .all(|(a, b)| bits(&a.tensor) == bits(&b.tensor));
                    if same {
                        pass(
                            Check::EvalDeterministic,
                            "two eval passes on the probe are bit-identical",
                        )
                    } else {
                        fail(
                            Check::EvalDeterministic,
                            "two eval passes on the same probe differ".into(),
                        )
                    }
                }
            },
        });
        checks.push(match (&eval, &self.batch_symbol) {
            (_, None) => skipped(
                Check::EvalRowIndependent,
                "the file fixes the batch size (or an output has no batch axis)",
            ),
            (Err(_), _) => fail(Check::EvalRowIndependent, "eval failed on the probe input".into()),
            (Ok(full), Some(_)) => self.check_rows(&probe, full),
        });
        checks.push(match &mut self.mc {
            Err(reason) => skipped(Check::McSharedTrunk, reason),
            Ok(plan) => check_shared_trunk(plan, &probe),
        });
        checks.push(match (&eval, &self.mc) {
            (_, Err(reason)) => skipped(Check::McMatchesEval, reason),
            (Err(_), _) => fail(Check::McMatchesEval, "eval failed on the probe input".into()),
            (Ok(full), Ok(plan)) => match run_with_unit_masks(plan, &probe) {
                Err(e) => fail(Check::McMatchesEval, format!("the MC graph failed: {e}")),
                Ok(outs) => match compare(full, &outs) {
                    None => pass(Check::McMatchesEval, "the MC graph with keep-all masks equals eval"),
                    Some(d) => fail(
                        Check::McMatchesEval,
                        format!("the MC graph with keep-all masks differs from eval: {d}"),
                    ),
                },
            },
        });
        let live = match &self.mc {
            Err(reason) => skipped(Check::McLive, reason),
            Ok(plan) => check_live(plan, &probe),
        };
        if live.result == Outcome::Fail {
            self.mc = Err(live.detail.clone());
        }
        if checks
            .iter()
            .any(|c| c.result == Outcome::Fail && c.check == Check::McMatchesEval)
        {
            self.mc = Err("the MC graph does not reproduce eval with keep-all masks".into());
        }
        checks.push(live);
        checks.push(self.check_batch_invariant(&probe));
        self.checks = checks;
    }

    fn check_rows(&self, probe: &InputRows, full: &[NamedTensor]) -> CheckResult {
        for r in 0..probe.rows {
            let tensors: TractResult<Vec<Tensor>> = probe.tensors.iter().map(|t| t.slice(0, r, r + 1)).collect();
            let single = tensors
                .map_err(|e| anyhow::anyhow!("{e}"))
                .and_then(|t| self.input_rows(t).map_err(|e| anyhow::anyhow!("{e}")))
                .and_then(|b| self.eval_session().run(&b).map_err(|e| anyhow::anyhow!("{e}")));
            let single = match single {
                Ok(s) => s,
                Err(e) => {
                    return fail(
                        Check::EvalRowIndependent,
                        format!("eval of probe row {r} alone failed: {e}"),
                    );
                }
            };
            let rows_of_full: TractResult<Vec<NamedTensor>> = full
                .iter()
                .map(|o| {
                    Ok(NamedTensor {
                        name: o.name.clone(),
                        tensor: o.tensor.slice(0, r, r + 1)?,
                    })
                })
                .collect();
            match rows_of_full {
                Err(e) => return fail(Check::EvalRowIndependent, format!("{e}")),
                Ok(rows) => {
                    if let Some(d) = compare(&rows, &single) {
                        return fail(
                            Check::EvalRowIndependent,
                            format!(
                                "probe row {r} gives a different output alone than inside a batch of {} \
                                 ({d}); typically BatchNormalization on batch statistics",
                                probe.rows
                            ),
                        );
                    }
                }
            }
        }
        pass(
            Check::EvalRowIndependent,
            &format!(
                "each of {} probe rows gives the same output alone as in the batch",
                probe.rows
            ),
        )
    }
}

pub(super) fn run_with_unit_masks(plan: &McPlan, batch: &InputRows) -> TractResult<Vec<NamedTensor>> {
    let mut masks = vec![];
    for m in &plan.masks {
        let shape = resolve(&m.shape, &batch.symbols).map_err(|e| anyhow::anyhow!(e))?;
        // Each mask's keep-everything value: 1 for a scale, 0 for alpha dropout's offset.
        let unit = Tensor::from_shape(&shape, &vec![m.values.unit; shape.iter().product()])?;
        masks.push(unit.cast_to_dt(m.datum)?.into_owned().into_tvalue());
    }
    let outs = plan
        .run(batch, 1, masks)?
        .into_iter()
        .map(|(shape, values)| Tensor::from_shape(&shape, &values))
        .collect::<TractResult<Vec<_>>>()?;
    Ok(unnamed(outs))
}

/// Tensors to compare by position.
pub(super) fn unnamed(tensors: impl IntoIterator<Item = Tensor>) -> Vec<NamedTensor> {
    tensors
        .into_iter()
        .map(|tensor| NamedTensor {
            name: String::new(),
            tensor,
        })
        .collect()
}

/// Dropout must move the raw MC graph's outputs (the logits, where the server applies the
/// softmax, centred per row) by far more than float rounding: a variance merely above zero
/// proves nothing (a saturated softmax gives 1e-39 from rounding alone). The spread of each
/// element over the samples is measured against the output's scale.
pub(super) fn check_live(plan: &McPlan, probe: &InputRows) -> CheckResult {
    const CHECK: Check = Check::McLive;
    let k = PROBE_MC_SAMPLES;
    let shared = matches!(plan.trunk, Trunk::Shared { .. });
    // As a request runs: all samples in one pass when the masks are batch-led, else one
    // pass per sample. Per output, the samples one after the other.
    let per_pass = if plan.batch.is_some() { k } else { 1 };
    let mut sampler = MaskSampler::new(0x6c_69_76_65);
    let mut raw: Vec<Vec<f64>> = vec![];
    let mut done = 0;
    while done < k {
        let step = per_pass.min(k - done);
        let outs = plan
            .sample_masks(probe, done, step, &mut sampler)
            .and_then(|masks| McPlan::run_plans(&plan.plans, shared, probe, step, masks))
            .and_then(|outs| {
                outs.iter()
                    .zip(&plan.softmax)
                    .map(|(t, &softmax)| {
                        let mut values = to_f64(t)?;
                        if softmax {
                            center_rows(
                                &mut values,
                                *t.shape().last().expect("softmax outputs have a last axis"),
                            );
                        }
                        Ok(values)
                    })
                    .collect::<TractResult<Vec<_>>>()
            });
        match outs {
            Ok(outs) => {
                raw.resize_with(outs.len(), Vec::new);
                for (all, values) in raw.iter_mut().zip(outs) {
                    all.extend(values);
                }
            }
            Err(e) => return fail(CHECK, format!("MC failed on the probe input: {e:#}")),
        }
        done += step;
    }
    let best = raw.iter().map(|v| relative_spread(v, k)).fold(0.0f64, f64::max);
    if best >= LIVE_SPREAD {
        pass(
            CHECK,
            &format!(
                "{k} MC samples on the probe moved an output by {best:.3e} of its scale (the check asks {LIVE_SPREAD:.0e})"
            ),
        )
    } else {
        fail(
            CHECK,
            format!(
                "{k} MC samples on the probe moved no output by more than {best:.3e} of its scale, \
                 below {LIVE_SPREAD:.0e}: that is float rounding, not dropout, so MC dropout is degenerate for \
                 this model (zero variance)"
            ),
        )
    }
}

/// Subtracts each row's mean: softmax ignores a shift shared by a row's logits, so only
/// what is left can move a probability. (With equal weights every logit of a row moves
/// alike, and the probabilities never move at all.)
pub(super) fn center_rows(values: &mut [f64], classes: usize) {
    for row in values.chunks_exact_mut(classes.max(1)) {
        let mean = row.iter().sum::<f64>() / row.len() as f64;
        row.iter_mut().for_each(|v| *v -= mean);
    }
}

/// The least spread, relative to an output's scale, that counts as dropout moving it:
/// about 800 float32 ulps, far above rounding, far below what a dropout site does.
pub(super) const LIVE_SPREAD: f64 = 1e-4;

/// `values` holds `k` samples one after the other; the largest (max − min) over the samples
/// of any element, divided by the largest magnitude in the output (0 when all are 0).
pub(super) fn relative_spread(values: &[f64], k: usize) -> f64 {
    let n = values.len() / k.max(1);
    let scale = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    // NaN scales fail too: neither comparison holds.
    if n == 0 || scale.is_nan() || scale <= 0.0 || !scale.is_finite() {
        return 0.0;
    }
    let spread = (0..n)
        .map(|e| {
            let (lo, hi) = (0..k)
                .map(|s| values[s * n + e])
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
            hi - lo
        })
        .fold(0.0f64, f64::max);
    spread / scale
}

/// Compares the shared-trunk MC graph with the full one on the probe, with the same masks,
/// and keeps the shared one only when they agree; then drops the full graph.
pub(super) fn check_shared_trunk(plan: &mut McPlan, probe: &InputRows) -> CheckResult {
    const CHECK: Check = Check::McSharedTrunk;
    let (detail, full) = match &mut plan.trunk {
        Trunk::Full(reason) => {
            return skipped(CHECK, &format!("MC runs the full graph for every sample: {reason}"));
        }
        Trunk::Shared { detail, full } => (
            detail.clone(),
            full.take().expect("the shared trunk is checked once, at load"),
        ),
    };
    let k = PROBE_MC_SAMPLES;
    let outcome = plan
        .sample_masks(probe, 0, k, &mut MaskSampler::new(0x74_72_75_6e_6b))
        .and_then(|masks| {
            let shared = McPlan::run_plans(&plan.plans, true, probe, k, masks.clone())?;
            let reference = McPlan::run_plans(&full, false, probe, k, masks)?;
            let tensors = |outs: TVec<TValue>| unnamed(outs.into_iter().map(|t| t.into_tensor()));
            Ok(compare(&tensors(reference), &tensors(shared)))
        });
    let problem = match outcome {
        Ok(None) => {
            return pass(
                CHECK,
                &format!("{detail}; with the same masks it equals the full graph on {k} samples of the probe"),
            );
        }
        Ok(Some(diff)) => format!("the shared-trunk graph differs from the full graph ({diff})"),
        Err(e) => format!("the shared-trunk graph failed on the probe ({e:#})"),
    };
    plan.plans = *full;
    let result = skipped(CHECK, &format!("MC runs the full graph for every sample: {problem}"));
    plan.trunk = Trunk::Full(problem);
    result
}

pub(super) fn pass(check: Check, detail: &str) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Pass,
        detail: detail.to_string(),
    }
}
pub(super) fn fail(check: Check, detail: String) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Fail,
        detail,
    }
}
pub(super) fn skipped(check: Check, detail: &str) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Skipped,
        detail: detail.to_string(),
    }
}

pub(super) fn bits(t: &Tensor) -> Vec<u64> {
    to_f64(t)
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .unwrap_or_default()
}

/// Same outputs up to float rounding? Different plans (batch sizes, fused kernels) may
/// reorder sums, so allow a few float32 ulps of relative slack, never more.
pub(super) fn compare(a: &[NamedTensor], b: &[NamedTensor]) -> Option<String> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.tensor.shape() != y.tensor.shape() {
            return Some(format!(
                "output {i} shape {:?} vs {:?}",
                x.tensor.shape(),
                y.tensor.shape()
            ));
        }
        let (Ok(xv), Ok(yv)) = (to_f64(&x.tensor), to_f64(&y.tensor)) else {
            continue;
        };
        for (j, (p, q)) in xv.iter().zip(&yv).enumerate() {
            let tol = 1e-5 + 1e-4 * p.abs().max(q.abs());
            if (p - q).abs() > tol && !(p.is_nan() && q.is_nan()) {
                return Some(format!("output {i} element {j}: {p} vs {q}"));
            }
        }
    }
    None
}
