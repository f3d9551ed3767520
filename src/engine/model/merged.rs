//! One pass for several requests: the batching queue (`core::queue`) hands the engine
//! the decoded batches of requests that waited while a pass ran, and they share the next.
//!
//! Requests are concatenated on the batch axis; each gets its own rows of the outputs back.
//! An MC request keeps its own seed stream: its masks are the masks it would have drawn
//! alone (sampled from its own seed and its own rows, `engine::masks`), laid into the rows
//! it occupies in the merged pass, and its statistics are accumulated from its own rows.
//! What a row computes does not depend on the other rows (the load-time
//! `eval_row_independent` check), so a request's answer is the one it gets alone.
//!
//! A merged pass runs the plan of the next power of two of its rows, padded with copies of
//! its first row: merged sizes follow arrival timing, and without the padding every size
//! from 1 to the row cap would build its own plan (milliseconds each) and churn the plan
//! cache. A pass of one request runs at its own size, as before.

use super::*;
use crate::engine::error::{EngineError, pass_failed};
use crate::engine::masks::MaskSampler;

/// One MC request of a merged pass.
pub struct McPart<'b> {
    pub batch: &'b InputRows,
    pub seed: u64,
    pub keep_samples: bool,
}

/// The plan size a merged pass of `rows` rows runs at.
pub fn padded_rows(rows: usize) -> usize {
    rows.next_power_of_two()
}

impl LoadedModel {
    /// Whether this model's requests may share a pass: every input and output leads with
    /// the batch axis (so rows can be concatenated and split), the inputs are plain data,
    /// and the load-time `batch_invariant` check found that merging keeps each request's
    /// bits. A pass also needs row granularity 1 for its shapes
    /// ([`row_granularity`](Self::row_granularity)).
    pub fn merges(&self) -> bool {
        self.batch_symbol.is_some() && self.inputs.iter().all(|s| s.datum.is_copy()) && self.layout.merge
    }

    /// Whether two of this model's batches can share a pass: they agree on every symbolic
    /// dimension but the batch (e.g. a sequence length).
    pub fn same_pass(&self, a: &InputRows, b: &InputRows) -> bool {
        let batch = self.batch_symbol.as_deref();
        a.symbols.len() == b.symbols.len()
            && a.symbols
                .iter()
                .all(|(s, v)| Some(s.as_str()) == batch || b.symbols.get(s) == Some(v))
    }

    /// Whether all `samples` of an MC pass of `rows` rows fit one pass, as
    /// [`McSession::start`] sizes passes (input elements and the memory budget).
    pub fn mc_one_pass(&self, rows: usize, row_elements: usize, samples: usize) -> bool {
        samples <= self.mc_split(rows, rows.saturating_mul(row_elements), 1)
    }

    /// Whether an eval pass of `rows` rows fits one pass's memory budget.
    pub fn eval_one_pass(&self, rows: usize) -> bool {
        self.eval_split(rows, 1) >= rows
    }

    /// Input elements of one row of `batch` (over all inputs).
    pub fn row_elements(batch: &InputRows) -> usize {
        batch.tensors.iter().map(|t| t.len()).sum::<usize>() / batch.rows.max(1)
    }

    /// The parts' rows one after another, padded to `padded` rows with copies of the first.
    fn concat(&self, parts: &[&InputRows], padded: usize) -> TractResult<InputRows> {
        let mut tensors = Vec::with_capacity(self.inputs.len());
        for input in 0..self.inputs.len() {
            let first = &parts[0].tensors[input];
            let mut shape = first.shape().to_vec();
            shape[0] = padded;
            // SAFETY: plain data (`merges`), and every byte is written below: the parts'
            // rows, then copies of the first row up to the end.
            let mut merged = unsafe { Tensor::uninitialized_dt(first.datum_type(), &shape)? };
            let row_bytes = first.as_bytes().len() / parts[0].rows;
            let bytes = merged.as_bytes_mut();
            let mut at = 0;
            for p in parts {
                let src = p.tensors[input].as_bytes();
                bytes[at..at + src.len()].copy_from_slice(src);
                at += src.len();
            }
            while at < bytes.len() {
                bytes.copy_within(0..row_bytes, at);
                at += row_bytes;
            }
            tensors.push(merged);
        }
        let mut symbols = parts[0].symbols.clone();
        if let Some(s) = &self.batch_symbol {
            symbols.insert(s.clone(), padded);
        }
        Ok(InputRows {
            tensors,
            rows: padded,
            symbols,
        })
    }
}

impl EvalSession<'_> {
    /// Eval of several batches in one pass; per batch, its outputs.
    pub fn run_merged(&self, parts: &[&InputRows]) -> Result<Vec<Vec<NamedTensor>>, EngineError> {
        if let [one] = parts {
            return Ok(vec![self.run(one)?]);
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let merged = pass_failed(self.model.concat(parts, padded_rows(rows)))?;
        let outputs = self.run(&merged)?;
        let mut answers = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            let mine = outputs
                .iter()
                .map(|o| {
                    Ok(NamedTensor {
                        name: o.name.clone(),
                        tensor: o.tensor.slice(0, at, at + p.rows)?,
                    })
                })
                .collect::<TractResult<Vec<_>>>();
            answers.push(pass_failed(mine)?);
            at += p.rows;
        }
        Ok(answers)
    }
}

impl McSession<'_> {
    /// `samples` MC samples of each part, all in one pass; per part, its summaries. Each
    /// part must fit one pass alone too ([`LoadedModel::mc_one_pass`]), so that its
    /// answer is the one [`McSession::run`] gives it.
    pub fn run_merged(&self, parts: &[McPart], samples: McSamples) -> Result<Vec<Vec<McOutput>>, EngineError> {
        let k = samples.get();
        if let [one] = parts {
            return Ok(vec![self.run(one.batch, samples, one.seed, one.keep_samples)?]);
        }
        let plan = self.plan;
        if plan.batch.is_none() {
            return Err(EngineError::Pass(
                "merged MC pass for a model whose masks are not batch-led: this is a bug".into(),
            ));
        }
        let rows: usize = parts.iter().map(|p| p.batch.rows).sum();
        let padded = padded_rows(rows);
        let batches: Vec<&InputRows> = parts.iter().map(|p| p.batch).collect();
        let merged = pass_failed(self.model.concat(&batches, padded))?;
        let per_part = parts
            .iter()
            .map(|p| plan.sample_masks(p.batch, 0, k, &mut MaskSampler::new(p.seed)))
            .collect::<TractResult<Vec<_>>>();
        let per_part = pass_failed(per_part)?;
        let masks = (0..plan.masks.len())
            .map(|m| interleave(&per_part, m, parts, k, padded).map(|t| t.into_tvalue()))
            .collect::<TractResult<Vec<_>>>();
        let outs = pass_failed(plan.run(&merged, k, pass_failed(masks)?))?;

        let mut answers: Vec<Vec<McOutput>> = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            let mut mine = Vec::with_capacity(outs.len());
            for (o, ((shape, values), spec)) in outs.iter().zip(&self.model.outputs).enumerate() {
                // Elements of one row of one sample.
                let per_row = values.len() / (k * padded);
                let mut shape = shape.clone();
                shape[0] = p.batch.rows;
                let mut acc = self.model.accumulator(o, &shape, p.keep_samples);
                for s in 0..k {
                    let start = (s * padded + at) * per_row;
                    acc.push(&values[start..start + p.batch.rows * per_row]);
                }
                mine.push(McOutput {
                    name: spec.name.clone(),
                    shape,
                    stats: acc.finish(),
                });
            }
            answers.push(mine);
            at += p.batch.rows;
        }
        Ok(answers)
    }
}

/// Mask `m` of the merged pass: sample-major like every MC pass (sample `s` holds rows
/// `s·padded .. (s+1)·padded`), and within a sample each part's own rows of its own mask
/// for that sample, in part order; the padding rows repeat the first part's first row.
fn interleave(per_part: &[Vec<TValue>], m: usize, parts: &[McPart], k: usize, padded: usize) -> TractResult<Tensor> {
    let first: &Tensor = &per_part[0][m];
    let mut shape = first.shape().to_vec();
    shape[0] = k * padded;
    // SAFETY: a float mask, and every byte is written below, sample by sample.
    let mut merged = unsafe { Tensor::uninitialized_dt(first.datum_type(), &shape)? };
    let row_bytes = first.as_bytes().len() / (k * parts[0].batch.rows);
    let bytes = merged.as_bytes_mut();
    let mut at = 0;
    for s in 0..k {
        let sample_start = at;
        for (masks, p) in per_part.iter().zip(parts) {
            let block = p.batch.rows * row_bytes;
            let src = &masks[m].as_bytes()[s * block..(s + 1) * block];
            bytes[at..at + block].copy_from_slice(src);
            at += block;
        }
        let end = sample_start + padded * row_bytes;
        while at < end {
            bytes.copy_within(sample_start..sample_start + row_bytes, at);
            at += row_bytes;
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str) -> LoadedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let config = std::fs::read(dir.join(format!("{name}.model.json")))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_default();
        LoadedModel::load(name, &dir.join(format!("{name}.onnx")), config).unwrap()
    }

    fn f32_ulps(a: &[f64], b: &[f64]) -> i64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((*x as f32).to_bits() as i64 - (*y as f32).to_bits() as i64).abs())
            .max()
            .unwrap_or(0)
    }

    /// Each part of a merged pass gets the answer it gets alone, bit for bit, eval and MC, on
    /// all three bundled models: the kernels are pinned and the server owns the final
    /// softmax (`engine::kernels`). CI runs it once per tract CPU cohort.
    #[test]
    fn each_part_of_a_merged_pass_gets_its_answer_alone() {
        for name in ["breast_cancer", "diabetes", "digits_cnn"] {
            let m = load(name);
            let parts: Vec<InputRows> = (0..40)
                .map(|i| m.probe_batch(1 + (i as usize % 3), i).unwrap())
                .collect();
            let eval_alone: Vec<Vec<f64>> = parts
                .iter()
                .map(|p| to_f64(&m.eval_session().run(p).unwrap()[0].tensor).unwrap())
                .collect();
            let s = m.mc_session().unwrap();
            let samples = McSamples::new(20).unwrap();
            let mc_alone: Vec<Vec<McOutput>> = parts
                .iter()
                .enumerate()
                .map(|(i, p)| s.run(p, samples, i as u64, i % 2 == 0).unwrap())
                .collect();
            let mut worst_eval = 0;
            for n in [2, 3, 5, 8, 13, 21, 40] {
                let refs: Vec<&InputRows> = parts[..n].iter().collect();
                for (i, out) in m.eval_session().run_merged(&refs).unwrap().iter().enumerate() {
                    worst_eval = worst_eval.max(f32_ulps(&to_f64(&out[0].tensor).unwrap(), &eval_alone[i]));
                }
                let mc: Vec<McPart> = refs
                    .iter()
                    .enumerate()
                    .map(|(i, batch)| McPart {
                        batch,
                        seed: i as u64,
                        keep_samples: i % 2 == 0,
                    })
                    .collect();
                for (i, out) in s.run_merged(&mc, samples).unwrap().iter().enumerate() {
                    let (a, b) = (&out[0], &mc_alone[i][0]);
                    assert_eq!(a.shape, b.shape, "{name}: part {i} of {n}");
                    for (x, y) in [(&a.stats.mean, &b.stats.mean), (&a.stats.variance, &b.stats.variance)] {
                        let bits = |v: &Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(x), bits(y), "{name}: MC part {i} of a merged pass of {n}");
                    }
                    assert_eq!(
                        a.stats.samples.as_ref().map(|s| s.len()),
                        b.stats.samples.as_ref().map(|s| s.len())
                    );
                }
            }
            assert!(
                worst_eval == 0,
                "{name}: eval of a merged pass is {worst_eval} f32 ulps from alone"
            );
        }
    }
}
