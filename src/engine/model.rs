//! A loaded model: an eval plan and (when dropout is live) an MC plan, the model's inputs
//! and outputs, its dropout sites and the results of its load-time self-checks.
//!
//! Mode is a type here. [`EvalSession`] can only reach the eval plan, which has no mask
//! inputs at all; [`McSession`] can only reach the MC plan, and exists only for a model
//! whose self-checks proved that dropout moves its outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use crate::engine::kernels;
use crate::engine::masks::{MaskSampler, MaskSpec};
use crate::engine::memory::ModelMemory;
use crate::engine::onnx_graph::{self, DropoutSite, FactAt, MASK_INPUT_PREFIX, MaskInput, ProbeLookup};
use crate::engine::plans::{self, Plans};
use crate::engine::trunk;
use crate::engine::uncertainty::{Accumulator, OutputStats};
use crate::error::Error;

mod merged;
pub use merged::{McPart, padded_rows};

/// Upper bound on input elements fed to one MC pass; more samples than fit run in chunks.
const MAX_PASS_INPUT_ELEMENTS: usize = 1 << 24;
/// The byte budget of one pass until the server sets its own
/// ([`LoadedModel::set_pass_budget`]): half the default `--max-memory-bytes`.
pub const DEFAULT_PASS_BUDGET_BYTES: u64 = 256 << 20;
/// Samples drawn by the load-time liveness check.
const PROBE_MC_SAMPLES: usize = 4;
/// Rows of the load-time probe batch.
const PROBE_ROWS: usize = 3;

/// Optional per-model settings, read from `<stem>.model.json` next to `<stem>.onnx`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ModelConfig {
    pub description: Option<String>,
    /// Outputs that are probability vectors along their last axis. When absent, outputs
    /// produced by a last-axis Softmax are detected.
    pub probability_outputs: Option<Vec<String>>,
    /// Values for symbolic non-batch dims in the load-time probe (default 1).
    pub probe_dims: HashMap<String, usize>,
    /// Dropout ratios for graph inputs that carry one. Without a value here, MC dropout is
    /// refused for such a model (eval still works: the input is dropped from its interface).
    pub dropout_ratios: HashMap<String, f32>,
    /// The accepted-case error rate that referral aims at (default 0.02); the model's
    /// calibration must have been computed for it.
    pub refer_target_error: Option<f64>,
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => write!(f, "{s}"),
        }
    }
}

pub fn shape_string(dims: &[Dim]) -> String {
    format!(
        "[{}]",
        dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: &'static str,
    #[serde(skip)]
    pub datum: DatumType,
    pub shape: Vec<Dim>,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    pub result: Outcome,
    pub detail: String,
}

struct EvalPlan {
    plans: Plans,
    /// Per output: the plan gives the logits of a final last-axis Softmax, which the server
    /// applies, in f64 (see `LoadedModel::load`).
    softmax: Vec<bool>,
}

struct McPlan {
    plans: Plans,
    masks: Vec<MaskInput>,
    /// The batch symbol when N samples of a B-row batch run as one pass of N·B rows: the
    /// model has a batch axis and it leads every mask. None: each sample is its own pass
    /// (the file fixes the batch size, or a mask does not have the batch in front).
    batch: Option<String>,
    /// Per output: the graph gives the logits of a final last-axis Softmax, which the
    /// server applies (see `LoadedModel::load`).
    softmax: Vec<bool>,
    trunk: Trunk,
}

enum Trunk {
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
    fn run(&self, batch: &Batch, k: usize, masks: Vec<TValue>) -> TractResult<Vec<(Vec<usize>, Vec<f64>)>> {
        let shared = matches!(self.trunk, Trunk::Shared { .. });
        let outs = Self::run_plans(&self.plans, shared, batch, k, masks)?;
        outs.iter()
            .zip(&self.softmax)
            .map(|(t, &softmax)| {
                let mut values = to_f64(t)?;
                if softmax {
                    softmax_rows(
                        &mut values,
                        *t.shape().last().expect("softmax outputs have a last axis"),
                    );
                }
                Ok((t.shape().to_vec(), values))
            })
            .collect()
    }

    /// One pass through `plans`: a shared-trunk graph takes the request rows, the full graph
    /// the rows tiled `k` times.
    fn run_plans(
        plans: &Plans,
        shared: bool,
        batch: &Batch,
        k: usize,
        masks: Vec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let tile = !shared && k > 1;
        let plan = if shared {
            plans.get(batch.rows, k)?
        } else {
            plans.get(batch.rows * k, 1)?
        };
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
        plans::run(&plan, inputs)
    }

    /// Masks for one pass of samples `first .. first + k` of `batch`.
    fn sample_masks(
        &self,
        batch: &Batch,
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

pub struct LoadedModel {
    pub name: String,
    pub path: PathBuf,
    pub config: ModelConfig,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Per output: classes along the last axis when it is a probability output.
    pub probability_classes: Vec<Option<usize>>,
    pub batch_symbol: Option<String>,
    pub sites: Vec<DropoutSite>,
    pub fixes: Vec<String>,
    pub checks: Vec<CheckResult>,
    /// Checked against this very file at load (see `engine::calibration`).
    pub calibration: Option<crate::engine::calibration::ModelCalibration>,
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

/// A validated batch of input tensors, in the model's input order.
pub struct Batch {
    tensors: Vec<Tensor>,
    rows: usize,
    symbols: HashMap<String, usize>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The input tensors, in the model's input order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
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

/// A number of MC samples that is valid by construction: at least 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McSamples(usize);

impl McSamples {
    pub fn new(n: usize, max: usize) -> Result<Self, Error> {
        if n < 2 || n > max {
            return Err(Error::InvalidParameter(format!(
                "mc_samples must be an integer in [2, {max}], got {n}"
            )));
        }
        Ok(McSamples(n))
    }
    pub fn get(self) -> usize {
        self.0
    }
}

/// Deterministic inference. Holds no way to reach a mask input.
pub struct EvalSession<'m> {
    model: &'m LoadedModel,
    plan: &'m EvalPlan,
}

/// Stochastic inference with live dropout.
pub struct McSession<'m> {
    model: &'m LoadedModel,
    plan: &'m McPlan,
}

impl LoadedModel {
    pub fn load(name: &str, path: &Path, config: ModelConfig) -> anyhow::Result<LoadedModel> {
        crate::engine::kernels::pin();
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_path(path).context("reading the ONNX protobuf")?;
        // External weights are read relative to the model's folder ("." for a bare file name).
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        onnx_graph::check_external_data(&proto, folder)?;
        let mut surgery = onnx_graph::analyse(&proto, &config.dropout_ratios)?;
        let dir = folder.to_str();
        let eval_typed = typed(&onnx, &surgery.eval_proto, dir).context("building the eval graph")?;
        let inputs = (0..eval_typed.inputs.len())
            .map(|i| {
                let outlet = eval_typed.inputs[i];
                spec(&eval_typed.node(outlet.node).name, eval_typed.input_fact(i)?)
            })
            .collect::<TractResult<Vec<_>>>()?;
        let output_names: Vec<String> = surgery
            .eval_proto
            .graph
            .as_ref()
            .expect("has graph")
            .output
            .iter()
            .map(|o| o.name.clone())
            .collect();
        let outputs = output_names
            .iter()
            .enumerate()
            .map(|(i, n)| spec(n, eval_typed.output_fact(i)?))
            .collect::<TractResult<Vec<_>>>()?;
        let batch_symbol = batch_symbol(&inputs, &outputs);
        let logits = softmax_logits(&proto, &outputs);
        let probability_classes = probability_outputs(&config, &outputs, &logits);
        let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);

        // Both graphs stop at the logits of a last-axis Softmax output, and the server
        // applies the softmax itself, in f64. For MC, tract's Softmax has a cost per row
        // (breast_cancer's MC-50, 2 classes: 57-76 µs with it, 33-43 µs without). For both,
        // tract's row sum splits a row at a 64-byte boundary, so a row's last bits would
        // follow its place in the pass (`engine::kernels`); the server's sum does not.
        // Logits that are an output themselves stay as they are: one name, one output.
        let server_softmax: Vec<Option<String>> = outputs
            .iter()
            .zip(&logits)
            .map(|(o, l)| {
                l.clone().filter(|l| {
                    matches!(o.datum, DatumType::F32 | DatumType::F64 | DatumType::F16)
                        && !outputs.iter().any(|other| other.name == *l)
                })
            })
            .collect();
        let (eval_typed, eval_softmax) =
            cut_softmax(eval_typed, &server_softmax).context("cutting the eval graph at its logits")?;
        let eval_plans =
            Plans::new(eval_typed, batch_symbol.as_deref(), None, file_bytes).context("optimizing the eval graph")?;
        let probed = probe_sites(&onnx, &mut surgery, dir)?;
        let mc = build_mc(
            &onnx,
            &surgery,
            &probed,
            dir,
            &inputs,
            &server_softmax,
            batch_symbol.as_deref(),
            file_bytes,
        );
        let mut model = LoadedModel {
            name: name.to_string(),
            path: path.to_path_buf(),
            config,
            inputs,
            outputs,
            probability_classes,
            batch_symbol,
            sites: surgery.sites,
            fixes: surgery.fixes,
            checks: vec![],
            calibration: None,
            eval: EvalPlan {
                plans: eval_plans,
                softmax: eval_softmax,
            },
            mc,
            memory: ModelMemory::default(),
            pass_budget: AtomicU64::new(DEFAULT_PASS_BUDGET_BYTES),
            layout: Layout {
                merge: true,
                pad_single_eval: false,
            },
        };
        model.self_check();
        // After the self-check: it may replace the shared-trunk MC graph by the full one.
        model.memory = model.memory_model();
        Ok(model)
    }

    fn memory_model(&self) -> ModelMemory {
        // Elements of one batch row: every dim but the batch (other symbols count 1; see
        // `engine::memory`). A model without a batch symbol counts its whole input as a row.
        let per_row = |shape: &[Dim]| -> u64 {
            shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as u64,
                    Dim::Symbol(_) => 1,
                })
                .product()
        };
        let input_bytes_per_row = self
            .inputs
            .iter()
            .map(|i| per_row(&i.shape) * i.datum.size_of() as u64)
            .sum();
        let output_elements_per_row = self.outputs.iter().map(|o| per_row(&o.shape)).sum();
        let probability_rows_per_row = self
            .outputs
            .iter()
            .zip(&self.probability_classes)
            .filter_map(|(o, k)| k.map(|k| per_row(&o.shape) / k.max(1) as u64))
            .sum();
        let (mc_graph, mc_shared, mask_bytes_per_row) = match &self.mc {
            Err(_) => (None, false, 0),
            Ok(plan) => (
                Some(plan.plans.bytes()),
                matches!(plan.trunk, Trunk::Shared { .. }),
                // The mask itself, and the sampler's u32 random word per element.
                plan.masks
                    .iter()
                    .map(|m| per_row(&m.shape) * (m.datum.size_of() as u64 + 4))
                    .sum(),
            ),
        };
        ModelMemory {
            eval_graph: self.eval.plans.bytes(),
            mc_graph,
            mc_shared,
            input_bytes_per_row,
            mask_bytes_per_row,
            output_elements_per_row,
            probability_rows_per_row,
        }
    }

    /// The estimated peak bytes of one eval pass of `rows` rows.
    pub fn eval_pass_bytes(&self, rows: usize) -> u64 {
        self.memory.eval_pass(rows)
    }

    /// The estimated peak bytes of one MC pass of `samples` samples of `rows` rows.
    pub fn mc_pass_bytes(&self, rows: usize, samples: usize) -> u64 {
        self.memory.mc_pass(rows, samples)
    }

    /// The estimated bytes of an MC answer: its statistics, its samples when returned, and
    /// their encoding.
    pub fn mc_answer_bytes(&self, rows: usize, samples: usize, return_samples: bool) -> u64 {
        self.memory.mc_answer(rows, samples, return_samples)
    }

    /// The estimated bytes of an eval answer's encoding.
    pub fn eval_answer_bytes(&self, rows: usize) -> u64 {
        self.memory.eval_answer(rows)
    }

    /// The bytes of `rows` rows of input, as the request holds them.
    pub fn input_bytes(&self, rows: usize) -> u64 {
        self.memory.input_bytes_per_row.saturating_mul(rows as u64)
    }

    /// Values `return_samples` gives back for `samples` samples of `rows` rows.
    pub fn returned_values(&self, rows: usize, samples: usize) -> u64 {
        self.memory.returned_values(rows, samples)
    }

    /// Sets the bytes one pass may take (the server's share of `--max-memory-bytes`).
    pub fn set_pass_budget(&self, bytes: u64) {
        self.pass_budget.store(bytes, Ordering::Relaxed);
    }

    pub fn pass_budget(&self) -> u64 {
        self.pass_budget.load(Ordering::Relaxed)
    }

    /// The most samples of `rows` rows that one MC pass may hold within the pass budget;
    /// 0 when not even one fits. A model whose masks are not batch-led runs one sample per
    /// pass whatever this says.
    pub fn mc_samples_per_pass(&self, rows: usize) -> usize {
        let budget = self.pass_budget();
        let base = self.mc_pass_bytes(rows, 0);
        let step = self.mc_pass_bytes(rows, 1).saturating_sub(base).max(1);
        // Linear in the samples: base + step·k (see `engine::memory`).
        (budget.saturating_sub(base) / step).min(usize::MAX as u64) as usize
    }

    /// Samples per MC pass of `batch`, as [`McSession::start`] sizes them: within the pass
    /// budget (admission refuses a request where not even one sample fits) and within the
    /// input elements that keep a pass's tiling cheap; one when the masks are not batch-led.
    pub fn mc_per_pass(&self, batch: &Batch) -> usize {
        self.mc_pass_samples(batch.rows, batch.tensors.iter().map(|t| t.len()).sum())
    }

    /// [`mc_per_pass`](Self::mc_per_pass) for a pass of `rows` rows holding
    /// `input_elements` input elements in all.
    pub fn mc_pass_samples(&self, rows: usize, input_elements: usize) -> usize {
        if !self.mc.as_ref().is_ok_and(|p| p.batch.is_some()) {
            return 1;
        }
        (MAX_PASS_INPUT_ELEMENTS / input_elements.max(1))
            .min(self.mc_samples_per_pass(rows))
            .max(1)
    }

    /// The most rows one eval pass may hold within the pass budget (at least 1: a row is
    /// the least a pass can run). Only a model with a batch axis splits its rows.
    pub fn eval_rows_per_pass(&self, rows: usize) -> usize {
        if self.batch_symbol.is_none() {
            return rows;
        }
        let budget = self.pass_budget();
        let base = self.eval_pass_bytes(0);
        let step = self.eval_pass_bytes(1).saturating_sub(base).max(1);
        ((budget.saturating_sub(base) / step) as usize).clamp(1, rows.max(1))
    }

    /// How many rows apart two places of a row of `batch` must be for its answer (eval and
    /// MC) to keep its bits: 1 when a row may go anywhere in a pass. A model with sums over
    /// rows of a size that a 64-byte boundary can split differently ([`kernels`]) answers
    /// more, and its passes then keep each row where it is when the request runs alone.
    pub fn row_granularity(&self, batch: &Batch) -> usize {
        let mc = self
            .mc
            .as_ref()
            .map(|p| p.plans.granularity(&batch.symbols))
            .unwrap_or(1);
        self.eval.plans.granularity(&batch.symbols).max(mc)
    }

    /// Whether the eval checks all passed; a model that fails them is not served. A failed
    /// `mc_live` only refuses MC, and a failed `batch_invariant` only keeps the model's
    /// requests in passes of their own.
    pub fn healthy(&self) -> bool {
        self.checks
            .iter()
            .all(|c| c.result != Outcome::Fail || !gates_health(c.check))
    }

    /// The eval self-checks that failed, as `check: detail; ...` (empty when healthy).
    pub fn failed_checks(&self) -> String {
        self.checks
            .iter()
            .filter(|c| c.result == Outcome::Fail && gates_health(c.check))
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
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

    pub fn mc_session(&self) -> Result<McSession<'_>, Error> {
        match &self.mc {
            Ok(plan) => Ok(McSession { model: self, plan }),
            Err(reason) => Err(Error::McUnavailable(format!(
                "model '{}' cannot serve MC dropout: {reason}",
                self.name
            ))),
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
    pub fn batch(&self, tensors: Vec<Tensor>) -> Result<Batch, Error> {
        if tensors.len() != self.inputs.len() {
            return Err(Error::MissingInput(format!(
                "model '{}' takes {} inputs, got {}",
                self.name,
                self.inputs.len(),
                tensors.len()
            )));
        }
        let mut symbols: HashMap<String, usize> = HashMap::new();
        for (spec, t) in self.inputs.iter().zip(&tensors) {
            let mismatch = || {
                Error::ShapeMismatch(format!(
                    "input '{}': expected shape {}, got {:?}",
                    spec.name,
                    shape_string(&spec.shape),
                    t.shape()
                ))
            };
            if t.datum_type() != spec.datum {
                return Err(Error::InvalidValue(format!(
                    "input '{}': expected {} values, got {:?}",
                    spec.name,
                    spec.dtype,
                    t.datum_type()
                )));
            }
            if t.rank() != spec.shape.len() {
                return Err(mismatch());
            }
            for (d, &actual) in spec.shape.iter().zip(t.shape()) {
                match d {
                    Dim::Fixed(n) if *n != actual => return Err(mismatch()),
                    Dim::Fixed(_) => {}
                    Dim::Symbol(s) => match symbols.get(s) {
                        Some(&v) if v != actual => {
                            return Err(Error::ShapeMismatch(format!(
                                "input '{}': dimension '{s}' is {actual} here but {v} in another \
                                 input (expected shape {}, got {:?})",
                                spec.name,
                                shape_string(&spec.shape),
                                t.shape()
                            )));
                        }
                        Some(_) => {}
                        None => {
                            if actual == 0 {
                                return Err(Error::ShapeMismatch(format!(
                                    "input '{}': dimension '{s}' is 0; send at least one row",
                                    spec.name
                                )));
                            }
                            symbols.insert(s.clone(), actual);
                        }
                    },
                }
            }
        }
        let rows = match &self.batch_symbol {
            Some(s) => symbols[s],
            None => tensors.first().and_then(|t| t.shape().first().copied()).unwrap_or(1),
        };
        Ok(Batch { tensors, rows, symbols })
    }

    fn probe_batch(&self, rows: usize, seed: u64) -> anyhow::Result<Batch> {
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
        self.batch(tensors).map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn self_check(&mut self) {
        let mut checks = vec![];
        let probe = self.probe_batch(PROBE_ROWS, 0x6d6364);
        let probe = match probe {
            Ok(p) => p,
            Err(e) => {
                for check in [
                    "eval_deterministic",
                    "eval_row_independent",
                    "mc_matches_eval",
                    "mc_live",
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
            Err(e) => fail("eval_deterministic", format!("eval failed on the probe input: {e}")),
            Ok(first) => match self.eval_session().run(&probe) {
                Err(e) => fail("eval_deterministic", format!("second eval failed: {e}")),
                Ok(second) => {
                    let same = first
                        .iter()
                        .zip(&second)
                        .all(|(a, b)| bits(&a.tensor) == bits(&b.tensor));
                    if same {
                        pass("eval_deterministic", "two eval passes on the probe are bit-identical")
                    } else {
                        fail("eval_deterministic", "two eval passes on the same probe differ".into())
                    }
                }
            },
        });
        checks.push(match (&eval, &self.batch_symbol) {
            (_, None) => skipped(
                "eval_row_independent",
                "the file fixes the batch size (or an output has no batch axis)",
            ),
            (Err(_), _) => fail("eval_row_independent", "eval failed on the probe input".into()),
            (Ok(full), Some(_)) => self.check_rows(&probe, full),
        });
        checks.push(match &mut self.mc {
            Err(reason) => skipped("mc_shared_trunk", reason),
            Ok(plan) => check_shared_trunk(plan, &probe),
        });
        checks.push(match (&eval, &self.mc) {
            (_, Err(reason)) => skipped("mc_matches_eval", reason),
            (Err(_), _) => fail("mc_matches_eval", "eval failed on the probe input".into()),
            (Ok(full), Ok(plan)) => match run_with_unit_masks(plan, &probe) {
                Err(e) => fail("mc_matches_eval", format!("the MC graph failed: {e}")),
                Ok(outs) => match compare(full, &outs) {
                    None => pass("mc_matches_eval", "the MC graph with keep-all masks equals eval"),
                    Some(d) => fail(
                        "mc_matches_eval",
                        format!("the MC graph with keep-all masks differs from eval: {d}"),
                    ),
                },
            },
        });
        let live = match &self.mc {
            Err(reason) => skipped("mc_live", reason),
            Ok(plan) => check_live(plan, &probe),
        };
        if live.result == Outcome::Fail {
            self.mc = Err(live.detail.clone());
        }
        if checks
            .iter()
            .any(|c| c.result == Outcome::Fail && c.check == "mc_matches_eval")
        {
            self.mc = Err("the MC graph does not reproduce eval with keep-all masks".into());
        }
        checks.push(live);
        checks.push(self.check_batch_invariant(&probe));
        self.checks = checks;
    }

    /// A row's answer must not depend on what else shares its pass. The kernels are pinned
    /// for that (`engine::kernels`); this proves it on the probe, and decides what the pass
    /// planner may do with this model: eval rows alone, in a pass of two and at every place
    /// of the probe batch; MC samples in one pass and in passes of two samples; a request
    /// alone and merged with others. A difference turns merging off for the model (its
    /// answers then depend only on the request), and is reported here.
    fn check_batch_invariant(&mut self, probe: &Batch) -> CheckResult {
        const CHECK: &str = "batch_invariant";
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
            let eval = |b: &Batch| -> TractResult<Vec<Vec<u64>>> {
                let outs = self.eval_session().plan_pass(b)?;
                Ok(outs.iter().map(|t| bits(t)).collect())
            };
            let rows = |idx: &[usize]| -> TractResult<Batch> { probe_rows(self, probe, idx) };
            let full = eval(probe)?;
            plans.push(self.eval.plans.get(probe.rows, 1)?);
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
            plans.push(self.eval.plans.get(1, 1)?);
            plans.push(self.eval.plans.get(2, 1)?);
            let Ok(plan) = &self.mc else { return Ok(()) };
            let session = McSession { model: self, plan };
            let k = McSamples(4);
            let stats = |outs: Vec<McOutput>| -> Vec<Vec<u64>> {
                outs.iter()
                    .flat_map(|o| [&o.stats.mean, &o.stats.variance])
                    .map(|v| v.iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            let one = stats(
                session
                    .run_in_passes(probe, k, 7, false, 4)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
            if granularity == 1 && plan.batch.is_some() {
                let two = stats(
                    session
                        .run_in_passes(probe, k, 7, false, 2)
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                );
                if one != two {
                    problems.push("MC samples drawn in passes of two differ from one pass".into());
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
            plans.push(plan.plans.get(probe.rows, k.get())?);
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
        let reductions = if sensitive.is_empty() {
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
            "; tract's one-row plan differs from larger ones here, so a one-row eval runs in a pass of two"
        } else {
            ""
        };
        let probed = if granularity == 1 {
            "probe rows alone, in larger passes and merged give the same bits"
        } else {
            "probe rows alone and in a pass of two give the same bits"
        };
        if problems.is_empty() {
            pass(CHECK, &format!("pinned FMA kernels; {reductions}{single}; {probed}"))
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

    fn check_rows(&self, probe: &Batch, full: &[NamedTensor]) -> CheckResult {
        for r in 0..probe.rows {
            let tensors: TractResult<Vec<Tensor>> = probe.tensors.iter().map(|t| t.slice(0, r, r + 1)).collect();
            let single = tensors
                .map_err(|e| anyhow::anyhow!("{e}"))
                .and_then(|t| self.batch(t).map_err(|e| anyhow::anyhow!("{e}")))
                .and_then(|b| self.eval_session().run(&b).map_err(|e| anyhow::anyhow!("{e}")));
            let single = match single {
                Ok(s) => s,
                Err(e) => {
                    return fail(
                        "eval_row_independent",
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
                Err(e) => return fail("eval_row_independent", format!("{e}")),
                Ok(rows) => {
                    if let Some(d) = compare(&rows, &single) {
                        return fail(
                            "eval_row_independent",
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
            "eval_row_independent",
            &format!(
                "each of {} probe rows gives the same output alone as in the batch",
                probe.rows
            ),
        )
    }
}

impl EvalSession<'_> {
    /// Runs the batch in one pass, or in passes of as many rows as the pass budget holds:
    /// rows are independent (the load-time check `eval_row_independent` proves it), so the
    /// outputs of the passes, concatenated, are the batch's.
    pub fn run(&self, batch: &Batch) -> Result<Vec<NamedTensor>, Error> {
        let per_pass = self.model.eval_rows_per_pass(batch.rows);
        self.run_in_passes(batch, aligned(per_pass, self.model.row_granularity(batch)))
    }

    /// As [`run`](Self::run), with at most `per_pass` rows per pass.
    pub fn run_in_passes(&self, batch: &Batch, per_pass: usize) -> Result<Vec<NamedTensor>, Error> {
        let eval_failed = |e: anyhow::Error| Error::Internal(format!("eval failed: {e:#}"));
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
            let part = Batch {
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
    fn pass(&self, batch: &Batch) -> TractResult<TVec<TValue>> {
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
    fn plan_pass(&self, batch: &Batch) -> TractResult<TVec<TValue>> {
        let inputs: TVec<TValue> = batch.tensors.iter().map(|t| t.clone().into_tvalue()).collect();
        let plan = self.plan.plans.get(batch.rows, 1)?;
        let outs = plans::run(&plan, inputs)?;
        outs.into_iter()
            .zip(&self.plan.softmax)
            .map(|(t, &softmax)| {
                if !softmax {
                    return Ok(t);
                }
                let mut values = to_f64(&t)?;
                softmax_rows(
                    &mut values,
                    *t.shape().last().expect("softmax outputs have a last axis"),
                );
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
        batch: &Batch,
        samples: McSamples,
        seed: u64,
        keep_samples: bool,
    ) -> Result<Vec<McOutput>, Error> {
        let mut draw = self.start(batch, seed, keep_samples);
        draw.draw(samples.get())?;
        Ok(draw.finish())
    }

    /// As [`run`](Self::run), with at most `per_pass` samples per forward pass (1 gives the
    /// sequential baseline the benchmarks compare against).
    pub fn run_in_passes(
        &self,
        batch: &Batch,
        samples: McSamples,
        seed: u64,
        keep_samples: bool,
        per_pass: usize,
    ) -> Result<Vec<McOutput>, Error> {
        let mut draw = self.start(batch, seed, keep_samples);
        draw.per_pass = aligned(per_pass.max(1), draw.step());
        draw.draw(samples.get())?;
        Ok(draw.finish())
    }

    /// Starts drawing samples of `batch`, to be drawn in as many steps as the caller likes:
    /// sample `s` is the same whichever step draws it.
    pub fn start<'s>(&'s self, batch: &'s Batch, seed: u64, keep_samples: bool) -> McDraw<'s> {
        let step = sample_step(self.model.row_granularity(batch), batch.rows);
        let per_pass = aligned(self.model.mc_per_pass(batch), step);
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
    model: &'s LoadedModel,
    plan: &'s McPlan,
    batch: &'s Batch,
    sampler: MaskSampler,
    accumulators: Vec<(Vec<usize>, Accumulator)>,
    done: usize,
    keep_samples: bool,
    per_pass: usize,
}

impl McDraw<'_> {
    /// Samples a pass may start at a multiple of, for a row to keep its alignment
    /// ([`LoadedModel::row_granularity`]); `auto` draws chunks of a multiple of it.
    pub fn step(&self) -> usize {
        sample_step(self.model.row_granularity(self.batch), self.batch.rows)
    }

    /// Draws the next `n` samples, in passes of at most the pass size.
    pub fn draw(&mut self, n: usize) -> Result<(), Error> {
        let batch_led = self.plan.batch.is_some();
        let per_pass = if batch_led { self.per_pass } else { 1 };
        let end = self.done + n;
        while self.done < end {
            let k = per_pass.min(end - self.done);
            // tract's plan for a pass of one row (one sample of a one-row request) differs
            // from its larger plans, and can give other bits (measured: 1-4 ulps on the
            // MONAI DenseNet). Such a pass also draws the next sample, and drops it.
            let run = if batch_led && k * self.batch.rows == 1 { 2 } else { k };
            let masks = internal(self.plan.sample_masks(self.batch, self.done, run, &mut self.sampler))?;
            let outs = internal(self.plan.run(self.batch, run, masks))?;
            for (o, (mut shape, values)) in outs.into_iter().enumerate() {
                let per_sample = values.len() / run;
                if self.accumulators.len() <= o {
                    if run > 1 {
                        shape[0] /= run;
                    }
                    let classes = self.model.probability_classes.get(o).copied().flatten();
                    self.accumulators
                        .push((shape, Accumulator::new(per_sample, classes, self.keep_samples)));
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

impl LoadedModel {
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

/// Samples apart that keep a row's alignment, for a model of row granularity `granularity`
/// and a batch of `rows` rows: sample `s` of row `r` sits at row `s·rows + r` of a pass.
fn sample_step(granularity: usize, rows: usize) -> usize {
    granularity / gcd(granularity, rows.max(1))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `per_pass` rounded down to a multiple of `step`, so that every pass after the first
/// starts where a row keeps its alignment; at least one step, even where the pass budget
/// holds less (a model whose sums a row's place can move, with a row that nearly fills a
/// pass by itself): the answer's bits come before the budget's last fraction.
fn aligned(per_pass: usize, step: usize) -> usize {
    (per_pass / step * step).max(step)
}

/// Whether a failed check makes the model unhealthy (not served).
fn gates_health(check: &str) -> bool {
    !matches!(check, "mc_live" | "batch_invariant")
}

/// The rows `idx` of `batch` (repeats allowed), as a batch of their own.
fn probe_rows(model: &LoadedModel, batch: &Batch, idx: &[usize]) -> TractResult<Batch> {
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
    model.batch(tensors).map_err(|e| anyhow::anyhow!("{e}"))
}

fn run_with_unit_masks(plan: &McPlan, batch: &Batch) -> TractResult<Vec<NamedTensor>> {
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
fn unnamed(tensors: impl IntoIterator<Item = Tensor>) -> Vec<NamedTensor> {
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
fn check_live(plan: &McPlan, probe: &Batch) -> CheckResult {
    const CHECK: &str = "mc_live";
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
fn center_rows(values: &mut [f64], classes: usize) {
    for row in values.chunks_exact_mut(classes.max(1)) {
        let mean = row.iter().sum::<f64>() / row.len() as f64;
        row.iter_mut().for_each(|v| *v -= mean);
    }
}

/// The least spread, relative to an output's scale, that counts as dropout moving it:
/// about 800 float32 ulps, far above rounding, far below what a dropout site does.
const LIVE_SPREAD: f64 = 1e-4;

/// `values` holds `k` samples one after the other; the largest (max − min) over the samples
/// of any element, divided by the largest magnitude in the output (0 when all are 0).
fn relative_spread(values: &[f64], k: usize) -> f64 {
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
fn check_shared_trunk(plan: &mut McPlan, probe: &Batch) -> CheckResult {
    const CHECK: &str = "mc_shared_trunk";
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

/// Softmax over consecutive rows of `classes` values, in place, in f64.
fn softmax_rows(values: &mut [f64], classes: usize) {
    for row in values.chunks_exact_mut(classes.max(1)) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

fn internal<T>(r: TractResult<T>) -> Result<T, Error> {
    r.map_err(|e| Error::Internal(format!("MC pass failed: {e:#}")))
}

fn pass(check: &'static str, detail: &str) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Pass,
        detail: detail.to_string(),
    }
}
fn fail(check: &'static str, detail: String) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Fail,
        detail,
    }
}
fn skipped(check: &'static str, detail: &str) -> CheckResult {
    CheckResult {
        check,
        result: Outcome::Skipped,
        detail: detail.to_string(),
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    to_f64(t)
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .unwrap_or_default()
}

/// Same outputs up to float rounding? Different plans (batch sizes, fused kernels) may
/// reorder sums, so allow a few float32 ulps of relative slack, never more.
fn compare(a: &[NamedTensor], b: &[NamedTensor]) -> Option<String> {
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

pub fn to_f64(t: &Tensor) -> TractResult<Vec<f64>> {
    let c = t.cast_to::<f64>()?;
    Ok(c.try_as_plain_ram()?.as_slice::<f64>()?.to_vec())
}

fn resolve(shape: &[Dim], symbols: &HashMap<String, usize>) -> Result<Vec<usize>, String> {
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => Ok(*v),
            Dim::Symbol(s) => symbols
                .get(s)
                .copied()
                .ok_or_else(|| format!("no value for dimension '{s}'")),
        })
        .collect()
}

fn typed(onnx: &tract_onnx::Onnx, proto: &ModelProto, dir: Option<&str>) -> TractResult<TypedModel> {
    let parsed = onnx.parse(proto, dir)?;
    if !parsed.unresolved_inputs.is_empty() {
        anyhow::bail!("unresolved inputs: {:?}", parsed.unresolved_inputs);
    }
    parsed.model.into_typed()
}

fn dtype_name(dt: DatumType) -> &'static str {
    match dt {
        DatumType::F32 => "float32",
        DatumType::F64 => "float64",
        DatumType::F16 => "float16",
        DatumType::I64 => "int64",
        DatumType::I32 => "int32",
        DatumType::I16 => "int16",
        DatumType::I8 => "int8",
        DatumType::U8 => "uint8",
        DatumType::U16 => "uint16",
        DatumType::U32 => "uint32",
        DatumType::U64 => "uint64",
        DatumType::Bool => "bool",
        _ => "other",
    }
}

fn spec(name: &str, fact: &TypedFact) -> TractResult<TensorSpec> {
    let shape = fact
        .shape
        .iter()
        .map(|d| match d {
            TDim::Val(v) => Dim::Fixed(*v as usize),
            other => Dim::Symbol(other.to_string()),
        })
        .collect();
    Ok(TensorSpec {
        name: name.to_string(),
        dtype: dtype_name(fact.datum_type),
        datum: fact.datum_type,
        shape,
    })
}

/// The batch axis: a symbol that is the first dim of every input and every output.
fn batch_symbol(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Option<String> {
    let first = match inputs.first()?.shape.first()? {
        Dim::Symbol(s) => s.clone(),
        Dim::Fixed(_) => return None,
    };
    let is_batch = |s: &TensorSpec| matches!(s.shape.first(), Some(Dim::Symbol(x)) if *x == first);
    (inputs.iter().all(is_batch) && outputs.iter().all(is_batch)).then_some(first)
}

fn probability_outputs(
    config: &ModelConfig,
    outputs: &[TensorSpec],
    softmax_logits: &[Option<String>],
) -> Vec<Option<usize>> {
    outputs
        .iter()
        .zip(softmax_logits)
        .map(|(o, logits)| {
            let last = match o.shape.last() {
                Some(Dim::Fixed(k)) if *k >= 2 => *k,
                _ => return None,
            };
            let declared = match &config.probability_outputs {
                Some(list) => list.contains(&o.name),
                None => logits.is_some(),
            };
            declared.then_some(last)
        })
        .collect()
}

/// The typed graph with each output that `server_softmax` names given by the input of the
/// Softmax that produced it (its logits); per output, whether it was cut.
fn cut_softmax(mut model: TypedModel, server_softmax: &[Option<String>]) -> TractResult<(TypedModel, Vec<bool>)> {
    use tract_onnx::tract_core::ops::nn::Softmax;
    let mut outlets = model.outputs.clone();
    let mut cut = vec![false; outlets.len()];
    for (ix, logits) in server_softmax.iter().enumerate() {
        if logits.is_none() {
            continue;
        }
        let node = model.node(outlets[ix].node);
        if node.op_as::<Softmax>().is_some() && node.inputs.len() == 1 {
            outlets[ix] = node.inputs[0];
            cut[ix] = true;
        }
    }
    if cut.iter().any(|c| *c) {
        model.select_output_outlets(&outlets)?;
        model = model.into_decluttered()?;
    }
    Ok((model, cut))
}

/// Per output: when a Softmax over the output's last axis produces it, the name of the
/// Softmax's input (the logits).
fn softmax_logits(proto: &ModelProto, outputs: &[TensorSpec]) -> Vec<Option<String>> {
    let graph = proto.graph.as_ref().expect("has graph");
    let opset = onnx_graph::opset(proto);
    outputs
        .iter()
        .map(|o| {
            let n = graph.node.iter().find(|n| {
                n.op_type == "Softmax"
                    && (n.domain.is_empty() || n.domain == "ai.onnx")
                    && n.output.first() == Some(&o.name)
            })?;
            let rank = o.shape.len() as i64;
            let default_axis = if opset >= 13 { -1 } else { 1 };
            let axis = n
                .attribute
                .iter()
                .find(|a| a.name == "axis")
                .map(|a| a.i)
                .unwrap_or(default_axis);
            // Before opset 13, Softmax normalises over all axes from `axis` on.
            let axis = if axis < 0 { axis + rank } else { axis };
            (axis == rank - 1).then(|| n.input.first().cloned()).flatten()
        })
        .collect()
}

/// The activation's data type and the mask's shape, per site (in site order).
type Probed = Vec<(DatumType, Vec<Dim>)>;

/// Types the graph once more, exposing every site's activation and the tensor that shapes
/// a file's own draw, to learn each mask's shape (and so each site's kind). A failure only
/// refuses MC, unless the file has dropout written as random ops: their replacement by the
/// identity is then unproven, and the model is refused.
fn probe_sites(
    onnx: &tract_onnx::Onnx,
    surgery: &mut onnx_graph::Surgery,
    dir: Option<&str>,
) -> anyhow::Result<Result<Probed, String>> {
    let (probe, lookups) = surgery.shape_probe_proto();
    let fact_shape = |model: &TypedModel, at: FactAt| -> TractResult<(DatumType, Vec<Dim>)> {
        let fact = match at {
            FactAt::Input(i) => model.input_fact(i),
            FactAt::Output(o) => model.output_fact(o),
        }?;
        // Symbols print by name only while their model lives: convert them now.
        Ok((fact.datum_type, spec("", fact)?.shape))
    };
    let probed = typed(onnx, &probe, dir).and_then(|model| {
        lookups
            .iter()
            .map(|l: &ProbeLookup| {
                let (datum, activation) = fact_shape(&model, l.activation)?;
                let mask = match l.template {
                    Some(at) => fact_shape(&model, at)?.1,
                    None => surgery.sites[l.site]
                        .static_mask_shape()
                        .unwrap_or_else(|| activation.clone()),
                };
                Ok((datum, activation, mask))
            })
            .collect::<TractResult<Vec<_>>>()
    });
    let probed = match probed {
        Ok(p) => p,
        Err(e) => {
            if let Some(site) = surgery.sites.iter().find(|s| s.pattern.is_some()) {
                anyhow::bail!(
                    "typing the graph to size the mask of dropout site '{}' failed: {e:#}",
                    site.node
                );
            }
            return Ok(Err(format!("typing the dropout inputs failed: {e:#}")));
        }
    };
    let mut out = vec![];
    for (site, (datum, activation, mask)) in surgery.sites.iter_mut().zip(probed) {
        site.set_mask_shape(&activation, mask.clone())?;
        out.push((datum, mask));
    }
    Ok(Ok(out))
}

#[allow(clippy::too_many_arguments)]
fn build_mc(
    onnx: &tract_onnx::Onnx,
    surgery: &onnx_graph::Surgery,
    probed: &Result<Probed, String>,
    dir: Option<&str>,
    inputs: &[TensorSpec],
    server_softmax: &[Option<String>],
    batch_symbol: Option<&str>,
    file_bytes: u64,
) -> Result<McPlan, String> {
    if surgery.sites.is_empty() {
        return Err("the model has no Dropout nodes".into());
    }
    if let Some(b) = &surgery.mc_blocker {
        return Err(b.clone());
    }
    if !surgery.sites.iter().any(|s| s.samples()) {
        return Err("every Dropout node of the model has ratio 0".into());
    }
    let probed = probed.as_ref().map_err(Clone::clone)?;
    let input_symbols: Vec<String> = inputs
        .iter()
        .flat_map(|i| i.shape.iter())
        .filter_map(|d| match d {
            Dim::Symbol(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let mut masks = vec![];
    for (site, (datum, shape)) in probed.iter().enumerate() {
        let s = &surgery.sites[site];
        if !s.samples() {
            continue;
        }
        for d in shape {
            match d {
                Dim::Fixed(_) => {}
                Dim::Symbol(sym) if input_symbols.contains(sym) => {}
                other => {
                    return Err(format!(
                        "the mask of dropout site '{}' has dimension '{other}', which is not a dimension \
                         of any model input, so the server cannot size it",
                        s.node
                    ));
                }
            }
        }
        for values in s.mask_values() {
            masks.push(MaskInput {
                site,
                name: format!("{MASK_INPUT_PREFIX}{}", masks.len()),
                ratio: s.ratio.expect("sampling sites have a ratio"),
                values,
                datum: *datum,
                shape: shape.clone(),
            });
        }
    }
    let logits_outputs: Vec<(usize, String)> = server_softmax
        .iter()
        .enumerate()
        .filter_map(|(ix, logits)| logits.clone().map(|l| (ix, l)))
        .collect();
    let softmax: Vec<bool> = server_softmax.iter().map(Option::is_some).collect();
    let proto = surgery
        .mc_proto(&masks, &logits_outputs)
        .map_err(|e| format!("{e:#}"))?;
    let full = typed(onnx, &proto, dir).map_err(|e| format!("building the MC graph failed: {e:#}"))?;
    let shared = match batch_symbol {
        None => Err("the file fixes the batch size (or an output has no batch axis)".to_string()),
        Some(b) => {
            let mask_inputs: Vec<usize> = (full.inputs.len() - masks.len()..full.inputs.len()).collect();
            match trunk::share(&full, b, &mask_inputs) {
                Ok(Some(t)) => Plans::new(t.model, batch_symbol, Some(trunk::SAMPLES_SYMBOL), file_bytes)
                    .map(|p| (p, t.trunk_nodes, t.tiled))
                    .map_err(|e| format!("optimizing the shared-trunk graph failed: {e:#}")),
                Ok(None) => {
                    Err("no node upstream of the dropout masks reads an input: there is no trunk to share".to_string())
                }
                Err(e) => Err(format!("the trunk cannot be shared: {e:#}")),
            }
        }
    };
    let full =
        Plans::new(full, batch_symbol, None, file_bytes).map_err(|e| format!("building the MC graph failed: {e:#}"))?;
    // Samples share a pass only when the batch leads every mask, so that each sample owns
    // a block of every mask. A mask without the batch in front (or without it at all) would
    // otherwise be drawn across samples, or even shared by them.
    let batch = batch_symbol
        .filter(|b| {
            masks
                .iter()
                .all(|m| matches!(m.shape.first(), Some(Dim::Symbol(s)) if s == b))
        })
        .map(str::to_string);
    let (plans, trunk) = match shared {
        Ok((plans, trunk_nodes, tiled)) => (
            plans,
            Trunk::Shared {
                detail: format!("{trunk_nodes} trunk nodes run once per row; {tiled} tensors tiled"),
                full: Some(Box::new(full)),
            },
        ),
        Err(reason) => (full, Trunk::Full(reason)),
    };
    Ok(McPlan {
        plans,
        masks,
        batch,
        softmax,
        trunk,
    })
}

#[cfg(test)]
mod tests {
    use super::softmax_rows;

    #[test]
    fn softmax_rows_closed_forms_and_extreme_logits() {
        let mut v = vec![0.0, 3f64.ln(), 5.0, 5.0, 1000.0, 0.0, -1000.0, -1000.0];
        softmax_rows(&mut v, 2);
        let want = [0.25, 0.75, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{v:?}");
        }
    }
}
