//! The answers of `GET /models` and `GET /models/{name}`: what the handlers build and
//! serialise, and what the OpenAPI document is generated from.

use std::borrow::Cow;
use std::path::Path;

use serde::Serialize;
use serde::ser::{self, Serializer};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

use crate::core::Core;
use crate::core::view::CalibrationFile;
use crate::core::view::DropoutSite;
use crate::core::view::{self, ModelRepo};
use crate::core::view::{CheckResult, Dim, LoadedModel, Passes};
use crate::front::rest::ErrorBody;
use crate::front::schema::{any_object, any_objects, json_schema};

#[derive(Serialize, ToSchema)]
pub struct ModelList<'a> {
    /// The model `POST /predict` serves; null when there is none.
    pub default_model: Option<&'a str>,
    pub models: Vec<ModelSummary<'a>>,
    pub load_failures: Vec<LoadFailure<'a>>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelSummary<'a> {
    pub name: &'a str,
    pub default: bool,
    pub healthy: bool,
    pub mc_available: bool,
    pub dropout_sites: usize,
    pub description: Option<&'a str>,
}

impl<'a> ModelList<'a> {
    pub fn new(core: &'a Core, repo: &'a ModelRepo) -> Self {
        let models = repo
            .models
            .values()
            .map(|m| ModelSummary {
                name: &m.name,
                default: is_default(core, m),
                healthy: m.healthy(),
                mc_available: m.mc_unavailable_reason().is_none(),
                dropout_sites: m.sampling_sites(),
                description: m.config.description.as_deref(),
            })
            .collect();
        ModelList {
            default_model: core.default_model.as_deref(),
            models,
            load_failures: repo.failures.iter().map(LoadFailure::from).collect(),
        }
    }
}

fn is_default(core: &Core, m: &LoadedModel) -> bool {
    core.default_model.as_deref() == Some(m.name.as_str())
}

/// A model file that did not load (at startup or on SIGHUP).
#[derive(Serialize, ToSchema)]
pub struct LoadFailure<'a> {
    pub model: &'a str,
    #[schema(value_type = String)]
    pub file: &'a Path,
    pub reason: &'a str,
    /// Whether the previous version keeps serving.
    pub kept_previous: bool,
    /// Whether this failure makes the server unready: a model of the folder at start that
    /// has no version serving. A file added on a reload that fails does not.
    pub blocks_readiness: bool,
}

impl<'a> From<&'a view::LoadFailure> for LoadFailure<'a> {
    fn from(f: &'a view::LoadFailure) -> Self {
        LoadFailure {
            model: &f.model,
            file: &f.file,
            reason: &f.reason,
            kept_previous: f.kept_previous,
            blocks_readiness: f.blocks_readiness,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata<'a> {
    pub name: &'a str,
    #[schema(value_type = Option<String>)]
    pub file: Option<Cow<'a, str>>,
    pub description: Option<&'a str>,
    pub default: bool,
    pub inputs: Vec<TensorSpec<'a>>,
    pub outputs: Vec<TensorSpec<'a>>,
    pub probability_outputs: Vec<&'a str>,
    /// Per output: `{"kind": "categorical", "class_axes": [1], "classes": 3}`,
    /// `{"kind": "bernoulli"}` or `{"kind": "other"}`; decides its MC entropies.
    #[schema(value_type = Object)]
    pub output_kinds: serde_json::Map<String, serde_json::Value>,
    /// The symbolic batch dimension, if the model has one.
    pub batch_dim: Option<&'a str>,
    /// The runtime that runs the model's passes: `tract` or `onnxruntime`.
    pub backend: &'static str,
    /// How a pass of several rows runs: `{"eval": "batched" | "row_by_row", "mc": ...,
    /// "multiply_adds_per_row": n}`. Large tract graphs run row by row (see the README).
    #[schema(value_type = Object)]
    pub passes: Passes,
    /// The dropout sites found in the graph.
    #[schema(schema_with = any_objects)]
    pub dropout_sites: AsValue<'a, [DropoutSite]>,
    /// Rewrites made to the graph at load time.
    pub graph_fixes: &'a [String],
    /// Seconds the model's load took (plans and self-checks; each check's own in
    /// `self_checks`).
    pub load_seconds: f64,
    /// The load-time self-checks and their outcomes.
    #[schema(schema_with = any_objects)]
    pub self_checks: AsValue<'a, [CheckResult]>,
    pub healthy: bool,
    pub mc_available: bool,
    pub mc_unavailable_reason: Option<&'a str>,
    pub max_mc_samples: usize,
    /// The error referral keeps accepted rows under (with a calibration).
    pub refer_target_error: Option<f64>,
    pub calibration: Option<Calibration<'a>>,
    /// The last failed load of this model's file, while an earlier version serves.
    pub load_failure: Option<LoadFailure<'a>>,
}

impl<'a> ModelMetadata<'a> {
    pub fn new(core: &'a Core, m: &'a LoadedModel, load_failure: Option<&'a view::LoadFailure>) -> Self {
        ModelMetadata {
            name: &m.name,
            file: file_name(&m.path),
            description: m.config.description.as_deref(),
            default: is_default(core, m),
            inputs: m.inputs.iter().map(TensorSpec::from).collect(),
            outputs: m.outputs.iter().map(TensorSpec::from).collect(),
            probability_outputs: m.probability_output_names(),
            output_kinds: m.output_kinds_by_name(),
            batch_dim: m.batch_symbol.as_deref(),
            backend: m.backend.as_str(),
            load_seconds: m.load_seconds,
            passes: m.passes(),
            dropout_sites: AsValue(&m.sites),
            graph_fixes: &m.fixes,
            self_checks: AsValue(&m.checks),
            healthy: m.healthy(),
            mc_available: m.mc_unavailable_reason().is_none(),
            mc_unavailable_reason: m.mc_unavailable_reason(),
            max_mc_samples: core.limits.max_mc_samples,
            refer_target_error: m.calibration.as_ref().map(|c| c.refer_target),
            calibration: m.calibration.as_ref().map(|c| Calibration {
                file: file_name(&c.path),
                summary: AsValue(&c.file),
            }),
            load_failure: load_failure.map(LoadFailure::from),
        }
    }
}

fn file_name(path: &Path) -> Option<Cow<'_, str>> {
    path.file_name().map(|f| f.to_string_lossy())
}

/// A model input or output: dims are sizes or symbol names.
#[derive(Serialize, ToSchema)]
pub struct TensorSpec<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    #[schema(schema_with = dims)]
    pub shape: &'a [Dim],
    /// For an input whose values index a table (token ids into an embedding): the table's
    /// size `n`. Each value must be in `-n..n`; another is refused with 400.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_limit: Option<usize>,
}

impl<'a> From<&'a crate::core::view::TensorSpec> for TensorSpec<'a> {
    fn from(spec: &'a crate::core::view::TensorSpec) -> Self {
        TensorSpec {
            name: &spec.name,
            dtype: spec.dtype,
            shape: &spec.shape,
            index_limit: spec.index_limit,
        }
    }
}

fn dims() -> RefOr<Schema> {
    json_schema(serde_json::json!({"type": "array", "items": {"type": ["integer", "string"]}}))
}

/// The model's calibration: its file, and what the file says (levels, quantiles or set
/// thresholds, referral thresholds, and their coverage on the calibration rows).
#[derive(Serialize, ToSchema)]
pub struct Calibration<'a> {
    #[schema(value_type = Option<String>)]
    pub file: Option<Cow<'a, str>>,
    #[schema(schema_with = any_object)]
    pub summary: AsValue<'a, CalibrationFile>,
}

/// What the engine reports about a model (its dropout sites, self-checks, calibration),
/// written as a `serde_json::Value` of it would be: an `f32` in it printed as the f64 it
/// widens to (a keep probability of 0.699999988079071, not 0.7), as these answers always
/// have.
pub struct AsValue<'a, T: ?Sized>(pub &'a T);

impl<T: Serialize + ?Sized> Serialize for AsValue<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::to_value(self.0).map_err(ser::Error::custom)?.serialize(s)
    }
}

/// A refusal of `GET /models/{name}`; for a model whose file failed to load, also its
/// name and the failure itself to read.
#[derive(Serialize, ToSchema)]
pub struct ModelRefusal<'a> {
    #[serde(flatten)]
    pub error: ErrorBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_failure: Option<LoadFailure<'a>>,
}
