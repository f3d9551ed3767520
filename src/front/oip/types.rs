//! The OIP REST bodies: the answers the handlers serialise, which the OpenAPI document is
//! generated from, and the inference request as the document describes it (`request.rs`
//! decodes it in one streaming pass, so that type is for the document only).

use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

use crate::front::answer::{EvalMode, McMode, McRun};
use crate::front::schema::{any_array, any_value, json_schema};

/// `GET /v2`.
#[derive(Serialize, ToSchema)]
#[schema(as = OipServerMetadata)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    /// `binary_tensor_data`, and `mc_dropout`: MC dropout through request parameters.
    pub extensions: Vec<&'static str>,
}

/// `GET /v2/health/live`.
#[derive(Serialize, ToSchema)]
#[schema(as = OipLive)]
pub struct Live {
    pub live: bool,
}

/// `GET /v2/health/ready`: ready, or why not.
#[derive(Serialize, ToSchema)]
#[schema(as = OipReady)]
pub struct Ready {
    pub ready: bool,
    pub reasons: Vec<String>,
}

/// `GET /v2/models/{model}/ready`.
#[derive(Serialize, ToSchema)]
#[schema(as = OipModelReady)]
pub struct ModelReady<'a> {
    pub name: &'a str,
    pub ready: bool,
}

/// `GET /v2/models/{model}`.
#[derive(Serialize, ToSchema)]
#[schema(as = OipModelMetadata)]
pub struct ModelMetadata<'a> {
    pub name: &'a str,
    pub versions: Vec<&'static str>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    /// The eval outputs, and with MC available the derived MC outputs (`parameters.mc_only`).
    pub outputs: Vec<TensorMetadata>,
    pub parameters: ModelParameters,
}

/// What a model offers beyond the protocol: MC dropout, and its calibration.
#[derive(Serialize, ToSchema)]
#[schema(as = OipModelParameters)]
pub struct ModelParameters {
    pub mc_available: bool,
    /// Dropout nodes that sample in MC mode.
    pub dropout_sites: usize,
    pub calibrated: bool,
    /// The error the referral keeps accepted rows under; null without a calibration.
    pub refer_target_error: Option<f64>,
    /// Per output: `{"kind": "categorical", "class_axes": [1], "classes": 3}`,
    /// `{"kind": "bernoulli"}` or `{"kind": "other"}`; decides its MC entropies.
    #[schema(value_type = Object)]
    pub output_kinds: serde_json::Map<String, Value>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = OipTensorMetadata)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    /// -1 for a variable dimension.
    pub shape: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<TensorMetadataParameters>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = OipTensorMetadataParameters)]
pub struct TensorMetadataParameters {
    /// Only MC answers carry this output.
    pub mc_only: bool,
}

/// The JSON answer (with binary outputs, the JSON header before the raw tensors). MC
/// answers carry each output's mean under its own name and the statistics as derived
/// outputs `<name>.variance`, `<name>.std`, `<name>.predictive_entropy`,
/// `<name>.expected_entropy`, `<name>.mutual_information` and `<name>.samples`.
#[derive(Serialize, ToSchema)]
#[schema(as = OipInferAnswer)]
pub struct InferAnswer<'a> {
    /// The request's `id`, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = any_value)]
    pub id: Option<Value>,
    pub model_name: &'a str,
    pub model_version: &'static str,
    pub parameters: AnswerParameters,
    pub outputs: Vec<OutputTensor>,
}

/// The mode the answer was computed in, and for MC dropout the run.
#[derive(Serialize, ToSchema)]
#[schema(as = OipAnswerParameters)]
#[serde(untagged)]
pub enum AnswerParameters {
    Eval(EvalParameters),
    McDropout(McParameters),
}

#[derive(Serialize, ToSchema)]
#[schema(as = OipEvalParameters)]
pub struct EvalParameters {
    #[schema(inline)]
    pub mode: EvalMode,
}

#[derive(Serialize, ToSchema)]
#[schema(as = OipMcParameters)]
pub struct McParameters {
    #[schema(inline)]
    pub mode: McMode,
    #[serde(flatten)]
    pub run: McRun,
}

#[derive(Serialize, ToSchema)]
#[schema(as = OipOutput)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    /// Flat row-major values; absent when the output is binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = flat_data)]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<OutputParameters>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = OipOutputParameters)]
pub struct OutputParameters {
    /// The output's byte length in the binary section.
    pub binary_data_size: usize,
}

fn flat_data() -> RefOr<Schema> {
    json_schema(json!({"type": "array", "items": {"type": ["number", "integer", "boolean", "string", "null"]}}))
}

// ---- The request, for the document ----------------------------------------------------

/// The JSON inference request. With the binary tensor data extension the body is this
/// JSON followed by the raw tensors, the JSON's length in `Inference-Header-Content-Length`.
#[derive(ToSchema)]
#[schema(as = OipInferRequest)]
#[allow(dead_code)]
pub struct InferRequest {
    #[schema(schema_with = any_value)]
    id: Option<Value>,
    /// `mc_samples` (integer >= 2), `seed` (integer), `return_samples` (boolean) choose MC
    /// dropout; `statistics` (comma-separated names) chooses its statistics, as `outputs`
    /// can by name; `binary_data_output` (boolean) asks for binary outputs.
    #[schema(schema_with = request_parameters)]
    parameters: Option<Value>,
    inputs: Vec<InferInput>,
    outputs: Option<Vec<RequestedOutput>>,
}

fn request_parameters() -> RefOr<Schema> {
    json_schema(json!({
        "type": "object",
        "properties": {
            "mc_samples": {"type": ["integer", "string"]},
            "seed": {"type": ["integer", "string"]},
            "return_samples": {"type": ["boolean", "string"]},
            "statistics": {"type": "string"},
            "binary_data_output": {"type": "boolean"},
        },
        "additionalProperties": {"type": ["string", "number", "integer", "boolean"]},
    }))
}

#[derive(ToSchema)]
#[schema(as = OipInput)]
#[allow(dead_code)]
pub struct InferInput {
    name: String,
    shape: Vec<i64>,
    /// BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64 or BYTES.
    datatype: String,
    /// `binary_data_size` when the values are in the binary section.
    #[schema(schema_with = input_parameters)]
    parameters: Option<Value>,
    /// Row-major values, flat or nested.
    #[schema(schema_with = any_array)]
    data: Option<Value>,
}

#[derive(ToSchema)]
#[schema(as = OipOutputRequest)]
#[allow(dead_code)]
pub struct RequestedOutput {
    name: String,
    #[schema(schema_with = output_parameters)]
    parameters: Option<Value>,
}

fn input_parameters() -> RefOr<Schema> {
    json_schema(json!({"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}))
}

fn output_parameters() -> RefOr<Schema> {
    json_schema(json!({"type": "object", "properties": {"binary_data": {"type": "boolean"}}}))
}
