//! The streaming parser against the oracle, and the properties of what it reads.

use axum::http::StatusCode;
use proptest::prelude::*;
use serde::de::DeserializeSeed;
use serde_json::{Number, Value, json};
use tract_onnx::prelude::*;

use super::{TensorSeed, parse_request};
use crate::core::json_inputs as oracle;
use crate::core::view::{Dim, LoadedModel, TensorSpec};
use crate::error::Error;
use crate::front::values::Nested;

fn flat<T: Datum + Copy>(t: &Tensor) -> Vec<T> {
    t.to_plain_array_view::<T>().unwrap().iter().copied().collect()
}

/// One input's value through the streaming parser, as a body would carry it.
fn to_tensor(spec: &TensorSpec, value: &Value) -> Result<Tensor, Error> {
    let text = serde_json::to_vec(value).unwrap();
    let mut de = serde_json::Deserializer::from_slice(&text);
    let parsed = TensorSeed(spec).deserialize(&mut de).unwrap();
    de.end().unwrap();
    parsed
}

/// The same answer: equal tensors, or errors of the same kind with the same words.
fn same(new: &Result<Vec<Tensor>, Error>, old: &Result<Vec<Tensor>, Error>) -> Result<(), TestCaseError> {
    match (new, old) {
        (Ok(a), Ok(b)) => {
            prop_assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(b) {
                prop_assert_eq!(a.datum_type(), b.datum_type());
                prop_assert_eq!(a.shape(), b.shape());
                prop_assert!(a == b, "values differ: {:?} vs {:?}", a, b);
            }
        }
        (Err(a), Err(b)) => {
            prop_assert_eq!(a.error_type(), b.error_type(), "{} vs {}", a, b);
            prop_assert_eq!(a.to_string(), b.to_string());
        }
        (a, b) => prop_assert!(
            false,
            "streaming: {:?}, oracle: {:?}",
            a.as_ref().map(|_| "tensors"),
            b.as_ref().map(|_| "tensors")
        ),
    }
    Ok(())
}

fn fixture(name: &str) -> LoadedModel {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = if name.ends_with(".onnx") {
        root.join("tests/fixtures").join(name)
    } else {
        root.join("models").join(format!("{name}.onnx"))
    };
    crate::core::view::load_model(name.trim_end_matches(".onnx"), &path).unwrap()
}

/// One model with one input, one with two, one with an integer input: loaded once.
fn models() -> &'static [LoadedModel] {
    static MODELS: std::sync::OnceLock<Vec<LoadedModel>> = std::sync::OnceLock::new();
    MODELS.get_or_init(|| {
        ["breast_cancer", "two_inputs.onnx", "int_input.onnx"]
            .map(fixture)
            .into()
    })
}

/// A value near a tensor of some rank: right or wrong in one place (a row longer or
/// shorter, an array or a non-number where a number goes, a wrong rank).
fn near_tensor() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        8 => (-1e3f64..1e3).prop_map(Value::from),
        2 => (-300i64..300).prop_map(Value::from),
        1 => prop_oneof![Just(json!(null)), Just(json!(true)), Just(json!("1")), Just(json!({"a": 1})), Just(json!([])), Just(json!([1.0])), Just(json!(1e300)), Just(json!(u64::MAX))],
    ];
    (
        prop_oneof![3 => Just(2usize), 1 => 1usize..5],
        prop::collection::vec(1usize..4, 1..4),
        prop::collection::vec(leaf, 64),
        any::<prop::sample::Index>(),
        0u8..4,
    )
        .prop_map(|(rank, dims, leaves, at, change)| {
            let mut leaves = leaves.into_iter().cycle();
            fn build(dims: &[usize], leaves: &mut dyn Iterator<Item = Value>) -> Value {
                match dims.split_first() {
                    None => leaves.next().unwrap(),
                    Some((&n, rest)) => Value::Array((0..n).map(|_| build(rest, leaves)).collect()),
                }
            }
            let dims: Vec<usize> = dims.iter().cycle().take(rank).copied().collect();
            let mut v = build(&dims, &mut leaves);
            // One structural change somewhere, or none.
            let mut cursor = &mut v;
            let mut depth = at.index(rank);
            while depth > 0 {
                let Value::Array(items) = cursor else { break };
                let i = items.len() - 1;
                cursor = &mut items[i];
                depth -= 1;
            }
            if let Value::Array(items) = cursor {
                match change {
                    0 => {}
                    1 => items.push(items[0].clone()),
                    2 => {
                        items.pop();
                    }
                    _ => items.push(json!([[]])),
                }
            }
            v
        })
}

/// A request body: the inputs as an array or by name (known, unknown and repeated
/// names), other fields, a repeated "inputs", or no object at all.
fn body() -> impl Strategy<Value = Value> {
    let tensor = prop_oneof![3 => near_tensor(), 1 => any_json()];
    let name = prop::sample::select(vec!["features", "a", "b", "x", "other"]);
    let by_name = prop::collection::vec((name, tensor.clone()), 0..4)
        .prop_map(|entries| Value::Object(entries.into_iter().map(|(n, v)| (n.to_string(), v)).collect()));
    // Both inputs of the two-input model, in either order, so that it also parses.
    let pair = (near_tensor(), near_tensor(), any::<bool>()).prop_map(|(a, b, swap)| {
        if swap {
            json!({"b": b, "a": a})
        } else {
            json!({"a": a, "b": b})
        }
    });
    let inputs = prop_oneof![3 => tensor.clone(), 2 => by_name, 2 => pair, 1 => any_json()];
    prop_oneof![
        6 => inputs.clone().prop_map(|i| json!({"inputs": i})),
        1 => (inputs.clone(), any_json()).prop_map(|(i, other)| json!({"model": other, "inputs": i})),
        1 => any_json().prop_map(|other| json!({"input": other})),
        1 => any_json(),
    ]
}

fn spec(datum: DatumType, rank: usize) -> TensorSpec {
    let mut shape = vec![Dim::Symbol("batch".into())];
    shape.extend((1..rank).map(|_| Dim::Fixed(3)));
    TensorSpec {
        name: "x".into(),
        dtype: "float32",
        datum,
        shape,
        index_limit: None,
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
        let json = serde_json::to_value(Nested::floats(&shape, &as_f64)).unwrap();
        let t = to_tensor(&spec(DatumType::F32, shape.len()), &json).unwrap();
        prop_assert_eq!(t.shape(), shape.as_slice());
        prop_assert_eq!(flat::<f32>(&t), values);
        prop_assert_eq!(serde_json::to_value(Nested::tensor(&t).unwrap()).unwrap(), json);
    }

    /// A ragged array (one row longer) is refused as ragged, naming where.
    #[test]
    fn ragged_arrays_are_refused_as_ragged((shape, values) in (2usize..4).prop_flat_map(tensor_values), row in 0usize..3) {
        let as_f64: Vec<f64> = values.iter().map(|&x| x as f64).collect();
        let mut json = serde_json::to_value(Nested::floats(&shape, &as_f64)).unwrap();
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

    /// The streaming parser gives the oracle's answer for one input: the same
    /// tensor, or an error of the same kind in the same words, on any JSON and on
    /// near-tensors with one thing wrong, for every element type.
    #[test]
    fn one_input_agrees_with_the_oracle(v in prop_oneof![any_json(), near_tensor()], rank in 1usize..4, dt in prop::sample::select(vec![DatumType::F32, DatumType::F64, DatumType::I64, DatumType::I8, DatumType::U8, DatumType::Bool, DatumType::F16, DatumType::String])) {
        let spec = spec(dt, rank);
        same(&to_tensor(&spec, &v).map(|t| vec![t]), &oracle::to_tensor(&spec, &v).map(|t| vec![t]))?;
    }

    /// Whole bodies, as bytes: the same answer as the oracle for every model
    /// (one input, two inputs, an integer input), and for bodies cut short or with a
    /// byte changed (not JSON, or JSON of another shape).
    #[test]
    fn bodies_agree_with_the_oracle(b in body(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), damage in 0u8..6) {
        let mut bytes = serde_json::to_vec(&b).unwrap();
        match damage {
            0 => bytes.truncate(cut.index(bytes.len() + 1)),
            1 => {
                let i = flip.index(bytes.len());
                bytes[i] = b"[]{},:0\" 1e-"[cut.index(12)];
            }
            _ => {}
        }
        for model in models() {
            same(&parse_request(model, &bytes), &oracle::parse_request(model, &bytes))?;
        }
    }

    /// Repeated keys, which a generated `Value` (and so the oracle) cannot hold: a
    /// repeated `"inputs"`, or a name repeated in it, is refused whatever the values and
    /// the model, naming what is repeated; without the repeat the same body agrees with
    /// the oracle.
    #[test]
    fn repeated_keys_are_refused(a in near_tensor(), b in near_tensor(), c in near_tensor(), order in 0u8..3) {
        let (a, b, c) = (a.to_string(), b.to_string(), c.to_string());
        let bodies = [
            (format!(r#"{{"inputs": {a}, "model": 1, "inputs": {b}}}"#), format!(r#"{{"inputs": {a}, "model": 1}}"#), "\"inputs\" twice"),
            match order {
                0 => (format!(r#"{{"inputs": {{"a": {a}, "b": {b}, "a": {c}}}}}"#), format!(r#"{{"inputs": {{"a": {a}, "b": {b}}}}}"#), "'a' twice"),
                1 => (format!(r#"{{"inputs": {{"b": {b}, "a": {a}, "b": {c}}}}}"#), format!(r#"{{"inputs": {{"b": {b}, "a": {a}}}}}"#), "'b' twice"),
                _ => (format!(r#"{{"inputs": {{"features": {a}, "x": {b}, "features": {c}, "x": 1}}}}"#), format!(r#"{{"inputs": {{"features": {a}, "x": {b}}}}}"#), "'features' twice"),
            },
        ];
        for (body, once, named) in bodies {
            for model in models() {
                match parse_request(model, body.as_bytes()) {
                    Err(Error::InvalidValue(m)) => prop_assert!(m.contains(named), "{m}"),
                    other => prop_assert!(false, "{body}: {:?}", other.map(|t| t.len())),
                }
                same(&parse_request(model, once.as_bytes()), &oracle::parse_request(model, once.as_bytes()))?;
            }
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
