//! Typed tensors as the Open Inference Protocol carries them (a declared datatype, a
//! shape and flat values, over REST JSON, REST binary or gRPC), and the one policy for
//! turning them into a model's inputs.
//!
//! A datatype other than the input's is converted only where no value can change: FP16
//! and FP32 to a wider float, FP64 to FP32 within range, an integer to a wider integer,
//! and an integer to FP32/FP64 when the value is exact there. Anything else, BYTES
//! included, is a 400 that names the input and both types.

use tract_onnx::prelude::*;

use crate::engine::model::{LoadedModel, TensorSpec};
use crate::error::Error;

/// The OIP datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn parse(s: &str) -> Result<DataType, Error> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| {
            Error::InvalidValue(format!(
                "unknown datatype '{s}'; the protocol's are {}",
                DataType::ALL.map(|d| d.as_str()).join(", ")
            ))
        })
    }

    /// The protocol's name for a tract datum type, if it has one.
    pub fn of(datum: DatumType) -> Option<DataType> {
        Some(match datum {
            DatumType::Bool => DataType::Bool,
            DatumType::U8 => DataType::U8,
            DatumType::U16 => DataType::U16,
            DatumType::U32 => DataType::U32,
            DatumType::U64 => DataType::U64,
            DatumType::I8 => DataType::I8,
            DatumType::I16 => DataType::I16,
            DatumType::I32 => DataType::I32,
            DatumType::I64 => DataType::I64,
            DatumType::F16 => DataType::F16,
            DatumType::F32 => DataType::F32,
            DatumType::F64 => DataType::F64,
            DatumType::String => DataType::Bytes,
            _ => return None,
        })
    }

    /// Bytes per element in the binary and raw forms; None for BYTES (length-prefixed).
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::U8 | DataType::I8 => Some(1),
            DataType::U16 | DataType::I16 | DataType::F16 => Some(2),
            DataType::U32 | DataType::I32 | DataType::F32 => Some(4),
            DataType::U64 | DataType::I64 | DataType::F64 => Some(8),
            DataType::Bytes => None,
        }
    }

    /// The range of an integer type.
    fn int_range(self) -> Option<(i128, i128)> {
        Some(match self {
            DataType::U8 => (0, u8::MAX as i128),
            DataType::U16 => (0, u16::MAX as i128),
            DataType::U32 => (0, u32::MAX as i128),
            DataType::U64 => (0, u64::MAX as i128),
            DataType::I8 => (i8::MIN as i128, i8::MAX as i128),
            DataType::I16 => (i16::MIN as i128, i16::MAX as i128),
            DataType::I32 => (i32::MIN as i128, i32::MAX as i128),
            DataType::I64 => (i64::MIN as i128, i64::MAX as i128),
            _ => return None,
        })
    }

    fn is_float(self) -> bool {
        matches!(self, DataType::F16 | DataType::F32 | DataType::F64)
    }
}

/// Flat values, in the widest Rust type of their kind; the declared [`DataType`] says
/// which type the client meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Uint(Vec<u64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Little-endian bytes of the declared datatype (binary extension, gRPC raw contents).
    Raw(Vec<u8>),
    /// BYTES elements. No model input here takes them; they are carried so that the
    /// refusal can name both types.
    Bytes(Vec<Vec<u8>>),
}

/// A tensor as a client sent it.
#[derive(Debug, Clone)]
pub struct WireTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub values: Values,
}

/// The admission bound on a request's rows from its declared shapes: the largest leading
/// dim (decoding later checks that the values fill the shapes, so a shape cannot lie).
pub fn rows_bound<'a>(shapes: impl Iterator<Item = &'a [i64]>) -> usize {
    shapes
        .map(|s| s.first().copied().unwrap_or(1).max(1) as usize)
        .max()
        .unwrap_or(1)
}

/// Named values in the model's input order. Unknown, repeated and missing names are
/// refused by name, with the same words on every protocol.
pub fn in_input_order<T>(model: &LoadedModel, named: Vec<(String, T)>) -> Result<Vec<(&TensorSpec, T)>, Error> {
    let mut slots: Vec<Option<T>> = model.inputs.iter().map(|_| None).collect();
    for (name, value) in named {
        let Some(i) = model.inputs.iter().position(|s| s.name == name) else {
            return Err(Error::UnknownInput(format!(
                "model '{}' has no input '{name}'; its inputs are {}",
                model.name,
                model.input_names()
            )));
        };
        if slots[i].replace(value).is_some() {
            return Err(Error::InvalidValue(format!("input '{name}' is given twice")));
        }
    }
    model
        .inputs
        .iter()
        .zip(slots)
        .map(|(spec, value)| {
            let value = value.ok_or_else(|| {
                Error::MissingInput(format!(
                    "input '{}' is missing; model '{}' takes {}",
                    spec.name,
                    model.name,
                    model.input_names()
                ))
            })?;
            Ok((spec, value))
        })
        .collect()
}

/// Wire tensors as the model's inputs, in its input order.
pub fn model_inputs(model: &LoadedModel, wire: Vec<WireTensor>) -> Result<Vec<Tensor>, Error> {
    let named = wire.into_iter().map(|t| (t.name.clone(), t)).collect();
    in_input_order(model, named)?
        .into_iter()
        .map(|(spec, t)| to_tensor(spec, t))
        .collect()
}

/// One wire tensor as the input `spec` takes it.
pub fn to_tensor(spec: &TensorSpec, t: WireTensor) -> Result<Tensor, Error> {
    let name = &spec.name;
    let want = DataType::of(spec.datum).ok_or_else(|| {
        Error::InvalidValue(format!(
            "input '{name}' has type {}, which the protocol cannot carry",
            spec.dtype
        ))
    })?;
    if !convertible(t.datatype, want) {
        return Err(Error::InvalidValue(format!(
            "input '{name}': the model takes {}, got {}; only conversions that change no value are made \
             (FP64 to FP32 within range, an integer to a wider integer or to an exact float)",
            want.as_str(),
            t.datatype.as_str()
        )));
    }
    let shape = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| Error::ShapeMismatch(format!("input '{name}': shape {:?} has a negative dim", t.shape)))?;
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::ShapeMismatch(format!("input '{name}': shape {shape:?} is too large")))?;
    let values = canonical(name, t.datatype, t.values)?;
    let count = values.len();
    if count != elements {
        return Err(Error::ShapeMismatch(format!(
            "input '{name}': shape {shape:?} holds {elements} values, got {count}"
        )));
    }
    // As on the native API: a non-finite float is refused, never fed to the model. Checked
    // on the values as sent (integers are always finite), before any tensor is built.
    let non_finite = match &values {
        Values::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i] as f64)),
        Values::F64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
        _ => None,
    };
    if let Some((i, x)) = non_finite {
        return Err(Error::InvalidValue(format!(
            "input '{name}': element {i} = {x} is not a finite number"
        )));
    }
    let target = spec.datum;
    let internal = |e: TractError| Error::Internal(format!("building input '{name}': {e}"));
    let tensor = match values {
        Values::Bool(v) => Tensor::from_shape(&shape, &v).map_err(internal)?,
        Values::F32(v) if target == DatumType::F32 => Tensor::from_shape(&shape, &v).map_err(internal)?,
        Values::F64(v) if target == DatumType::F64 => Tensor::from_shape(&shape, &v).map_err(internal)?,
        Values::F64(v) if target == DatumType::F32 => {
            let out = v
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let y = x as f32;
                    if y.is_finite() {
                        Ok(y)
                    } else {
                        Err(Error::InvalidValue(format!(
                            "input '{name}': element {i} = {x} is out of range for FP32"
                        )))
                    }
                })
                .collect::<Result<Vec<f32>, Error>>()?;
            Tensor::from_shape(&shape, &out).map_err(internal)?
        }
        Values::F32(v) => {
            let t = Tensor::from_shape(&shape, &v).map_err(internal)?;
            t.cast_to_dt(target).map_err(internal)?.into_owned()
        }
        Values::Int(v) => exact_ints(name, &shape, v, target)?,
        Values::Uint(v) => exact_ints(name, &shape, v, target)?,
        Values::F64(_) | Values::Raw(_) | Values::Bytes(_) => {
            unreachable!("canonical() leaves no raw values or strings; F64 goes to floats")
        }
    };
    if tensor.datum_type() != target {
        return Ok(tensor.cast_to_dt(target).map_err(internal)?.into_owned());
    }
    Ok(tensor)
}

/// Integers into an integer input (already range-checked), or into a float input when
/// every value is exact there.
fn exact_ints<T: Datum + Copy + Into<i128>>(
    name: &str,
    shape: &[usize],
    v: Vec<T>,
    target: DatumType,
) -> Result<Tensor, Error> {
    let internal = |e: TractError| Error::Internal(format!("building input '{name}': {e}"));
    if !target.is_float() {
        return Ok(Tensor::from_shape(shape, &v)
            .map_err(internal)?
            .cast_to_dt(target)
            .map_err(internal)?
            .into_owned());
    }
    let (label, single) = if target == DatumType::F32 {
        ("FP32", true)
    } else {
        ("FP64", false)
    };
    let out = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let x: i128 = x.into();
            let y = if single { x as f32 as f64 } else { x as f64 };
            if y as i128 == x {
                Ok(y)
            } else {
                Err(Error::InvalidValue(format!(
                    "input '{name}': element {i} = {x} is not exact in {label}"
                )))
            }
        })
        .collect::<Result<Vec<f64>, Error>>()?;
    // Every value is exact in the target, so this cast changes none.
    Ok(Tensor::from_shape(shape, &out)
        .map_err(internal)?
        .cast_to_dt(target)
        .map_err(internal)?
        .into_owned())
}

/// Whether `from` converts to `to` without changing a value (floats to FP32 are checked
/// for range, integers to floats for exactness, value by value).
fn convertible(from: DataType, to: DataType) -> bool {
    if from == to {
        return from != DataType::Bytes;
    }
    match (from.int_range(), to.int_range()) {
        (Some((fmin, fmax)), Some((tmin, tmax))) => tmin <= fmin && fmax <= tmax,
        (Some(_), None) => matches!(to, DataType::F32 | DataType::F64),
        (None, _) => matches!(
            (from, to),
            (DataType::F16, DataType::F32)
                | (DataType::F16 | DataType::F32, DataType::F64)
                | (DataType::F64, DataType::F32)
        ),
    }
}

/// Values in the widest type of their kind, each checked against the declared datatype:
/// raw bytes decoded, JSON numbers checked for range.
fn canonical(name: &str, dt: DataType, values: Values) -> Result<Values, Error> {
    let wrong =
        |got: &str| Error::InvalidValue(format!("input '{name}': datatype {} does not hold {got}", dt.as_str()));
    let out_of_range = |i: usize, v: String| {
        Error::InvalidValue(format!(
            "input '{name}': element {i} = {v} is out of range for {}",
            dt.as_str()
        ))
    };
    Ok(match values {
        Values::Raw(bytes) => decode_raw(name, dt, &bytes)?,
        Values::Bool(v) if dt == DataType::Bool => Values::Bool(v),
        Values::Bool(_) => return Err(wrong("booleans")),
        Values::Int(_) | Values::Uint(_) if dt == DataType::Bool => return Err(wrong("numbers")),
        Values::Int(v) if dt.is_float() => Values::F64(v.into_iter().map(|x| x as f64).collect()),
        Values::Uint(v) if dt.is_float() => Values::F64(v.into_iter().map(|x| x as f64).collect()),
        Values::Int(v) => {
            let (lo, hi) = dt.int_range().ok_or_else(|| wrong("numbers"))?;
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !(lo..=hi).contains(&(**x as i128))) {
                return Err(out_of_range(i, x.to_string()));
            }
            Values::Int(v)
        }
        Values::Uint(v) => {
            let (lo, hi) = dt.int_range().ok_or_else(|| wrong("numbers"))?;
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !(lo..=hi).contains(&(**x as i128))) {
                return Err(out_of_range(i, x.to_string()));
            }
            Values::Uint(v)
        }
        Values::F32(v) if dt == DataType::F32 || dt == DataType::F16 => Values::F32(v),
        Values::F64(v) if dt == DataType::F64 => Values::F64(v),
        Values::F64(v) if dt == DataType::F32 || dt == DataType::F16 => {
            let mut out = Vec::with_capacity(v.len());
            for (i, x) in v.into_iter().enumerate() {
                let y = x as f32;
                if x.is_finite() && !y.is_finite() {
                    return Err(out_of_range(i, x.to_string()));
                }
                out.push(y);
            }
            Values::F32(out)
        }
        Values::F32(_) | Values::F64(_) => return Err(wrong("fractional numbers")),
        Values::Bytes(_) => return Err(wrong("strings")),
    })
}

fn decode_raw(name: &str, dt: DataType, bytes: &[u8]) -> Result<Values, Error> {
    let size = dt.size().ok_or_else(|| {
        Error::InvalidValue(format!(
            "input '{name}': BYTES tensors cannot feed a numeric model input"
        ))
    })?;
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::ShapeMismatch(format!(
            "input '{name}': {} bytes of binary data is not a whole number of {} elements ({size} bytes each)",
            bytes.len(),
            dt.as_str()
        )));
    }
    macro_rules! le {
        ($t:ty, $n:expr, $variant:ident, $conv:expr) => {
            Values::$variant(
                bytes
                    .chunks_exact($n)
                    .map(|c| $conv(<$t>::from_le_bytes(c.try_into().expect("chunk size"))))
                    .collect(),
            )
        };
    }
    Ok(match dt {
        DataType::Bool => Values::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DataType::U8 => Values::Uint(bytes.iter().map(|&b| b as u64).collect()),
        DataType::I8 => Values::Int(bytes.iter().map(|&b| b as i8 as i64).collect()),
        DataType::U16 => le!(u16, 2, Uint, |x: u16| x as u64),
        DataType::I16 => le!(i16, 2, Int, |x: i16| x as i64),
        DataType::U32 => le!(u32, 4, Uint, |x: u32| x as u64),
        DataType::I32 => le!(i32, 4, Int, |x: i32| x as i64),
        DataType::U64 => le!(u64, 8, Uint, |x: u64| x),
        DataType::I64 => le!(i64, 8, Int, |x: i64| x),
        DataType::F16 => le!(u16, 2, F32, |x: u16| f16::from_bits(x).to_f32()),
        DataType::F32 => le!(f32, 4, F32, |x: f32| x),
        DataType::F64 => le!(f64, 8, F64, |x: f64| x),
        DataType::Bytes => unreachable!("BYTES has no element size"),
    })
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::Bool(v) => v.len(),
            Values::Int(v) => v.len(),
            Values::Uint(v) => v.len(),
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::Raw(v) => v.len(),
            Values::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model output for the wire: its datatype and its values as little-endian bytes.
pub fn tensor_bytes(t: &Tensor) -> Result<(DataType, Vec<u8>), Error> {
    let internal = |e: TractError| Error::Internal(format!("encoding output: {e}"));
    let dt = DataType::of(t.datum_type())
        .filter(|d| *d != DataType::Bytes)
        .ok_or_else(|| Error::Internal(format!("output type {:?} has no protocol datatype", t.datum_type())))?;
    let view = t.try_as_plain_ram().map_err(internal)?;
    let bytes = match dt {
        DataType::Bool => view
            .as_slice::<bool>()
            .map_err(internal)?
            .iter()
            .map(|&b| b as u8)
            .collect(),
        _ => {
            // Plain tensors of numeric types hold their elements packed, in the machine's
            // order; every target of this server is little-endian.
            #[cfg(target_endian = "big")]
            compile_error!("the wire format is little-endian");
            view.as_bytes().to_vec()
        }
    };
    Ok((dt, bytes))
}

/// f64 values as little-endian FP64 bytes.
pub fn f64_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f64 values as little-endian FP32 bytes.
pub fn f32_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::Dim;

    pub(super) fn spec(datum: DatumType) -> TensorSpec {
        TensorSpec {
            name: "x".into(),
            dtype: "x",
            datum,
            shape: vec![Dim::Symbol("batch".into()), Dim::Fixed(2)],
            index_limit: None,
        }
    }

    fn wire(datatype: DataType, values: Values) -> WireTensor {
        WireTensor {
            name: "x".into(),
            datatype,
            shape: vec![1, 2],
            values,
        }
    }

    #[test]
    fn safe_conversions_only() {
        let f32_in = spec(DatumType::F32);
        let ok = |dt, v| to_tensor(&f32_in, wire(dt, v));
        assert!(ok(DataType::F32, Values::F64(vec![1.5, 2.0])).is_ok());
        assert!(ok(DataType::F64, Values::F64(vec![1.5, 2.0])).is_ok());
        assert!(
            ok(DataType::F64, Values::F64(vec![1e300, 2.0])).is_err(),
            "out of FP32 range"
        );
        assert!(ok(DataType::I64, Values::Int(vec![3, 4])).is_ok());
        assert!(
            ok(DataType::I64, Values::Int(vec![(1 << 24) + 1, 4])).is_err(),
            "not exact in FP32"
        );
        assert!(ok(DataType::Bool, Values::Bool(vec![true, false])).is_err());
        assert!(ok(DataType::Bytes, Values::Raw(vec![0; 8])).is_err());
        let i32_in = spec(DatumType::I32);
        assert!(
            to_tensor(&i32_in, wire(DataType::I64, Values::Int(vec![1, 2]))).is_err(),
            "narrowing"
        );
        assert!(to_tensor(&i32_in, wire(DataType::I16, Values::Int(vec![1, 2]))).is_ok());
        assert!(
            to_tensor(&i32_in, wire(DataType::U32, Values::Uint(vec![1, 2]))).is_err(),
            "u32 overflows i32"
        );
        assert!(to_tensor(&i32_in, wire(DataType::F32, Values::F64(vec![1.0, 2.0]))).is_err());
        let e = to_tensor(&i32_in, wire(DataType::I16, Values::Int(vec![1, 70000]))).unwrap_err();
        assert!(e.to_string().contains("out of range for INT16"), "{e}");
    }

    #[test]
    fn raw_bytes_decode_little_endian_and_count_elements() {
        let f32_in = spec(DatumType::F32);
        let raw: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = to_tensor(&f32_in, wire(DataType::F32, Values::Raw(raw.clone()))).unwrap();
        assert_eq!(
            t.to_plain_array_view::<f32>().unwrap().as_slice().unwrap(),
            &[1.5, -2.0]
        );
        let nan: Vec<u8> = [1.5f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = to_tensor(&f32_in, wire(DataType::F32, Values::Raw(nan))).unwrap_err();
        assert!(e.to_string().contains("element 1 = NaN is not a finite number"), "{e}");
        let e = to_tensor(
            &spec(DatumType::F64),
            wire(DataType::F64, Values::F64(vec![1.0, f64::INFINITY])),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a finite number"), "{e}");
        let e = to_tensor(&f32_in, wire(DataType::F32, Values::Raw(raw[..6].to_vec()))).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch(_)), "{e}");
        let mut w = wire(DataType::F32, Values::Raw(raw));
        w.shape = vec![1, 3];
        let e = to_tensor(&f32_in, w).unwrap_err();
        assert!(e.to_string().contains("holds 3 values, got 2"), "{e}");
    }
}

#[cfg(test)]
mod props {
    use super::tests::spec;
    use super::*;
    use axum::http::StatusCode;
    use proptest::prelude::*;

    fn flat<T: Datum + Copy>(t: &Tensor) -> Vec<T> {
        t.to_plain_array_view::<T>().unwrap().iter().copied().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Arbitrary bytes under any declared datatype and shape, into an input of any
        /// type: a tensor or a 400, never a panic.
        #[test]
        fn raw_bytes_are_a_tensor_or_a_400(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            dt in prop::sample::select(DataType::ALL.to_vec()),
            shape in prop::collection::vec(-2i64..5, 0..4),
            input in prop::sample::select(vec![DatumType::F32, DatumType::F64, DatumType::I64, DatumType::I32, DatumType::U8, DatumType::Bool]),
        ) {
            let w = WireTensor { name: "x".into(), datatype: dt, shape, values: Values::Raw(bytes) };
            if let Err(e) = to_tensor(&spec(input), w) {
                prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{}", e);
            }
        }

        /// Huge declared dims never allocate or overflow: refused, not panicked.
        #[test]
        fn huge_shapes_are_refused(d in prop::sample::select(vec![i64::MAX, i64::MIN, 1 << 62, u32::MAX as i64]), values in prop::collection::vec(any::<f32>(), 0..8)) {
            let w = WireTensor { name: "x".into(), datatype: DataType::F32, shape: vec![d, 2], values: Values::F32(values) };
            prop_assert!(to_tensor(&spec(DatumType::F32), w).is_err());
        }

        /// Finite FP32 values sent as little-endian bytes come back exactly, in the
        /// declared shape.
        #[test]
        fn fp32_bytes_round_trip(rows in 1usize..5, seed in prop::collection::vec(-1e38f32..1e38, 10)) {
            let values: Vec<f32> = seed.iter().cycle().take(rows * 2).copied().collect();
            let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            let w = WireTensor { name: "x".into(), datatype: DataType::F32, shape: vec![rows as i64, 2], values: Values::Raw(raw) };
            let t = to_tensor(&spec(DatumType::F32), w).unwrap();
            prop_assert_eq!(t.shape(), &[rows, 2]);
            prop_assert_eq!(flat::<f32>(&t), values.clone());
            let (dt, back) = tensor_bytes(&t).unwrap();
            prop_assert_eq!(dt, DataType::F32);
            prop_assert_eq!(back, values.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        }

        /// Integer bytes round-trip into an input of their type, widen exactly into a
        /// wider one, and are refused (not truncated) into a narrower one.
        #[test]
        fn integer_bytes_round_trip_and_only_widen(a in any::<i32>(), b in any::<i32>()) {
            let w = |dt, raw: Vec<u8>| WireTensor { name: "x".into(), datatype: dt, shape: vec![1, 2], values: Values::Raw(raw) };
            let raw32: Vec<u8> = [a, b].iter().flat_map(|x| x.to_le_bytes()).collect();
            let raw64: Vec<u8> = [a as i64, b as i64].iter().flat_map(|x| x.to_le_bytes()).collect();
            let t = to_tensor(&spec(DatumType::I64), w(DataType::I64, raw64.clone())).unwrap();
            prop_assert_eq!(flat::<i64>(&t), vec![a as i64, b as i64]);
            let t = to_tensor(&spec(DatumType::I64), w(DataType::I32, raw32)).unwrap();
            prop_assert_eq!(flat::<i64>(&t), vec![a as i64, b as i64]);
            let e = to_tensor(&spec(DatumType::I32), w(DataType::I64, raw64)).unwrap_err();
            prop_assert!(matches!(e, Error::InvalidValue(_)), "{}", e);
        }

        /// The name of the datatype parses back to it; anything else is a 400.
        #[test]
        fn datatype_names_round_trip(dt in prop::sample::select(DataType::ALL.to_vec()), junk in "[A-Za-z0-9]{0,8}") {
            prop_assert_eq!(DataType::parse(dt.as_str()).unwrap(), dt);
            if let Err(e) = DataType::parse(&junk) {
                prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            }
        }
    }
}
