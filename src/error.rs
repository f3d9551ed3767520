//! The one error type of the service, and the one place where it becomes each protocol's
//! status: an HTTP status for the REST front ends, a gRPC code for the gRPC one.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    MalformedProtobuf(String),
    #[error("{0}")]
    RaggedArray(String),
    #[error("{0}")]
    ShapeMismatch(String),
    #[error("{0}")]
    MissingInput(String),
    #[error("{0}")]
    UnknownInput(String),
    #[error("{0}")]
    InvalidValue(String),
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    NoDefaultModel(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UriTooLong(String),
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("the request body made no progress for {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    ModeMismatch(String),
    #[error("{0}")]
    McUnavailable(String),
    #[error("server is at capacity; retry later")]
    Overloaded,
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    ModelUnhealthy(String),
    #[error("inference did not finish within {0:?}")]
    Timeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    error_type: &'a str,
}

impl Error {
    /// The machine-readable kind, stable for clients.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::MalformedJson(_) => "malformed_json",
            Error::MalformedProtobuf(_) => "malformed_protobuf",
            Error::RaggedArray(_) => "ragged_array",
            Error::ShapeMismatch(_) => "shape_mismatch",
            Error::MissingInput(_) => "missing_input",
            Error::UnknownInput(_) => "unknown_input",
            Error::InvalidValue(_) => "invalid_value",
            Error::ModelNotFound(_) => "model_not_found",
            Error::NoDefaultModel(_) => "no_default_model",
            Error::RouteNotFound(_) => "not_found",
            Error::InvalidPath(_) => "invalid_path",
            Error::Unauthorized(_) => "unauthorized",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::UriTooLong(_) => "uri_too_long",
            Error::HeadersTooLarge(_) => "headers_too_large",
            Error::BodyTimeout(_) => "body_timeout",
            Error::InvalidParameter(_) => "invalid_parameter",
            Error::ModeMismatch(_) => "mode_mismatch",
            Error::McUnavailable(_) => "mc_unavailable",
            Error::Overloaded => "overloaded",
            Error::NotReady(_) => "not_ready",
            Error::ModelUnhealthy(_) => "model_unhealthy",
            Error::Timeout(_) => "timeout",
            Error::Internal(_) => "internal",
        }
    }

    /// The only mapping from error kind to HTTP status in the code base.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::MalformedJson(_)
            | Error::MalformedProtobuf(_)
            | Error::RaggedArray(_)
            | Error::ShapeMismatch(_)
            | Error::MissingInput(_)
            | Error::UnknownInput(_)
            | Error::InvalidValue(_)
            | Error::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::ModelNotFound(_) | Error::NoDefaultModel(_) | Error::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Error::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::InvalidParameter(_) | Error::ModeMismatch(_) | Error::McUnavailable(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Error::NotReady(_) | Error::ModelUnhealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl Error {
    /// The only mapping from error kind to gRPC status code in the code base.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::MalformedJson(_)
            | Error::MalformedProtobuf(_)
            | Error::RaggedArray(_)
            | Error::ShapeMismatch(_)
            | Error::MissingInput(_)
            | Error::UnknownInput(_)
            | Error::InvalidValue(_)
            | Error::InvalidParameter(_)
            | Error::InvalidPath(_)
            | Error::ModeMismatch(_) => Code::InvalidArgument,
            Error::Unauthorized(_) => Code::Unauthenticated,
            Error::ModelNotFound(_) | Error::NoDefaultModel(_) => Code::NotFound,
            Error::RouteNotFound(_) | Error::MethodNotAllowed(_) => Code::Unimplemented,
            // The model cannot do what was asked (no live dropout): not the client's syntax.
            Error::McUnavailable(_) => Code::FailedPrecondition,
            // The HTTP-only limits, for completeness: gRPC never raises them.
            Error::PayloadTooLarge(_) | Error::UriTooLong(_) | Error::HeadersTooLarge(_) | Error::Overloaded => {
                Code::ResourceExhausted
            }
            Error::BodyTimeout(_) => Code::DeadlineExceeded,
            Error::NotReady(_) | Error::ModelUnhealthy(_) => Code::Unavailable,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    /// The message, with the error type in the `error-type` metadata entry.
    fn from(e: Error) -> tonic::Status {
        let mut status = tonic::Status::new(e.grpc_code(), e.to_string());
        status.metadata_mut().insert(
            "error-type",
            tonic::metadata::MetadataValue::from_static(e.error_type()),
        );
        status
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: self.to_string(),
            error_type: self.error_type(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
