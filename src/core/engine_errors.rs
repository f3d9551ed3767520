//! The engine's errors as the service's: the one place where they are worded for users.

use crate::engine::error::{EngineError, InputMismatch};
use crate::error::Error;

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
        match e {
            EngineError::Input(InputMismatch::Count { model, expected, got }) => {
                Error::MissingInput(format!("model '{model}' takes {expected} inputs, got {got}"))
            }
            EngineError::Input(InputMismatch::Datum { input, expected, got }) => {
                Error::InvalidValue(format!("input '{input}': expected {expected} values, got {got:?}"))
            }
            EngineError::Input(InputMismatch::Shape { input, expected, got }) => {
                Error::ShapeMismatch(format!("input '{input}': expected shape {expected}, got {got:?}"))
            }
            EngineError::Input(InputMismatch::Symbol {
                input,
                symbol,
                here,
                elsewhere,
                expected,
                got,
            }) => Error::ShapeMismatch(format!(
                "input '{input}': dimension '{symbol}' is {here} here but {elsewhere} in another input \
                 (expected shape {expected}, got {got:?})"
            )),
            EngineError::Input(InputMismatch::Empty { input, symbol }) => Error::ShapeMismatch(format!(
                "input '{input}': dimension '{symbol}' is 0; send at least one row"
            )),
            EngineError::Input(InputMismatch::Index {
                input,
                at,
                value,
                limit,
            }) => Error::InvalidValue(format!(
                "input '{input}': element {at:?} = {value} is not an index of the model's table of {limit} \
                 entries (valid: {} to {})",
                -(limit as i128),
                limit - 1
            )),
            EngineError::McUnavailable { model, reason } => {
                Error::McUnavailable(format!("model '{model}' cannot serve MC dropout: {reason}"))
            }
            EngineError::Pass(detail) => Error::Internal(detail),
        }
    }
}
