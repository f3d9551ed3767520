//! The native predict answers: the types [`encode`](super::encode) builds and serialises,
//! and that the OpenAPI document is generated from; and the request as the document
//! describes it (the decoder in `decode.rs` streams it, so that type is for the document
//! only).

use serde::Serialize;
use serde::ser::Serializer;
use serde_json::{Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;
use utoipa::{PartialSchema, ToSchema};

use crate::front::answer::{EvalMode, McMode, McRun};
use crate::front::schema::json_schema;
use crate::front::values::Nested;

/// The answer of a predict request: eval, or MC dropout when `mc_samples` was given.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[schema(discriminator(property_name = "mode", mapping(
    ("eval" = "#/components/schemas/EvalAnswer"),
    ("mc_dropout" = "#/components/schemas/McAnswer"),
)))]
pub enum PredictAnswer<'a> {
    Eval(EvalAnswer<'a>),
    McDropout(McAnswer<'a>),
}

/// One deterministic forward pass, dropout off.
#[derive(Serialize, ToSchema)]
pub struct EvalAnswer<'a> {
    pub model: &'a str,
    #[schema(inline)]
    pub mode: EvalMode,
    /// Each model output by name, nested as its shape.
    #[schema(value_type = BTreeMap<String, Nested>)]
    pub outputs: ByName<&'a str, Nested<'a>>,
}

/// MC dropout: `mc_samples` stochastic passes and their statistics.
#[derive(Serialize, ToSchema)]
pub struct McAnswer<'a> {
    pub model: &'a str,
    #[schema(inline)]
    pub mode: McMode,
    #[serde(flatten)]
    pub run: McRun,
    /// Each model output by name.
    #[schema(value_type = BTreeMap<String, McOutput>)]
    pub outputs: ByName<&'a str, McOutput<'a>>,
}

/// The statistics of one output over the MC passes, those the request's `statistics` chose
/// (by default: all of them for an output with one position a row; `mean`,
/// `predictive_entropy`, `mutual_information` and `summary` for more). `mean`, `variance`
/// and `std` have the output's shape. The entropies come for categorical and Bernoulli outputs (see the
/// model's `output_kinds`), one per position: shaped like the output without its class
/// axes (categorical), or like the output itself (Bernoulli). Where a row has more than
/// one position, `summary` scores each row. A calibrated regression output adds
/// `intervals`; a calibrated probability output adds `prediction_sets`, `refer`,
/// `refer_threshold` and `refer_target_error`; a calibrated multi-label output the same,
/// with a set per label.
#[derive(Serialize, ToSchema)]
pub struct McOutput<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<Nested<'a>>,
    /// Unbiased, accumulated in f64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variance: Option<Nested<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std: Option<Nested<'a>>,
    /// Entropy of the mean distribution, per position, in nats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictive_entropy: Option<Nested<'a>>,
    /// Mean entropy of the sampled distributions, per position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_entropy: Option<Nested<'a>>,
    /// predictive_entropy - expected_entropy: the model's own uncertainty, per position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutual_information: Option<Nested<'a>>,
    /// Scores per row over its positions, for outputs with more than one position a row:
    /// `mean_predictive_entropy`, `max_predictive_entropy`, `mean_mutual_information`,
    /// `max_mutual_information` (one per row); for Bernoulli outputs, or with the config's
    /// `background_class`, `foreground_mean_predictive_entropy` and
    /// `foreground_mean_mutual_information` (null for a row without foreground); and
    /// `volume_mean`, `volume_std`, `volume_cv` ([rows, structures]: the positions each
    /// class takes across samples).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, Nested>>)]
    pub summary: Option<ByName<&'static str, Nested<'a>>>,
    /// Every pass, shaped [mc_samples, ...output shape], with `return_samples=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Nested<'a>>,
    /// Conformal intervals keyed by level ("0.8", "0.9", "0.95", "0.99").
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, Interval>>)]
    pub intervals: Option<ByName<String, Interval<'a>>>,
    /// Per level, per row, the class indices of the prediction set, most probable first.
    /// For a multi-label output, per row and label, the label's values in its set (0
    /// absent, 1 present), the predicted one first.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = prediction_sets)]
    pub prediction_sets: Option<ByName<String, Nested<'a>>>,
    /// Per row: whether the answer should be referred to a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<bool>>)]
    pub refer: Option<Nested<'a>>,
    /// The predictive entropy above which a row is referred; null when the calibration
    /// could not show the target error (every row is referred).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refer_threshold: Option<Option<f64>>,
    /// The error the referral keeps accepted rows under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refer_target_error: Option<f64>,
}

fn prediction_sets() -> RefOr<Schema> {
    json_schema(json!({
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "array", "items": {"anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "array", "items": {"type": "integer", "minimum": 0}},
        ]}}},
    }))
}

/// Bounds shaped like `mean`; a bound is null where that side is unbounded (the
/// calibration set was too small for the level).
#[derive(Serialize, ToSchema)]
pub struct Interval<'a> {
    pub lower: Nested<'a>,
    pub upper: Nested<'a>,
}

/// A JSON object of values by name, in the order given: the model's outputs, the
/// calibration's levels.
pub struct ByName<K, V>(pub Vec<(K, V)>);

impl<K: Serialize, V: Serialize> Serialize for ByName<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// A tensor in a native request: nested arrays whose nesting is the input's shape,
/// numbers (or booleans for a bool input) at the leaves. Four levels are described, which
/// covers the bundled models; deeper nesting is accepted as well.
pub struct Tensor;

impl PartialSchema for Tensor {
    fn schema() -> RefOr<Schema> {
        let leaf = json!({"type": ["number", "boolean"]});
        let mut level = json!({"type": "array", "items": leaf});
        for _ in 0..3 {
            level = json!({"type": "array", "items": {"anyOf": [leaf, level]}});
        }
        json_schema(level)
    }
}
impl ToSchema for Tensor {}

/// `{"inputs": <tensor>}` for a single-input model, or `{"inputs": {"<input name>":
/// <tensor>, ...}}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct NativeRequest {
    #[schema(schema_with = native_inputs)]
    inputs: Value,
}

fn native_inputs() -> RefOr<Schema> {
    json_schema(json!({"anyOf": [
        {"$ref": "#/components/schemas/Tensor"},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Tensor"}},
    ]}))
}
