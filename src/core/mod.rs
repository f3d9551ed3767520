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
pub mod calibrated;
pub mod metrics;
pub mod mode;
pub mod tensors;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tract_onnx::prelude::Tensor;

use crate::engine::model::{Batch, LoadedModel, McOutput, NamedTensor, Outcome};
use crate::engine::repo::ModelRepo;
use crate::error::Error;
use admission::{Admission, PoolError};
use metrics::{Metrics, UNKNOWN_MODEL};
use mode::{McRequest, Mode, ModeLabel, ModeParams};

/// Limits and knobs of the predict path.
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
    /// An upper bound on the request's rows, known before decoding: the admission cost.
    fn rows_bound(&self) -> usize;
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
    pub calibrated: Vec<Option<calibrated::Calibrated>>,
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
    pub default_model: String,
    pub metrics: Metrics,
    pub limits: Limits,
    admission: Admission,
}

impl Core {
    pub fn new(default_model: String, limits: Limits) -> Arc<Self> {
        Arc::new(Core {
            repo: RwLock::new(None),
            ready: tokio::sync::watch::Sender::new(false),
            shutting_down: AtomicBool::new(false),
            default_model,
            metrics: Metrics::new(),
            admission: Admission::new(limits.max_inflight_cost, limits.workers, limits.request_timeout),
            limits,
        })
    }

    pub fn repo(&self) -> Option<Arc<ModelRepo>> {
        self.repo.read().expect("repo lock poisoned: this is a bug").clone()
    }

    /// Installs a (re)loaded repository and publishes its metrics.
    pub fn install(&self, repo: ModelRepo) {
        self.metrics.install(&repo);
        *self.repo.write().expect("repo lock poisoned: this is a bug") = Some(Arc::new(repo));
        self.refresh_ready();
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
                        .filter(|c| c.result == Outcome::Fail && c.check != "mc_live")
                    {
                        reasons.push(format!("model '{name}' failed self-check {}: {}", c.check, c.detail));
                    }
                }
            }
        }
        reasons
    }

    /// The model a metadata request names (None: the default model), or why there is none.
    pub fn model(&self, name: Option<&str>) -> Result<Arc<LoadedModel>, Error> {
        let repo = self
            .repo()
            .ok_or_else(|| Error::NotReady("models are still loading".into()))?;
        let name = name.unwrap_or(&self.default_model);
        repo.models
            .get(name)
            .cloned()
            .ok_or_else(|| Error::ModelNotFound(format!("no model named '{name}'")))
    }

    /// Whether a model exists, has passed its eval checks, and the server is not stopping.
    pub fn model_ready(&self, name: &str) -> Result<bool, Error> {
        let model = self.model(Some(name))?;
        Ok(model.healthy() && !self.shutting_down.load(Ordering::SeqCst))
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
        let name = request.model.clone().unwrap_or_else(|| self.default_model.clone());
        let model = self.model(Some(&name));
        let model_label = if model.is_ok() { name.as_str() } else { UNKNOWN_MODEL };
        let result = match model {
            Ok(model) => self.run(model, request, encode).await,
            Err(e) => Err(e),
        };
        self.record(protocol, model_label, label, result.as_ref().err(), started);
        Reply { mode: label, result }
    }

    /// Counts a request that its front end refused before it could reach
    /// [`predict`](Self::predict) (a body that is not the protocol's syntax, an unknown
    /// query parameter), and hands its error back.
    pub fn refuse(&self, protocol: Protocol, model: Option<&str>, mode: ModeLabel, error: Error) -> Error {
        let name = model.unwrap_or(&self.default_model);
        let known = self.repo().is_some_and(|r| r.models.contains_key(name));
        let model = if known { name } else { UNKNOWN_MODEL };
        self.record(protocol, model, mode, Some(&error), Instant::now());
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
                    return Err(e);
                }
                mc.samples.bound()
            }
        };
        let cost = (request.inputs.rows_bound().max(1) as u64).saturating_mul(samples as u64);
        let core = self.clone();
        let inputs = request.inputs;
        let work = move || {
            let batch = core.batch(&model, inputs)?;
            let answer = core.infer(&model, &batch, mode)?;
            encode(&model, answer)
        };
        match self.admission.run(cost, work).await {
            Ok(result) => result,
            Err(PoolError::Rejected(e)) => Err(e),
            Err(PoolError::Panicked(message)) => {
                m.panics.inc();
                tracing::error!(panic = %message, "inference panicked");
                Err(Error::Internal("inference panicked; the server keeps serving".into()))
            }
        }
    }

    fn batch(&self, model: &LoadedModel, inputs: impl Inputs) -> Result<Batch, Error> {
        let batch = model.batch(inputs.decode(model)?)?;
        let max_rows = self.limits.max_batch_rows;
        if batch.rows() > max_rows {
            return Err(Error::PayloadTooLarge(format!(
                "batch of {} rows exceeds the limit of {max_rows}",
                batch.rows()
            )));
        }
        Ok(batch)
    }

    fn infer(&self, model: &LoadedModel, batch: &Batch, mode: Mode) -> Result<Answer, Error> {
        let t = Instant::now();
        let answer = match mode {
            Mode::Eval => Answer::Eval(model.eval_session().run(batch)?),
            Mode::McDropout(request) => {
                let (outputs, samples, auto) = adaptive::draw(&model.mc_session()?, batch, request)?;
                self.metrics
                    .mc_samples
                    .with_label_values(&[model.name.as_str()])
                    .observe(samples as f64);
                for o in &outputs {
                    if let Some(e) = &o.stats.entropy {
                        let hist = self
                            .metrics
                            .predictive_entropy
                            .with_label_values(&[model.name.as_str(), o.name.as_str()]);
                        for h in &e.predictive_entropy {
                            hist.observe(*h);
                        }
                    }
                }
                let calibrated = calibrated::compute(model, &outputs)?;
                self.record_calibrated(model, &outputs, &calibrated);
                Answer::McDropout(McAnswer {
                    request,
                    samples,
                    auto,
                    outputs,
                    calibrated,
                })
            }
        };
        self.metrics
            .inference_duration
            .with_label_values(&[model.name.as_str(), mode.label().as_str()])
            .observe(t.elapsed().as_secs_f64());
        Ok(answer)
    }

    fn record_calibrated(
        &self,
        model: &LoadedModel,
        outputs: &[McOutput],
        calibrated: &[Option<calibrated::Calibrated>],
    ) {
        for (o, c) in outputs.iter().zip(calibrated) {
            let Some(calibrated::Calibrated::Sets(sets)) = c else {
                continue;
            };
            let labels = [model.name.as_str(), o.name.as_str()];
            let referred = sets.refer.iter().filter(|r| **r).count();
            self.metrics
                .referrals
                .with_label_values(&labels)
                .inc_by(referred as u64);
            let sizes = self.metrics.prediction_set_size.with_label_values(&labels);
            let at = |(level, _): &&(f64, Vec<Vec<usize>>)| *level == crate::engine::calibration::METRIC_SET_LEVEL;
            for row in sets.sets.iter().find(at).map(|(_, rows)| rows).into_iter().flatten() {
                sizes.observe(row.len() as f64);
            }
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
