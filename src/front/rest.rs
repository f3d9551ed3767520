//! What the native and OIP REST front ends share: the mode header, the error body, the
//! body's rejection as our error, and the tail of a predict call (the core's answer or
//! refusal, as a response that says the mode).

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::core::mode::{ModeLabel, ModeParams};
use crate::core::view::LoadedModel;
use crate::core::{Answer, Core, Inputs, PredictRequest, Protocol};
use crate::error::Error;

/// The header every predict answer carries: the mode the request asked for.
pub const MODE_HEADER: &str = "x-inference-mode";

/// Every 4xx and 5xx answer.
// `Error`'s own response writes the same two fields (held to it by a test below).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// Stable and machine-readable: malformed_json, ragged_array, shape_mismatch,
    /// missing_input, unknown_input, invalid_value, invalid_path, model_not_found,
    /// not_found, method_not_allowed, payload_too_large, invalid_parameter, mode_mismatch,
    /// mc_unavailable, overloaded, not_ready, model_unhealthy, no_default_model,
    /// unauthorized, timeout, internal.
    #[schema(value_type = String)]
    pub error_type: &'static str,
}

impl From<&Error> for ErrorBody {
    fn from(e: &Error) -> ErrorBody {
        ErrorBody {
            error: e.to_string(),
            error_type: e.error_type(),
        }
    }
}

/// A body read as bytes, with the rejection (a body over the limit, a broken stream)
/// already our error.
pub fn body_error(core: &Core, rejection: BytesRejection) -> Error {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge(format!(
            "request body exceeds the limit of {} bytes",
            core.limits.body_limit_bytes
        ))
    } else if let Some(limit) = crate::front::connections::stalled(&rejection) {
        Error::BodyTimeout(limit)
    } else {
        Error::MalformedJson(format!("could not read the request body: {rejection}"))
    }
}

/// A predict request as its front end decoded it: the mode parameters, the inputs (not
/// parsed yet), and how to encode the answer. A refusal carries the mode asked for.
pub type Decoded<I, E> = Result<(ModeParams, I, E), (ModeLabel, Error)>;

/// Runs a decoded predict request on the core, or counts its refusal, and answers with
/// the encoded body or the error, and the mode in [`MODE_HEADER`] either way.
pub async fn predict<I, T, E>(
    core: &Arc<Core>,
    protocol: Protocol,
    model: Option<String>,
    decoded: Decoded<I, E>,
) -> Response
where
    I: Inputs,
    T: IntoResponse + Send + 'static,
    E: FnOnce(&LoadedModel, Answer) -> Result<T, Error> + Send + 'static,
{
    let (mode, result) = match decoded {
        Err((mode, e)) => (mode, Err(core.refuse(protocol, model.as_deref(), mode, e))),
        Ok((params, inputs, encode)) => {
            let request = PredictRequest {
                protocol,
                model,
                params,
                inputs,
            };
            let reply = core.predict(request, encode).await;
            (reply.mode, reply.result)
        }
    };
    let mut response = match result {
        Ok(body) => body.into_response(),
        Err(e) => e.into_response(),
    };
    response
        .headers_mut()
        .insert(MODE_HEADER, HeaderValue::from_static(mode.as_str()));
    response
}

/// An answer already serialised to JSON (on the worker pool).
pub struct JsonBytes(pub Vec<u8>);

impl IntoResponse for JsonBytes {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

/// Serialises an answer, as the encoders on the worker pool do.
pub fn to_json<T: Serialize>(answer: &T) -> Result<JsonBytes, Error> {
    serde_json::to_vec(answer)
        .map(JsonBytes)
        .map_err(|e| Error::Internal(format!("encoding the answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document describes refusals with [`ErrorBody`]; `Error` writes its own body.
    #[tokio::test]
    async fn error_responses_are_the_error_body() {
        for e in [
            Error::MalformedJson("not JSON".into()),
            Error::Overloaded,
            Error::Timeout(std::time::Duration::from_millis(1500)),
            Error::Internal("a bug".into()),
        ] {
            let expected = serde_json::to_vec(&ErrorBody::from(&e)).unwrap();
            let body = axum::body::to_bytes(e.into_response().into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(body, expected);
        }
    }
}
