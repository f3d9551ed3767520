//! An answer's values in JSON: a flat row-major buffer written as nested arrays of its
//! shape, straight into the serializer. Building a `serde_json::Value` per number first
//! would cost 80 bytes and an allocation per array on answers of millions of values.

use std::borrow::Cow;

use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::json;
use tract_onnx::prelude::*;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;
use utoipa::{PartialSchema, ToSchema};

use crate::front::schema::json_schema;

/// Values nested as `shape` (a bare value for rank 0). A non-finite float is written as
/// null, as JSON has no number for it, and so is a value the buffer is short of.
pub struct Nested<'a> {
    shape: Cow<'a, [usize]>,
    leaves: Leaves<'a>,
}

/// The flat values, by kind.
pub enum Leaves<'a> {
    Floats(Cow<'a, [f64]>),
    Ints(Vec<i64>),
    Bools(Cow<'a, [bool]>),
    /// Per row, the class indices of a prediction set.
    Sets(&'a [Vec<usize>]),
}

impl<'a> Nested<'a> {
    pub fn new(shape: impl Into<Cow<'a, [usize]>>, leaves: Leaves<'a>) -> Self {
        Nested {
            shape: shape.into(),
            leaves,
        }
    }

    pub fn floats(shape: &'a [usize], values: &'a [f64]) -> Self {
        Nested::new(shape, Leaves::Floats(values.into()))
    }

    /// One flat array of every value, whatever the shape the values have.
    pub fn flat(leaves: Leaves<'a>) -> Self {
        let len = match &leaves {
            Leaves::Floats(v) => v.len(),
            Leaves::Ints(v) => v.len(),
            Leaves::Bools(v) => v.len(),
            Leaves::Sets(v) => v.len(),
        };
        Nested::new(vec![len], leaves)
    }

    /// A tensor's values: booleans, integers (as i64), or anything else as f64.
    pub fn tensor(t: &Tensor) -> TractResult<Nested<'static>> {
        Ok(Nested::new(t.shape().to_vec(), Leaves::of(t)?))
    }
}

impl Leaves<'static> {
    pub fn of(t: &Tensor) -> TractResult<Self> {
        if t.datum_type() == DatumType::Bool {
            let view = t.try_as_plain_ram()?;
            return Ok(Leaves::Bools(view.as_slice::<bool>()?.to_vec().into()));
        }
        if t.datum_type().is_integer() {
            let c = t.cast_to::<i64>()?;
            let view = c.try_as_plain_ram()?;
            return Ok(Leaves::Ints(view.as_slice::<i64>()?.to_vec()));
        }
        Ok(Leaves::Floats(crate::core::view::to_f64(t)?.into()))
    }
}

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.leaves {
            Leaves::Floats(v) => Shaped(&self.shape, v).serialize(s),
            Leaves::Ints(v) => Shaped(&self.shape, v).serialize(s),
            Leaves::Bools(v) => Shaped(&self.shape, v).serialize(s),
            Leaves::Sets(v) => Shaped(&self.shape, v).serialize(s),
        }
    }
}

/// The values of one sub-array: its shape and its stretch of the flat buffer.
struct Shaped<'s, T>(&'s [usize], &'s [T]);

impl<T: Serialize> Serialize for Shaped<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Shaped(shape, values) = *self;
        let Some((&n, rest)) = shape.split_first() else {
            return values.first().serialize(s);
        };
        let stride: usize = rest.iter().product();
        let mut seq = s.serialize_seq(Some(n))?;
        for i in 0..n {
            let start = (i * stride).min(values.len());
            let end = (start + stride).min(values.len());
            seq.serialize_element(&Shaped(rest, &values[start..end]))?;
        }
        seq.end()
    }
}

impl PartialSchema for Nested<'_> {
    /// Numbers nested as the output's shape (a bare number for a rank-0 result); null for
    /// a non-finite value.
    fn schema() -> RefOr<Schema> {
        json_schema(json!({"anyOf": [
            {"type": ["number", "integer", "boolean", "null"]},
            {"type": "array", "items": {"$ref": "#/components/schemas/NestedNumbers"}},
        ]}))
    }
}

impl ToSchema for Nested<'_> {
    fn name() -> Cow<'static, str> {
        "NestedNumbers".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// What the encoders wrote before: a `Value` tree of the same leaves.
    fn tree(shape: &[usize], leaves: &mut dyn Iterator<Item = Value>) -> Value {
        match shape.split_first() {
            None => leaves.next().unwrap_or(Value::Null),
            Some((&n, rest)) => Value::Array((0..n).map(|_| tree(rest, leaves)).collect()),
        }
    }

    #[test]
    fn nested_floats_are_the_text_of_the_value_tree() {
        let values = [1.5, -0.0, f64::NAN, 1e300, f64::INFINITY, 0.1 + 0.2, 3.0];
        for shape in [
            &[][..],
            &[7],
            &[1, 7],
            &[7, 1],
            &[2, 3],
            &[2, 2, 2],
            &[0, 3],
            &[3, 0],
            &[2, 0, 2],
        ] {
            let nested = serde_json::to_string(&Nested::floats(shape, &values)).unwrap();
            let mut leaves = values
                .iter()
                .map(|&x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number));
            assert_eq!(nested, tree(shape, &mut leaves).to_string(), "{shape:?}");
        }
    }

    #[test]
    fn nested_sets_ints_and_bools_are_nested_by_shape() {
        let sets = [vec![1], vec![0, 1]];
        let json = |n: Nested| serde_json::to_string(&n).unwrap();
        assert_eq!(json(Nested::new(vec![2], Leaves::Sets(&sets))), "[[1],[0,1]]");
        assert_eq!(json(Nested::new(vec![1, 2], Leaves::Ints(vec![-1, 2]))), "[[-1,2]]");
        assert_eq!(
            json(Nested::flat(Leaves::Bools(vec![true, false].into()))),
            "[true,false]"
        );
    }
}
