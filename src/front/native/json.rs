//! JSON request bodies to tensors, and tensors back to nested JSON arrays.
//!
//! The nesting of a JSON array gives the tensor's shape. Every problem a client can cause
//! becomes a 400 that names the input and the place in it.

use std::borrow::Cow;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use tract_onnx::prelude::*;

use crate::core::tensors::in_input_order;
use crate::engine::model::{LoadedModel, TensorSpec, shape_string};
use crate::error::Error;

/// Parses `{"inputs": [...]}` or `{"inputs": {"name": [...], ...}}` into the model's inputs,
/// in the model's input order.
///
/// One pass over the bytes: the numbers go straight into each input's buffer, with no
/// `serde_json::Value` tree in between (that tree cost an allocation per array and 32
/// bytes per number, and was most of the parse time). The answer is the one the two-step
/// parse gave, error for error: a body that is not JSON is refused as such even when an
/// input in it is also wrong, so problems with the inputs are only noted while reading
/// and reported once the whole body has parsed.
pub fn parse_request(model: &LoadedModel, body: &[u8]) -> Result<Vec<Tensor>, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed(model).deserialize(&mut de).and_then(|r| de.end().map(|()| r));
    parsed.map_err(|e| Error::MalformedJson(format!("request body is not valid JSON: {e}")))?
}

/// The whole body: an object whose `"inputs"` are read (the last one, if repeated, as a
/// JSON object keeps the last value of a key) and whose other fields are skipped.
struct BodySeed<'m>(&'m LoadedModel);

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = Result<Vec<Tensor>, Error>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn not_an_object() -> Error {
    Error::MalformedJson("request body must be a JSON object like {\"inputs\": ...}".into())
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = Result<Vec<Tensor>, Error>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object like {\"inputs\": ...}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut inputs = None;
        while let Some(key) = map.next_key::<Key>()? {
            if key.0 == "inputs" {
                inputs = Some(map.next_value_seed(InputsSeed(self.0))?);
            } else {
                map.next_value::<Skip>()?;
            }
        }
        Ok(inputs.unwrap_or_else(|| Err(Error::MissingInput("request body has no \"inputs\" field".into()))))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        drain(seq)?;
        Ok(Err(not_an_object()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(not_an_object()))
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A value read and dropped. Not serde's `IgnoredAny`: that skips strings without
/// checking their escapes, and a body the old parse refused as not JSON (say, a lone
/// surrogate in a field it did not need) must still be refused as such.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = Skip;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
        drain(seq).map(|_| Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
}

/// Reads what is left of an array, to keep the parse going past a refusal.
fn drain<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<usize, A::Error> {
    let mut n = 0;
    while seq.next_element::<Skip>()?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// The value of `"inputs"`: a nested array for a single-input model, or an object of them
/// by input name.
struct InputsSeed<'m>(&'m LoadedModel);

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = Result<Vec<Tensor>, Error>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl InputsSeed<'_> {
    fn not_inputs(&self, kind: &str) -> Result<Vec<Tensor>, Error> {
        Err(Error::InvalidValue(format!(
            "\"inputs\" must be a nested array or an object of them, got {kind}"
        )))
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = Result<Vec<Tensor>, Error>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a nested array or an object of them")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let model = self.0;
        if let [spec] = model.inputs.as_slice() {
            let mut walker = Walker::new(spec);
            Node::root(&mut walker).visit_seq(seq)?;
            return Ok(walker.finish().map(|t| vec![t]));
        }
        drain(seq)?;
        Ok(Err(Error::MissingInput(format!(
            "model '{}' takes {} inputs ({}); send {{\"inputs\": {{\"<name>\": [...], ...}}}}",
            model.name,
            model.inputs.len(),
            model.input_names()
        ))))
    }

    /// By name. A name given twice keeps its first place and its last value, as a JSON
    /// object read whole does; unknown and missing names are refused before any value
    /// (by [`in_input_order`]), and values in the model's input order.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let model = self.0;
        let mut named: Vec<(String, Option<Result<Tensor, Error>>)> = Vec::with_capacity(model.inputs.len());
        while let Some(Key(name)) = map.next_key::<Key>()? {
            let value = match model.inputs.iter().find(|s| s.name == *name) {
                Some(spec) => Some(map.next_value_seed(TensorSeed(spec))?),
                None => {
                    map.next_value::<Skip>()?;
                    None
                }
            };
            match named.iter_mut().find(|(n, _)| *n == *name) {
                Some((_, slot)) => *slot = value,
                None => named.push((name.into_owned(), value)),
            }
        }
        Ok(in_input_order(model, named).and_then(|ordered| {
            ordered
                .into_iter()
                .map(|(_, value)| value.expect("every known input has a value"))
                .collect()
        }))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(self.not_inputs("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(self.not_inputs("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(self.not_inputs("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(self.not_inputs("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(self.not_inputs("a string"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.not_inputs("null"))
    }
}

/// One input's nested arrays, read into a tensor of `spec`'s type.
struct TensorSeed<'s>(&'s TensorSpec);

impl<'de> DeserializeSeed<'de> for TensorSeed<'_> {
    type Value = Result<Tensor, Error>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let mut walker = Walker::new(self.0);
        Node::root(&mut walker).deserialize(d)?;
        Ok(walker.finish())
    }
}

/// A JSON value that is not an array, as met where an element belongs.
#[derive(Clone, Copy)]
enum Leaf {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str,
    Object,
}

impl Leaf {
    fn kind(self) -> &'static str {
        match self {
            Leaf::Null => "null",
            Leaf::Bool(_) => "a boolean",
            Leaf::U64(_) | Leaf::I64(_) | Leaf::F64(_) => "a number",
            Leaf::Str => "a string",
            Leaf::Object => "an object",
        }
    }

    /// A number as JSON prints it (the messages quote the client's value).
    fn number(self) -> Option<Number> {
        match self {
            Leaf::U64(x) => Some(x.into()),
            Leaf::I64(x) => Some(x.into()),
            Leaf::F64(x) => Number::from_f64(x),
            _ => None,
        }
    }
}

/// Where the elements go, by the input's type.
enum Sink {
    /// F32, and F16 (cast once the values are all read).
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    /// Every integer type: read as i64, narrowed with a range check at the end.
    Int(Vec<i64>),
    /// A type JSON cannot carry: refused once the shape is known to be right.
    None,
}

/// The state of one input's walk.
///
/// The shape is read as the nesting of the first element at each depth (the first array at
/// depth d is the first element of the first array at depth d-1); every other array is
/// checked against it. Errors keep the precedence of a walk over a whole tree: a wrong rank
/// (from those first elements) before a ragged array, the first ragged array in document
/// order before a wrong element, the first wrong element before an integer out of range.
struct Walker<'s> {
    spec: &'s TensorSpec,
    /// The length of the first array at each depth; its length is the rank once known.
    shape: Vec<usize>,
    /// Known once the first elements reach a non-array or an empty array.
    rank: Option<usize>,
    /// Where the walk is: the index at each depth.
    path: Vec<usize>,
    ragged: Option<Error>,
    wrong_element: Option<Error>,
    sink: Sink,
}

impl<'s> Walker<'s> {
    fn new(spec: &'s TensorSpec) -> Self {
        let sink = match spec.datum {
            DatumType::F32 | DatumType::F16 => Sink::F32(vec![]),
            DatumType::F64 => Sink::F64(vec![]),
            DatumType::Bool => Sink::Bool(vec![]),
            dt if dt.is_integer() => Sink::Int(vec![]),
            _ => Sink::None,
        };
        Walker {
            spec,
            shape: vec![],
            rank: None,
            path: vec![],
            ragged: None,
            wrong_element: None,
            sink,
        }
    }

    /// Notes a ragged array here, unless an earlier one was noted.
    fn ragged(&mut self, what: std::fmt::Arguments) {
        if self.ragged.is_none() {
            self.ragged = Some(self.ragged_error("ragged array: ", what));
        }
    }

    fn ragged_error(&self, prefix: &str, what: std::fmt::Arguments) -> Error {
        Error::RaggedArray(format!(
            "input '{}': {prefix}element {} {what}",
            self.spec.name,
            path_string(&self.path)
        ))
    }

    /// A non-array value at `depth`; `first` when it is the first element at every depth
    /// above it.
    fn leaf(&mut self, depth: usize, first: bool, leaf: Leaf) {
        if first && self.rank.is_none() {
            self.rank = Some(depth);
        }
        let rank = self
            .rank
            .expect("the first elements reached the bottom before any other");
        if depth < rank {
            let expected = self.shape[depth];
            self.ragged(format_args!(
                "is {}, expected an array of length {expected}",
                leaf.kind()
            ));
            return;
        }
        if self.ragged.is_some() || self.wrong_element.is_some() {
            return;
        }
        let dtype = self.spec.dtype;
        let wrong = match (&mut self.sink, leaf) {
            (Sink::F32(v), Leaf::U64(_) | Leaf::I64(_) | Leaf::F64(_)) => {
                let x = as_f64(leaf) as f32;
                if x.is_finite() {
                    v.push(x);
                    return;
                }
                format!("= {} is out of range for {dtype}", leaf.number().expect("a number"))
            }
            (Sink::F64(v), Leaf::U64(_) | Leaf::I64(_) | Leaf::F64(_)) => {
                v.push(as_f64(leaf));
                return;
            }
            (Sink::F32(_) | Sink::F64(_), other) => format!("is {}, expected a number", other.kind()),
            (Sink::Bool(v), Leaf::Bool(b)) => {
                v.push(b);
                return;
            }
            (Sink::Bool(_), other) => format!("is {}, expected true or false", other.kind()),
            (Sink::Int(v), Leaf::I64(x)) => {
                v.push(x);
                return;
            }
            (Sink::Int(v), Leaf::U64(x)) if i64::try_from(x).is_ok() => {
                v.push(x as i64);
                return;
            }
            (Sink::Int(_), Leaf::U64(_) | Leaf::F64(_)) => format!(
                "= {}, expected an integer ({dtype} input)",
                leaf.number().expect("a number")
            ),
            (Sink::Int(_), other) => format!("is {}, expected an integer", other.kind()),
            (Sink::None, _) => return,
        };
        self.wrong_element = Some(Error::InvalidValue(format!(
            "input '{}': element {} {wrong}",
            self.spec.name,
            path_string(&self.path)
        )));
    }

    fn finish(self) -> Result<Tensor, Error> {
        let spec = self.spec;
        let rank = self.rank.expect("a whole value was read");
        if rank != spec.shape.len() {
            return Err(Error::ShapeMismatch(format!(
                "input '{}': expected shape {} (rank {}), got an array of shape {:?} (rank {})",
                spec.name,
                shape_string(&spec.shape),
                spec.shape.len(),
                self.shape,
                rank
            )));
        }
        if let Some(e) = self.ragged {
            return Err(e);
        }
        if let Sink::None = self.sink {
            return Err(Error::InvalidValue(format!(
                "input '{}' has type {:?}, which JSON requests cannot carry",
                spec.name, spec.datum
            )));
        }
        if let Some(e) = self.wrong_element {
            return Err(e);
        }
        let internal = |e: TractError| Error::Internal(format!("building input '{}': {e}", spec.name));
        // The values move into the tensor: no copy.
        fn array<T: Datum>(shape: &[usize], v: Vec<T>) -> TractResult<Tensor> {
            Ok(tract_ndarray::ArrayD::from_shape_vec(shape, v)?.into_tensor())
        }
        let shape = self.shape.as_slice();
        match self.sink {
            Sink::F32(v) if spec.datum == DatumType::F16 => {
                let t = array(shape, v).map_err(internal)?;
                Ok(t.cast_to_dt(DatumType::F16).map_err(internal)?.into_owned())
            }
            Sink::F32(v) => array(shape, v).map_err(internal),
            Sink::F64(v) => array(shape, v).map_err(internal),
            Sink::Bool(v) => array(shape, v).map_err(internal),
            Sink::Int(v) => {
                let dt = spec.datum;
                if dt == DatumType::I64 {
                    return array(shape, v).map_err(internal);
                }
                let t = array(shape, v).map_err(internal)?;
                // Out-of-range values for narrower integer types are an input error, not a
                // wrap: a value that does not survive the round trip through the type is
                // refused.
                let narrowed = t.cast_to_dt(dt).map_err(internal)?.into_owned();
                let back = narrowed.cast_to_dt(DatumType::I64).map_err(internal)?;
                if *back != t {
                    return Err(Error::InvalidValue(format!(
                        "input '{}': a value is out of range for {}",
                        spec.name, spec.dtype
                    )));
                }
                Ok(narrowed)
            }
            Sink::None => unreachable!("refused above"),
        }
    }
}

fn as_f64(leaf: Leaf) -> f64 {
    match leaf {
        Leaf::U64(x) => x as f64,
        Leaf::I64(x) => x as f64,
        Leaf::F64(x) => x,
        _ => unreachable!("only numbers are read as floats"),
    }
}

/// One value of an input's nesting, at `depth`.
struct Node<'w, 's> {
    walker: &'w mut Walker<'s>,
    depth: usize,
    /// The first element at every depth above: this value still tells the shape.
    first: bool,
}

impl<'w, 's> Node<'w, 's> {
    fn root(walker: &'w mut Walker<'s>) -> Self {
        Node {
            walker,
            depth: 0,
            first: true,
        }
    }

    fn leaf<E>(self, leaf: Leaf) -> Result<(), E> {
        self.walker.leaf(self.depth, self.first, leaf);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a nested array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Node {
            walker: w,
            depth,
            first,
        } = self;
        // An array among the first elements, before the bottom is reached: its length is
        // the shape's at this depth, whatever it is.
        let shaping = first && w.rank.is_none();
        let expected = if shaping {
            w.shape.push(0);
            None
        } else {
            let rank = w.rank.expect("the first elements reached the bottom before any other");
            if depth == rank {
                if w.ragged.is_none() {
                    let what = format_args!("is an array, but elements at depth {depth} are numbers elsewhere");
                    w.ragged = Some(w.ragged_error("", what));
                }
                drain(seq)?;
                return Ok(());
            }
            Some(w.shape[depth])
        };
        // Problems inside this array come after its own length in document order.
        let clean = w.ragged.is_none();
        let mut n = 0;
        loop {
            w.path.push(n);
            // Past a ragged array nothing else is reported: skip, only count.
            let walk = w.ragged.is_none() && expected.is_none_or(|e| n < e);
            let more = if walk {
                let child = Node {
                    walker: &mut *w,
                    depth: depth + 1,
                    first: shaping && n == 0,
                };
                seq.next_element_seed(child)?.is_some()
            } else {
                seq.next_element::<Skip>()?.is_some()
            };
            w.path.pop();
            if !more {
                break;
            }
            n += 1;
        }
        match expected {
            None => {
                w.shape[depth] = n;
                if n == 0 {
                    w.rank = Some(depth + 1);
                }
            }
            Some(e) if n != e && clean => {
                // This array comes before anything noted inside it.
                let what = format_args!("has length {n}, expected {e} like its siblings");
                w.ragged = Some(w.ragged_error("ragged array: ", what));
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        self.leaf(Leaf::Object)
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.leaf(Leaf::Bool(b))
    }
    fn visit_i64<E>(self, x: i64) -> Result<(), E> {
        self.leaf(Leaf::I64(x))
    }
    fn visit_u64<E>(self, x: u64) -> Result<(), E> {
        self.leaf(Leaf::U64(x))
    }
    fn visit_f64<E>(self, x: f64) -> Result<(), E> {
        self.leaf(Leaf::F64(x))
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.leaf(Leaf::Str)
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.leaf(Leaf::Null)
    }
}

fn path_string(path: &[usize]) -> String {
    path.iter().map(|i| format!("[{i}]")).collect()
}

/// The parser as it was before it streamed: the whole body into a `serde_json::Value`,
/// then each input from the tree. Kept as the reference the streaming parser must agree
/// with, answer for answer and error for error.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

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
    use serde_json::json;

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
                "streaming: {:?}, reference: {:?}",
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
        crate::engine::repo::load_model(name.trim_end_matches(".onnx"), &path).unwrap()
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

        /// The streaming parser gives the reference's answer for one input: the same
        /// tensor, or an error of the same kind in the same words, on any JSON and on
        /// near-tensors with one thing wrong, for every element type.
        #[test]
        fn one_input_agrees_with_the_reference(v in prop_oneof![any_json(), near_tensor()], rank in 1usize..4, dt in prop::sample::select(vec![DatumType::F32, DatumType::F64, DatumType::I64, DatumType::I8, DatumType::U8, DatumType::Bool, DatumType::F16, DatumType::String])) {
            let spec = spec(dt, rank);
            same(&to_tensor(&spec, &v).map(|t| vec![t]), &reference::to_tensor(&spec, &v).map(|t| vec![t]))?;
        }

        /// Whole bodies, as bytes: the same answer as the reference for every model
        /// (one input, two inputs, an integer input), and for bodies cut short or with a
        /// byte changed (not JSON, or JSON of another shape).
        #[test]
        fn bodies_agree_with_the_reference(b in body(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), damage in 0u8..6) {
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
                same(&parse_request(model, &bytes), &reference::parse_request(model, &bytes))?;
            }
        }

        /// Repeated keys, which a generated `Value` cannot hold: the last `"inputs"`
        /// and the last value of a repeated input name count, as in the reference
        /// (serde_json's map keeps the first place and the last value).
        #[test]
        fn repeated_keys_agree_with_the_reference(a in near_tensor(), b in near_tensor(), c in near_tensor(), order in 0u8..3) {
            let (a, b, c) = (a.to_string(), b.to_string(), c.to_string());
            let bodies = [
                format!(r#"{{"inputs": {a}, "model": 1, "inputs": {b}}}"#),
                match order {
                    0 => format!(r#"{{"inputs": {{"a": {a}, "b": {b}, "a": {c}}}}}"#),
                    1 => format!(r#"{{"inputs": {{"b": {b}, "a": {a}, "b": {c}}}}}"#),
                    _ => format!(r#"{{"inputs": {{"features": {a}, "x": {b}, "features": {c}, "x": 1}}}}"#),
                },
            ];
            for body in bodies {
                for model in models() {
                    same(&parse_request(model, body.as_bytes()), &reference::parse_request(model, body.as_bytes()))?;
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
}
