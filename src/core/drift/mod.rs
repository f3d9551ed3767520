//! Online dataset-shift detection on served answers (issue 24; Rabanser et al., "Failing
//! Loudly", NeurIPS 2019: KS tests on a model's own outputs, Bonferroni over the
//! statistics).
//!
//! A model with a drift reference (`engine::drift_reference`) has up to two monitors: one
//! for its MC rows and one for its eval rows, each against the reference of its mode. Per
//! row the worker records the m statistics the monitor tests ([`observe`]) into the
//! monitor's current window: one short mutex push of m numbers, bounded at W rows × m. A
//! full window is handed, by a non-blocking send, to the one drift thread, which runs a
//! two-sample KS test of each statistic against the reference sample ([`ks`]) and calls
//! the window drifting when any p-value is below α / m. The tests never run on an
//! answer's path.

pub mod ks;
pub mod observe;

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{GaugeVec, IntCounterVec, IntGauge, IntGaugeVec};
use serde::Serialize;

use crate::engine::conformal::rfc3339;
use crate::engine::drift_reference::{DriftReference, Samples, Statistic};
pub use observe::{MAX_REGRESSION_ELEMENTS, Observed};

/// Windows kept for `GET /models/{name}/drift`.
pub const KEPT_WINDOWS: usize = 16;
/// Full windows that may wait for the drift thread; more are dropped and counted.
const QUEUED_WINDOWS: usize = 8;

/// `--drift-window` and `--drift-alpha`.
#[derive(Debug, Clone, Copy)]
pub struct DriftSettings {
    pub window: usize,
    pub alpha: f64,
}

/// Which answers a monitor reads: each mode has its own reference, windows and tests
/// (an eval row's top-class probability is not distributed as an MC mean's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftMode {
    Mc,
    Eval,
}

impl DriftMode {
    /// As the `mode` label of the other metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftMode::Mc => "mc_dropout",
            DriftMode::Eval => "eval",
        }
    }
}

/// A model's monitors, one per mode its reference covers.
#[derive(Clone, Default)]
pub struct Monitors {
    pub mc: Option<Arc<Monitor>>,
    pub eval: Option<Arc<Monitor>>,
}

impl Monitors {
    /// The monitors of a model's reference; none where it holds nothing for a mode, or
    /// with a window of 0.
    pub fn new(model: &str, reference: &DriftReference, settings: DriftSettings, metrics: &DriftMetrics) -> Monitors {
        let info = |mc_samples| ReferenceInfo {
            n: reference.n,
            file: reference.file.clone(),
            created: reference.created.clone(),
            mc_samples,
        };
        let make = |mode: DriftMode, samples: &Samples, info: ReferenceInfo| {
            let gauge = metrics.window_rows.with_label_values(&[model, mode.as_str()]);
            Monitor::from_reference(model, mode, samples, info, settings, gauge).map(Arc::new)
        };
        Monitors {
            mc: make(DriftMode::Mc, &reference.mc, info(Some(reference.mc_samples))),
            eval: make(DriftMode::Eval, &reference.eval, info(None)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.mc.is_none() && self.eval.is_none()
    }
}

/// The drift gauges and counters (registered with the server's other metrics).
#[derive(Clone)]
pub struct DriftMetrics {
    pub p_value: GaugeVec,
    pub ks_statistic: GaugeVec,
    pub windows: IntCounterVec,
    pub window_rows: IntGaugeVec,
    pub consecutive: IntGaugeVec,
    pub dropped: IntCounterVec,
}

/// One statistic's test in a window.
#[derive(Debug, Clone, Serialize)]
pub struct StatisticResult {
    pub output: String,
    pub statistic: String,
    pub ks_statistic: f64,
    pub p_value: f64,
}

/// One tested window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowResult {
    /// From 1, per model since it was (re)loaded.
    pub window: u64,
    pub rows: usize,
    pub drift: bool,
    /// UTC, RFC 3339.
    pub tested_at: String,
    pub min_p_value: f64,
    /// Drifting windows in a row, up to and including this one.
    pub consecutive_drifting: u64,
    pub statistics: Vec<StatisticResult>,
}

#[derive(Debug, Default)]
struct History {
    tested: u64,
    drifting: u64,
    /// Consecutive drifting windows up to the last one.
    consecutive: u64,
    last: VecDeque<WindowResult>,
}

/// What `GET /models/{name}/drift` shows of one of a model's monitors.
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    /// The answers it reads: `mc_dropout` or `eval`.
    pub mode: &'static str,
    pub window: usize,
    pub alpha: f64,
    /// α / m: a window drifts when a statistic's p-value is below it.
    pub threshold: f64,
    pub statistics: Vec<MonitoredStatistic>,
    pub reference: ReferenceInfo,
    pub current_window_rows: usize,
    pub windows_tested: u64,
    pub windows_drifting: u64,
    pub consecutive_drifting: u64,
    pub windows_dropped: u64,
    /// Most recent first, at most [`KEPT_WINDOWS`].
    pub last_windows: Vec<WindowResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MonitoredStatistic {
    pub output: String,
    pub statistic: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReferenceInfo {
    pub n: usize,
    pub file: String,
    /// When the calibration was made (UTC, RFC 3339).
    pub created: String,
    /// MC samples per row of an MC reference (absent for eval).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc_samples: Option<usize>,
}

/// One model's monitor of one mode.
pub struct Monitor {
    model: String,
    mode: DriftMode,
    window: usize,
    alpha: f64,
    statistics: Vec<MonitoredStatistic>,
    /// Per monitored statistic, what it reads.
    kinds: Vec<Statistic>,
    /// Per statistic, sorted.
    reference: Vec<Vec<f64>>,
    info: ReferenceInfo,
    /// The current window, row-major: rows × m values, fewer than W rows.
    current: Mutex<Vec<f64>>,
    /// `mcd_drift_window_rows` of this monitor, resolved once.
    window_rows: IntGauge,
    history: Mutex<History>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Monitor {
    /// The monitor of a reference sample (per output, per statistic, its values); None
    /// when it holds nothing or the window is 0.
    pub fn from_reference(
        model: &str,
        mode: DriftMode,
        samples: &Samples,
        info: ReferenceInfo,
        settings: DriftSettings,
        window_rows: IntGauge,
    ) -> Option<Monitor> {
        let mut statistics = vec![];
        let mut kinds = vec![];
        let mut reference = vec![];
        for (output, stats) in samples {
            for (statistic, values) in stats {
                // Names are checked at load (engine::drift_reference::validate).
                let Some(kind) = Statistic::parse(statistic) else {
                    continue;
                };
                let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
                if v.is_empty() {
                    continue;
                }
                v.sort_by(f64::total_cmp);
                statistics.push(MonitoredStatistic {
                    output: output.clone(),
                    statistic: statistic.clone(),
                });
                kinds.push(kind);
                reference.push(v);
            }
        }
        if statistics.is_empty() || settings.window == 0 {
            return None;
        }
        let m = statistics.len();
        window_rows.set(0);
        Some(Monitor {
            model: model.to_string(),
            mode,
            window: settings.window,
            alpha: settings.alpha,
            statistics,
            kinds,
            info,
            reference,
            current: Mutex::new(Vec::with_capacity(settings.window * m)),
            window_rows,
            history: Mutex::new(History::default()),
            dropped: Default::default(),
        })
    }

    pub fn mode(&self) -> DriftMode {
        self.mode
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// The Bonferroni threshold: α over the m monitored statistics.
    pub fn threshold(&self) -> f64 {
        self.alpha / self.statistics.len() as f64
    }

    /// Records an answer's rows; returns the windows this filled (each W rows × m values),
    /// for the drift thread. An answer missing a monitored statistic is skipped whole.
    pub fn record(&self, observed: &[Observed], rows: usize) -> Vec<Vec<f64>> {
        let sources: Option<Vec<&Observed>> = self
            .statistics
            .iter()
            .zip(&self.kinds)
            .map(|(s, &kind)| {
                observed
                    .iter()
                    .find(|o| o.name() == s.output)
                    .filter(|o| o.gives(kind, rows))
            })
            .collect();
        let Some(sources) = sources else {
            return vec![];
        };
        let m = self.statistics.len();
        let mut full = vec![];
        let mut current = self.current.lock().expect("drift window lock poisoned: this is a bug");
        for r in 0..rows {
            current.extend(sources.iter().zip(&self.kinds).map(|(o, &k)| o.value(k, rows, r)));
            if current.len() == self.window * m {
                full.push(std::mem::replace(&mut *current, Vec::with_capacity(self.window * m)));
            }
        }
        self.window_rows.set((current.len() / m) as i64);
        full
    }

    pub fn current_rows(&self) -> usize {
        self.current
            .lock()
            .expect("drift window lock poisoned: this is a bug")
            .len()
            / self.statistics.len()
    }

    /// Tests a full window (rows × m values, row-major) against the reference.
    pub fn test(&self, window: &[f64]) -> WindowResult {
        let m = self.statistics.len();
        let rows = window.len() / m;
        let threshold = self.threshold();
        let statistics: Vec<StatisticResult> = self
            .statistics
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let mut sample: Vec<f64> = (0..rows).map(|r| window[r * m + k]).filter(|x| x.is_finite()).collect();
                let r = ks::ks_2samp_sorted_reference(&mut sample, &self.reference[k]);
                StatisticResult {
                    output: s.output.clone(),
                    statistic: s.statistic.clone(),
                    ks_statistic: r.statistic,
                    p_value: r.p_value,
                }
            })
            .collect();
        let min_p_value = statistics.iter().map(|s| s.p_value).fold(1.0, f64::min);
        let mut history = self.history.lock().expect("drift history lock poisoned: this is a bug");
        history.tested += 1;
        let drift = min_p_value < threshold;
        if drift {
            history.drifting += 1;
            history.consecutive += 1;
        } else {
            history.consecutive = 0;
        }
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let result = WindowResult {
            window: history.tested,
            rows,
            drift,
            tested_at: rfc3339(secs),
            min_p_value,
            consecutive_drifting: history.consecutive,
            statistics,
        };
        history.last.push_front(result.clone());
        history.last.truncate(KEPT_WINDOWS);
        result
    }

    pub fn report(&self) -> DriftReport {
        let history = self.history.lock().expect("drift history lock poisoned: this is a bug");
        DriftReport {
            mode: self.mode.as_str(),
            window: self.window,
            alpha: self.alpha,
            threshold: self.threshold(),
            statistics: self.statistics.clone(),
            reference: self.info.clone(),
            current_window_rows: self.current_rows(),
            windows_tested: history.tested,
            windows_drifting: history.drifting,
            consecutive_drifting: history.consecutive,
            windows_dropped: self.dropped.load(std::sync::atomic::Ordering::Relaxed),
            last_windows: history.last.iter().cloned().collect(),
        }
    }

    fn publish(&self, metrics: &DriftMetrics, result: &WindowResult) {
        for s in &result.statistics {
            let labels = [
                self.model.as_str(),
                self.mode.as_str(),
                s.output.as_str(),
                s.statistic.as_str(),
            ];
            metrics.p_value.with_label_values(&labels).set(s.p_value);
            metrics.ks_statistic.with_label_values(&labels).set(s.ks_statistic);
        }
        let label = if result.drift { "drift" } else { "no_drift" };
        let model = [self.model.as_str(), self.mode.as_str()];
        metrics.windows.with_label_values(&[model[0], model[1], label]).inc();
        metrics
            .consecutive
            .with_label_values(&model)
            .set(result.consecutive_drifting as i64);
    }
}

/// A full window on its way to the drift thread.
struct Full {
    monitor: Arc<Monitor>,
    window: Vec<f64>,
}

/// The drift thread's inbox: full windows go in without blocking.
pub struct Tester {
    send: SyncSender<Full>,
    metrics: DriftMetrics,
}

impl Tester {
    /// Starts the drift thread; it ends when the tester is dropped.
    pub fn start(metrics: DriftMetrics) -> Tester {
        let (send, receive) = std::sync::mpsc::sync_channel(QUEUED_WINDOWS);
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("mcd-drift".into())
            .spawn(move || run(receive, m))
            .expect("spawning the drift thread");
        Tester { send, metrics }
    }

    /// Records an answer's rows in a monitor; full windows go to the drift thread
    /// (dropped and counted when it is [`QUEUED_WINDOWS`] behind).
    pub fn record(&self, monitor: &Arc<Monitor>, observed: &[Observed], rows: usize) {
        for window in monitor.record(observed, rows) {
            let sent = self.send.try_send(Full {
                monitor: monitor.clone(),
                window,
            });
            if let Err(TrySendError::Full(f) | TrySendError::Disconnected(f)) = sent {
                f.monitor.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics
                    .dropped
                    .with_label_values(&[f.monitor.model.as_str(), f.monitor.mode.as_str()])
                    .inc();
                tracing::warn!(model = %f.monitor.model, mode = f.monitor.mode.as_str(), "drift window dropped: the drift thread is behind");
            }
        }
    }
}

fn run(receive: Receiver<Full>, metrics: DriftMetrics) {
    while let Ok(Full { monitor, window }) = receive.recv() {
        let result = monitor.test(&window);
        monitor.publish(&metrics, &result);
        if result.drift {
            tracing::warn!(
                model = %monitor.model,
                mode = monitor.mode.as_str(),
                window = result.window,
                min_p_value = result.min_p_value,
                threshold = monitor.threshold(),
                "dataset shift: the window's outputs differ from the calibration reference"
            );
        }
    }
}

#[cfg(test)]
mod tests;
