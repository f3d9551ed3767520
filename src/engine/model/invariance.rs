//! The `batch_invariant` self-check: a row's answer must not depend on what else shares
//! its pass, and what the pass planner may do with the model follows from it.

use tract_onnx::prelude::*;

use super::*;
use crate::engine::kernels;
use checks::{bits, fail, pass, skipped};

impl LoadedModel {
    /// A row's answer must not depend on what else shares its pass. The kernels are pinned
    /// for that (`engine::kernels`); this proves it on the probe, and decides what the pass
    /// planner may do with this model: eval rows alone, in a pass of two and at every place
    /// of the probe batch; MC samples in one pass and in passes of two samples; a request
    /// alone and merged with others. A difference turns merging off for the model (its
    /// answers then depend only on the request), and is reported here.
    pub(super) fn check_batch_invariant(&mut self, probe: &InputRows) -> CheckResult {
        const CHECK: Check = Check::BatchInvariant;
        if self.batch_symbol.is_none() {
            return skipped(CHECK, "the file fixes the batch size: every pass has the same shape");
        }
        let mut plans = vec![];
        let mut problems = vec![];
        if !kernels::pinned() {
            problems.push("tract was used before the engine pinned its kernels".to_string());
        }
        let granularity = self.row_granularity(probe);
        let sensitive: Vec<String> = self
            .eval
            .plans
            .sensitive_nodes()
            .into_iter()
            .chain(self.mc.as_ref().map(|p| p.plans.sensitive_nodes()).unwrap_or_default())
            .collect();
        let mut pad_single = false;
        let outcome = (|| -> TractResult<()> {
            let eval = |b: &InputRows| -> TractResult<Vec<Vec<u64>>> {
                let outs = self.eval_session().plan_pass(b)?;
                Ok(outs.iter().map(|t| bits(t)).collect())
            };
            let rows = |idx: &[usize]| -> TractResult<InputRows> { probe_rows(self, probe, idx) };
            let full = eval(probe)?;
            plans.extend(self.eval.plans.audited(probe.rows, 1)?);
            for r in 0..probe.rows {
                let alone = eval(&rows(&[r])?)?;
                let pair = eval(&rows(&[r, r])?)?;
                let row = |outs: &Vec<Vec<u64>>, at: usize, of: usize| -> Vec<Vec<u64>> {
                    outs.iter()
                        .map(|o| o.chunks(o.len() / of).nth(at).unwrap_or(&[]).to_vec())
                        .collect()
                };
                if row(&alone, 0, 1) != row(&pair, 0, 2) {
                    pad_single = true;
                }
                if granularity == 1 && row(&full, r, probe.rows) != row(&pair, 0, 2) {
                    problems.push(format!(
                        "eval of probe row {r} differs in a pass of {} rows from a pass of two",
                        probe.rows
                    ));
                }
            }
            plans.extend(self.eval.plans.audited(1, 1)?);
            plans.extend(self.eval.plans.audited(2, 1)?);
            let Ok(plan) = &self.mc else { return Ok(()) };
            let session = McSession { model: self, plan };
            let k = McSamples::new(mc_checks::probe_samples(plan)).expect("at least 2 samples");
            let stats = |outs: Vec<McOutput>| -> Vec<Vec<u64>> {
                outs.iter()
                    .flat_map(|o| [&o.stats.mean, &o.stats.variance])
                    .map(|v| v.iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            if granularity == 1 && plan.batch.is_some() {
                // Passes of two samples would run the same one-row passes as one pass does.
                if !plan.plans.row_by_row() {
                    let one = stats(
                        session
                            .run_in_passes(probe, k, 7, false, k.get())
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    );
                    let two = stats(
                        session
                            .run_in_passes(probe, k, 7, false, 2)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    );
                    if one != two {
                        problems.push("MC samples drawn in passes of two differ from one pass".into());
                    }
                }
                let parts = [rows(&[0])?, rows(&[1, 2])?];
                let merged = session
                    .run_merged(
                        &[
                            McPart {
                                batch: &parts[0],
                                seed: 1,
                                keep_samples: false,
                            },
                            McPart {
                                batch: &parts[1],
                                seed: 2,
                                keep_samples: false,
                            },
                        ],
                        k,
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                for ((part, seed), got) in parts.iter().zip([1, 2]).zip(merged) {
                    let alone = session.run(part, k, seed, false).map_err(|e| anyhow::anyhow!("{e}"))?;
                    if stats(alone) != stats(got) {
                        problems.push(format!(
                            "MC of a {}-row request merged with another differs from alone",
                            part.rows
                        ));
                    }
                }
            }
            plans.extend(plan.plans.audited(probe.rows, k.get())?);
            Ok(())
        })();
        if let Err(e) = outcome {
            problems.push(format!("the probe failed: {e:#}"));
        }
        self.layout.pad_single_eval = pad_single;
        for plan in &plans {
            for odd in kernels::audit(plan) {
                problems.push(format!("matrix kernel not pinned: {odd}"));
            }
        }
        let reductions = if self.eval.plans.row_by_row() {
            format!(
                "{:.1} M multiply-adds a row: passes run one row at a time through the one-row plan, \
                 so a row's place in a pass cannot move its bits",
                self.eval.plans.row_fma().unwrap_or(0) as f64 / 1e6
            )
        } else if sensitive.is_empty() {
            "no sum a row's place can move".to_string()
        } else if granularity == 1 {
            format!(
                "{} sums, on rows that keep their 64-byte alignment anywhere in a pass",
                sensitive.len()
            )
        } else {
            format!(
                "{} sums on rows a 64-byte boundary splits by their place (e.g. '{}'): at the probe's \
                 shape a row must stay a multiple of {granularity} rows from where it runs alone, so \
                 such passes are not merged and split only at multiples of {granularity}",
                sensitive.len(),
                sensitive[0]
            )
        };
        let single = if self.layout.pad_single_eval {
            "; the one-row plan differs from larger ones here, so a one-row eval runs in a pass of two"
        } else {
            ""
        };
        let probed = if granularity == 1 {
            "probe rows alone, in larger passes and merged give the same bits"
        } else {
            "probe rows alone and in a pass of two give the same bits"
        };
        if problems.is_empty() {
            // tract's kernels are pinned by the engine; onnxruntime's are its own, and the
            // probe is all that speaks for them.
            let kernels = match self.backend {
                crate::engine::backend::Backend::Tract => "pinned FMA kernels",
                crate::engine::backend::Backend::Onnxruntime => "onnxruntime's kernels",
            };
            pass(CHECK, &format!("{kernels}; {reductions}{single}; {probed}"))
        } else {
            self.layout.merge = false;
            fail(
                CHECK,
                format!(
                    "{}; requests of this model run in passes of their own",
                    problems.join("; ")
                ),
            )
        }
    }
}
