//! One pass for several requests: the batching queue (`core::batcher`) hands the engine
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

/// One MC request of a merged pass.
pub struct McPart<'b> {
    pub batch: &'b Batch,
    pub seed: u64,
    pub keep_samples: bool,
}

/// The plan size a merged pass of `rows` rows runs at.
pub fn padded_rows(rows: usize) -> usize {
    rows.next_power_of_two()
}

impl LoadedModel {
    /// Whether this model's requests may share a pass: every input and output leads with
    /// the batch axis (so rows can be concatenated and split) and the inputs are plain data.
    pub fn merges(&self) -> bool {
        self.batch_symbol.is_some() && self.inputs.iter().all(|s| s.datum.is_copy())
    }

    /// Whether two of this model's batches can share a pass: they agree on every symbolic
    /// dimension but the batch (e.g. a sequence length).
    pub fn same_pass(&self, a: &Batch, b: &Batch) -> bool {
        let batch = self.batch_symbol.as_deref();
        a.symbols.len() == b.symbols.len()
            && a.symbols
                .iter()
                .all(|(s, v)| Some(s.as_str()) == batch || b.symbols.get(s) == Some(v))
    }

    /// Whether all `samples` of an MC request of `rows` rows run in one pass.
    pub fn mc_one_pass(&self, rows: usize, row_elements: usize, samples: usize) -> bool {
        match &self.mc {
            Ok(plan) if plan.batch.is_some() => {
                rows.saturating_mul(row_elements).saturating_mul(samples) <= MAX_PASS_INPUT_ELEMENTS
            }
            _ => false,
        }
    }

    /// Input elements of one row of `batch` (over all inputs).
    pub fn row_elements(batch: &Batch) -> usize {
        batch.tensors.iter().map(|t| t.len()).sum::<usize>() / batch.rows.max(1)
    }

    /// The parts' rows one after another, padded to `padded` rows with copies of the first.
    fn concat(&self, parts: &[&Batch], padded: usize) -> TractResult<Batch> {
        let mut tensors = Vec::with_capacity(self.inputs.len());
        for input in 0..self.inputs.len() {
            let first = &parts[0].tensors[input];
            let mut shape = first.shape().to_vec();
            shape[0] = padded;
            let mut merged = Tensor::zero_dt(first.datum_type(), &shape)?;
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
        Ok(Batch {
            tensors,
            rows: padded,
            symbols,
        })
    }
}

impl EvalSession<'_> {
    /// Eval of several batches in one pass; per batch, its outputs.
    pub fn run_merged(&self, parts: &[&Batch]) -> Result<Vec<Vec<NamedTensor>>, Error> {
        if let [one] = parts {
            return Ok(vec![self.run(one)?]);
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let merged = internal(self.model.concat(parts, padded_rows(rows)))?;
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
            answers.push(internal(mine)?);
            at += p.rows;
        }
        Ok(answers)
    }
}

impl McSession<'_> {
    /// `samples` MC samples of each part, all in one pass; per part, its summaries. Each
    /// part must fit one pass alone too ([`LoadedModel::mc_one_pass`]), so that its
    /// answer is the one [`McSession::run`] gives it.
    pub fn run_merged(&self, parts: &[McPart], samples: McSamples) -> Result<Vec<Vec<McOutput>>, Error> {
        let k = samples.get();
        if let [one] = parts {
            return Ok(vec![self.run(one.batch, samples, one.seed, one.keep_samples)?]);
        }
        let plan = self.plan;
        if plan.batch.is_none() {
            return Err(Error::Internal(
                "merged MC pass for a model whose masks are not batch-led: this is a bug".into(),
            ));
        }
        let rows: usize = parts.iter().map(|p| p.batch.rows).sum();
        let padded = padded_rows(rows);
        let batches: Vec<&Batch> = parts.iter().map(|p| p.batch).collect();
        let merged = internal(self.model.concat(&batches, padded))?;
        let per_part = parts
            .iter()
            .map(|p| plan.sample_masks(p.batch, 0, k, &mut MaskSampler::new(p.seed)))
            .collect::<TractResult<Vec<_>>>();
        let per_part = internal(per_part)?;
        let masks = (0..plan.masks.len())
            .map(|m| interleave(&per_part, m, parts, k, padded).map(|t| t.into_tvalue()))
            .collect::<TractResult<Vec<_>>>();
        let outs = internal(plan.run(&merged, k, internal(masks)?))?;

        let mut answers: Vec<Vec<McOutput>> = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            let mut mine = Vec::with_capacity(outs.len());
            for (o, ((shape, values), spec)) in outs.iter().zip(&self.model.outputs).enumerate() {
                // Elements of one row of one sample.
                let per_row = values.len() / (k * padded);
                let classes = self.model.probability_classes.get(o).copied().flatten();
                let mut acc = Accumulator::new(p.batch.rows * per_row, classes, p.keep_samples);
                for s in 0..k {
                    let start = (s * padded + at) * per_row;
                    acc.push(&values[start..start + p.batch.rows * per_row]);
                }
                let mut shape = shape.clone();
                shape[0] = p.batch.rows;
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
    let mut merged = Tensor::zero_dt(first.datum_type(), &shape)?;
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
