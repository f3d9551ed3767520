//! Extractors whose rejections are the service's JSON errors. axum's own answer a
//! rejected path (say `/models/%FF/predict`, not UTF-8) with a `text/plain` 400, which
//! clients that parse `{"error", "error_type"}` cannot read.

use axum::extract::FromRequestParts;
use axum::extract::rejection::PathRejection;

use crate::error::Error;

/// `axum::extract::Path`, rejected with [`Error::InvalidPath`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
pub struct Path<T>(pub T);

impl From<PathRejection> for Error {
    fn from(rejection: PathRejection) -> Error {
        Error::InvalidPath(format!("the request path is invalid: {}", rejection.body_text()))
    }
}
