//! Request bodies inside the memory budget (issue 25, F1).
//!
//! A JSON body, and its parse, can take several times its size in memory (an OIP body of
//! 62 MB peaked at 441 MiB), so bodies are admitted against the same budget as passes,
//! before they are read:
//! - a declared `Content-Length` over `--body-limit-bytes` is refused with 413 before a
//!   byte of the body is read;
//! - a declared length reserves its whole cost up front, or the request is refused (429
//!   while others hold the budget, 413 if it could never fit), again before reading;
//! - a body without a declared length (chunked) reserves as it arrives, growing by an
//!   eighth at a time;
//!   a step that does not fit ends the read, and the request gets that refusal.
//!
//! gRPC messages carry no length the server sees before reading, so a gRPC call's body
//! reserves as it arrives, as a chunked REST body does ([`GrpcBodyLayer`]).
//!
//! The reservation is held until the answer is built, and its release trims the heap
//! (`MemoryPermit`), so the memory comes back.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;

use crate::core::memory_budget::{BODY_RESERVATION, MemoryPermit};
use crate::core::mode::{self, ModeLabel};
use crate::core::{Core, Protocol};
use crate::error::Error;
use crate::front::grpc_decode::replace_status;
use crate::front::http::protocol_of;

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
        // The request's own reservation takes the body's over (see BODY_RESERVATION).
        let held = std::cell::RefCell::new(Some(permit));
        return BODY_RESERVATION.scope(held, next.run(request)).await;
    }
    let state = Streamed::new(core.clone(), permit);
    let (parts, body) = request.into_parts();
    let body = Body::new(Reserving::new(body, state.clone()));
    let counted = (
        model_of(parts.uri.path()).map(str::to_string),
        mode_of(&parts.uri),
        protocol_of(parts.uri.path()),
    );
    let response = next.run(Request::from_parts(parts, body)).await;
    match state.failed() {
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

/// The model a predict or infer path names (`/models/{name}/…`, `/v2/models/{name}/…`).
fn model_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2").unwrap_or(path);
    rest.strip_prefix("/models/")?
        .split('/')
        .next()
        .filter(|m| !m.is_empty())
}

/// The mode asked for, by the core's rule on parameter names ([`mode::asked_for`]): a
/// native request names MC in its query; an OIP request's mode is in its body, not read.
fn mode_of(uri: &axum::http::Uri) -> ModeLabel {
    let names: Vec<String> = uri
        .query()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    mode::asked_for(names.iter())
}

/// A chunked body's reservation, and why it ended the read, if it did.
struct Streamed {
    core: Arc<Core>,
    permit: Mutex<MemoryPermit>,
    failed: Mutex<Option<Error>>,
}

impl Streamed {
    fn new(core: Arc<Core>, permit: MemoryPermit) -> Arc<Streamed> {
        Arc::new(Streamed {
            core,
            permit: Mutex::new(permit),
            failed: Mutex::new(None),
        })
    }

    fn failed(&self) -> Option<Error> {
        self.failed
            .lock()
            .expect("body budget lock poisoned: this is a bug")
            .take()
    }
}

/// A body that reserves as it arrives.
struct Reserving<B> {
    inner: B,
    state: Arc<Streamed>,
    /// Body bytes read so far.
    read: u64,
    /// A gRPC body: its first five bytes give the message's length, reserved whole at once.
    grpc: bool,
}

impl<B> Reserving<B> {
    fn new(inner: B, state: Arc<Streamed>) -> Reserving<B> {
        Reserving {
            inner,
            state,
            read: 0,
            grpc: false,
        }
    }
}

impl<B> http_body::Body for Reserving<B>
where
    B: http_body::Body<Data = axum::body::Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = axum::body::Bytes;
    type Error = tower::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(data) = f.data_ref()
        {
            // A gRPC message's length prefix (a flag byte, then 4 bytes big-endian) says what
            // is coming: reserving it whole at once means concurrent large messages are
            // refused up front, not each refused halfway after taking a share of the budget.
            let announced = match (this.grpc, this.read, data.get(..5)) {
                (true, 0, Some(prefix)) => 5 + u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as u64,
                _ => 0,
            };
            this.read += data.len() as u64;
            let state = &this.state;
            let mut permit = state.permit.lock().expect("body budget lock poisoned: this is a bug");
            if let Err(e) = state.core.grow_body(&mut permit, this.read.max(announced)) {
                let message = e.to_string();
                *state.failed.lock().expect("body budget lock poisoned: this is a bug") = Some(e);
                return Poll::Ready(Some(Err(message.into())));
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

/// The gRPC listener's layer: each call's message reserves as it arrives; a call whose
/// message does not fit gets RESOURCE_EXHAUSTED with the budget's reason (429 or 413 on
/// REST), counted like the other refusals.
#[derive(Clone)]
pub struct GrpcBodyLayer {
    pub core: Arc<Core>,
}

impl<S> tower::Layer<S> for GrpcBodyLayer {
    type Service = GrpcBody<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcBody {
            inner,
            core: self.core.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcBody<S> {
    inner: S,
    core: Arc<Core>,
}

impl<S, RB> tower::Service<axum::http::Request<tonic::body::Body>> for GrpcBody<S>
where
    S: tower::Service<axum::http::Request<tonic::body::Body>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<tonic::body::Body>) -> Self::Future {
        let core = self.core.clone();
        let state = Streamed::new(core.clone(), MemoryPermit::none());
        let (parts, body) = request.into_parts();
        let mut reserving = Reserving::new(body, state.clone());
        reserving.grpc = true;
        let body = tonic::body::Body::new(reserving);
        let answer = self.inner.call(axum::http::Request::from_parts(parts, body));
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some(e) = state.failed() {
                // tonic answered the broken read with a status of its own; the reason is ours.
                replace_status(&mut response, core.refuse(Protocol::Grpc, None, ModeLabel::Eval, e));
            }
            Ok(response)
        })
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
