//! The engine's vocabulary: a model's configuration, its tensors' declared shapes, a valid
//! MC sample count, and the conversions every other engine module shares. A leaf: it uses
//! nothing else of the crate but the entropy layout its output kinds give.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

/// Optional per-model settings, read from `<stem>.model.json` next to `<stem>.onnx`.
/// An unknown key refuses the file (with the key named): a misspelt setting would
/// otherwise be ignored in silence.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
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
    /// How the model scored when it was trained, and how it was trained: notes for people
    /// (the bundled models carry them), free-form, never read by the server.
    pub metrics: Option<serde_json::Value>,
    pub training: Option<serde_json::Value>,
    /// Rows per drift window for this model (default: `--drift-window`).
    pub drift_window: Option<usize>,
    /// The class of a categorical output that is background: the per-row summary then adds
    /// means over the other positions (the foreground).
    pub background_class: Option<usize>,
    /// Output kinds by output name, overriding what the graph shows (see [`OutputKind`]).
    pub output_kinds: HashMap<String, DeclaredKind>,
    /// The runtime that runs this model's passes (`"tract"` or `"onnxruntime"`), over the
    /// server's `--backend`. A model the backend cannot run is refused, never moved to the
    /// other one.
    pub backend: Option<crate::engine::backend::Backend>,
    /// How tract runs a pass of several rows: `"batched"` (one pass) or `"row_by_row"` (one
    /// pass of the one-row plan per row). Default: row by row from
    /// [`crate::engine::row_passes::ROW_BY_ROW_FMA`] multiply-adds a row.
    pub passes: Option<PassMode>,
}

/// A model's choice of how tract runs a pass of several rows ([`crate::engine::row_passes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassMode {
    Batched,
    RowByRow,
}

/// An output kind as `<stem>.model.json` declares it: `{"kind": "categorical",
/// "class_axis": 1}`, `{"kind": "bernoulli"}` or `{"kind": "other"}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeclaredKind {
    /// The axis may count from the end (-1 is the last).
    Categorical {
        class_axis: i64,
    },
    Bernoulli,
    Other,
}

/// What an output's values are, decided once at load from the graph (the Softmax or Sigmoid
/// that produces it) or from the model's config. It decides which uncertainty statistics the
/// output has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputKind {
    /// At every position of the other axes, a distribution over the classes along
    /// `class_axes`: one axis, or (a Softmax before opset 13) every axis from its `axis` on,
    /// which ONNX normalises jointly, so that block is one distribution per row.
    /// `classes` is their count when the file fixes those dims.
    Categorical {
        class_axes: Vec<usize>,
        classes: Option<usize>,
    },
    /// Each element is the probability of its own event (a Sigmoid produces it).
    Bernoulli,
    Other,
}

impl OutputKind {
    /// The shape of the per-position statistics for an output of `shape`: the shape without
    /// its class axes (categorical), the shape itself (Bernoulli); None for other outputs.
    pub fn positions<T: Clone>(&self, shape: &[T]) -> Option<Vec<T>> {
        match self {
            OutputKind::Categorical { class_axes, .. } => Some(
                shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !class_axes.contains(i))
                    .map(|(_, d)| d.clone())
                    .collect(),
            ),
            OutputKind::Bernoulli => Some(shape.to_vec()),
            OutputKind::Other => None,
        }
    }

    /// How the entropies read a sample of `shape` (row-major), or None for other outputs
    /// and for shapes the kind does not fit.
    pub fn layout(&self, shape: &[usize]) -> Option<crate::engine::uncertainty::EntropyLayout> {
        use crate::engine::uncertainty::EntropyLayout;
        match self {
            OutputKind::Categorical { class_axes, .. } => {
                let (&first, &last) = (class_axes.first()?, class_axes.last()?);
                if last >= shape.len() || first > last {
                    return None;
                }
                let classes: usize = shape[first..=last].iter().product();
                let inner: usize = shape[last + 1..].iter().product();
                (classes >= 2).then_some(EntropyLayout::Categorical { classes, inner })
            }
            OutputKind::Bernoulli => Some(EntropyLayout::Bernoulli),
            OutputKind::Other => None,
        }
    }
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
    /// For an input whose values index a table (`onnx_graph::index_limits`): the table's
    /// size `n`; each value must be in `-n..n`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_limit: Option<usize>,
}

/// A number of MC samples that is valid by construction: at least 2, so that a variance
/// exists. The core decides what a request may ask for (its own maximum); this type only
/// guarantees what the statistics need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McSamples(usize);

impl McSamples {
    pub const fn new(n: usize) -> Option<Self> {
        if n < 2 { None } else { Some(McSamples(n)) }
    }
    pub fn get(self) -> usize {
        self.0
    }
}

/// Values of any numeric tensor, as f64.
pub fn to_f64(t: &Tensor) -> TractResult<Vec<f64>> {
    let c = t.cast_to::<f64>()?;
    Ok(c.try_as_plain_ram()?.as_slice::<f64>()?.to_vec())
}

pub fn resolve(shape: &[Dim], symbols: &HashMap<String, usize>) -> Result<Vec<usize>, String> {
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

pub fn dtype_name(dt: DatumType) -> &'static str {
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

pub fn tensor_spec(name: &str, fact: &TypedFact) -> TractResult<TensorSpec> {
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
        index_limit: None,
    })
}
