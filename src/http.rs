//! The HTTP surface: routes, the per-mode predict paths, health, metadata and metrics.
//!
//! Each predict request declares its mode through its query: no `mc_samples` is eval,
//! `mc_samples=N` is MC dropout. The two modes run through different functions that reach
//! different session types ([`EvalSession`](crate::model::EvalSession) and
//! [`McSession`](crate::model::McSession)), so an eval request cannot touch a mask and an
//! MC request cannot be quietly answered in eval mode.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::Error;
use crate::metrics::{Metrics, UNKNOWN_MODEL};
use crate::model::{LoadedModel, McSamples};
use crate::repo::ModelRepo;
use crate::tensor_json::{floats_to_json, parse_request, tensor_to_json};

pub const MODE_HEADER: &str = "x-inference-mode";

/// Limits and knobs of the HTTP layer.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_mc_samples: usize,
    /// Admission capacity in cost units; a request costs rows × samples (eval: rows).
    pub max_inflight_cost: u32,
    pub max_batch_rows: usize,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    pub workers: usize,
}

pub struct AppState {
    repo: RwLock<Option<Arc<ModelRepo>>>,
    shutting_down: AtomicBool,
    pub default_model: String,
    pub metrics: Metrics,
    pub limits: Limits,
    cost: Arc<Semaphore>,
    workers: Arc<Semaphore>,
}

impl AppState {
    pub fn new(default_model: String, limits: Limits) -> Arc<Self> {
        Arc::new(AppState {
            repo: RwLock::new(None),
            shutting_down: AtomicBool::new(false),
            default_model,
            metrics: Metrics::new(),
            cost: Arc::new(Semaphore::new(limits.max_inflight_cost as usize)),
            workers: Arc::new(Semaphore::new(limits.workers.max(1))),
            limits,
        })
    }

    pub fn repo(&self) -> Option<Arc<ModelRepo>> {
        self.repo.read().expect("repo lock poisoned: this is a bug").clone()
    }

    /// Installs a (re)loaded repository and publishes its metrics.
    pub fn install(&self, repo: ModelRepo) {
        let m = &self.metrics;
        m.model_info.reset();
        for (name, model) in &repo.models {
            m.model_info
                .with_label_values(&[name.as_str(), &model.sampling_sites().to_string()])
                .set(1);
            for c in &model.checks {
                m.mode_checks
                    .with_label_values(&[name.as_str(), c.check, c.result.as_str()])
                    .inc();
            }
        }
        for (name, t) in &repo.load_times {
            tracing::info!(model = %name, seconds = t.as_secs_f64(), "model loaded");
            m.startup_seconds.observe(t.as_secs_f64());
        }
        m.load_failures.set(repo.failures.len() as i64);
        *self.repo.write().expect("repo lock poisoned: this is a bug") = Some(Arc::new(repo));
        self.refresh_ready();
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.refresh_ready();
    }

    fn refresh_ready(&self) {
        self.metrics.ready.set(self.not_ready_reasons().is_empty() as i64);
    }

    /// Empty when ready: every model loaded, every eval check passed, not shutting down.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = vec![];
        if self.shutting_down.load(Ordering::SeqCst) {
            reasons.push("the server is shutting down".to_string());
        }
        match self.repo() {
            None => reasons.push("models are still loading".into()),
            Some(repo) => {
                for f in &repo.failures {
                    reasons.push(format!(
                        "model '{}' failed to load from {}: {}",
                        f.model,
                        f.file.display(),
                        f.reason
                    ));
                }
                for (name, m) in &repo.models {
                    for c in m
                        .checks
                        .iter()
                        .filter(|c| c.result == crate::model::Outcome::Fail && c.check != "mc_live")
                    {
                        reasons.push(format!("model '{name}' failed self-check {}: {}", c.check, c.detail));
                    }
                }
            }
        }
        reasons
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.body_limit_bytes;
    let panic_state = state.clone();
    Router::new()
        .route("/predict", post(predict_default))
        .route("/models/{name}/predict", post(predict_named))
        .route("/models", get(list_models))
        .route("/models/{name}", get(model_metadata))
        .route("/health/live", get(|| async { axum::Json(json!({"status": "live"})) }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { Error::RouteNotFound(uri.path().to_string()) })
        .method_not_allowed_fallback(|method: Method| async move { Error::MethodNotAllowed(method.to_string()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(move |panic: Box<dyn std::any::Any + Send>| {
            panic_state.metrics.panics.inc();
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
        .with_state(state)
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

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// What a predict request asked for, once its query is validated.
enum Mode {
    Eval,
    McDropout {
        samples: McSamples,
        seed: u64,
        return_samples: bool,
    },
}

impl Mode {
    fn label(requested_mc: bool) -> &'static str {
        if requested_mc { "mc_dropout" } else { "eval" }
    }
}

/// Every `reason` label of `mcd_mode_violations_total`.
pub const VIOLATION_REASONS: [&str; 3] = ["seed_without_mc", "return_samples_without_mc", "mc_unavailable"];

/// A refused request whose parameters contradict its mode: the reason label for metrics.
struct Violation(&'static str, Error);

fn parse_mode(query: Option<&str>, max_samples: usize) -> Result<Mode, Violation> {
    let plain = |e: Error| Violation("", e);
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| plain(Error::InvalidParameter(format!("query string is malformed: {e}"))))?;
    let mut mc_samples = None;
    let mut seed = None;
    let mut return_samples = None;
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "mc_samples" => &mut mc_samples,
            "seed" => &mut seed,
            "return_samples" => &mut return_samples,
            other => {
                return Err(plain(Error::InvalidParameter(format!(
                    "unknown query parameter '{other}'; the known ones are mc_samples, seed and return_samples"
                ))));
            }
        };
        if slot.replace(v).is_some() {
            return Err(plain(Error::InvalidParameter(format!(
                "query parameter '{k}' is given twice"
            ))));
        }
    }
    let Some(n) = mc_samples else {
        if seed.is_some() {
            return Err(Violation(
                "seed_without_mc",
                Error::ModeMismatch(
                    "'seed' only applies to MC dropout: add mc_samples=N, or drop seed for an eval answer".into(),
                ),
            ));
        }
        if return_samples.is_some() {
            return Err(Violation(
                "return_samples_without_mc",
                Error::ModeMismatch("'return_samples' only applies to MC dropout: add mc_samples=N".into()),
            ));
        }
        return Ok(Mode::Eval);
    };
    let samples = n
        .trim()
        .parse::<usize>()
        .map_err(|_| {
            plain(Error::InvalidParameter(format!(
                "mc_samples must be an integer in [2, {max_samples}], got '{n}'"
            )))
        })
        .and_then(|n| McSamples::new(n, max_samples).map_err(plain))?;
    let seed = match seed {
        None => rand::random::<u64>() >> 11, // below 2^53, so JavaScript clients read it exactly
        Some(s) => s.trim().parse::<u64>().map_err(|_| {
            plain(Error::InvalidParameter(format!(
                "seed must be an unsigned 64-bit integer, got '{s}'"
            )))
        })?,
    };
    let return_samples = match return_samples.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(plain(Error::InvalidParameter(format!(
                "return_samples must be true or false, got '{other}'"
            ))));
        }
    };
    Ok(Mode::McDropout {
        samples,
        seed,
        return_samples,
    })
}

async fn predict_default(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let name = state.default_model.clone();
    predict(state, name, query, body).await
}

async fn predict_named(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    predict(state, name, query, body).await
}

struct Inflight<'a>(&'a prometheus::IntGauge);
impl<'a> Inflight<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Inflight(g)
    }
}
impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn predict(
    state: Arc<AppState>,
    name: String,
    query: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let _inflight = Inflight::new(&state.metrics.inflight);
    let requested_mc = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("mc_samples")));
    let mode_label = Mode::label(requested_mc);
    let repo = state.repo();
    let model = repo.as_ref().and_then(|r| r.models.get(&name)).cloned();
    let model_label = if model.is_some() { name.as_str() } else { UNKNOWN_MODEL };

    let result = match (repo, model) {
        (None, _) => {
            state.metrics.rejected.with_label_values(&["not_ready"]).inc();
            Err(Error::NotReady("models are still loading".into()))
        }
        (Some(_), None) => Err(Error::ModelNotFound(format!("no model named '{name}'"))),
        (Some(_), Some(model)) => serve(&state, model, query.as_deref(), body).await,
    };
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status(),
    };
    let m = &state.metrics;
    m.requests
        .with_label_values(&[model_label, mode_label, status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[model_label, mode_label])
        .observe(started.elapsed().as_secs_f64());
    let seconds = started.elapsed().as_secs_f64();
    match &result {
        // Successes log at debug: at tens of thousands of requests a second an info line each
        // is a measurable share of the server's CPU. Metrics count them all regardless.
        Ok(_) => tracing::debug!(model = model_label, mode = mode_label, status = 200, seconds, "predict"),
        Err(e) => {
            tracing::info!(model = model_label, mode = mode_label, status = status.as_u16(), seconds, error_type = e.error_type(), error = %e, "predict refused")
        }
    }
    let mut response = match result {
        Ok(body) => (StatusCode::OK, axum::Json(body)).into_response(),
        Err(e) => e.into_response(),
    };
    response
        .headers_mut()
        .insert(MODE_HEADER, HeaderValue::from_static(mode_label));
    response
}

async fn serve(
    state: &Arc<AppState>,
    model: Arc<LoadedModel>,
    query: Option<&str>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, Error> {
    let m = &state.metrics;
    let mode = match parse_mode(query, state.limits.max_mc_samples) {
        Ok(mode) => mode,
        Err(Violation(reason, e)) => {
            if !reason.is_empty() {
                m.mode_violations
                    .with_label_values(&[model.name.as_str(), reason])
                    .inc();
            }
            return Err(e);
        }
    };
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            m.rejected.with_label_values(&["payload_too_large"]).inc();
            Error::PayloadTooLarge(format!(
                "request body exceeds the limit of {} bytes",
                state.limits.body_limit_bytes
            ))
        } else {
            Error::MalformedJson(format!("could not read the request body: {rejection}"))
        }
    })?;
    if !model.healthy() {
        return Err(Error::ModelUnhealthy(format!(
            "model '{}' failed its load-time self-checks; see GET /models/{}",
            model.name, model.name
        )));
    }
    match mode {
        Mode::Eval => predict_eval(state, model, body).await,
        Mode::McDropout {
            samples,
            seed,
            return_samples,
        } => {
            // Refuse before doing any work: a model without live dropout never answers MC.
            if let Err(e) = model.mc_session() {
                m.mode_violations
                    .with_label_values(&[model.name.as_str(), "mc_unavailable"])
                    .inc();
                return Err(e);
            }
            m.mc_samples
                .with_label_values(&[model.name.as_str()])
                .observe(samples.get() as f64);
            predict_mc(state, model, body, samples, seed, return_samples).await
        }
    }
}

/// Parses the body on the worker pool too: a 32 MiB JSON body is CPU work.
fn parse_batch(model: &LoadedModel, body: &[u8], max_rows: usize) -> Result<crate::model::Batch, Error> {
    let batch = model.batch(parse_request(model, body)?)?;
    if batch.rows() > max_rows {
        return Err(Error::PayloadTooLarge(format!(
            "batch of {} rows exceeds the limit of {max_rows}",
            batch.rows()
        )));
    }
    Ok(batch)
}

fn estimated_rows(body: &[u8]) -> u32 {
    // Cheap upper bound before parsing: rows cannot outnumber '[' characters.
    body.iter().filter(|&&b| b == b'[').count().max(1) as u32
}

async fn predict_eval(state: &Arc<AppState>, model: Arc<LoadedModel>, body: Bytes) -> Result<Value, Error> {
    let max_rows = state.limits.max_batch_rows;
    let st = state.clone();
    on_pool(state, estimated_rows(&body), move || {
        let batch = parse_batch(&model, &body, max_rows)?;
        let t = Instant::now();
        let outputs = model.eval_session().run(&batch)?;
        st.metrics
            .inference_duration
            .with_label_values(&[model.name.as_str(), "eval"])
            .observe(t.elapsed().as_secs_f64());
        let mut out = serde_json::Map::new();
        for o in &outputs {
            out.insert(o.name.clone(), tensor_to_json(&o.tensor)?);
        }
        Ok(json!({"model": model.name, "mode": "eval", "outputs": out}))
    })
    .await
}

async fn predict_mc(
    state: &Arc<AppState>,
    model: Arc<LoadedModel>,
    body: Bytes,
    samples: McSamples,
    seed: u64,
    return_samples: bool,
) -> Result<Value, Error> {
    let max_rows = state.limits.max_batch_rows;
    let st = state.clone();
    let cost = estimated_rows(&body).saturating_mul(samples.get() as u32);
    on_pool(state, cost, move || {
        let batch = parse_batch(&model, &body, max_rows)?;
        let session = model.mc_session()?;
        let t = Instant::now();
        let outputs = session.run(&batch, samples, seed, return_samples)?;
        st.metrics.inference_duration.with_label_values(&[model.name.as_str(), "mc_dropout"]).observe(t.elapsed().as_secs_f64());
        let mut out = serde_json::Map::new();
        for o in outputs {
            let s = &o.stats;
            let mut entry = serde_json::Map::new();
            entry.insert("mean".into(), floats_to_json(&o.shape, &s.mean));
            entry.insert("variance".into(), floats_to_json(&o.shape, &s.variance));
            entry.insert("std".into(), floats_to_json(&o.shape, &s.std));
            if let Some(e) = &s.entropy {
                let rows_shape = &o.shape[..o.shape.len() - 1];
                let hist = st.metrics.predictive_entropy.with_label_values(&[model.name.as_str(), o.name.as_str()]);
                for h in &e.predictive_entropy {
                    hist.observe(*h);
                }
                entry.insert("predictive_entropy".into(), floats_to_json(rows_shape, &e.predictive_entropy));
                entry.insert("expected_entropy".into(), floats_to_json(rows_shape, &e.expected_entropy));
                entry.insert("mutual_information".into(), floats_to_json(rows_shape, &e.mutual_information));
            }
            if let Some(raw) = &s.samples {
                let mut shape = vec![s.count];
                shape.extend(&o.shape);
                entry.insert("samples".into(), floats_to_json(&shape, raw));
            }
            out.insert(o.name, Value::Object(entry));
        }
        Ok(json!({"model": model.name, "mode": "mc_dropout", "mc_samples": samples.get(), "seed": seed, "outputs": out}))
    })
    .await
}

/// Runs CPU-bound work on the bounded blocking pool, after weighted admission.
///
/// Admission fails fast (429) when the cost budget is spent. The permits move into the
/// work itself, so a request that timed out still holds its capacity until the work ends;
/// work whose caller has gone before it starts is skipped.
async fn on_pool<T: Send + 'static>(
    state: &Arc<AppState>,
    cost: u32,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let m = &state.metrics;
    let cost = cost.clamp(1, state.limits.max_inflight_cost);
    let admitted = state.cost.clone().try_acquire_many_owned(cost).map_err(|_| {
        m.rejected.with_label_values(&["overloaded"]).inc();
        Error::Overloaded
    })?;
    let timeout = state.limits.request_timeout;
    let workers = state.workers.clone();
    let run = async move {
        let worker = workers
            .acquire_owned()
            .await
            .expect("worker semaphore is never closed: this is a bug");
        let (tx, rx) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let _permits = (admitted, worker);
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
        });
        rx.await
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => {
            m.rejected.with_label_values(&["timeout"]).inc();
            Err(Error::Timeout(timeout))
        }
        Ok(Err(_)) => Err(Error::Internal("the inference worker stopped".into())),
        Ok(Ok(Err(panic))) => {
            m.panics.inc();
            tracing::error!(panic = %panic_message(&*panic), "inference panicked");
            Err(Error::Internal("inference panicked; the server keeps serving".into()))
        }
        Ok(Ok(Ok(result))) => result,
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, Error> {
    let repo = state
        .repo()
        .ok_or_else(|| Error::NotReady("models are still loading".into()))?;
    let models: Vec<Value> = repo
        .models
        .values()
        .map(|m| {
            json!({
                "name": m.name,
                "default": m.name == state.default_model,
                "healthy": m.healthy(),
                "mc_available": m.mc_unavailable_reason().is_none(),
                "dropout_sites": m.sampling_sites(),
                "description": m.config.description,
            })
        })
        .collect();
    Ok(
        axum::Json(json!({"default_model": state.default_model, "models": models, "load_failures": repo.failures}))
            .into_response(),
    )
}

async fn model_metadata(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, Error> {
    let repo = state
        .repo()
        .ok_or_else(|| Error::NotReady("models are still loading".into()))?;
    let m = repo
        .models
        .get(&name)
        .ok_or_else(|| Error::ModelNotFound(format!("no model named '{name}'")))?;
    let probability_outputs: Vec<&str> = m
        .outputs
        .iter()
        .zip(&m.probability_classes)
        .filter(|(_, k)| k.is_some())
        .map(|(o, _)| o.name.as_str())
        .collect();
    Ok(axum::Json(json!({
        "name": m.name,
        "file": m.path.file_name().map(|f| f.to_string_lossy()),
        "description": m.config.description,
        "default": m.name == state.default_model,
        "inputs": m.inputs,
        "outputs": m.outputs,
        "probability_outputs": probability_outputs,
        "batch_dim": m.batch_symbol,
        "dropout_sites": m.sites,
        "graph_fixes": m.fixes,
        "self_checks": m.checks,
        "healthy": m.healthy(),
        "mc_available": m.mc_unavailable_reason().is_none(),
        "mc_unavailable_reason": m.mc_unavailable_reason(),
        "max_mc_samples": state.limits.max_mc_samples,
        "load_failure": repo.failures.iter().find(|f| f.model == name),
    }))
    .into_response())
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let reasons = state.not_ready_reasons();
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

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeArgs;

    #[tokio::test]
    async fn a_panic_in_inference_is_a_counted_500_and_the_pool_keeps_serving() {
        let state = AppState::new("m".into(), ServeArgs::for_models("models").limits());
        let r: Result<(), Error> = on_pool(&state, 1, || panic!("injected panic")).await;
        let e = r.unwrap_err();
        assert_eq!(
            (e.status(), e.error_type()),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        assert_eq!(state.metrics.panics.get(), 1);
        assert_eq!(on_pool(&state, 1, || Ok(7)).await.unwrap(), 7);
        // The admission budget comes back whole once the work has really ended (the permits
        // drop on the worker thread just after it hands over the result).
        let full = state.limits.max_inflight_cost as usize;
        for _ in 0..100 {
            if state.cost.available_permits() == full {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(state.cost.available_permits(), full);
    }

    #[test]
    fn modes_parse_from_the_query() {
        assert!(matches!(parse_mode(None, 10), Ok(Mode::Eval)));
        assert!(matches!(
            parse_mode(Some("mc_samples=5&seed=9&return_samples=true"), 10),
            Ok(Mode::McDropout {
                seed: 9,
                return_samples: true,
                ..
            })
        ));
        assert!(matches!(
            parse_mode(Some("seed=1"), 10),
            Err(Violation("seed_without_mc", _))
        ));
        assert!(matches!(
            parse_mode(Some("mc_samples=11"), 10),
            Err(Violation("", Error::InvalidParameter(_)))
        ));
    }
}
