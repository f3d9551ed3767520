//! The self-checks of the MC graph: that it reproduces eval with keep-all masks, that its
//! samples really differ (no dropout that never fires), and whether the head can run on a
//! trunk computed once per request.

use tract_onnx::prelude::*;

use super::*;
use crate::engine::masks::MaskSampler;
use checks::{Check, CheckResult, compare, fail, pass, skipped};
use session::Trunk;

/// Samples drawn by the load-time MC checks: four, or two on a graph that runs row by row
/// ([`crate::engine::row_passes`]), whose every sample-row is a pass of a large model (about
/// 90 ms each for DenseNet121). Two samples still show dropout moving an output, and still
/// give a merged request two samples to compare with its own.
pub(super) fn probe_samples(plan: &McPlan) -> usize {
    if plan.plans.row_by_row() { 2 } else { 4 }
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
/// softmax, centred per distribution) by far more than float rounding: a variance merely above zero
/// proves nothing (a saturated softmax gives 1e-39 from rounding alone). The spread of each
/// element over the samples is measured against the output's scale.
pub(super) fn check_live(plan: &McPlan, probe: &InputRows) -> CheckResult {
    const CHECK: Check = Check::McLive;
    let k = probe_samples(plan);
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
                    .zip(&plan.activation)
                    .map(|(t, activation)| {
                        let mut values = to_f64(t)?;
                        if let Some(a) = activation {
                            a.center(&mut values, t.shape());
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
    let k = probe_samples(plan);
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
