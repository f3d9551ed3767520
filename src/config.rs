//! Command line and environment configuration. Every flag has an `MCD_*` variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::core::Limits;
use crate::engine::backend::Backend;

#[derive(Debug, Parser)]
#[command(
    name = "mcd-serve",
    version,
    about = "Serve ONNX models with Monte-Carlo-dropout uncertainty over HTTP"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 when the server's readiness endpoint answers 200, 1 otherwise (for container
    /// HEALTHCHECKs: no curl needed).
    Healthcheck {
        /// The URL to probe.
        #[arg(
            long,
            env = "MCD_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8080/health/ready"
        )]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, env = "MCD_HEALTHCHECK_TIMEOUT_SECS", default_value_t = 3.0)]
        timeout_secs: f64,
    },
    /// Calibrate a model's MC answers on labelled rows (JSON Lines) and write
    /// `<stem>.calibration.json` beside it: conformal intervals, prediction sets, referral.
    Calibrate(crate::commands::calibrate::CalibrateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Folder of `*.onnx` models; a model's name is its file stem.
    #[arg(long, env = "MCD_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Address to listen on: the native and OIP REST APIs, health and metrics.
    #[arg(long, env = "MCD_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: String,
    /// Address of the OIP v2 gRPC service (`inference.GRPCInferenceService`, and
    /// `grpc.health.v1`); an empty value turns it off.
    #[arg(long, env = "MCD_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    pub grpc_addr: String,
    /// Serve the folder's one model under this name instead of its file stem (KServe:
    /// `--model-name={{.Name}}`, the InferenceService's name, which its clients call).
    #[arg(long, env = "MCD_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Model served by `POST /predict` (default: breast_cancer if present, else the only
    /// model; with several and none named, `POST /predict` answers 404 `no_default_model`
    /// and the per-model routes serve).
    #[arg(long, env = "MCD_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Largest `mc_samples` a request may ask for.
    #[arg(long, env = "MCD_MAX_MC_SAMPLES", default_value_t = 1000)]
    pub max_mc_samples: usize,
    /// Admission budget in cost units (rows × samples; eval counts rows). A request that
    /// does not fit in what is left is refused at once with 429.
    #[arg(long, env = "MCD_MAX_INFLIGHT_COST", default_value_t = 200_000)]
    pub max_inflight_cost: u32,
    /// Memory budget in bytes that admission and pass sizing share: a request reserves its
    /// estimated peak (input, largest pass, answer) or is refused (429 while others hold
    /// the budget, 413 when it could never fit); each pass may take budget / max(workers, 2).
    /// The default is half the shipped Kubernetes limit of 1 GiB: the rest holds the
    /// process's idle footprint, request bodies and allocator slack.
    #[arg(long, env = "MCD_MAX_MEMORY_BYTES", default_value_t = 512 << 20)]
    pub max_memory_bytes: u64,
    /// Most values one `return_samples` answer may hold (samples × rows × output elements);
    /// beyond it the request is refused with 413.
    #[arg(long, env = "MCD_MAX_RETURNED_SAMPLES", default_value_t = 1 << 20)]
    pub max_returned_samples: u64,
    /// Largest batch (rows) one request may send.
    #[arg(long, env = "MCD_MAX_BATCH_ROWS", default_value_t = 4096)]
    pub max_batch_rows: usize,
    /// Seconds a predict request may wait and run before it is answered 504.
    #[arg(long, env = "MCD_REQUEST_TIMEOUT_SECS", default_value_t = 30.0)]
    pub request_timeout_secs: f64,
    /// Largest request body in bytes (image batches are large).
    #[arg(long, env = "MCD_BODY_LIMIT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Inference threads (default: the number of cores).
    #[arg(long, env = "MCD_WORKERS")]
    pub workers: Option<usize>,
    /// Threads a pass may use when it runs alone (no other pass running): tract splits its
    /// large products between them (default: the number of cores; 1: every pass on its
    /// worker's thread). Passes that run beside others keep one thread each.
    #[arg(long, env = "MCD_PASS_THREADS")]
    pub pass_threads: Option<usize>,
    /// Microseconds an inference worker holding a request waits for more requests to share
    /// its pass (Triton's `max_queue_delay_microseconds`). 0: never wait; requests that
    /// arrive while a pass runs are still merged into the next one.
    #[arg(long, env = "MCD_MAX_BATCH_DELAY_US", default_value_t = 0)]
    pub max_batch_delay_us: u64,
    /// Most request rows merged into one pass (a single larger request still runs).
    #[arg(long, env = "MCD_MAX_PASS_ROWS", default_value_t = 256)]
    pub max_pass_rows: usize,
    /// Rows per drift window: MC rows of a model with a drift reference fill windows of
    /// this many rows, each tested against the reference (a model's `model.json` may set
    /// `drift_window`). 0 turns drift monitoring off.
    #[arg(long, env = "MCD_DRIFT_WINDOW", default_value_t = 200)]
    pub drift_window: usize,
    /// False-alarm probability per drift window: a window drifts when a statistic's KS
    /// p-value is below alpha / m (Bonferroni over the m monitored statistics).
    #[arg(long, env = "MCD_DRIFT_ALPHA", default_value_t = 0.01)]
    pub drift_alpha: f64,
    /// Log format.
    #[arg(long, env = "MCD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// On SIGTERM, seconds to keep serving with readiness at 503 before closing the
    /// listener, so load balancers stop sending traffic first.
    #[arg(long, env = "MCD_SHUTDOWN_DRAIN_SECS", default_value_t = 1.0)]
    pub shutdown_drain_secs: f64,
    /// Seconds a client may take to send a request head, from its first byte; then the
    /// connection is closed (slow header senders hold a connection each).
    #[arg(long, env = "MCD_HEADER_READ_TIMEOUT_SECS", default_value_t = 30.0)]
    pub header_read_timeout_secs: f64,
    /// Seconds a connection may stay open with no request in flight and nothing sent
    /// (keep-alive, or a new connection); then it is closed.
    #[arg(long, env = "MCD_IDLE_TIMEOUT_SECS", default_value_t = 60.0)]
    pub idle_timeout_secs: f64,
    /// Seconds a request body may make no progress; then the request is answered 408
    /// `body_timeout` and its connection closed.
    #[arg(long, env = "MCD_BODY_READ_TIMEOUT_SECS", default_value_t = 30.0)]
    pub body_read_timeout_secs: f64,
    /// Seconds between HTTP/2 keepalive pings on gRPC connections; a client that does not
    /// answer one within as many seconds is disconnected. A gRPC connection that has not
    /// sent its HTTP/2 preface within `--header-read-timeout-secs` is closed.
    #[arg(long, env = "MCD_GRPC_KEEPALIVE_SECS", default_value_t = 30.0)]
    pub grpc_keepalive_secs: f64,
    /// File of API keys, one per line (blank lines and `#` comments ignored), re-read on
    /// SIGHUP. When set, predict and metadata calls on every protocol need
    /// `Authorization: Bearer <key>`; health and metrics stay open.
    #[arg(long, env = "MCD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Serve `/metrics` on this address instead of the main one (e.g. a port only the
    /// scraper reaches). Empty: on the main address.
    #[arg(long, env = "MCD_METRICS_ADDR", default_value = "")]
    pub metrics_addr: String,
    /// The runtime that runs models' passes: `tract` (built in) or `onnxruntime` (needs a
    /// build with the `onnxruntime` feature and `--ort-lib`). A model's `model.json` may
    /// name its own (`"backend"`).
    #[arg(long, env = "MCD_BACKEND", default_value = "tract")]
    pub backend: Backend,
    /// Path of `libonnxruntime.so` (1.31 or newer, e.g. from the onnxruntime wheel), loaded
    /// at startup when the onnxruntime backend is the default, else when a model asks for
    /// it. Unset: `ORT_DYLIB_PATH`.
    #[arg(long, env = "MCD_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
}

/// The longest connection timeout: a day (a longer one is a typo, or no timeout at all).
pub const MAX_CONNECTION_TIMEOUT_SECS: f64 = 86_400.0;

/// The smallest `--max-memory-bytes`: below it not even one small pass fits.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

impl ServeArgs {
    /// Every setting out of its range, each with its flag, or Ok. The server refuses to
    /// start on any (no value is silently changed to a nearby one).
    pub fn check(&self) -> Result<(), String> {
        let mut wrong = vec![];
        let mut at_least = |flag: &str, value: u64, min: u64, why: &str| {
            if value < min {
                wrong.push(format!("{flag} is {value}; it must be at least {min} ({why})"));
            }
        };
        at_least(
            "--max-mc-samples",
            self.max_mc_samples as u64,
            2,
            "MC needs two samples for a spread",
        );
        at_least(
            "--max-inflight-cost",
            self.max_inflight_cost.into(),
            1,
            "0 would admit nothing",
        );
        at_least(
            "--max-batch-rows",
            self.max_batch_rows as u64,
            1,
            "0 would refuse every request",
        );
        at_least(
            "--max-pass-rows",
            self.max_pass_rows as u64,
            1,
            "a pass runs at least one row",
        );
        at_least(
            "--max-memory-bytes",
            self.max_memory_bytes,
            MIN_MEMORY_BYTES,
            "below 1 MiB not even one small pass fits",
        );
        if let Some(w) = self.workers {
            at_least("--workers", w as u64, 1, "0 would run nothing");
        }
        if let Some(t) = self.pass_threads {
            at_least("--pass-threads", t as u64, 1, "a pass runs on at least its own thread");
        }
        if !(self.request_timeout_secs.is_finite() && self.request_timeout_secs > 0.0) {
            wrong.push(format!(
                "--request-timeout-secs is {}; it must be a number of seconds above 0",
                self.request_timeout_secs
            ));
        }
        if !(self.shutdown_drain_secs.is_finite() && self.shutdown_drain_secs >= 0.0) {
            wrong.push(format!(
                "--shutdown-drain-secs is {}; it must be a number of seconds, at least 0",
                self.shutdown_drain_secs
            ));
        }
        for (flag, secs) in [
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--idle-timeout-secs", self.idle_timeout_secs),
            ("--body-read-timeout-secs", self.body_read_timeout_secs),
            ("--grpc-keepalive-secs", self.grpc_keepalive_secs),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs <= MAX_CONNECTION_TIMEOUT_SECS) {
                wrong.push(format!(
                    "{flag} is {secs}; it must be a number of seconds above 0 and at most {MAX_CONNECTION_TIMEOUT_SECS} (a day)"
                ));
            }
        }
        if !(self.drift_alpha > 0.0 && self.drift_alpha < 1.0) {
            wrong.push(format!(
                "--drift-alpha is {}; it must be a probability strictly between 0 and 1",
                self.drift_alpha
            ));
        }
        if let Err(e) = self.backend.compiled() {
            wrong.push(format!("--backend is {}: {e}", self.backend));
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    }

    /// The core's limits; [`check`](Self::check) has passed.
    pub fn limits(&self) -> Limits {
        Limits {
            max_mc_samples: self.max_mc_samples,
            max_inflight_cost: self.max_inflight_cost,
            max_batch_rows: self.max_batch_rows,
            max_memory_bytes: self.max_memory_bytes,
            max_returned_samples: self.max_returned_samples,
            request_timeout: Duration::from_secs_f64(self.request_timeout_secs),
            body_limit_bytes: self.body_limit_bytes,
            workers: self
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            max_batch_delay: Duration::from_micros(self.max_batch_delay_us),
            max_pass_rows: self.max_pass_rows,
            drift: crate::core::drift::DriftSettings {
                window: self.drift_window,
                alpha: self.drift_alpha,
            },
            backend: self.backend,
        }
    }

    /// Threads a lone pass may use: `--pass-threads`, else the number of cores.
    pub fn pass_threads(&self) -> usize {
        self.pass_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// The HTTP connection timeouts; [`check`](Self::check) has passed.
    pub fn connection_timeouts(&self) -> crate::front::connections::Timeouts {
        crate::front::connections::Timeouts {
            header_read: Duration::from_secs_f64(self.header_read_timeout_secs),
            idle: Duration::from_secs_f64(self.idle_timeout_secs),
            body_read: Duration::from_secs_f64(self.body_read_timeout_secs),
        }
    }

    /// Settings for tests and embedding: the given folder, everything else at its default.
    pub fn for_models(dir: impl Into<PathBuf>) -> Self {
        let mut args = Cli::parse_from(["mcd-serve"]).serve;
        args.models = dir.into();
        args
    }
}
