//! The HTTP listener: the native and OIP REST routes on one router, the middleware they
//! share, health and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;

use crate::core::admission::panic_message;
use crate::core::{Core, Protocol};
use crate::error::Error;

/// Every route on one listener: the APIs, health and `/metrics`.
pub fn router(core: Arc<Core>) -> Router {
    build(core, true, Middleware::SERVER)
}

/// The APIs and health, for when `/metrics` has a listener of its own.
pub fn router_without_metrics(core: Arc<Core>) -> Router {
    build(core, false, Middleware::SERVER)
}

/// Which of the server's two layers wrap the routes. The server always runs
/// [`Middleware::SERVER`]; the switches exist so that `examples/middleware_bench.rs` can
/// measure what each costs per request (docs/performance.md).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Middleware {
    /// [`RequestLayer`]: request id, span, failure log and `Connection: close` while
    /// draining.
    pub request: bool,
    pub catch_panic: bool,
}

impl Middleware {
    pub const SERVER: Middleware = Middleware {
        request: true,
        catch_panic: true,
    };
}

/// Every route, with the layers `middleware` asks for (see [`Middleware`]).
#[doc(hidden)]
pub fn router_with(core: Arc<Core>, middleware: Middleware) -> Router {
    build(core, true, middleware)
}

/// `/metrics` alone (`--metrics-addr`).
pub fn metrics_router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { Error::RouteNotFound(uri.path().to_string()) })
        .with_state(core)
}

/// Calls that need no API key: probes and scrapers carry none. Everything else (predict,
/// metadata, and unknown paths, so that a key-less caller learns nothing of the routes)
/// needs one when a key file is set.
pub fn open_path(path: &str) -> bool {
    matches!(
        path,
        "/health/live" | "/health/ready" | "/metrics" | "/openapi.json" | "/v2/health/live" | "/v2/health/ready"
    ) || (path.starts_with("/v2/models/") && path.ends_with("/ready"))
}

/// The REST protocol a path belongs to: OIP under `/v2`, the native API elsewhere.
pub(crate) fn protocol_of(path: &str) -> Protocol {
    if path == "/v2" || path.starts_with("/v2/") {
        Protocol::OipRest
    } else {
        Protocol::Native
    }
}

async fn require_key(State(core): State<Arc<Core>>, request: Request<Body>, next: Next) -> Response {
    let path = request.uri().path();
    if !open_path(path) {
        let protocol = protocol_of(path);
        let values: Vec<&[u8]> = request
            .headers()
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if let Err(e) = core.authorize(protocol, &values) {
            return e.into_response();
        }
    }
    next.run(request).await
}

fn build(core: Arc<Core>, with_metrics: bool, middleware: Middleware) -> Router {
    let body_limit = core.limits.body_limit_bytes;
    let panic_core = core.clone();
    let routes = Router::new()
        .merge(super::native::routes())
        .merge(super::oip::routes())
        .route("/health/live", get(|| async { axum::Json(Status { status: "live" }) }))
        .route("/health/ready", get(ready))
        .route("/openapi.json", get(super::openapi::serve));
    let routes = if with_metrics {
        routes.route("/metrics", get(metrics))
    } else {
        routes
    };
    let routes = routes
        .fallback(|uri: Uri| async move { Error::RouteNotFound(uri.path().to_string()) })
        .method_not_allowed_fallback(|method: Method| async move { Error::MethodNotAllowed(method.to_string()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            core.clone(),
            super::body_budget::reserve_body,
        ));
    // The key file is fixed at start (SIGHUP changes the keys, not whether there are any),
    // so a server without one has no key check on its request path at all.
    let routes = if core.keys.required() {
        routes.layer(axum::middleware::from_fn_with_state(core.clone(), require_key))
    } else {
        routes
    };
    let routes = if middleware.catch_panic {
        routes.layer(CatchPanicLayer::custom(move |panic: Box<dyn std::any::Any + Send>| {
            panic_core.metrics.panics.inc();
            tracing::error!(panic = %panic_message(&*panic), "handler panicked");
            Error::Internal("the request handler panicked; the server keeps serving".into()).into_response()
        }))
    } else {
        routes
    };
    let routes = if middleware.request {
        routes.layer(RequestLayer {
            core: core.clone(),
            ids: RequestCounter::default(),
        })
    } else {
        routes
    };
    routes.with_state(core)
}

/// Everything the server does around each request, in one layer: the request id (the
/// client's `x-request-id`, else a new one) on the answer, the `request` span every log
/// line of the request carries, an error log for a 500, and `Connection: close` on HTTP/1
/// answers while draining.
///
/// One layer, not tower-http's request-id and trace layers and a `from_fn` middleware:
/// each of those wraps the request in a future of its own, the request-id layer stores the
/// id in the request's headers and extensions (an allocation) for the others to read back,
/// and `from_fn` boxes the rest of the stack per request, 3-5 µs of CPU per request in all
/// (`examples/middleware_bench.rs`, docs/performance.md).
#[derive(Clone)]
struct RequestLayer {
    core: Arc<Core>,
    ids: RequestCounter,
}

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
struct RequestService<S> {
    inner: S,
    layer: RequestLayer,
}

const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

impl<S> tower::Service<Request<Body>> for RequestService<S>
where
    S: tower::Service<Request<Body>, Response = Response, Error = std::convert::Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The service that was polled ready serves this request; a clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = std::time::Instant::now();
        let id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => self.layer.ids.next(),
        };
        let span = tracing::info_span!(
            "request",
            request_id = id.to_str().unwrap_or("-"),
            method = %request.method(),
            path = request.uri().path()
        );
        let http1 = request.version() < axum::http::Version::HTTP_2;
        let core = self.layer.core.clone();
        let answer = async move {
            let Ok(mut response) = inner.call(request).await;
            let status = response.status();
            // Most 5xx are expected and counted in the metrics: readiness at 503 while
            // loading or draining, 503 for an unhealthy model, 504 on a timeout. Only a 500
            // (a bug) is an error.
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(
                    status = 500,
                    latency_ms = started.elapsed().as_secs_f64() * 1e3,
                    "internal server error"
                );
            } else if status.is_server_error() {
                tracing::debug!(status = status.as_u16(), "answered with a server status");
            }
            tracing::debug!(
                status = status.as_u16(),
                latency_us = started.elapsed().as_micros() as u64,
                "answered"
            );
            let headers = response.headers_mut();
            if !headers.contains_key(&X_REQUEST_ID) {
                headers.insert(X_REQUEST_ID, id);
            }
            // During the drain a client looping on a keep-alive connection then opens a
            // new one for its next request, which either reaches the still-open listener
            // or is refused at connect, where it knows nothing was sent; otherwise the
            // listener's close races requests already written to idle connections, and
            // those are lost unanswered. (HTTP/2 has GOAWAY for this, and forbids the
            // header.)
            if http1 && core.is_shutting_down() {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        };
        Box::pin(tracing::Instrument::instrument(answer, span))
    }
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

impl RequestCounter {
    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}-{n}", self.prefix)).expect("hex digits, a dash and digits")
    }
}

async fn ready(State(core): State<Arc<Core>>) -> Response {
    let reasons = core.not_ready_reasons();
    if reasons.is_empty() {
        axum::Json(Status { status: "ready" }).into_response()
    } else {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(NotReady {
                status: "not_ready",
                error: reasons.join("; "),
                error_type: "not_ready",
                reasons,
            }),
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

/// `GET /health/live`, and `/health/ready` when ready.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Status {
    pub status: &'static str,
}

/// Readiness refused: why, as an error body with the reasons listed.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct NotReady {
    pub status: &'static str,
    pub error: String,
    pub error_type: &'static str,
    pub reasons: Vec<String>,
}
