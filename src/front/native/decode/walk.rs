//! One input's nested arrays, read into a tensor of its type as the parser meets them.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;
use tract_onnx::prelude::*;

use super::{Skip, drain};
use crate::core::json_inputs::path_string;
use crate::core::view::{TensorSpec, shape_string};
use crate::error::Error;

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
pub(super) struct Walker<'s> {
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
    pub(super) fn new(spec: &'s TensorSpec) -> Self {
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

    pub(super) fn finish(self) -> Result<Tensor, Error> {
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
pub(super) struct Node<'w, 's> {
    walker: &'w mut Walker<'s>,
    depth: usize,
    /// The first element at every depth above: this value still tells the shape.
    first: bool,
}

impl<'w, 's> Node<'w, 's> {
    pub(super) fn root(walker: &'w mut Walker<'s>) -> Self {
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
