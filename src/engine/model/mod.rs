//! A loaded model: an eval plan and (when dropout is live) an MC plan, the model's inputs
//! and outputs, its dropout sites and the results of its load-time self-checks.
//!
//! Mode is a type here. [`EvalSession`] can only reach the eval plan, which has no mask
//! inputs at all; [`McSession`] can only reach the MC plan, and exists only for a model
//! whose self-checks proved that dropout moves its outputs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use tract_onnx::prelude::*;

use crate::engine::conformal::Calibrates;
use crate::engine::error::{EngineError, InputMismatch};
use crate::engine::footprint::ModelMemory;
use crate::engine::onnx_graph::DropoutSite;
pub use crate::engine::spec::*;
use crate::engine::statistics::{self, Requested, StatSet};

mod checks;
mod invariance;
mod kinds;
mod load;
mod mc_checks;
mod merged;
mod session;
mod sizing;

pub use checks::{Check, CheckResult, Outcome};
pub use merged::{McPart, padded_rows};
use session::{EvalPlan, McPlan};
pub use session::{EvalSession, McDraw, McOutput, McSession, NamedTensor};
pub use sizing::{DEFAULT_PASS_BUDGET_BYTES, pass_sizes, sample_step};

pub struct LoadedModel {
    pub name: String,
    pub path: PathBuf,
    pub config: ModelConfig,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Per output: classes along the last axis when it is one distribution along it.
    pub probability_classes: Vec<Option<usize>>,
    /// Per output: what its values are, which decides its uncertainty statistics.
    pub output_kinds: Vec<OutputKind>,
    pub batch_symbol: Option<String>,
    /// The runtime that runs this model's passes.
    pub backend: crate::engine::backend::Backend,
    pub sites: Vec<DropoutSite>,
    pub fixes: Vec<String>,
    pub checks: Vec<CheckResult>,
    /// Checked against this very file at load (see `engine::conformal`).
    pub calibration: Option<crate::engine::conformal::ModelCalibration>,
    /// What dataset-shift tests compare served rows with (see `engine::drift_reference`).
    pub drift_reference: Option<crate::engine::drift_reference::DriftReference>,
    /// Seconds the load took: reading, surgery, plans and self-checks (each check's own
    /// share is in `checks`).
    pub load_seconds: f64,
    eval: EvalPlan,
    mc: Result<McPlan, String>,
    /// What the pass and answer estimates are built from, fixed at load.
    memory: ModelMemory,
    /// Bytes one pass may take: passes are sized to fit it.
    pass_budget: AtomicU64,
    /// What the load-time `batch_invariant` check allows the pass planner.
    layout: Layout,
}

/// How passes may hold a model's rows without moving their bits, as the load-time
/// `batch_invariant` check found.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Requests may share a pass (where the row granularity is 1).
    merge: bool,
    /// A one-row eval runs in a pass of two (a copy of the row beside it): the plan tract
    /// builds for one row differs from the plan of any larger pass for this model.
    pad_single_eval: bool,
}

/// A request's rows: its input tensors, checked against the model's inputs and in their
/// order, with the row count and the value each symbolic dim takes.
pub struct InputRows {
    tensors: Vec<Tensor>,
    rows: usize,
    symbols: HashMap<String, usize>,
}

impl InputRows {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The input tensors, in the model's input order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
}

/// How the model's passes of several rows run ([`LoadedModel::passes`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Passes {
    /// `batched` or `row_by_row`.
    pub eval: PassMode,
    /// The same for MC passes; None without MC.
    pub mc: Option<PassMode>,
    /// One row's multiply-adds by tract's cost model (None where a dimension other than the
    /// batch is symbolic, or on onnxruntime).
    pub multiply_adds_per_row: Option<u64>,
}

impl LoadedModel {
    /// Whether the eval checks all passed; a model that fails them is not served
    /// ([`Check::gates_health`]).
    pub fn healthy(&self) -> bool {
        self.checks
            .iter()
            .all(|c| c.result != Outcome::Fail || !c.check.gates_health())
    }

    /// The eval self-checks that failed, as `check: detail; ...` (empty when healthy).
    pub fn failed_checks(&self) -> String {
        self.checks
            .iter()
            .filter(|c| c.result == Outcome::Fail && c.check.gates_health())
            .map(|c| format!("{}: {}", c.check.as_str(), c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// How a pass of several rows runs: in one batched pass, or row by row
    /// ([`crate::engine::row_passes`]); for the model's metadata.
    pub fn passes(&self) -> Passes {
        let shape = |row_by_row: bool| {
            if row_by_row {
                PassMode::RowByRow
            } else {
                PassMode::Batched
            }
        };
        Passes {
            eval: shape(self.eval.plans.row_by_row()),
            mc: self.mc.as_ref().ok().map(|p| shape(p.plans.row_by_row())),
            multiply_adds_per_row: self.eval.plans.row_fma(),
        }
    }

    /// The shape of `spec`, one of this model's inputs, for a batch of `rows` rows, its
    /// other symbols (a sequence length, say) at `other(name)`.
    pub fn input_shape(&self, spec: &TensorSpec, rows: usize, other: impl Fn(&str) -> usize) -> Vec<usize> {
        spec.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Symbol(s) if Some(s) == self.batch_symbol.as_ref() => rows,
                Dim::Symbol(s) => other(s),
            })
            .collect()
    }

    /// The values one row of the inputs holds at least: each input's elements at one row
    /// with its other symbols at 1, summed.
    pub fn input_values_per_row(&self) -> usize {
        self.inputs
            .iter()
            .map(|spec| self.input_shape(spec, 1, |_| 1).iter().product::<usize>())
            .sum::<usize>()
            .max(1)
    }

    pub fn mc_unavailable_reason(&self) -> Option<&str> {
        self.mc.as_ref().err().map(String::as_str)
    }

    pub fn eval_session(&self) -> EvalSession<'_> {
        EvalSession {
            model: self,
            plan: &self.eval,
        }
    }

    pub fn mc_session(&self) -> Result<McSession<'_>, EngineError> {
        match &self.mc {
            Ok(plan) => Ok(McSession { model: self, plan }),
            Err(reason) => Err(EngineError::McUnavailable {
                model: self.name.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// The input names, quoted, for messages: `'a', 'b'`.
    pub fn input_names(&self) -> String {
        self.inputs
            .iter()
            .map(|s| format!("'{}'", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The outputs that are probability vectors along their last axis.
    pub fn probability_output_names(&self) -> Vec<&str> {
        self.outputs
            .iter()
            .zip(&self.probability_classes)
            .filter(|(_, k)| k.is_some())
            .map(|(o, _)| o.name.as_str())
            .collect()
    }

    /// Number of Dropout nodes that sample in MC mode.
    pub fn sampling_sites(&self) -> usize {
        self.sites.iter().filter(|s| s.samples()).count()
    }

    /// Checks tensors against the declared inputs: dtype, rank, fixed dims, and that each
    /// symbolic dim takes one value across all inputs.
    pub fn input_rows(&self, tensors: Vec<Tensor>) -> Result<InputRows, EngineError> {
        let refuse = |m: InputMismatch| Err(EngineError::Input(m));
        if tensors.len() != self.inputs.len() {
            return refuse(InputMismatch::Count {
                model: self.name.clone(),
                expected: self.inputs.len(),
                got: tensors.len(),
            });
        }
        let mut symbols: HashMap<String, usize> = HashMap::new();
        for (spec, t) in self.inputs.iter().zip(&tensors) {
            let shape = || InputMismatch::Shape {
                input: spec.name.clone(),
                expected: shape_string(&spec.shape),
                got: t.shape().to_vec(),
            };
            if t.datum_type() != spec.datum {
                return refuse(InputMismatch::Datum {
                    input: spec.name.clone(),
                    expected: spec.dtype,
                    got: t.datum_type(),
                });
            }
            if t.rank() != spec.shape.len() {
                return refuse(shape());
            }
            for (d, &actual) in spec.shape.iter().zip(t.shape()) {
                match d {
                    Dim::Fixed(n) if *n != actual => return refuse(shape()),
                    Dim::Fixed(_) => {}
                    Dim::Symbol(s) => match symbols.get(s) {
                        Some(&v) if v != actual => {
                            return refuse(InputMismatch::Symbol {
                                input: spec.name.clone(),
                                symbol: s.clone(),
                                here: actual,
                                elsewhere: v,
                                expected: shape_string(&spec.shape),
                                got: t.shape().to_vec(),
                            });
                        }
                        Some(_) => {}
                        None => {
                            if actual == 0 {
                                return refuse(InputMismatch::Empty {
                                    input: spec.name.clone(),
                                    symbol: s.clone(),
                                });
                            }
                            symbols.insert(s.clone(), actual);
                        }
                    },
                }
            }
            if let Some(limit) = spec.index_limit
                && let Some(m) = out_of_table(spec, t, limit)
            {
                return refuse(m);
            }
        }
        let rows = match &self.batch_symbol {
            Some(s) => symbols[s],
            None => tensors.first().and_then(|t| t.shape().first().copied()).unwrap_or(1),
        };
        Ok(InputRows { tensors, rows, symbols })
    }

    fn name_outputs(&self, outs: TVec<TValue>) -> Vec<NamedTensor> {
        outs.into_iter()
            .zip(&self.outputs)
            .map(|(t, spec)| NamedTensor {
                name: spec.name.clone(),
                tensor: t.into_tensor(),
            })
            .collect()
    }
}

/// The first value of `t` (an input that indexes a table of `limit` entries) outside
/// `-limit..limit`: tract's Gather would panic on it.
fn out_of_table(spec: &TensorSpec, t: &Tensor, limit: usize) -> Option<InputMismatch> {
    let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
    let values = t.cast_to::<i64>().ok()?;
    let values = values.try_as_plain_ram().ok()?.as_slice::<i64>().ok()?;
    let i = values.iter().position(|&v| v < -limit_i || v >= limit_i)?;
    // The flat position as one index per axis.
    let mut at = vec![0; t.rank()];
    let mut rest = i;
    for (a, &d) in t.shape().iter().enumerate().rev() {
        at[a] = rest % d;
        rest /= d;
    }
    Some(InputMismatch::Index {
        input: spec.name.clone(),
        at,
        value: values[i],
        limit,
    })
}

/// The rows `idx` of `batch` (repeats allowed), as a batch of their own.
pub(super) fn probe_rows(model: &LoadedModel, batch: &InputRows, idx: &[usize]) -> TractResult<InputRows> {
    let tensors = batch
        .tensors
        .iter()
        .map(|t| {
            let rows = idx
                .iter()
                .map(|&i| t.slice(0, i, i + 1))
                .collect::<TractResult<Vec<_>>>()?;
            Tensor::stack_tensors(0, &rows)
        })
        .collect::<TractResult<Vec<_>>>()?;
    model.input_rows(tensors).map_err(|e| anyhow::anyhow!("{e}"))
}

impl LoadedModel {
    /// The accumulator for output `o`, of `shape` per sample (its first dim the rows), with
    /// the per-position entropies its kind gives.
    pub(super) fn accumulator(
        &self,
        o: usize,
        shape: &[usize],
        keep_samples: bool,
    ) -> crate::engine::uncertainty::Accumulator {
        let kind = self.output_kinds.get(o).unwrap_or(&OutputKind::Other);
        let len = shape.iter().product();
        let positions = kind.positions(shape).unwrap_or_default();
        crate::engine::uncertainty::Accumulator::with_layout(len, kind.layout(shape), positions, keep_samples)
            .with_background(self.config.background_class)
    }
}

impl LoadedModel {
    /// The per-row summary statistics an output of `kind` carries, in answer order: the
    /// foreground means for Bernoulli outputs, and for categorical ones of a model whose
    /// config names its background class.
    pub fn summary_statistics(&self, kind: &OutputKind) -> Vec<&'static str> {
        let foreground = match kind {
            OutputKind::Bernoulli => true,
            OutputKind::Categorical { .. } => self.config.background_class.is_some(),
            OutputKind::Other => false,
        };
        crate::engine::row_summary::statistics(foreground)
    }

    /// What output `o` can be calibrated as: a probability output; Bernoulli labels, one
    /// per element of a [rows, labels] output; anything else as a regression (a map's
    /// positions have no conformal method yet, and `calibrate` refuses them).
    pub fn calibrates(&self, o: usize) -> Calibrates {
        let shape = &self.outputs[o].shape;
        match (&self.probability_classes[o], &self.output_kinds[o], shape.as_slice()) {
            (Some(_), _, _) => Calibrates::Probabilities,
            (None, OutputKind::Bernoulli, [_, Dim::Fixed(labels)]) => Calibrates::Labels(*labels),
            _ => Calibrates::Regression,
        }
    }

    /// What output `o` returns for a request (see [`crate::engine::statistics`]).
    pub fn returned(&self, o: usize, requested: Requested, return_samples: bool) -> StatSet {
        let kind = self.output_kinds.get(o).unwrap_or(&OutputKind::Other);
        statistics::returned(kind, &self.outputs[o].shape, requested, return_samples)
    }

    /// A `statistics` choice naming one that no output of this model has is a mistake to
    /// say, not an answer with that statistic silently missing.
    pub fn check_statistics(&self, requested: Requested) -> Result<(), String> {
        let Requested::Every(asked) = requested else {
            return Ok(());
        };
        let offered = self
            .outputs
            .iter()
            .zip(&self.output_kinds)
            .fold(StatSet::EMPTY, |set, (o, k)| {
                StatSet::of(set.iter().chain(statistics::available(k, &o.shape).iter()))
            });
        let missing: Vec<&str> = asked.iter().filter(|s| !offered.has(*s)).map(|s| s.name()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "model '{}' has no output with {}: its outputs offer {}",
            self.name,
            missing.join(", "),
            offered.without(statistics::Statistic::Samples).names()
        ))
    }

    /// Each output's kind by output name, as model metadata shows it.
    pub fn output_kinds_by_name(&self) -> serde_json::Map<String, serde_json::Value> {
        self.outputs
            .iter()
            .zip(&self.output_kinds)
            .map(|(o, k)| {
                let kind = serde_json::to_value(k).expect("an output kind serialises: this is a bug");
                (o.name.clone(), kind)
            })
            .collect()
    }
}
