//! Request bodies inside the memory budget (issue 25, F1).
//!
//! A JSON body, and its parse, can take several times its size in memory (an OIP body of
//! 62 MB peaked at 441 MiB), so bodies are admitted against the same budget as passes,
//! before they are read:
//! - a declared `Content-Length` over `--body-limit-bytes` is refused with 413 before a
//!   byte of the body is read;
//! - a declared length reserves its whole cost up front, or the request is refused (429
//!   while others hold the budget, 413 if it could never fit), again before reading;
//! - a body without a declared length (chunked) reserves as it arrives, a step at a time;
//!   a step that does not fit ends the read, and the request gets that refusal.
//!
//! The reservation is held until the answer is built, and its release trims the heap
//! (`MemoryPermit`), so the memory comes back.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;

use crate::core::memory_budget::{BODY_STEP_BYTES, MemoryPermit};
use crate::core::mode::ModeLabel;
use crate::core::{Core, Protocol};
use crate::error::Error;

/// The middleware of the HTTP listener.
pub async fn reserve_body(State(core): State<Arc<Core>>, request: Request, next: Next) -> Response {
    let limit = core.limits.body_limit_bytes as u64;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let refuse = |e: Error| refused(&core, &request, e).into_response();
    if let Some(n) = declared.filter(|&n| n > limit) {
        return refuse(Error::PayloadTooLarge(format!(
            "the request body declares {n} bytes (Content-Length), over the limit of {limit} bytes \
             (--body-limit-bytes, MCD_BODY_LIMIT_BYTES)"
        )));
    }
    let streamed = declared.is_none() && request.headers().contains_key(TRANSFER_ENCODING);
    let permit = match core.reserve_body(declared.unwrap_or(0)) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    if !streamed {
        let response = next.run(request).await;
        drop(permit);
        return response;
    }
    let state = Arc::new(Streamed {
        core: core.clone(),
        permit: Mutex::new(permit),
        failed: Mutex::new(None),
    });
    let (parts, body) = request.into_parts();
    let body = Body::new(Reserving {
        inner: body,
        state: state.clone(),
        read: 0,
        covered: 0,
    });
    let counted = (
        model_of(parts.uri.path()).map(str::to_string),
        mode_of(&parts.uri),
        protocol_of(parts.uri.path()),
    );
    let response = next.run(Request::from_parts(parts, body)).await;
    let failed = state
        .failed
        .lock()
        .expect("body budget lock poisoned: this is a bug")
        .take();
    match failed {
        // The handler saw a broken body; the reason is the budget's.
        Some(e) => {
            let (model, mode, protocol) = counted;
            core.refuse(protocol, model.as_deref(), mode, e).into_response()
        }
        None => response,
    }
}

/// Counts a refused request as the front ends count theirs, and hands its error back.
fn refused(core: &Core, request: &Request, e: Error) -> Error {
    let path = request.uri().path();
    core.refuse(protocol_of(path), model_of(path), mode_of(request.uri()), e)
}

fn protocol_of(path: &str) -> Protocol {
    if path == "/v2" || path.starts_with("/v2/") {
        Protocol::OipRest
    } else {
        Protocol::Native
    }
}

/// The model a predict or infer path names (`/models/{name}/…`, `/v2/models/{name}/…`).
fn model_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2").unwrap_or(path);
    rest.strip_prefix("/models/")?
        .split('/')
        .next()
        .filter(|m| !m.is_empty())
}

/// A native request names MC in its query; an OIP request's mode is in its body, not read.
fn mode_of(uri: &axum::http::Uri) -> ModeLabel {
    let asks_mc = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.split('=').next() == Some("mc_samples")));
    if asks_mc { ModeLabel::McDropout } else { ModeLabel::Eval }
}

/// A chunked body's reservation, and why it ended the read, if it did.
struct Streamed {
    core: Arc<Core>,
    permit: Mutex<MemoryPermit>,
    failed: Mutex<Option<Error>>,
}

/// A body that reserves as it arrives.
struct Reserving {
    inner: Body,
    state: Arc<Streamed>,
    read: u64,
    /// Body bytes reserved so far.
    covered: u64,
}

impl http_body::Body for Reserving {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(data) = f.data_ref()
        {
            self.read += data.len() as u64;
            if self.read > self.covered {
                let step = (self.read - self.covered).div_ceil(BODY_STEP_BYTES) * BODY_STEP_BYTES;
                let state = self.state.clone();
                let mut permit = state.permit.lock().expect("body budget lock poisoned: this is a bug");
                if let Err(e) = state.core.grow_body(&mut permit, step) {
                    let message = e.to_string();
                    *state.failed.lock().expect("body budget lock poisoned: this is a bug") = Some(e);
                    return Poll::Ready(Some(Err(axum::Error::new(message))));
                }
                self.covered += step;
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_model_and_protocol() {
        assert_eq!(model_of("/models/digits_cnn/predict"), Some("digits_cnn"));
        assert_eq!(model_of("/v2/models/bc/versions/1/infer"), Some("bc"));
        assert_eq!(model_of("/predict"), None);
        assert_eq!(protocol_of("/v2/models/bc/infer"), Protocol::OipRest);
        assert_eq!(protocol_of("/predict"), Protocol::Native);
        let uri: axum::http::Uri = "/predict?seed=1&mc_samples=5".parse().unwrap();
        assert_eq!(mode_of(&uri), ModeLabel::McDropout);
    }
}
