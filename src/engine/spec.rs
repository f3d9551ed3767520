//! The engine's vocabulary: a model's configuration, its tensors' declared shapes, a valid
//! MC sample count, and the conversions every other engine module shares. A leaf: it uses
//! nothing else of the crate.

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
