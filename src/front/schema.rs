//! Schemas written as JSON Schema, for what utoipa's derive and builders cannot say (a
//! number or an array of such, a list of types, a const), and the pass that puts them in
//! the finished document.

use serde_json::{Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema};
use utoipa::{PartialSchema, ToSchema};

/// Marks a literal schema: a placeholder whose title carries the JSON, replaced by
/// [`put_literals`] once utoipa has built the rest.
const LITERAL: &str = "mcd-literal-schema:";

/// A schema written as JSON Schema.
pub fn json_schema(v: Value) -> RefOr<Schema> {
    RefOr::T(Schema::Object(
        ObjectBuilder::new().title(Some(format!("{LITERAL}{v}"))).build(),
    ))
}

/// Puts each literal schema in place of its placeholder, keeping what utoipa added beside
/// it (a field's description).
pub fn put_literals(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let literal = map
                .get("title")
                .and_then(Value::as_str)
                .and_then(|t| t.strip_prefix(LITERAL))
                .map(|t| serde_json::from_str::<Value>(t).expect("a literal schema is JSON"));
            if let Some(Value::Object(mut literal)) = literal {
                // The placeholder's own title and (default) type go; a description stays.
                map.remove("title");
                map.remove("type");
                for (k, x) in std::mem::take(map) {
                    literal.entry(k).or_insert(x);
                }
                *map = literal;
            }
            map.values_mut().for_each(put_literals);
        }
        Value::Array(items) => items.iter_mut().for_each(put_literals),
        _ => {}
    }
}

/// An object of any fields.
pub fn any_object() -> RefOr<Schema> {
    json_schema(json!({"type": "object"}))
}

/// An array of objects of any fields.
pub fn any_objects() -> RefOr<Schema> {
    json_schema(json!({"type": "array", "items": {"type": "object"}}))
}

/// An array of anything.
pub fn any_array() -> RefOr<Schema> {
    json_schema(json!({"type": "array"}))
}

/// Any JSON value.
pub fn any_value() -> RefOr<Schema> {
    json_schema(json!({"type": ["string", "number", "integer", "boolean", "null", "object", "array"]}))
}

/// Bytes: with the binary tensor data extension, the JSON request then the raw tensors.
pub struct Binary;

impl PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        json_schema(json!({"type": "string", "contentMediaType": "application/octet-stream"}))
    }
}
impl ToSchema for Binary {}
