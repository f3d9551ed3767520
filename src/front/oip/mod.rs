//! The Open Inference Protocol v2 (KServe V2, Triton's HTTP API) over REST.
//!
//! MC dropout travels in the request's `parameters` (`mc_samples`, `seed`,
//! `return_samples`), so tritonclient's `infer(..., parameters={"mc_samples": 50})` works
//! unchanged. This module decodes the protocol's JSON and binary bodies into the core's
//! request and encodes the core's answer; the core decides what the request means.

pub mod outputs;
pub mod request;
pub mod types;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;

use crate::core::mode::ModeLabel;
use crate::core::view::LoadedModel;
use crate::core::{Answer, Core, Protocol};
use crate::core::{MODEL_VERSION, check_version};
use crate::error::Error;
use crate::front::extract::Path;
use crate::front::rest::{self, JsonBytes, body_error};
use outputs::{OutTensor, answer_outputs, metadata, select};
use request::{HEADER_LENGTH, OutputRequest};
use types::{InferAnswer, Live, ModelReady, OutputParameters, OutputTensor, Ready, ServerMetadata};

/// Our extension for MC dropout, advertised in server metadata beside the binary one.
pub const EXTENSIONS: [&str; 2] = ["binary_tensor_data", "mc_dropout"];

pub fn routes() -> Router<Arc<Core>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { axum::Json(Live { live: true }) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
}

async fn server_metadata() -> Response {
    axum::Json(ServerMetadata {
        name: "mcd-serve",
        version: env!("CARGO_PKG_VERSION"),
        extensions: EXTENSIONS.to_vec(),
    })
    .into_response()
}

async fn server_ready(State(core): State<Arc<Core>>) -> Response {
    let reasons = core.not_ready_reasons();
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(Ready {
            ready: reasons.is_empty(),
            reasons,
        }),
    )
        .into_response()
}

/// A model route's path: `/v2/models/{model}[/versions/{version}]`.
#[derive(serde::Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

async fn model_metadata(State(core): State<Arc<Core>>, Path(p): Path<ModelPath>) -> Result<Response, Error> {
    check_version(&p.model, p.version.as_deref())?;
    let m = core.model(Some(&p.model))?;
    Ok(axum::Json(metadata(&m)?).into_response())
}

async fn model_ready(State(core): State<Arc<Core>>, Path(p): Path<ModelPath>) -> Result<Response, Error> {
    check_version(&p.model, p.version.as_deref())?;
    let ready = core.model_ready(&p.model)?;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ModelReady { name: &p.model, ready };
    Ok((status, axum::Json(body)).into_response())
}

async fn infer(
    State(core): State<Arc<Core>>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run_infer(core, p.model, p.version, headers, body).await
}

async fn run_infer(
    core: Arc<Core>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // No Content-Type is required: tritonclient sends none.
    let header_length = headers.get(HEADER_LENGTH).map(|v| v.to_str().unwrap_or("?"));
    let decoded = check_version(&model, version.as_deref())
        .and_then(|()| body.map_err(|r| body_error(&core, r)))
        .map_err(|e| (ModeLabel::Eval, e))
        .and_then(|body| request::decode(body, header_length))
        .map(|req| {
            let (id, requested, binary_output) = (req.id, req.outputs, req.binary_output);
            let encode = move |m: &LoadedModel, a: Answer| encode(m, a, id, requested, binary_output);
            (req.params, req.inputs, encode)
        });
    rest::predict(&core, Protocol::OipRest, Some(model), decoded).await
}

/// An encoded infer answer: JSON, or a JSON header followed by binary outputs.
struct Encoded {
    body: Vec<u8>,
    header_length: Option<usize>,
}

impl IntoResponse for Encoded {
    fn into_response(self) -> Response {
        match self.header_length {
            None => JsonBytes(self.body).into_response(),
            Some(n) => (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::HeaderName::from_static(HEADER_LENGTH), n.to_string()),
                ],
                self.body,
            )
                .into_response(),
        }
    }
}

/// Runs on the worker pool: the answer's outputs, filtered to those requested, as JSON
/// `data` or as binary data after the JSON header.
fn encode(
    model: &LoadedModel,
    answer: Answer,
    id: Option<Value>,
    requested: Option<Vec<OutputRequest>>,
    binary_output: bool,
) -> Result<Encoded, Error> {
    let (outputs, parameters) = answer_outputs(model, answer)?;
    let chosen = select(model, outputs, requested, |r: &OutputRequest| r.name.as_str())?;
    let mut binary = vec![];
    let mut any_binary = false;
    let mut entries = Vec::with_capacity(chosen.len());
    for (o, req) in chosen {
        let as_binary = req.map_or(binary_output, |r| r.binary);
        any_binary |= as_binary;
        entries.push(output_entry(&o, as_binary, &mut binary)?);
    }
    let doc = InferAnswer {
        id,
        model_name: &model.name,
        model_version: MODEL_VERSION,
        parameters,
        outputs: entries,
    };
    let mut body = serde_json::to_vec(&doc).map_err(|e| Error::Internal(format!("encoding the answer: {e}")))?;
    if !any_binary {
        return Ok(Encoded {
            body,
            header_length: None,
        });
    }
    let header_length = body.len();
    body.extend_from_slice(&binary);
    Ok(Encoded {
        body,
        header_length: Some(header_length),
    })
}

fn output_entry(o: &OutTensor, as_binary: bool, binary: &mut Vec<u8>) -> Result<OutputTensor, Error> {
    let (data, parameters) = if as_binary {
        let bytes = o.bytes()?;
        let size = bytes.len();
        binary.extend_from_slice(&bytes);
        (None, Some(OutputParameters { binary_data_size: size }))
    } else {
        (Some(o.json()?), None)
    };
    Ok(OutputTensor {
        name: o.name.clone(),
        datatype: o.datatype.as_str(),
        shape: o.shape.clone(),
        data,
        parameters,
    })
}
