//! JSON request bodies to tensors, and tensors back to nested JSON arrays.
//!
//! The nesting of a JSON array gives the tensor's shape. Every problem a client can cause
//! becomes a 400 that names the input and the place in it.

use serde_json::{Map, Number, Value};
use tract_onnx::prelude::*;

use crate::core::tensors::in_input_order;
use crate::engine::model::{LoadedModel, TensorSpec, shape_string};
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

fn path_string(path: &[usize]) -> String {
    path.iter().map(|i| format!("[{i}]")).collect()
}

/// Shape from the first element at each depth, then a full walk that checks every array
/// against it and collects the leaves.
fn to_tensor(spec: &TensorSpec, value: &Value) -> Result<Tensor, Error> {
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

/// An empty JSON object, for building responses.
pub fn object() -> Map<String, Value> {
    Map::new()
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::engine::model::Dim;
    use axum::http::StatusCode;
    use proptest::prelude::*;

    fn flat<T: Datum + Copy>(t: &Tensor) -> Vec<T> {
        t.to_plain_array_view::<T>().unwrap().iter().copied().collect()
    }

    fn spec(datum: DatumType, rank: usize) -> TensorSpec {
        let mut shape = vec![Dim::Symbol("batch".into())];
        shape.extend((1..rank).map(|_| Dim::Fixed(3)));
        TensorSpec {
            name: "x".into(),
            dtype: "float32",
            datum,
            shape,
        }
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>().prop_map(|x| Number::from_f64(x).map_or(Value::Null, Value::Number)),
            any::<i64>().prop_map(|x| Value::Number(x.into())),
            any::<u64>().prop_map(|x| Value::Number(x.into())),
            ".{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,3}", inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Row-major f32 values and a shape of the given rank.
    fn tensor_values(rank: usize) -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
        prop::collection::vec(1usize..4, rank).prop_flat_map(|shape| {
            let n: usize = shape.iter().product();
            (Just(shape), prop::collection::vec(-1e30f32..1e30, n))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any JSON at all: a tensor or a 400, never a panic, never a 5xx.
        #[test]
        fn any_json_is_a_tensor_or_a_400(v in any_json(), rank in 1usize..4, dt in prop::sample::select(vec![DatumType::F32, DatumType::F64, DatumType::I64, DatumType::I8, DatumType::Bool, DatumType::F16])) {
            if let Err(e) = to_tensor(&spec(dt, rank), &v) {
                prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{}", e);
            }
        }

        /// Nested arrays of f32 values become the tensor of that shape and those values,
        /// and encode back to the same JSON.
        #[test]
        fn nested_arrays_round_trip((shape, values) in (1usize..4).prop_flat_map(tensor_values)) {
            let as_f64: Vec<f64> = values.iter().map(|&x| x as f64).collect();
            let json = floats_to_json(&shape, &as_f64);
            let t = to_tensor(&spec(DatumType::F32, shape.len()), &json).unwrap();
            prop_assert_eq!(t.shape(), shape.as_slice());
            prop_assert_eq!(flat::<f32>(&t), values);
            prop_assert_eq!(tensor_to_json(&t).unwrap(), json);
        }

        /// A ragged array (one row longer) is refused as ragged, naming where.
        #[test]
        fn ragged_arrays_are_refused_as_ragged((shape, values) in (2usize..4).prop_flat_map(tensor_values), row in 0usize..3) {
            let as_f64: Vec<f64> = values.iter().map(|&x| x as f64).collect();
            let mut json = floats_to_json(&shape, &as_f64);
            let rows = json.as_array_mut().unwrap();
            let row = row % rows.len();
            let first = rows[row][0].clone();
            rows[row].as_array_mut().unwrap().push(first);
            let refused = rows.len() > 1 || row > 0;
            let e = to_tensor(&spec(DatumType::F32, shape.len()), &json);
            if refused {
                prop_assert!(matches!(e, Err(Error::RaggedArray(_))), "{:?}", e.map(|t| t.shape().to_vec()));
            }
        }

        /// Integers out of a narrow input type's range are refused, not wrapped.
        #[test]
        fn narrow_integers_are_range_checked(x in any::<i64>()) {
            let json = Value::Array(vec![Value::Array(vec![x.into(); 3])]);
            let r = to_tensor(&spec(DatumType::I8, 2), &json);
            if i8::try_from(x).is_ok() {
                prop_assert_eq!(flat::<i8>(&r.unwrap()), vec![x as i8; 3]);
            } else {
                prop_assert!(matches!(r, Err(Error::InvalidValue(_))));
            }
        }
    }
}
