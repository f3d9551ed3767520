//! The core: one predict path for every protocol.
//!
//! A front end decodes its request into a [`PredictRequest`]: which model, the mode
//! parameters as it found them ([`mode::ModeParams`]), and an [`Inputs`] that turns the
//! body into tensors once the model is known. [`Core::predict`] decides everything the
//! request means, once: the model, the mode and its guards, admission, the pool, the
//! timeout, inference, the statistics and the metrics. The front end then only encodes
//! the typed [`Answer`].

pub mod adaptive;
pub mod admission;
pub mod auth;
pub mod drift;
mod engine_errors;
pub mod guarantees;
pub mod json_inputs;
pub mod memory_budget;
pub mod metrics;
pub mod mode;
pub mod models_folder;
pub mod offline;
pub mod queue;
pub mod tensors;
pub mod view;
mod worker;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tract_onnx::prelude::Tensor;

use crate::engine::model::{LoadedModel, McOutput, NamedTensor};
use crate::engine::repo::ModelRepo;
use crate::error::Error;
use admission::{Admission, panic_message};
use auth::ApiKeys;
use metrics::{Metrics, UNKNOWN_MODEL};
use mode::{McRequest, Mode, ModeLabel, ModeParams};
use queue::{Job, Pending, Queue};

/// Limits and knobs of the predict path.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_mc_samples: usize,
    /// Admission capacity in cost units; a request costs rows × samples (eval: rows).
    pub max_inflight_cost: u32,
    pub max_batch_rows: usize,
    /// The byte budget that admission and pass sizing share (see [`memory`]).
    pub max_memory_bytes: u64,
    /// Most values a `return_samples` answer may hold.
    pub max_returned_samples: u64,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    /// Inference threads.
    pub workers: usize,
    /// How long a worker holding a mergeable request waits for others to share its pass
    /// (zero: never; requests that arrive during a pass still share the next one).
    pub max_batch_delay: Duration,
    /// Most request rows merged into one pass.
    pub max_pass_rows: usize,
    /// Drift windows (a model's `model.json` may set its own window) and their α.
    pub drift: drift::DriftSettings,
    /// The runtime of models whose `model.json` names none.
    pub backend: crate::engine::backend::Backend,
}

/// The protocol a request came by: the `protocol` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/predict`, `/models/{name}/predict`.
    Native,
    /// Open Inference Protocol v2 over REST (`/v2/...`).
    OipRest,
    /// Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`).
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Native => "native",
            Protocol::OipRest => "oip",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Every model serves one version.
pub const MODEL_VERSION: &str = "1";

/// Which version a request may name: none (or empty, gRPC's default), or the one served;
/// another is not found, on every protocol.
pub fn check_version(model: &str, version: Option<&str>) -> Result<(), Error> {
    match version {
        None | Some("") | Some(MODEL_VERSION) => Ok(()),
        Some(v) => Err(Error::ModelNotFound(format!(
            "model '{model}' has no version '{v}'; it serves version {MODEL_VERSION}"
        ))),
    }
}

/// The body of a request, still in its protocol's form. Decoding runs on the worker
/// pool, after admission: a 64 MiB JSON body is CPU work.
pub trait Inputs: Send + 'static {
    /// An upper bound on the request's rows, known before decoding: the admission cost and
    /// the memory reserved before the body is decoded.
    fn rows_bound(&self, model: &LoadedModel) -> usize;
    /// The model's inputs, in its input order.
    fn decode(self, model: &LoadedModel) -> Result<Vec<Tensor>, Error>;
}

pub struct PredictRequest<I> {
    pub protocol: Protocol,
    /// None: the default model.
    pub model: Option<String>,
    pub params: ModeParams,
    pub inputs: I,
}

/// What inference produced, typed by mode.
pub enum Answer {
    Eval(Vec<NamedTensor>),
    McDropout(McAnswer),
}

pub struct McAnswer {
    pub request: McRequest,
    /// Samples drawn: the request's count, or what `mc_samples=auto` chose.
    pub samples: usize,
    /// For `mc_samples=auto`: whether it met its criterion, and the criterion.
    pub auto: Option<adaptive::AutoOutcome>,
    pub outputs: Vec<McOutput>,
    /// Per output, in order: what the model's calibration adds.
    pub calibrated: Vec<Option<guarantees::Calibrated>>,
}

/// The outcome of a predict request, with the mode it asked for (what the front end
/// reports, e.g. in `x-inference-mode`, whether or not the request succeeded).
pub struct Reply<T> {
    pub mode: ModeLabel,
    pub result: Result<T, Error>,
}

pub struct Core {
    repo: RwLock<Option<Arc<ModelRepo>>>,
    /// Readiness, for the front ends that push it (gRPC health).
    ready: tokio::sync::watch::Sender<bool>,
    shutting_down: AtomicBool,
    /// None: several models and none named (`POST /predict` is then 404).
    pub default_model: Option<String>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub keys: ApiKeys,
    admission: Admission,
    queue: Queue,
    memory: memory_budget::MemoryBudget,
    /// Per model with a drift reference: its drift monitors (rebuilt at each install).
    drift_monitors: RwLock<std::collections::HashMap<String, drift::Monitors>>,
    drift_tester: drift::Tester,
}

impl Core {
    pub fn new(default_model: Option<String>, limits: Limits, keys: ApiKeys) -> Arc<Self> {
        let metrics = Metrics::new();
        let admission = Admission::new(limits.max_inflight_cost, metrics.held_cost.clone());
        Arc::new_cyclic(|core| Core {
            repo: RwLock::new(None),
            ready: tokio::sync::watch::Sender::new(false),
            shutting_down: AtomicBool::new(false),
            default_model,
            drift_tester: drift::Tester::start(metrics.drift.clone()),
            metrics,
            drift_monitors: RwLock::new(Default::default()),
            admission,
            // Requests are merged by count here and split into passes by their real rows
            // once decoded: a request has at least one row.
            queue: Queue::start(
                core.clone(),
                limits.workers,
                limits.max_batch_delay,
                limits.max_pass_rows,
            ),
            memory: memory_budget::MemoryBudget::new(limits.max_memory_bytes, limits.max_returned_samples),
            limits,
            keys,
        })
    }

    pub fn repo(&self) -> Option<Arc<ModelRepo>> {
        self.repo.read().expect("repo lock poisoned: this is a bug").clone()
    }

    /// The drift monitors of a model; None: it has no drift reference, monitoring is off
    /// (a window of 0), or there is no such model.
    pub fn drift_monitors(&self, model: &str) -> Option<drift::Monitors> {
        self.drift_monitors
            .read()
            .expect("drift lock poisoned: this is a bug")
            .get(model)
            .cloned()
    }

    /// Installs a (re)loaded repository and publishes its metrics.
    pub fn install(&self, repo: ModelRepo) {
        self.metrics.install(&repo);
        let pass_budget = memory_budget::MemoryBudget::pass_bytes(self.limits.max_memory_bytes, self.limits.workers);
        repo.models.values().for_each(|m| m.set_pass_budget(pass_budget));
        let monitors = repo
            .models
            .iter()
            .filter_map(|(name, m)| {
                let settings = drift::DriftSettings {
                    window: m.config.drift_window.unwrap_or(self.limits.drift.window),
                    ..self.limits.drift
                };
                let monitors = drift::Monitors::new(name, m.drift_reference.as_ref()?, settings, &self.metrics.drift);
                (!monitors.is_empty()).then(|| (name.clone(), monitors))
            })
            .collect();
        *self.drift_monitors.write().expect("drift lock poisoned: this is a bug") = monitors;
        *self.repo.write().expect("repo lock poisoned: this is a bug") = Some(Arc::new(repo));
        self.refresh_ready();
    }

    /// Whether a call may go on: always, without a key file; else only with a known key
    /// in its `Authorization` (HTTP header or gRPC metadata), sent once: with several,
    /// which one counts would be a guess (proxies differ on first or last), so the call
    /// is refused. A refusal is counted.
    pub fn authorize(&self, protocol: Protocol, authorization: &[&[u8]]) -> Result<(), Error> {
        let checked = match authorization {
            [_, _, ..] if self.keys.required() => Err(Error::Unauthorized(format!(
                "{} Authorization headers; send exactly one",
                authorization.len()
            ))),
            _ => self.keys.check(authorization.first().copied()),
        };
        checked.inspect_err(|e| {
            self.metrics.auth_failures.with_label_values(&[protocol.as_str()]).inc();
            // The reason only: never the header, which holds the key.
            tracing::info!(protocol = protocol.as_str(), error = %e, "unauthorized");
        })
    }

    /// Reserves, from the memory budget passes share, what reading and decoding a request
    /// body of `body_bytes` may hold (see [`memory_budget::JSON_BODY_FACTOR`]).
    pub fn reserve_body(&self, body_bytes: u64) -> Result<memory_budget::MemoryPermit, Error> {
        self.memory.reserve_body(body_bytes)
    }

    /// Grows a body's reservation to the `read` bytes that have arrived, for a body whose
    /// length was not declared.
    pub fn grow_body(&self, permit: &mut memory_budget::MemoryPermit, read: u64) -> Result<(), Error> {
        self.memory.grow_body(permit, read)
    }

    /// Whether the drain has begun (readiness is 503 from then on).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.refresh_ready();
    }

    fn refresh_ready(&self) {
        let ready = self.not_ready_reasons().is_empty();
        self.metrics.ready.set(ready as i64);
        self.ready.send_replace(ready);
    }

    /// Follows readiness as it changes.
    pub fn watch_ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Empty when ready. Readiness means every model that should serve has a healthy
    /// version serving, and the server is not stopping. Every model of the folder at start
    /// should; a file that first appears on a reload should not until it loads. So neither
    /// a failed reload of a model that keeps serving its last good version nor a new file
    /// that fails to load is a readiness matter: the same bad file reaches every replica,
    /// and taking them all out of the Service would stop models that still answer. Both
    /// show in `/models`, `mcd_model_load_failures` and an alert
    /// ([`LoadFailure::blocks_readiness`](crate::engine::repo::LoadFailure)).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = vec![];
        if self.shutting_down.load(Ordering::SeqCst) {
            reasons.push("the server is shutting down".to_string());
        }
        match self.repo() {
            None => reasons.push("models are still loading".into()),
            Some(repo) => {
                for f in repo.failures.iter().filter(|f| f.blocks_readiness) {
                    reasons.push(format!(
                        "model '{}' failed to load from {}: {}",
                        f.model,
                        f.file.display(),
                        f.reason
                    ));
                }
                for (name, m) in repo.models.iter().filter(|(_, m)| !m.healthy()) {
                    reasons.push(format!("model '{name}' failed its self-checks: {}", m.failed_checks()));
                }
            }
        }
        reasons
    }

    /// The model a request names (None: the default model), or why there is none: a model
    /// that never loaded is 503 with its load failure, not 404.
    pub fn model(&self, name: Option<&str>) -> Result<Arc<LoadedModel>, Error> {
        self.lookup(name).1
    }

    /// [`model`](Self::model), read from one snapshot of the repository together with the
    /// name the request's metrics carry: a model of the folder (loaded or failed), else
    /// [`UNKNOWN_MODEL`], so a client cannot grow the label set.
    fn lookup(&self, name: Option<&str>) -> (String, Result<Arc<LoadedModel>, Error>) {
        let unknown = |e| (UNKNOWN_MODEL.to_string(), Err(e));
        let Some(repo) = self.repo() else {
            return unknown(Error::NotReady("models are still loading".into()));
        };
        let Some(name) = name.or(self.default_model.as_deref()) else {
            let names: Vec<&str> = repo.models.keys().map(String::as_str).collect();
            return unknown(Error::NoDefaultModel(format!(
                "no default model: this server serves {} models ({}); call /models/{{name}}/predict, or start it with --default-model NAME (MCD_DEFAULT_MODEL)",
                names.len(),
                names.join(", ")
            )));
        };
        if let Some(m) = repo.models.get(name) {
            return (name.to_string(), Ok(m.clone()));
        }
        match repo.failures.iter().find(|f| f.model == name) {
            Some(f) => (
                name.to_string(),
                Err(Error::ModelUnhealthy(format!(
                    "model '{name}' failed to load from {}: {}",
                    f.file.display(),
                    f.reason
                ))),
            ),
            None => unknown(Error::ModelNotFound(format!("no model named '{name}'"))),
        }
    }

    /// Whether a model exists, has passed its eval checks, and the server is not stopping.
    pub fn model_ready(&self, name: &str) -> Result<bool, Error> {
        match self.model(Some(name)) {
            Ok(model) => Ok(model.healthy() && !self.shutting_down.load(Ordering::SeqCst)),
            Err(Error::ModelUnhealthy(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The one predict path. `encode` turns the typed answer into the protocol's body; it
    /// runs on the worker pool too, because encoding a large answer is CPU work.
    pub async fn predict<I: Inputs, T: Send + 'static>(
        self: &Arc<Self>,
        request: PredictRequest<I>,
        encode: impl FnOnce(&LoadedModel, Answer) -> Result<T, Error> + Send + 'static,
    ) -> Reply<T> {
        let started = Instant::now();
        let _inflight = Inflight::new(&self.metrics.inflight);
        let label = request.params.label();
        let protocol = request.protocol;
        let (model_label, model) = self.lookup(request.model.as_deref());
        let result = match model {
            Ok(model) => self.run(model, request, encode).await,
            Err(e) => Err(e),
        };
        self.record(protocol, &model_label, label, result.as_ref().err(), started);
        Reply { mode: label, result }
    }

    /// Counts a request that its front end refused before it could reach
    /// [`predict`](Self::predict) (a body that is not the protocol's syntax, an unknown
    /// query parameter), and hands its error back.
    pub fn refuse(&self, protocol: Protocol, model: Option<&str>, mode: ModeLabel, error: Error) -> Error {
        let (model, _) = self.lookup(model);
        self.record(protocol, &model, mode, Some(&error), Instant::now());
        error
    }

    /// Counts and logs (at debug) a gRPC call whose message did not decode: no model and no
    /// mode are known, so it counts under `_unknown` and eval, with the reason
    /// `malformed_protobuf` among the rejections.
    pub fn refuse_undecodable(&self, error: Error) -> Error {
        let m = &self.metrics;
        m.rejected.with_label_values(&[error.error_type()]).inc();
        let status = error.status().as_u16().to_string();
        m.requests
            .with_label_values(&[
                UNKNOWN_MODEL,
                ModeLabel::Eval.as_str(),
                &status,
                Protocol::Grpc.as_str(),
            ])
            .inc();
        tracing::debug!(protocol = Protocol::Grpc.as_str(), error_type = error.error_type(), error = %error, "undecodable request refused");
        error
    }

    async fn run<I: Inputs, T: Send + 'static>(
        self: &Arc<Self>,
        model: Arc<LoadedModel>,
        request: PredictRequest<I>,
        encode: impl FnOnce(&LoadedModel, Answer) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let m = &self.metrics;
        let mode = mode::decide(&request.params, self.limits.max_mc_samples).map_err(|refusal| {
            if let Some(reason) = refusal.violation {
                m.mode_violations
                    .with_label_values(&[model.name.as_str(), reason])
                    .inc();
            }
            refusal.error
        })?;
        if !model.healthy() {
            return Err(Error::ModelUnhealthy(format!(
                "model '{}' failed its load-time self-checks; see GET /models/{}",
                model.name, model.name
            )));
        }
        let samples = match mode {
            Mode::Eval => 1,
            Mode::McDropout(mc) => {
                // Refuse before doing any work: a model without live dropout never answers MC.
                if let Err(e) = model.mc_session() {
                    m.mode_violations
                        .with_label_values(&[model.name.as_str(), "mc_unavailable"])
                        .inc();
                    return Err(e.into());
                }
                model.check_statistics(mc.requested).map_err(Error::InvalidParameter)?;
                mc.samples.bound()
            }
        };
        // Read once: for a native body the bound is a scan of the whole body.
        let rows_bound = request.inputs.rows_bound(&model).max(1);
        let admitted = self
            .admission
            .admit((rows_bound as u64).saturating_mul(samples as u64))?;
        // Memory is reserved on the rows' upper bound (the batch guard refuses more rows
        // than the limit after decoding), and shrinks to the estimate once decoded.
        let rows = rows_bound.min(self.limits.max_batch_rows);
        let reserved = self.memory.reserve_request(&model, rows, &mode)?;
        let held = admitted.held();
        let (tx, rx) = oneshot::channel();
        self.queue.submit(Job {
            class: worker::pass_class(&model, &mode),
            model,
            mode,
            enqueued: Instant::now(),
            request: Box::new(Request {
                inputs: Some(request.inputs),
                encode,
                tx,
                admitted,
                reserved,
            }),
        });
        match tokio::time::timeout(self.limits.request_timeout, rx).await {
            // Dropping `rx` marks the job abandoned: a worker that has not started it skips it.
            Err(_) => {
                held.timed_out();
                Err(Error::Timeout(self.limits.request_timeout))
            }
            Ok(Err(_)) => Err(Error::Internal("the inference worker stopped".into())),
            Ok(Ok(result)) => result,
        }
    }

    fn record(&self, protocol: Protocol, model: &str, mode: ModeLabel, error: Option<&Error>, started: Instant) {
        let m = &self.metrics;
        let status = error.map_or(200, |e| e.status().as_u16());
        match error {
            Some(Error::Overloaded) => m.rejected.with_label_values(&["overloaded"]).inc(),
            Some(Error::Timeout(_)) => m.rejected.with_label_values(&["timeout"]).inc(),
            Some(Error::NotReady(_)) => m.rejected.with_label_values(&["not_ready"]).inc(),
            Some(Error::PayloadTooLarge(_)) => m.rejected.with_label_values(&["payload_too_large"]).inc(),
            _ => {}
        }
        let seconds = started.elapsed().as_secs_f64();
        let (protocol, mode) = (protocol.as_str(), mode.as_str());
        m.requests
            .with_label_values(&[model, mode, &status.to_string(), protocol])
            .inc();
        m.request_duration
            .with_label_values(&[model, mode, protocol])
            .observe(seconds);
        match error {
            // Successes log at debug: at tens of thousands of requests a second an info line
            // each is a measurable share of the server's CPU. Metrics count them regardless.
            None => tracing::debug!(model, mode, protocol, status, seconds, "predict"),
            Some(e) => {
                tracing::info!(model, mode, protocol, status, seconds, error_type = e.error_type(), error = %e, "predict refused")
            }
        }
    }
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

/// A queued request, typed by its front end's answer `T`.
struct Request<I, E, T> {
    inputs: Option<I>,
    encode: E,
    tx: oneshot::Sender<Result<T, Error>>,
    /// Its admission and its memory: given back when the work ends, before the answer is
    /// sent.
    admitted: admission::Admitted,
    reserved: memory_budget::MemoryPermit,
}

impl<I, E, T> Pending for Request<I, E, T>
where
    I: Inputs,
    E: FnOnce(&LoadedModel, Answer) -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    fn abandoned(&self) -> bool {
        self.tx.is_closed()
    }

    fn decode(&mut self, model: &LoadedModel) -> Result<Vec<Tensor>, Error> {
        match self.inputs.take() {
            Some(inputs) => inputs.decode(model),
            None => Err(Error::Internal("a request was decoded twice: this is a bug".into())),
        }
    }

    fn shrink_reservation(&mut self, bytes: u64) {
        self.reserved.shrink_to(bytes);
    }

    fn respond(self: Box<Self>, model: &LoadedModel, answer: Result<Answer, Error>) -> Option<String> {
        let Request {
            encode,
            tx,
            admitted,
            reserved,
            ..
        } = *self;
        let mut panicked = None;
        let body = answer.and_then(|answer| {
            std::panic::catch_unwind(AssertUnwindSafe(|| encode(model, answer))).unwrap_or_else(|panic| {
                panicked = Some(panic_message(&*panic));
                Err(Error::Internal("inference panicked; the server keeps serving".into()))
            })
        });
        // Capacity comes back before the answer leaves: a client that sends its next
        // request as soon as it reads this one must find the budget free.
        drop((admitted, reserved));
        let _ = tx.send(body);
        panicked
    }
}
