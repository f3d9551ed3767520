//! The HTTP listener: the native and OIP REST routes on one router, the middleware they
//! share, health and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::core::Core;
use crate::core::admission::panic_message;
use crate::error::Error;

/// The header every predict answer carries: the mode the request asked for.
pub const MODE_HEADER: &str = "x-inference-mode";

pub fn router(core: Arc<Core>) -> Router {
    let body_limit = core.limits.body_limit_bytes;
    let panic_core = core.clone();
    Router::new()
        .merge(super::native::routes())
        .merge(super::oip::routes())
        .route("/health/live", get(|| async { axum::Json(json!({"status": "live"})) }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(super::openapi::serve))
        .fallback(|uri: Uri| async move { Error::RouteNotFound(uri.path().to_string()) })
        .method_not_allowed_fallback(|method: Method| async move { Error::MethodNotAllowed(method.to_string()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(move |panic: Box<dyn std::any::Any + Send>| {
            panic_core.metrics.panics.inc();
            tracing::error!(panic = %panic_message(&*panic), "handler panicked");
            Error::Internal("the request handler panicked; the server keeps serving".into()).into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(RequestCounter::default()))
        .with_state(core)
}

/// Request ids: a per-process random prefix and a counter, unless the client sent one.
#[derive(Clone)]
struct RequestCounter {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl Default for RequestCounter {
    fn default() -> Self {
        RequestCounter {
            prefix: rand::random(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for RequestCounter {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}-{n}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// A body read as bytes, with the rejection (a body over the limit, a broken stream)
/// already our error.
pub fn body_error(core: &Core, rejection: axum::extract::rejection::BytesRejection) -> Error {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge(format!(
            "request body exceeds the limit of {} bytes",
            core.limits.body_limit_bytes
        ))
    } else {
        Error::MalformedJson(format!("could not read the request body: {rejection}"))
    }
}

async fn ready(State(core): State<Arc<Core>>) -> Response {
    let reasons = core.not_ready_reasons();
    if reasons.is_empty() {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "error": reasons.join("; "), "error_type": "not_ready", "reasons": reasons})),
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

async fn metrics(State(core): State<Arc<Core>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        core.metrics.render(),
    )
        .into_response()
}
