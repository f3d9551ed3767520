//! Native JSON request bodies to tensors, in one pass over the bytes.
//!
//! The nesting of a JSON array gives the tensor's shape. Every problem a client can cause
//! becomes a 400 that names the input and the place in it. This file reads the body and
//! its `"inputs"`; [`walk`] reads one input's nested arrays into a tensor.

mod walk;

#[cfg(test)]
mod props;

use std::borrow::Cow;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use tract_onnx::prelude::*;

use crate::core::tensors::in_input_order;
use crate::core::view::{LoadedModel, TensorSpec};
use crate::error::Error;
use walk::{Node, Walker};

/// Parses `{"inputs": [...]}` or `{"inputs": {"name": [...], ...}}` into the model's inputs,
/// in the model's input order.
///
/// One pass over the bytes: the numbers go straight into each input's buffer, with no
/// `serde_json::Value` tree in between (a tree costs an allocation per array and 32 bytes
/// per number, most of a parse's time). The answer is the tree parse's (`core/json_inputs.rs`),
/// error for error: a body that is not JSON is refused as such even when an input in it
/// is also wrong, so problems with the inputs are only noted while reading and reported
/// once the whole body has parsed.
pub fn parse_request(model: &LoadedModel, body: &[u8]) -> Result<Vec<Tensor>, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed(model).deserialize(&mut de).and_then(|r| de.end().map(|()| r));
    parsed.map_err(|e| Error::MalformedJson(format!("request body is not valid JSON: {e}")))?
}

/// The whole body: an object whose `"inputs"` are read and whose other fields are
/// skipped. `"inputs"` given twice is refused (as OIP REST refuses a repeated field):
/// JSON leaves a repeated key's meaning to the reader, and parsers differ (first wins,
/// last wins), so the server does not guess which one the client meant.
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
        let mut repeated = false;
        while let Some(key) = map.next_key::<Key>()? {
            if key.0 == "inputs" && inputs.is_none() {
                inputs = Some(map.next_value_seed(InputsSeed(self.0))?);
            } else {
                repeated |= key.0 == "inputs";
                // Read to the end all the same: a body that is not JSON is refused as such.
                map.next_value::<Skip>()?;
            }
        }
        if repeated {
            return Ok(Err(Error::InvalidValue(
                "the body gives \"inputs\" twice; send it once".into(),
            )));
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
/// checking their escapes, and a body the tree parse refuses as not JSON (say, a lone
/// surrogate in a field it does not need) must be refused as such here too.
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

    /// By name. A name given twice is refused, as `"inputs"` twice is (see [`BodySeed`]);
    /// then unknown and missing names are refused before any value (by
    /// [`in_input_order`]), and values come in the model's input order.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let model = self.0;
        let mut named: Vec<(String, Option<Result<Tensor, Error>>)> = Vec::with_capacity(model.inputs.len());
        let mut repeated: Option<String> = None;
        while let Some(Key(name)) = map.next_key::<Key>()? {
            if named.iter().any(|(n, _)| *n == *name) {
                map.next_value::<Skip>()?;
                repeated.get_or_insert_with(|| name.into_owned());
                continue;
            }
            let value = match model.inputs.iter().find(|s| s.name == *name) {
                Some(spec) => Some(map.next_value_seed(TensorSeed(spec))?),
                None => {
                    map.next_value::<Skip>()?;
                    None
                }
            };
            named.push((name.into_owned(), value));
        }
        if let Some(name) = repeated {
            return Ok(Err(Error::InvalidValue(format!(
                "\"inputs\" names '{name}' twice; send each input once"
            ))));
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
