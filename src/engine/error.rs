//! The engine's own error: what went wrong, in the engine's terms. The core maps each kind
//! to the service's error, and so to each protocol's status, and words it for users
//! (`core::engine_errors`); nothing here knows of a protocol.

use tract_onnx::prelude::DatumType;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The tensors do not match the model's declared inputs.
    #[error("the inputs do not match the model's: {0:?}")]
    Input(InputMismatch),
    /// MC asked of a model whose dropout is not live; `reason` says why.
    #[error("model '{model}' cannot serve MC dropout: {reason}")]
    McUnavailable { model: String, reason: String },
    /// A pass failed inside the runtime: never the request's fault.
    #[error("a pass failed: {0}")]
    Pass(String),
}

/// How a request's tensors miss the model's inputs, with what each side said.
#[derive(Debug, Clone, PartialEq)]
pub enum InputMismatch {
    /// The model takes `expected` inputs.
    Count { model: String, expected: usize, got: usize },
    /// An input's element type.
    Datum {
        input: String,
        expected: &'static str,
        got: DatumType,
    },
    /// An input's rank, or one of its fixed dimensions.
    Shape {
        input: String,
        expected: String,
        got: Vec<usize>,
    },
    /// A symbolic dimension that takes two values across the inputs.
    Symbol {
        input: String,
        symbol: String,
        here: usize,
        elsewhere: usize,
        expected: String,
        got: Vec<usize>,
    },
    /// A symbolic dimension of 0: no rows.
    Empty { input: String, symbol: String },
    /// A value of an input that indexes a table of `limit` entries is outside `-limit..limit`.
    Index {
        input: String,
        /// Where the value is, per axis.
        at: Vec<usize>,
        value: i64,
        limit: usize,
    },
}

/// A pass's failure inside tract, as an [`EngineError::Pass`].
pub fn pass_failed<T>(r: tract_onnx::prelude::TractResult<T>) -> Result<T, EngineError> {
    r.map_err(|e| EngineError::Pass(format!("MC pass failed: {e:#}")))
}
