//! The sessions: eval and MC passes over a batch of rows. Mode is a type here:
//! [`EvalSession`] can only reach the eval plan, which has no mask inputs at all;
//! [`McSession`] can only reach the MC plan, and exists only for a model whose self-checks
//! proved that dropout moves its outputs.

use tract_onnx::prelude::*;

use super::*;
use crate::engine::error::{EngineError, pass_failed};
use crate::engine::masks::{MaskSampler, MaskSpec};
use crate::engine::onnx_graph::MaskInput;
use crate::engine::plans::Plans;
use crate::engine::uncertainty::{Accumulator, OutputStats};
use kinds::Activation;
use sizing::{aligned, pass_sizes, sample_step};

pub(super) struct EvalPlan {
    pub(super) plans: Plans,
    /// Per output: the plan gives the logits of a final Softmax or Sigmoid, which the server
    /// applies, in f64 (see `LoadedModel::load`).
    pub(super) activation: Vec<Option<Activation>>,
}

pub(super) struct McPlan {
    pub(super) plans: Plans,
    pub(super) masks: Vec<MaskInput>,
    /// The batch symbol when N samples of a B-row batch run as one pass of N·B rows: the
    /// model has a batch axis and it leads every mask. None: each sample is its own pass
    /// (the file fixes the batch size, or a mask does not have the batch in front).
    pub(super) batch: Option<String>,
    /// Per output: the graph gives the logits of a final Softmax or Sigmoid, which the
    /// server applies (see `LoadedModel::load`).
    pub(super) activation: Vec<Option<Activation>>,
    pub(super) trunk: Trunk,
}

pub(super) enum Trunk {
    /// `plans` is the shared-trunk graph ([`crate::engine::trunk`]): it takes the B request rows and
    /// tiles them itself after the trunk. `full` is the full graph, kept only until the
    /// load-time self-check has compared the two.
    Shared { detail: String, full: Option<Box<Plans>> },
    /// `plans` is the full graph, which takes N·B tiled rows, for this reason.
    Full(String),
}

impl McPlan {
    /// Runs one pass of `k` samples of `batch` with the given masks (each sized k·B rows).
    /// Per output: its shape and its values in f64, with the softmax applied where the
    /// server owns it.
    pub(super) fn run(
        &self,
        batch: &InputRows,
        k: usize,
        masks: Vec<TValue>,
    ) -> TractResult<Vec<(Vec<usize>, Vec<f64>)>> {
        let shared = matches!(self.trunk, Trunk::Shared { .. });
        let outs = Self::run_plans(&self.plans, shared, batch, k, masks)?;
        outs.iter()
            .zip(&self.activation)
            .map(|(t, activation)| {
                let mut values = to_f64(t)?;
                if let Some(a) = activation {
                    a.apply(&mut values, t.shape());
                }
                Ok((t.shape().to_vec(), values))
            })
            .collect()
    }

    /// One pass through `plans`: a shared-trunk graph takes the request rows, the full graph
    /// the rows tiled `k` times.
    pub(super) fn run_plans(
        plans: &Plans,
        shared: bool,
        batch: &InputRows,
        k: usize,
        masks: Vec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let tile = !shared && k > 1;
        let (rows, samples) = if shared { (batch.rows, k) } else { (batch.rows * k, 1) };
        let mut inputs = batch
            .tensors
            .iter()
            .map(|t| {
                Ok(if tile {
                    Tensor::stack_tensors(0, &vec![t; k])?.into_tvalue()
                } else {
                    t.clone().into_tvalue()
                })
            })
            .collect::<TractResult<TVec<TValue>>>()?;
        inputs.extend(masks);
        plans.run(rows, samples, inputs)
    }

    /// Masks for one pass of samples `first .. first + k` of `batch`.
    pub(super) fn sample_masks(
        &self,
        batch: &InputRows,
        first: usize,
        k: usize,
        sampler: &mut MaskSampler,
    ) -> TractResult<Vec<TValue>> {
        let mut symbols = batch.symbols.clone();
        if let Some(sym) = &self.batch {
            symbols.insert(sym.clone(), batch.rows * k);
        }
        let shapes = self
            .masks
            .iter()
            .map(|m| resolve(&m.shape, &symbols).map_err(|e| anyhow::anyhow!(e)))
            .collect::<TractResult<Vec<_>>>()?;
        // The masks of one site (alpha dropout has two) share their keep/drop draws.
        let mut specs: Vec<MaskSpec> = vec![];
        for (ix, (m, shape)) in self.masks.iter().zip(&shapes).enumerate() {
            match specs.last_mut() {
                Some(spec) if ix > 0 && self.masks[ix - 1].site == m.site => {
                    spec.values.push((m.values.kept, m.values.dropped))
                }
                _ => specs.push(MaskSpec {
                    ratio: m.ratio,
                    shape,
                    datum: m.datum,
                    values: vec![(m.values.kept, m.values.dropped)],
                }),
            }
        }
        Ok(sampler
            .sample_pass(first as u64, k, &specs)?
            .into_iter()
            .map(|t| t.into_tvalue())
            .collect())
    }
}

pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

pub struct McOutput {
    pub name: String,
    /// Shape of one sample (as the eval output).
    pub shape: Vec<usize>,
    pub stats: OutputStats,
}

/// Deterministic inference. Holds no way to reach a mask input.
pub struct EvalSession<'m> {
    pub(super) model: &'m LoadedModel,
    pub(super) plan: &'m EvalPlan,
}

/// Stochastic inference with live dropout.
pub struct McSession<'m> {
    pub(super) model: &'m LoadedModel,
    pub(super) plan: &'m McPlan,
}

impl EvalSession<'_> {
    /// Runs the batch in one pass, or in passes of as many rows as the pass budget holds:
    /// rows are independent (the load-time check `eval_row_independent` proves it), so the
    /// outputs of the passes, concatenated, are the batch's.
    pub fn run(&self, batch: &InputRows) -> Result<Vec<NamedTensor>, EngineError> {
        let granularity = self.model.row_granularity(batch);
        self.run_in_passes(batch, self.model.eval_split(batch.rows, granularity))
    }

    /// As [`run`](Self::run), with at most `per_pass` rows per pass.
    pub fn run_in_passes(&self, batch: &InputRows, per_pass: usize) -> Result<Vec<NamedTensor>, EngineError> {
        let eval_failed = |e: anyhow::Error| EngineError::Pass(format!("eval failed: {e:#}"));
        let per_pass = per_pass.max(1);
        let Some(symbol) = self.model.batch_symbol.as_ref().filter(|_| per_pass < batch.rows) else {
            let outs = self.pass(batch).map_err(eval_failed)?;
            return Ok(self.model.name_outputs(outs));
        };
        let mut parts: Vec<Vec<Tensor>> = vec![];
        let mut first = 0;
        while first < batch.rows {
            let end = (first + per_pass).min(batch.rows);
            let tensors = batch
                .tensors
                .iter()
                .map(|t| t.slice(0, first, end))
                .collect::<TractResult<Vec<_>>>()
                .map_err(eval_failed)?;
            let mut symbols = batch.symbols.clone();
            symbols.insert(symbol.clone(), end - first);
            let part = InputRows {
                tensors,
                rows: end - first,
                symbols,
            };
            let outs = self.pass(&part).map_err(eval_failed)?;
            parts.resize_with(outs.len(), Vec::new);
            for (all, t) in parts.iter_mut().zip(outs) {
                all.push(t.into_tensor());
            }
            first = end;
        }
        let outs = parts
            .iter()
            .map(|p| Ok(Tensor::stack_tensors(0, p)?.into_tvalue()))
            .collect::<TractResult<TVec<TValue>>>()
            .map_err(eval_failed)?;
        Ok(self.model.name_outputs(outs))
    }

    /// One pass over `batch`. A lone row of a model whose one-row plan differs from its
    /// larger plans runs beside a copy of itself (the load-time `batch_invariant` check).
    fn pass(&self, batch: &InputRows) -> TractResult<TVec<TValue>> {
        if batch.rows == 1 && self.model.layout.pad_single_eval && self.model.batch_symbol.is_some() {
            let pair = probe_rows(self.model, batch, &[0, 0])?;
            return self
                .plan_pass(&pair)?
                .into_iter()
                .map(|t| Ok(t.slice(0, 0, 1)?.into_tvalue()))
                .collect();
        }
        self.plan_pass(batch)
    }

    /// One pass over `batch` with the plan for its own size.
    pub(super) fn plan_pass(&self, batch: &InputRows) -> TractResult<TVec<TValue>> {
        let inputs: TVec<TValue> = batch.tensors.iter().map(|t| t.clone().into_tvalue()).collect();
        self.activate(self.plan.plans.run(batch.rows, 1, inputs)?)
    }

    /// One pass over all of `batch` at once, even on a graph that serves row by row
    /// ([`crate::engine::row_passes`]): for the check that rows are independent.
    pub(super) fn batched_pass(&self, batch: &InputRows) -> TractResult<Vec<NamedTensor>> {
        let inputs: TVec<TValue> = batch.tensors.iter().map(|t| t.clone().into_tvalue()).collect();
        let outs = self.activate(self.plan.plans.run_batched(batch.rows, 1, inputs)?)?;
        Ok(self.model.name_outputs(outs))
    }

    /// The plan's outputs with the activations the server owns applied.
    fn activate(&self, outs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        outs.into_iter()
            .zip(&self.plan.activation)
            .map(|(t, activation)| {
                let Some(activation) = activation else {
                    return Ok(t);
                };
                let mut values = to_f64(&t)?;
                activation.apply(&mut values, t.shape());
                let probabilities = Tensor::from_shape(t.shape(), &values)?;
                Ok(probabilities.cast_to_dt(t.datum_type())?.into_owned().into_tvalue())
            })
            .collect()
    }
}

impl McSession<'_> {
    /// Runs `samples` stochastic passes and summarises them per output. All samples go
    /// through one batched forward pass when the model has a batch axis (in chunks when
    /// that pass would be huge); otherwise one pass per sample.
    pub fn run(
        &self,
        batch: &InputRows,
        samples: McSamples,
        seed: u64,
        keep_samples: bool,
    ) -> Result<Vec<McOutput>, EngineError> {
        let mut draw = self.start(batch, seed, keep_samples);
        draw.draw(samples.get())?;
        Ok(draw.finish())
    }

    /// As [`run`](Self::run), with at most `per_pass` samples per forward pass (1 gives the
    /// sequential baseline the benchmarks compare against).
    pub fn run_in_passes(
        &self,
        batch: &InputRows,
        samples: McSamples,
        seed: u64,
        keep_samples: bool,
        per_pass: usize,
    ) -> Result<Vec<McOutput>, EngineError> {
        let mut draw = self.start(batch, seed, keep_samples);
        draw.per_pass = aligned(per_pass.max(1), draw.step());
        draw.draw(samples.get())?;
        Ok(draw.finish())
    }

    /// Starts drawing samples of `batch`, to be drawn in as many steps as the caller likes:
    /// sample `s` is the same whichever step draws it.
    pub fn start<'s>(&'s self, batch: &'s InputRows, seed: u64, keep_samples: bool) -> McDraw<'s> {
        let elements = batch.tensors.iter().map(|t| t.len()).sum();
        let per_pass = self
            .model
            .mc_split(batch.rows, elements, self.model.row_granularity(batch));
        McDraw {
            model: self.model,
            plan: self.plan,
            batch,
            sampler: MaskSampler::new(seed),
            accumulators: vec![],
            done: 0,
            keep_samples,
            per_pass,
        }
    }
}

/// MC samples drawn so far, summarised per output.
pub struct McDraw<'s> {
    pub(super) model: &'s LoadedModel,
    pub(super) plan: &'s McPlan,
    pub(super) batch: &'s InputRows,
    pub(super) sampler: MaskSampler,
    pub(super) accumulators: Vec<(Vec<usize>, Accumulator)>,
    pub(super) done: usize,
    pub(super) keep_samples: bool,
    pub(super) per_pass: usize,
}

impl McDraw<'_> {
    /// Samples a pass may start at a multiple of, for a row to keep its alignment
    /// ([`LoadedModel::row_granularity`]); `auto` draws chunks of a multiple of it.
    pub fn step(&self) -> usize {
        sample_step(self.model.row_granularity(self.batch), self.batch.rows)
    }

    /// Draws the next `n` samples, in passes of at most the pass size.
    pub fn draw(&mut self, n: usize) -> Result<(), EngineError> {
        let batch_led = self.plan.batch.is_some();
        let per_pass = if batch_led { self.per_pass } else { 1 };
        for k in pass_sizes(n, per_pass) {
            // tract's plan for a pass of one row (one sample of a one-row request) differs
            // from its larger plans, and can give other bits (measured: 1-4 ulps on the
            // MONAI DenseNet). Such a pass also draws the next sample, and drops it; unless
            // every pass runs row by row through that one-row plan anyway.
            let lone = batch_led && k * self.batch.rows == 1 && !self.plan.plans.row_by_row();
            let run = if lone { 2 } else { k };
            let masks = pass_failed(self.plan.sample_masks(self.batch, self.done, run, &mut self.sampler))?;
            let outs = pass_failed(self.plan.run(self.batch, run, masks))?;
            for (o, (mut shape, values)) in outs.into_iter().enumerate() {
                let per_sample = values.len() / run;
                if self.accumulators.len() <= o {
                    if run > 1 {
                        shape[0] /= run;
                    }
                    let acc = self.model.accumulator(o, &shape, self.keep_samples);
                    self.accumulators.push((shape, acc));
                }
                for s in 0..k {
                    self.accumulators[o]
                        .1
                        .push(&values[s * per_sample..(s + 1) * per_sample]);
                }
            }
            self.done += k;
        }
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.done
    }

    /// The largest Monte-Carlo standard error of a mean (std/√n) over every element of
    /// every output; infinite before two samples.
    pub fn max_standard_error(&self) -> f64 {
        self.accumulators
            .iter()
            .map(|(_, a)| a.max_standard_error())
            .fold(if self.done < 2 { f64::INFINITY } else { 0.0 }, f64::max)
    }

    pub fn finish(self) -> Vec<McOutput> {
        self.accumulators
            .into_iter()
            .zip(&self.model.outputs)
            .map(|((shape, acc), spec)| McOutput {
                name: spec.name.clone(),
                shape,
                stats: acc.finish(),
            })
            .collect()
    }
}
