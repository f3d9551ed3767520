//! The native JSON input format read as a tree: the whole body into a `serde_json::Value`,
//! then each input from it. `mcd-serve calibrate` reads its rows with it, and it is the
//! oracle of the native front end's streaming decoder (`front/native/decode/props.rs`
//! holds that decoder to these answers, error for error). Slower than the streaming
//! decoder, and easy to check by reading.

use serde_json::Value;
use tract_onnx::prelude::*;

use crate::core::tensors::in_input_order;
use crate::core::view::{LoadedModel, TensorSpec, shape_string};
use crate::error::Error;

/// Parses `{"inputs": [...]}` or `{"inputs": {"name": [...], ...}}` into the model's inputs,
/// in the model's input order.
pub fn parse_request(model: &LoadedModel, body: &[u8]) -> Result<Vec<Tensor>, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::MalformedJson(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(Error::MalformedJson(
            "request body must be a JSON object like {\"inputs\": ...}".into(),
        ));
    };
    let inputs = object
        .remove("inputs")
        .ok_or_else(|| Error::MissingInput("request body has no \"inputs\" field".into()))?;
    parse_inputs(model, inputs)
}

/// The value of `"inputs"`: one nested array for a one-input model, or an object of them
/// by input name; in the model's input order.
pub fn parse_inputs(model: &LoadedModel, inputs: Value) -> Result<Vec<Tensor>, Error> {
    match inputs {
        Value::Object(by_name) => in_input_order(model, by_name.into_iter().collect())?
            .into_iter()
            .map(|(spec, v)| to_tensor(spec, &v))
            .collect(),
        array @ Value::Array(_) if model.inputs.len() == 1 => Ok(vec![to_tensor(&model.inputs[0], &array)?]),
        Value::Array(_) => Err(Error::MissingInput(format!(
            "model '{}' takes {} inputs ({}); send {{\"inputs\": {{\"<name>\": [...], ...}}}}",
            model.name,
            model.inputs.len(),
            model.input_names()
        ))),
        other => Err(Error::InvalidValue(format!(
            "\"inputs\" must be a nested array or an object of them, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shape from the first element at each depth, then a full walk that checks every array
/// against it and collects the leaves.
pub fn to_tensor(spec: &TensorSpec, value: &Value) -> Result<Tensor, Error> {
    let mut shape = vec![];
    let mut cursor = value;
    while let Value::Array(items) = cursor {
        shape.push(items.len());
        match items.first() {
            Some(first) => cursor = first,
            None => break,
        }
    }
    if shape.len() != spec.shape.len() {
        return Err(Error::ShapeMismatch(format!(
            "input '{}': expected shape {} (rank {}), got an array of shape {:?} (rank {})",
            spec.name,
            shape_string(&spec.shape),
            spec.shape.len(),
            shape,
            shape.len()
        )));
    }
    let mut leaves = Vec::with_capacity(shape.iter().product());
    let mut path = vec![];
    collect(spec, value, &shape, 0, &mut path, &mut leaves)?;
    build(spec, &shape, &leaves)
}

fn collect<'v>(
    spec: &TensorSpec,
    value: &'v Value,
    shape: &[usize],
    depth: usize,
    path: &mut Vec<usize>,
    leaves: &mut Vec<&'v Value>,
) -> Result<(), Error> {
    if depth == shape.len() {
        if let Value::Array(_) = value {
            return Err(Error::RaggedArray(format!(
                "input '{}': element {} is an array, but elements at depth {depth} are numbers elsewhere",
                spec.name,
                path_string(path)
            )));
        }
        leaves.push(value);
        return Ok(());
    }
    match value {
        Value::Array(items) if items.len() == shape[depth] => {
            for (i, item) in items.iter().enumerate() {
                path.push(i);
                collect(spec, item, shape, depth + 1, path, leaves)?;
                path.pop();
            }
            Ok(())
        }
        Value::Array(items) => Err(Error::RaggedArray(format!(
            "input '{}': ragged array: element {} has length {}, expected {} like its siblings",
            spec.name,
            path_string(path),
            items.len(),
            shape[depth]
        ))),
        other => Err(Error::RaggedArray(format!(
            "input '{}': ragged array: element {} is {}, expected an array of length {}",
            spec.name,
            path_string(path),
            kind(other),
            shape[depth]
        ))),
    }
}

fn leaf_error(spec: &TensorSpec, index: usize, shape: &[usize], what: String) -> Error {
    let mut path = vec![0; shape.len()];
    let mut rest = index;
    for (d, &n) in shape.iter().enumerate().rev() {
        path[d] = rest % n.max(1);
        rest /= n.max(1);
    }
    Error::InvalidValue(format!("input '{}': element {} {what}", spec.name, path_string(&path)))
}

fn build(spec: &TensorSpec, shape: &[usize], leaves: &[&Value]) -> Result<Tensor, Error> {
    let err = |i: usize, what: String| leaf_error(spec, i, shape, what);
    let float = |i: usize, v: &Value| -> Result<f64, Error> {
        match v {
            Value::Number(n) => n.as_f64().ok_or_else(|| err(i, format!("= {n} is not representable"))),
            other => Err(err(i, format!("is {}, expected a number", kind(other)))),
        }
    };
    let integer = |i: usize, v: &Value| -> Result<i64, Error> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| err(i, format!("= {n}, expected an integer ({} input)", spec.dtype))),
            other => Err(err(i, format!("is {}, expected an integer", kind(other)))),
        }
    };
    let tensor = match spec.datum {
        DatumType::F32 | DatumType::F16 => {
            let data = leaves
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let x = float(i, v)? as f32;
                    if x.is_finite() {
                        Ok(x)
                    } else {
                        Err(err(i, format!("= {v} is out of range for {}", spec.dtype)))
                    }
                })
                .collect::<Result<Vec<f32>, Error>>()?;
            let t = Tensor::from_shape(shape, &data);
            if spec.datum == DatumType::F16 {
                t.and_then(|t| Ok(t.cast_to_dt(DatumType::F16)?.into_owned()))
            } else {
                t
            }
        }
        DatumType::F64 => {
            let data = leaves
                .iter()
                .enumerate()
                .map(|(i, v)| float(i, v))
                .collect::<Result<Vec<f64>, Error>>()?;
            Tensor::from_shape(shape, &data)
        }
        DatumType::Bool => {
            let data = leaves
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Bool(b) => Ok(*b),
                    other => Err(err(i, format!("is {}, expected true or false", kind(other)))),
                })
                .collect::<Result<Vec<bool>, Error>>()?;
            Tensor::from_shape(shape, &data)
        }
        dt if dt.is_integer() => {
            let data = leaves
                .iter()
                .enumerate()
                .map(|(i, v)| integer(i, v))
                .collect::<Result<Vec<i64>, Error>>()?;
            let t = Tensor::from_shape(shape, &data).map_err(|e| Error::Internal(e.to_string()))?;
            // Out-of-range values for narrower integer types are an input error, not a wrap.
            let narrowed = t
                .cast_to_dt(dt)
                .map_err(|e| Error::Internal(e.to_string()))?
                .into_owned();
            let back = narrowed
                .cast_to_dt(DatumType::I64)
                .map_err(|e| Error::Internal(e.to_string()))?;
            if *back != t {
                return Err(Error::InvalidValue(format!(
                    "input '{}': a value is out of range for {}",
                    spec.name, spec.dtype
                )));
            }
            Ok(narrowed)
        }
        other => {
            return Err(Error::InvalidValue(format!(
                "input '{}' has type {other:?}, which JSON requests cannot carry",
                spec.name
            )));
        }
    };
    tensor.map_err(|e| Error::Internal(format!("building input '{}': {e}", spec.name)))
}

/// Where in a nested array an element sits, for messages: `[0][3]`.
pub fn path_string(path: &[usize]) -> String {
    path.iter().map(|i| format!("[{i}]")).collect()
}
