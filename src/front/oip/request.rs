//! An OIP REST infer request: its JSON header (and, with the binary tensor data
//! extension, the raw tensors after it), decoded into the core's request.
//!
//! The JSON is read once on the async side with each input's `data` kept as raw text;
//! the numbers in it are parsed on the worker pool, after admission.

use std::collections::BTreeMap;

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tract_onnx::prelude::Tensor;

use crate::core::Inputs;
use crate::core::mode::{ModeLabel, ModeParams, Param};
use crate::core::tensors::{DataType, Values, WireTensor, model_inputs, rows_bound};
use crate::core::view::LoadedModel;
use crate::error::Error;

/// The header tritonclient sets when the body carries binary tensors after the JSON.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Deserialize)]
struct Header {
    id: Option<Value>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    inputs: Vec<InputHeader>,
    outputs: Option<Vec<OutputHeader>>,
    // Other fields (KServe's client sends `model_name`) are ignored, as the protocol allows.
}

#[derive(Deserialize)]
struct InputHeader {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct OutputHeader {
    name: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

/// One requested output, and whether its values go in the binary section.
pub struct OutputRequest {
    pub name: String,
    pub binary: bool,
}

/// A decoded infer request.
pub struct InferRequest {
    /// Echoed in the answer.
    pub id: Option<Value>,
    pub params: ModeParams,
    /// The `binary_data_output` request parameter: every output binary unless it says.
    pub binary_output: bool,
    /// None: every output.
    pub outputs: Option<Vec<OutputRequest>>,
    pub inputs: InferInputs,
}

/// The inputs, their numbers not parsed yet.
pub struct InferInputs(Vec<PendingInput>);

struct PendingInput {
    name: String,
    datatype: DataType,
    shape: Vec<i64>,
    data: Pending,
}

enum Pending {
    Json(Box<RawValue>),
    Binary(Bytes),
}

/// The binary-extension parameters, which the protocol defines: not mode parameters,
/// and never refused as unknown.
const BINARY_DATA_OUTPUT: &str = "binary_data_output";
const BINARY_DATA_SIZE: &str = "binary_data_size";
const BINARY_DATA: &str = "binary_data";

/// Splits the body by `Inference-Header-Content-Length` (absent: all JSON) and decodes it.
/// A refusal carries the mode the request asked for, as far as it could be read.
pub fn decode(body: Bytes, header_length: Option<&str>) -> Result<InferRequest, (ModeLabel, Error)> {
    let mut label = ModeLabel::Eval;
    decode_inner(body, header_length, &mut label).map_err(|e| (label, e))
}

fn decode_inner(body: Bytes, header_length: Option<&str>, label: &mut ModeLabel) -> Result<InferRequest, Error> {
    let (json, mut binary) = match header_length {
        None => (body, Bytes::new()),
        Some(len) => {
            let len: usize = len.trim().parse().map_err(|_| {
                Error::MalformedJson(format!(
                    "Inference-Header-Content-Length must be a byte count, got '{len}'"
                ))
            })?;
            if len > body.len() {
                return Err(Error::MalformedJson(format!(
                    "Inference-Header-Content-Length is {len}, but the body has only {} bytes",
                    body.len()
                )));
            }
            let binary = body.slice(len..);
            (body.slice(..len), binary)
        }
    };
    let header: Header = serde_json::from_slice(&json)
        .map_err(|e| Error::MalformedJson(format!("the inference request is not valid JSON for the protocol: {e}")))?;

    let mut params = ModeParams::default();
    let mut binary_output = false;
    *label = crate::core::mode::asked_for(header.parameters.keys());
    for (k, v) in header.parameters {
        if k == BINARY_DATA_OUTPUT {
            binary_output = boolean(&v, "request parameter 'binary_data_output'")?;
        } else {
            let p = param(&k, v)?;
            params.set(&k, p, "request parameter")?;
        }
    }

    let mut inputs = Vec::with_capacity(header.inputs.len());
    for input in header.inputs {
        let datatype = DataType::parse(&input.datatype)
            .map_err(|e| Error::InvalidValue(format!("input '{}': {e}", input.name)))?;
        let mut size = None;
        for (k, v) in &input.parameters {
            match k.as_str() {
                BINARY_DATA_SIZE => {
                    size = Some(v.as_u64().ok_or_else(|| {
                        Error::InvalidParameter(format!(
                            "input '{}': binary_data_size must be a byte count, got {v}",
                            input.name
                        ))
                    })? as usize)
                }
                other => {
                    return Err(Error::InvalidParameter(format!(
                        "input '{}': unknown parameter '{other}'; inputs take only binary_data_size",
                        input.name
                    )));
                }
            }
        }
        let data = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(Error::MalformedJson(format!(
                    "input '{}' has both JSON data and binary_data_size",
                    input.name
                )));
            }
            (None, None) => {
                return Err(Error::MalformedJson(format!(
                    "input '{}' has neither data nor binary_data_size",
                    input.name
                )));
            }
            (None, Some(json)) => Pending::Json(json),
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(Error::MalformedJson(format!(
                        "input '{}': binary_data_size is {n}, but only {} bytes of binary data remain",
                        input.name,
                        binary.len()
                    )));
                }
                Pending::Binary(binary.split_to(n))
            }
        };
        inputs.push(PendingInput {
            name: input.name,
            datatype,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(Error::MalformedJson(format!(
            "{} bytes of binary data follow the inputs' binary_data_size",
            binary.len()
        )));
    }

    let outputs = header
        .outputs
        .map(|outputs| {
            outputs
                .into_iter()
                .map(|o| {
                    let mut binary = binary_output;
                    for (k, v) in &o.parameters {
                        match k.as_str() {
                            BINARY_DATA => binary = boolean(v, &format!("output '{}': binary_data", o.name))?,
                            other => {
                                return Err(Error::InvalidParameter(format!(
                                    "output '{}': unknown parameter '{other}'; outputs take only binary_data",
                                    o.name
                                )));
                            }
                        }
                    }
                    Ok(OutputRequest { name: o.name, binary })
                })
                .collect::<Result<Vec<_>, Error>>()
        })
        .transpose()?;
    params.outputs = outputs
        .as_ref()
        .map(|o: &Vec<OutputRequest>| o.iter().map(|o| o.name.clone()).collect());

    Ok(InferRequest {
        id: header.id,
        params,
        binary_output,
        outputs,
        inputs: InferInputs(inputs),
    })
}

/// A request parameter as a mode parameter; values that are no scalar are refused.
pub fn param(name: &str, v: Value) -> Result<Param, Error> {
    Ok(match v {
        Value::Bool(b) => Param::Bool(b),
        Value::String(s) => Param::Str(s),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Param::Uint(u)
            } else if let Some(i) = n.as_i64() {
                Param::Int(i)
            } else {
                Param::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        other => {
            return Err(Error::InvalidParameter(format!(
                "request parameter '{name}' must be a number, string or boolean, got {other}"
            )));
        }
    })
}

fn boolean(v: &Value, what: &str) -> Result<bool, Error> {
    v.as_bool()
        .ok_or_else(|| Error::InvalidParameter(format!("{what} must be true or false, got {v}")))
}

impl Inputs for InferInputs {
    fn rows_bound(&self, _: &LoadedModel) -> usize {
        rows_bound(self.0.iter().map(|i| i.shape.as_slice()))
    }

    fn decode(self, model: &LoadedModel) -> Result<Vec<Tensor>, Error> {
        let wire = self
            .0
            .into_iter()
            .map(|i| {
                let values = match i.data {
                    Pending::Binary(bytes) => Values::Raw(bytes.to_vec()),
                    Pending::Json(raw) => json_values(&i.name, i.datatype, &raw)?,
                };
                Ok(WireTensor {
                    name: i.name,
                    datatype: i.datatype,
                    shape: i.shape,
                    values,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        model_inputs(model, wire)
    }
}

/// `data` as flat values: row-major, flat or nested to any depth.
///
/// Read in one pass straight into the values, with no `serde_json::Value` per element in
/// between. Each leaf must be the datatype's kind of value; the first that is not is
/// refused with its index, quoted as JSON.
fn json_values(name: &str, dt: DataType, raw: &RawValue) -> Result<Values, Error> {
    let mut flat = Flat {
        values: match dt {
            DataType::Bool => Values::Bool(vec![]),
            DataType::Bytes => Values::Bytes(vec![]),
            DataType::F16 | DataType::F32 | DataType::F64 => Values::F64(vec![]),
            DataType::U8 | DataType::U16 | DataType::U32 | DataType::U64 => Values::Uint(vec![]),
            DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64 => Values::Int(vec![]),
        },
        count: 0,
        wrong: None,
    };
    let mut de = serde_json::Deserializer::from_str(raw.get());
    serde::de::DeserializeSeed::deserialize(&mut flat, &mut de)
        .and_then(|()| de.end())
        .map_err(|e| Error::MalformedJson(format!("input '{name}': data: {e}")))?;
    if let Some((i, leaf)) = flat.wrong {
        let want = match dt {
            DataType::Bool => "true or false",
            DataType::Bytes => "a string",
            DataType::F16 | DataType::F32 | DataType::F64 => "a number",
            DataType::U8 | DataType::U16 | DataType::U32 | DataType::U64 => "a non-negative integer",
            DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64 => "an integer",
        };
        return Err(Error::InvalidValue(format!(
            "input '{name}': element {i} of data is {leaf}, expected {want} for {}",
            dt.as_str()
        )));
    }
    Ok(flat.values)
}

/// The leaves of nested arrays, in order, into `values`; the first leaf of the wrong kind
/// is kept (its index and the leaf) and nothing is stored after it.
struct Flat {
    values: Values,
    count: usize,
    wrong: Option<(usize, Value)>,
}

impl Flat {
    /// One leaf: stored if it is of the values' kind; else, if it is the first such, kept
    /// for the message.
    fn leaf(&mut self, leaf: Value) {
        let i = self.count;
        self.count += 1;
        if self.wrong.is_some() {
            return;
        }
        match (&mut self.values, &leaf) {
            (Values::Bool(v), Value::Bool(b)) => v.push(*b),
            (Values::Bytes(v), Value::String(s)) => v.push(s.as_bytes().to_vec()),
            (Values::F64(v), Value::Number(n)) => v.push(n.as_f64().expect("JSON numbers are finite")),
            (Values::Uint(v), Value::Number(n)) if n.is_u64() => v.push(n.as_u64().expect("checked")),
            (Values::Int(v), Value::Number(n)) if n.is_i64() => v.push(n.as_i64().expect("checked")),
            _ => self.wrong = Some((i, leaf)),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Flat {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Flat {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("nested arrays of values")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }

    // Only the numbers and booleans a tensor is made of are common; every other leaf is
    // kept whole, as the message quotes it.
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.leaf(Value::Bool(b));
        Ok(())
    }
    fn visit_i64<E>(self, x: i64) -> Result<(), E> {
        self.leaf(Value::Number(x.into()));
        Ok(())
    }
    fn visit_u64<E>(self, x: u64) -> Result<(), E> {
        self.leaf(Value::Number(x.into()));
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<(), E> {
        let n = serde_json::Number::from_f64(x).ok_or_else(|| E::custom("a JSON number is finite"))?;
        self.leaf(Value::Number(n));
        Ok(())
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        self.leaf(Value::String(s.to_string()));
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.leaf(Value::Null);
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let object = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        self.leaf(object);
        Ok(())
    }
}

#[cfg(test)]
mod reference {
    use super::*;

    /// `json_values` as it was: the whole `data` into a `serde_json::Value`, flattened.
    pub fn json_values(name: &str, dt: DataType, raw: &RawValue) -> Result<Values, Error> {
        let value: Value =
            serde_json::from_str(raw.get()).map_err(|e| Error::MalformedJson(format!("input '{name}': data: {e}")))?;
        let mut leaves = vec![];
        flatten(value, &mut leaves);
        // Each leaf read as the datatype's kind of value, or refused with its index.
        let read = |want: &str, f: &dyn Fn(&Value) -> Option<()>| -> Result<(), Error> {
            match leaves.iter().position(|v| f(v).is_none()) {
                None => Ok(()),
                Some(i) => Err(Error::InvalidValue(format!(
                    "input '{name}': element {i} of data is {}, expected {want} for {}",
                    leaves[i],
                    dt.as_str()
                ))),
            }
        };
        Ok(match dt {
            DataType::Bool => {
                read("true or false", &|v| v.as_bool().map(drop))?;
                Values::Bool(leaves.iter().filter_map(Value::as_bool).collect())
            }
            DataType::Bytes => {
                read("a string", &|v| v.as_str().map(drop))?;
                Values::Bytes(
                    leaves
                        .iter()
                        .filter_map(|v| v.as_str().map(|s| s.as_bytes().to_vec()))
                        .collect(),
                )
            }
            DataType::F16 | DataType::F32 | DataType::F64 => {
                read("a number", &|v| v.as_f64().map(drop))?;
                Values::F64(leaves.iter().filter_map(Value::as_f64).collect())
            }
            DataType::U8 | DataType::U16 | DataType::U32 | DataType::U64 => {
                read("a non-negative integer", &|v| v.as_u64().map(drop))?;
                Values::Uint(leaves.iter().filter_map(Value::as_u64).collect())
            }
            DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64 => {
                read("an integer", &|v| v.as_i64().map(drop))?;
                Values::Int(leaves.iter().filter_map(Value::as_i64).collect())
            }
        })
    }

    fn flatten(v: Value, out: &mut Vec<Value>) {
        match v {
            Value::Array(items) => items.into_iter().for_each(|x| flatten(x, out)),
            leaf => out.push(leaf),
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use axum::http::StatusCode;
    use proptest::prelude::*;
    use serde_json::json;

    /// A valid binary-extension body: the JSON header and the raw values after it.
    fn binary_body(chunks: &[Vec<u8>], params: &Value) -> (Vec<u8>, usize) {
        let inputs: Vec<Value> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"name": format!("in{i}"), "shape": [c.len()], "datatype": "UINT8", "parameters": {"binary_data_size": c.len()}}))
            .collect();
        let mut body = serde_json::to_vec(&json!({"id": "p", "parameters": params, "inputs": inputs})).unwrap();
        let len = body.len();
        body.extend(chunks.iter().flatten());
        (body, len)
    }

    /// `data` as clients send it (flat or nested numbers) and as they should not: other
    /// leaves (strings with escapes, objects, null), empty and ragged arrays.
    fn data() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            4 => any::<f64>().prop_map(Value::from),
            4 => any::<i64>().prop_map(Value::from),
            2 => any::<u64>().prop_map(Value::from),
            1 => (0u64..300).prop_map(Value::from),
            1 => any::<bool>().prop_map(Value::from),
            1 => ".{0,4}".prop_map(Value::from),
            1 => Just(Value::Null),
            1 => Just(json!({"a": [1, "é\\\""]})),
        ];
        let mixed = leaf.prop_recursive(3, 48, 6, |inner| {
            prop::collection::vec(inner, 0..6).prop_map(Value::Array)
        });
        // All of one kind, flat or in rows, so that every datatype also reads some.
        let n = 0..12;
        let kind = prop_oneof![
            prop::collection::vec(any::<f64>().prop_map(Value::from), n.clone()),
            prop::collection::vec((-200i64..200).prop_map(Value::from), n.clone()),
            prop::collection::vec(any::<u64>().prop_map(Value::from), n.clone()),
            prop::collection::vec(any::<bool>().prop_map(Value::from), n.clone()),
            prop::collection::vec("[a-z]{0,3}".prop_map(Value::from), n),
        ];
        let uniform = (kind, any::<bool>()).prop_map(|(v, rows)| {
            if rows {
                json!(v.chunks(3).map(|c| c.to_vec()).collect::<Vec<_>>())
            } else {
                json!(v)
            }
        });
        prop_oneof![mixed, uniform]
    }

    fn client_error(e: &Error) -> bool {
        e.status().is_client_error()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Arbitrary bytes with an arbitrary header value: decoded or refused with a 4xx,
        /// never a panic.
        #[test]
        fn any_body_and_header_length_is_decoded_or_a_4xx(
            body in prop::collection::vec(any::<u8>(), 0..200),
            len in prop::option::of(prop_oneof![(0usize..250).prop_map(|n| n.to_string()), ".{0,6}"]),
        ) {
            if let Err((_, e)) = decode(Bytes::from(body), len.as_deref()) {
                prop_assert!(client_error(&e), "{}", e);
            }
        }

        /// Valid binary bodies split back into exactly the bytes of each input, in order,
        /// with the mode parameters read.
        #[test]
        fn binary_bodies_split_exactly(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..4),
            samples in 2u64..100,
        ) {
            let (body, len) = binary_body(&chunks, &json!({"mc_samples": samples}));
            let req = decode(Bytes::from(body), Some(&len.to_string())).map_err(|(_, e)| e).unwrap();
            prop_assert_eq!(req.params.mc_samples, Some(Param::Uint(samples)));
            prop_assert_eq!(req.inputs.0.len(), chunks.len());
            for (input, chunk) in req.inputs.0.iter().zip(&chunks) {
                match &input.data {
                    Pending::Binary(b) => prop_assert_eq!(b.as_ref(), chunk.as_slice()),
                    Pending::Json(_) => prop_assert!(false, "decoded as JSON"),
                }
            }
        }

        /// A header length that does not match the body is refused as malformed.
        #[test]
        fn wrong_header_lengths_are_refused(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 1..3),
            delta in prop_oneof![-5i64..0, 1i64..5],
        ) {
            let (body, len) = binary_body(&chunks, &json!({}));
            let wrong = (len as i64 + delta).max(0) as usize;
            let e = decode(Bytes::from(body), Some(&wrong.to_string())).map(|_| ()).map_err(|(_, e)| e);
            prop_assert!(matches!(e, Err(Error::MalformedJson(_))), "{:?}", e);
        }

        /// Flipping any byte of a valid body (header or binary section) never panics.
        #[test]
        fn flipped_bytes_are_decoded_or_a_4xx(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..20), 1..3),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let (mut body, len) = binary_body(&chunks, &json!({"mc_samples": 5, "seed": 1}));
            let i = at.index(body.len());
            body[i] ^= 1 << bit;
            if let Err((_, e)) = decode(Bytes::from(body), Some(&len.to_string())) {
                prop_assert!(client_error(&e), "{}", e);
            }
        }

        /// Request parameters of any JSON kind become mode parameters or a 422; the
        /// refusal's mode label says MC whenever mc_samples was present.
        #[test]
        fn request_parameters_are_read_or_a_422(
            key in prop::sample::select(vec!["mc_samples", "seed", "return_samples", "binary_data_output", "other"]),
            v in prop_oneof![any::<i64>().prop_map(Value::from), any::<f64>().prop_map(Value::from), any::<bool>().prop_map(Value::from), ".{0,5}".prop_map(Value::from), Just(json!([1])), Just(json!({}))],
        ) {
            let body = serde_json::to_vec(&json!({"parameters": {key: v}, "inputs": []})).unwrap();
            match decode(Bytes::from(body), None) {
                Ok(_) => prop_assert!(key != "other"),
                Err((label, e)) => {
                    prop_assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY, "{}", e);
                    prop_assert_eq!(label == ModeLabel::McDropout, key == "mc_samples");
                }
            }
        }

        /// The one-pass reader gives the reference's answer on any `data`: the same
        /// values, or the same refusal in the same words.
        #[test]
        fn json_data_agrees_with_the_reference(
            data in data(),
            dt in prop::sample::select(DataType::ALL.to_vec()),
        ) {
            let raw = RawValue::from_string(data.to_string()).unwrap();
            let new = json_values("x", dt, &raw);
            let old = reference::json_values("x", dt, &raw);
            match (new, old) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a.error_type(), b.error_type());
                    prop_assert_eq!(a.to_string(), b.to_string());
                }
                (a, b) => prop_assert!(false, "one-pass: {:?}, reference: {:?}", a, b),
            }
        }

        /// JSON `data`, flat or nested, is read as the datatype's kind of value, or
        /// refused as a 400 that names the element.
        #[test]
        fn json_data_is_read_or_a_400(
            data in prop::collection::vec(prop_oneof![any::<i64>().prop_map(Value::from), any::<f64>().prop_map(Value::from), any::<bool>().prop_map(Value::from), Just(Value::Null)], 0..8),
            nested in any::<bool>(),
            dt in prop::sample::select(vec!["FP32", "FP64", "INT8", "INT64", "UINT64", "BOOL", "BYTES", "FP16"]),
        ) {
            let count = data.len();
            let data = if nested { json!([data]) } else { json!(data) };
            let raw = RawValue::from_string(data.to_string()).unwrap();
            match json_values("x", DataType::parse(dt).unwrap(), &raw) {
                Ok(values) => prop_assert_eq!(values.len(), count),
                Err(e) => prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{}", e),
            }
        }
    }
}
