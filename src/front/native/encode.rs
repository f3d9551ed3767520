//! Tensors and statistics back to nested JSON arrays.

use serde_json::{Number, Value};
use tract_onnx::prelude::*;

use crate::error::Error;

/// A tensor as nested JSON arrays.
pub fn tensor_to_json(t: &Tensor) -> Result<Value, Error> {
    let internal = |e: TractError| Error::Internal(format!("encoding output: {e}"));
    if t.datum_type() == DatumType::Bool {
        let view = t.try_as_plain_ram().map_err(internal)?;
        let data = view.as_slice::<bool>().map_err(internal)?;
        return Ok(nest(t.shape(), &mut data.iter().map(|b| Value::Bool(*b))));
    }
    if t.datum_type().is_integer() {
        let c = t.cast_to::<i64>().map_err(internal)?;
        let view = c.try_as_plain_ram().map_err(internal)?;
        let data = view.as_slice::<i64>().map_err(internal)?;
        return Ok(nest(t.shape(), &mut data.iter().map(|x| Value::Number((*x).into()))));
    }
    let values = crate::engine::model::to_f64(t).map_err(internal)?;
    Ok(floats_to_json(t.shape(), &values))
}

/// Flat f64 values in row-major order as nested JSON arrays. Non-finite values become null.
pub fn floats_to_json(shape: &[usize], values: &[f64]) -> Value {
    nest(
        shape,
        &mut values
            .iter()
            .map(|x| Number::from_f64(*x).map(Value::Number).unwrap_or(Value::Null)),
    )
}

/// Flat leaves in row-major order as nested JSON arrays of `shape`.
pub fn nest(shape: &[usize], leaves: &mut dyn Iterator<Item = Value>) -> Value {
    match shape.split_first() {
        None => leaves.next().unwrap_or(Value::Null),
        Some((&n, rest)) => Value::Array((0..n).map(|_| nest(rest, leaves)).collect()),
    }
}
