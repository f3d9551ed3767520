//! Online dataset-shift detection on served MC answers (issue 24; Rabanser et al.,
//! "Failing Loudly", NeurIPS 2019: KS tests on a model's own outputs, Bonferroni over the
//! statistics).
//!
//! Per MC row the worker records m statistics of each monitored output ([`row_statistics`]:
//! predictive entropy, mutual information and top-class probability for probability outputs;
//! mean and std per element for regression outputs) into its model's current window: a
//! short mutex push of m numbers, bounded at W rows × m. A full window is handed, by a
//! non-blocking send, to the one drift thread, which runs a two-sample KS test of each
//! statistic against the calibration's reference sample ([`ks`]) and calls the window
//! drifting when any p-value is below α / m. The tests never run on an answer's path.

pub mod ks;

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec};
use serde::Serialize;

use crate::engine::conformal::{ModelCalibration, rfc3339};
use crate::engine::model::McOutput;

/// Windows kept for `GET /models/{name}/drift`.
pub const KEPT_WINDOWS: usize = 16;
/// Full windows that may wait for the drift thread; more are dropped and counted.
const QUEUED_WINDOWS: usize = 8;
/// Elements of a regression output beyond which it is not monitored (m stays small).
pub const MAX_REGRESSION_ELEMENTS: usize = 8;

/// `--drift-window` and `--drift-alpha`.
#[derive(Debug, Clone, Copy)]
pub struct DriftSettings {
    pub window: usize,
    pub alpha: f64,
}

/// Per output, in order: per statistic, its value on each of the answer's `rows` rows.
/// Outputs that cannot be monitored (several values per row for a probability output, or
/// more than [`MAX_REGRESSION_ELEMENTS`] elements per row) give nothing.
pub fn row_statistics(outputs: &[McOutput], rows: usize) -> BTreeMap<String, BTreeMap<String, Vec<f64>>> {
    let mut all = BTreeMap::new();
    if rows == 0 {
        return all;
    }
    for o in outputs {
        let s = &o.stats;
        let mut stats = BTreeMap::new();
        match &s.entropy {
            Some(e) => {
                if e.predictive_entropy.len() != rows || !s.mean.len().is_multiple_of(rows) {
                    continue;
                }
                let classes = s.mean.len() / rows;
                let top = s
                    .mean
                    .chunks_exact(classes.max(1))
                    .map(|r| r.iter().copied().fold(f64::NEG_INFINITY, f64::max))
                    .collect();
                stats.insert("predictive_entropy".to_string(), e.predictive_entropy.clone());
                stats.insert("mutual_information".to_string(), e.mutual_information.clone());
                stats.insert("top_class_probability".to_string(), top);
            }
            None => {
                if !s.mean.len().is_multiple_of(rows) {
                    continue;
                }
                let columns = s.mean.len() / rows;
                if columns == 0 || columns > MAX_REGRESSION_ELEMENTS {
                    continue;
                }
                for c in 0..columns {
                    let name = |n: &str| {
                        if columns == 1 {
                            n.to_string()
                        } else {
                            format!("{n}[{c}]")
                        }
                    };
                    let column = |v: &[f64]| (0..rows).map(|r| v[r * columns + c]).collect();
                    stats.insert(name("mean"), column(&s.mean));
                    stats.insert(name("std"), column(&s.std));
                }
            }
        }
        all.insert(o.name.clone(), stats);
    }
    all
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

/// What `GET /models/{name}/drift` shows of a monitored model.
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
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
    pub mc_samples: usize,
}

/// One model's monitor.
pub struct Monitor {
    model: String,
    window: usize,
    alpha: f64,
    statistics: Vec<MonitoredStatistic>,
    /// Per statistic, sorted.
    reference: Vec<Vec<f64>>,
    info: ReferenceInfo,
    /// The current window, row-major: rows × m values, fewer than W rows.
    current: Mutex<Vec<f64>>,
    history: Mutex<History>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Monitor {
    /// The monitor of a model whose calibration holds a reference sample; None without one.
    pub fn new(model: &str, calibration: &ModelCalibration, settings: DriftSettings) -> Option<Monitor> {
        let file = &calibration.file;
        let info = ReferenceInfo {
            n: 0,
            file: calibration
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            created: file.created.clone(),
            mc_samples: file.mc_samples,
        };
        Monitor::from_reference(model, &file.drift_reference, info, settings)
    }

    /// The monitor of a reference sample: per output, per statistic, its values.
    pub fn from_reference(
        model: &str,
        samples: &BTreeMap<String, BTreeMap<String, Vec<f64>>>,
        mut info: ReferenceInfo,
        settings: DriftSettings,
    ) -> Option<Monitor> {
        let mut statistics = vec![];
        let mut reference = vec![];
        for (output, stats) in samples {
            for (statistic, values) in stats {
                let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
                if v.is_empty() {
                    continue;
                }
                v.sort_by(f64::total_cmp);
                statistics.push(MonitoredStatistic {
                    output: output.clone(),
                    statistic: statistic.clone(),
                });
                reference.push(v);
            }
        }
        if statistics.is_empty() || settings.window == 0 {
            return None;
        }
        let m = statistics.len();
        info.n = reference.iter().map(Vec::len).max().unwrap_or(0);
        Some(Monitor {
            model: model.to_string(),
            window: settings.window,
            alpha: settings.alpha,
            statistics,
            info,
            reference,
            current: Mutex::new(Vec::with_capacity(settings.window * m)),
            history: Mutex::new(History::default()),
            dropped: Default::default(),
        })
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// The Bonferroni threshold: α over the m monitored statistics.
    pub fn threshold(&self) -> f64 {
        self.alpha / self.statistics.len() as f64
    }

    /// Records an answer's rows; returns the windows this filled (each W rows × m values),
    /// for the drift thread. Rows missing a monitored statistic are skipped.
    pub fn record(&self, stats: &BTreeMap<String, BTreeMap<String, Vec<f64>>>, rows: usize) -> Vec<Vec<f64>> {
        let columns: Option<Vec<&Vec<f64>>> = self
            .statistics
            .iter()
            .map(|s| {
                stats
                    .get(&s.output)
                    .and_then(|o| o.get(&s.statistic))
                    .filter(|v| v.len() == rows)
            })
            .collect();
        let Some(columns) = columns else {
            return vec![];
        };
        let m = self.statistics.len();
        let mut full = vec![];
        let mut current = self.current.lock().expect("drift window lock poisoned: this is a bug");
        for r in 0..rows {
            current.extend(columns.iter().map(|c| c[r]));
            if current.len() == self.window * m {
                full.push(std::mem::replace(&mut *current, Vec::with_capacity(self.window * m)));
            }
        }
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
            let labels = [self.model.as_str(), s.output.as_str(), s.statistic.as_str()];
            metrics.p_value.with_label_values(&labels).set(s.p_value);
            metrics.ks_statistic.with_label_values(&labels).set(s.ks_statistic);
        }
        let label = if result.drift { "drift" } else { "no_drift" };
        metrics.windows.with_label_values(&[self.model.as_str(), label]).inc();
        metrics
            .consecutive
            .with_label_values(&[self.model.as_str()])
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

    /// Records an MC answer's rows in the model's monitor; full windows go to the drift
    /// thread (dropped and counted when it is [`QUEUED_WINDOWS`] behind).
    pub fn record(&self, monitor: &Arc<Monitor>, outputs: &[McOutput], rows: usize) {
        let full = monitor.record(&row_statistics(outputs, rows), rows);
        self.metrics
            .window_rows
            .with_label_values(&[monitor.model.as_str()])
            .set(monitor.current_rows() as i64);
        for window in full {
            let sent = self.send.try_send(Full {
                monitor: monitor.clone(),
                window,
            });
            if let Err(TrySendError::Full(f) | TrySendError::Disconnected(f)) = sent {
                f.monitor.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics
                    .dropped
                    .with_label_values(&[f.monitor.model.as_str()])
                    .inc();
                tracing::warn!(model = %f.monitor.model, "drift window dropped: the drift thread is behind");
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
