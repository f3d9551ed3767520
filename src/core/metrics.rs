//! Prometheus metrics. Label values are bounded: model names come from the repository
//! (or the fixed `_unknown`), never from the raw URL.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::core::Protocol;
use crate::core::admission::REJECT_REASONS;
use crate::core::mode::VIOLATION_REASONS;
use crate::engine::conformal::OutputCalibration;
use crate::engine::repo::ModelRepo;

/// The `result` of `mcd_model_reloads_total`.
pub const RELOAD_RESULTS: [&str; 3] = ["ok", "partial", "refused"];

/// Label used for requests naming a model the repository does not have.
pub const UNKNOWN_MODEL: &str = "_unknown";

/// Entropy buckets in nats: fine below ln 2 (binary models top out at 0.693), then up to
/// ln 1000 for large label sets.
const ENTROPY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SET_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 50.0, 100.0];
/// Request rows per pass: powers of two up to the default pass cap, then the request cap.
const ROW_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0];
/// Queue waits start far below request latency: a merged request waits for one pass.
const QUEUE_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0,
];
/// Pass memory in bytes: 64 KiB to 1 GiB by factors of 4, with the default pass budget
/// (256 MiB) and its neighbours as bounds.
const PASS_MEMORY_BUCKETS: &[f64] = &[
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
const SAMPLE_BUCKETS: &[f64] = &[2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub batch_rows: HistogramVec,
    pub queue_duration: HistogramVec,
    pub mc_samples: HistogramVec,
    pub pass_memory: HistogramVec,
    pub predictive_entropy: HistogramVec,
    pub referrals: IntCounterVec,
    pub prediction_set_size: HistogramVec,
    pub mode_checks: IntCounterVec,
    pub mode_violations: IntCounterVec,
    pub inflight: IntGauge,
    pub held_cost: IntGauge,
    pub rejected: IntCounterVec,
    pub model_info: IntGaugeVec,
    pub ready: IntGauge,
    pub load_failures: IntGauge,
    pub reloads: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub panics: prometheus::IntCounter,
    /// Passes by the threads they ran on, caught up from `engine::cores` at each scrape.
    pub passes: IntCounterVec,
    pub startup_seconds: Histogram,
    pub drift: crate::core::drift::DriftMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique: this is a bug");
            c
        }
        let hist = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
                .expect("valid histogram: this is a bug")
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter: this is a bug")
        };
        let metrics = Metrics {
            requests: reg(
                &registry,
                counter(
                    "mcd_requests_total",
                    "Predict requests by model, mode, HTTP status (gRPC: the status the same error has over HTTP) and protocol.",
                    &["model", "mode", "status", "protocol"],
                ),
            ),
            request_duration: reg(
                &registry,
                hist(
                    "mcd_request_duration_seconds",
                    "Predict request latency, body parse to response.",
                    &["model", "mode", "protocol"],
                    LATENCY_BUCKETS,
                ),
            ),
            inference_duration: reg(
                &registry,
                hist(
                    "mcd_inference_duration_seconds",
                    "Engine time of the pass that served each predict request (a merged pass counts once per request in it).",
                    &["model", "mode"],
                    LATENCY_BUCKETS,
                ),
            ),
            batch_rows: reg(
                &registry,
                hist(
                    "mcd_batch_rows",
                    "Request rows per pass; above the request's own rows when concurrent requests were merged (an MC pass runs each row once per sample).",
                    &["model", "mode"],
                    ROW_BUCKETS,
                ),
            ),
            queue_duration: reg(
                &registry,
                hist(
                    "mcd_queue_duration_seconds",
                    "Time an admitted predict request waited for an inference worker.",
                    &["model", "mode"],
                    QUEUE_BUCKETS,
                ),
            ),
            mc_samples: reg(
                &registry,
                hist(
                    "mcd_mc_samples",
                    "MC samples drawn per MC request (for mc_samples=auto, the count it chose).",
                    &["model"],
                    SAMPLE_BUCKETS,
                ),
            ),
            pass_memory: reg(
                &registry,
                hist(
                    "mcd_pass_memory_bytes",
                    "Estimated peak memory of each inference pass (activations, masks, outputs), by model and mode.",
                    &["model", "mode"],
                    PASS_MEMORY_BUCKETS,
                ),
            ),
            predictive_entropy: reg(
                &registry,
                hist(
                    "mcd_predictive_entropy",
                    "Predictive entropy (nats) of MC answers, one observation per row (the mean over its positions for a map).",
                    &["model", "output"],
                    ENTROPY_BUCKETS,
                ),
            ),
            referrals: reg(
                &registry,
                counter(
                    "mcd_referrals_total",
                    "Rows of calibrated MC answers referred to a person: predictive entropy above the model's referral threshold.",
                    &["model", "output"],
                ),
            ),
            prediction_set_size: reg(
                &registry,
                hist(
                    "mcd_prediction_set_size",
                    "Classes in the conformal prediction set at level 0.95, one observation per row of a calibrated MC answer.",
                    &["model", "output"],
                    SET_SIZE_BUCKETS,
                ),
            ),
            mode_checks: reg(
                &registry,
                counter(
                    "mcd_mode_checks_total",
                    "Load-time mode self-checks by result (pass, fail, skipped).",
                    &["model", "check", "result"],
                ),
            ),
            mode_violations: reg(
                &registry,
                counter(
                    "mcd_mode_violations_total",
                    "Requests refused because their parameters contradict their mode.",
                    &["model", "reason"],
                ),
            ),
            inflight: reg(
                &registry,
                IntGauge::new("mcd_inflight_requests", "Predict requests in progress.").expect("valid gauge"),
            ),
            held_cost: reg(
                &registry,
                IntGauge::new(
                    "mcd_held_cost",
                    "Admission cost held by work whose request timed out (answered 504) and that has not ended yet.",
                )
                .expect("valid gauge"),
            ),
            rejected: reg(
                &registry,
                counter(
                    "mcd_rejected_requests_total",
                    "Requests shed before inference (overloaded, timeout, not_ready, payload_too_large), or whose gRPC message did not decode (malformed_protobuf).",
                    &["reason"],
                ),
            ),
            model_info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "mcd_model_info",
                        "Loaded models; value 1. `backend` is the runtime that runs the model's passes.",
                    ),
                    &["model", "dropout_sites", "backend"],
                )
                .expect("valid gauge"),
            ),
            ready: reg(
                &registry,
                IntGauge::new(
                    "mcd_ready",
                    "1 when every model that should serve (each of the folder at start; one added on a reload once it loads) has a healthy version serving and the server is not shutting down.",
                )
                .expect("valid gauge"),
            ),
            load_failures: reg(
                &registry,
                IntGauge::new(
                    "mcd_model_load_failures",
                    "Model files that failed their last load (including those whose previous version keeps serving).",
                )
                .expect("valid gauge"),
            ),
            reloads: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "mcd_model_reloads_total",
                        "SIGHUP reloads: ok (every file loaded), partial (some kept their last good version), refused (the folder was unreadable or empty; nothing changed).",
                    ),
                    &["result"],
                )
                .expect("valid counter"),
            ),
            auth_failures: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "mcd_auth_failures_total",
                        "Calls refused for a missing or unknown API key, by protocol.",
                    ),
                    &["protocol"],
                )
                .expect("valid counter"),
            ),
            panics: reg(
                &registry,
                prometheus::IntCounter::new(
                    "mcd_internal_panics_total",
                    "Panics caught inside inference or handlers.",
                )
                .expect("valid counter"),
            ),
            passes: reg(
                &registry,
                counter(
                    "mcd_passes_total",
                    "Inference passes by where they ran: `pool` (alone, on --pass-threads threads) or `own` (beside other passes, on the worker's thread).",
                    &["threads"],
                ),
            ),
            startup_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "mcd_model_load_duration_seconds",
                        "Time to load and self-check one model.",
                    )
                    .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
                )
                .expect("valid histogram"),
            ),
            drift: crate::core::drift::DriftMetrics {
                p_value: reg(
                    &registry,
                    prometheus::GaugeVec::new(
                        Opts::new(
                            "mcd_drift_p_value",
                            "Two-sample KS p-value of the last tested drift window against the calibration reference, by statistic (a window drifts when one is below alpha / m).",
                        ),
                        &["model", "mode", "output", "statistic"],
                    )
                    .expect("valid gauge"),
                ),
                ks_statistic: reg(
                    &registry,
                    prometheus::GaugeVec::new(
                        Opts::new(
                            "mcd_drift_ks_statistic",
                            "Two-sample KS statistic D of the last tested drift window against the calibration reference, by statistic.",
                        ),
                        &["model", "mode", "output", "statistic"],
                    )
                    .expect("valid gauge"),
                ),
                windows: reg(
                    &registry,
                    counter(
                        "mcd_drift_windows_total",
                        "Drift windows tested, by result (drift: some statistic's p-value below alpha / m).",
                        &["model", "mode", "result"],
                    ),
                ),
                window_rows: reg(
                    &registry,
                    IntGaugeVec::new(
                        Opts::new(
                            "mcd_drift_window_rows",
                            "Rows in the current (not yet full) drift window of the model's monitor of this mode (mc_dropout or eval).",
                        ),
                        &["model", "mode"],
                    )
                    .expect("valid gauge"),
                ),
                consecutive: reg(
                    &registry,
                    IntGaugeVec::new(
                        Opts::new(
                            "mcd_drift_consecutive_windows",
                            "Drifting drift windows in a row up to the last tested one (0 after a window without drift).",
                        ),
                        &["model", "mode"],
                    )
                    .expect("valid gauge"),
                ),
                dropped: reg(
                    &registry,
                    counter(
                        "mcd_drift_windows_dropped_total",
                        "Full drift windows dropped untested because the drift thread was behind.",
                        &["model", "mode"],
                    ),
                ),
            },
            registry,
        };
        // Series an alert or a dashboard reads from the start, not from the first event.
        for result in RELOAD_RESULTS {
            metrics.reloads.with_label_values(&[result]);
        }
        for protocol in [Protocol::Native, Protocol::OipRest, Protocol::Grpc] {
            metrics.auth_failures.with_label_values(&[protocol.as_str()]);
        }
        metrics
    }

    /// Publishes a (re)loaded repository: model info, self-check results, load times and
    /// failures. Every known label series of the refusal counters starts at 0, so a rate
    /// over them is defined before the first event.
    pub fn install(&self, repo: &ModelRepo) {
        self.model_info.reset();
        for (name, model) in &repo.models {
            self.model_info
                .with_label_values(&[
                    name.as_str(),
                    &model.sampling_sites().to_string(),
                    model.backend.as_str(),
                ])
                .set(1);
            for c in &model.checks {
                self.mode_checks
                    .with_label_values(&[name.as_str(), c.check.as_str(), c.result.as_str()])
                    .inc();
            }
            for reason in VIOLATION_REASONS {
                self.mode_violations.with_label_values(&[name.as_str(), reason]);
            }
            self.pass_memory.with_label_values(&[name.as_str(), "eval"]);
            if model.mc_unavailable_reason().is_none() {
                self.pass_memory.with_label_values(&[name.as_str(), "mc_dropout"]);
            }
            for (output, cal) in model.calibration.iter().flat_map(|c| &c.file.outputs) {
                match cal {
                    OutputCalibration::Probabilities(_) => {
                        self.referrals.with_label_values(&[name.as_str(), output]);
                        self.prediction_set_size.with_label_values(&[name.as_str(), output]);
                    }
                    OutputCalibration::Labels(_) => {
                        self.referrals.with_label_values(&[name.as_str(), output]);
                    }
                    OutputCalibration::Regression(_) => {}
                }
            }
        }
        for (name, model) in &repo.models {
            let Some(reference) = &model.drift_reference else {
                continue;
            };
            for (mode, samples) in [("mc_dropout", &reference.mc), ("eval", &reference.eval)] {
                if samples.is_empty() {
                    continue;
                }
                let labels = [name.as_str(), mode];
                for result in ["drift", "no_drift"] {
                    self.drift.windows.with_label_values(&[name.as_str(), mode, result]);
                }
                self.drift.window_rows.with_label_values(&labels).set(0);
                self.drift.consecutive.with_label_values(&labels).set(0);
                self.drift.dropped.with_label_values(&labels);
            }
        }
        for reason in REJECT_REASONS {
            self.rejected.with_label_values(&[reason]);
        }
        for (name, t) in &repo.load_times {
            tracing::info!(model = %name, seconds = t.as_secs_f64(), "model loaded");
            self.startup_seconds.observe(t.as_secs_f64());
        }
        self.load_failures.set(repo.failures.len() as i64);
    }

    pub fn render(&self) -> String {
        let (pool, own) = crate::engine::cores::passes();
        for (label, total) in [("pool", pool), ("own", own)] {
            let c = self.passes.with_label_values(&[label]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail: this is a bug");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
