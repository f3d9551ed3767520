//! The load-time self-checks: a model proves, on a seeded probe input, that it runs in the
//! mode each route asks for before the server reports it ready.

use serde::Serialize;
use tract_onnx::prelude::*;

use super::*;
use mc_checks::{check_live, check_shared_trunk, run_with_unit_masks};

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
    /// Wall time the check took at load, so a slow load shows which check it spent on.
    pub seconds: f64,
}

impl LoadedModel {
    pub(super) fn probe_batch(&self, rows: usize, seed: u64) -> anyhow::Result<InputRows> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = vec![];
        for spec in &self.inputs {
            let shape = self.input_shape(spec, rows, |s| self.config.probe_dims.get(s).copied().unwrap_or(1));
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
                        seconds: 0.0,
                    });
                }
                self.checks = checks;
                return;
            }
        };
        // Each check's wall time: `timed` stamps the check just pushed with the time since `t`.
        fn timed(checks: &mut [CheckResult], t: &mut std::time::Instant) {
            if let Some(last) = checks.last_mut() {
                last.seconds = t.elapsed().as_secs_f64();
            }
            *t = std::time::Instant::now();
        }
        let mut t = std::time::Instant::now();
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
        timed(&mut checks, &mut t);
        checks.push(match (&eval, &self.batch_symbol) {
            (_, None) => skipped(
                Check::EvalRowIndependent,
                "the file fixes the batch size (or an output has no batch axis)",
            ),
            (Err(_), _) => fail(Check::EvalRowIndependent, "eval failed on the probe input".into()),
            // The probe in one batched pass, even when the model serves row by row: a
            // BatchNorm on batch statistics only shows in a batch.
            (Ok(_), Some(_)) => match self.eval_session().batched_pass(&probe) {
                Ok(full) => self.check_rows(&probe, &full),
                Err(e) => fail(
                    Check::EvalRowIndependent,
                    format!("eval of the probe in one pass failed: {e}"),
                ),
            },
        });
        timed(&mut checks, &mut t);
        checks.push(match &mut self.mc {
            Err(reason) => skipped(Check::McSharedTrunk, reason),
            Ok(plan) => check_shared_trunk(plan, &probe),
        });
        timed(&mut checks, &mut t);
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
        timed(&mut checks, &mut t);
        let mut live = match &self.mc {
            Err(reason) => skipped(Check::McLive, reason),
            Ok(plan) => check_live(plan, &probe),
        };
        live.seconds = t.elapsed().as_secs_f64();
        t = std::time::Instant::now();
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
        timed(&mut checks, &mut t);
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

pub(super) fn pass(check: Check, detail: &str) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Pass,
        detail: detail.to_string(),
        seconds: 0.0,
    }
}
pub(super) fn fail(check: Check, detail: String) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Fail,
        detail,
        seconds: 0.0,
    }
}
pub(super) fn skipped(check: Check, detail: &str) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Skipped,
        detail: detail.to_string(),
        seconds: 0.0,
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
