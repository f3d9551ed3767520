//! The calibration file (`<stem>.calibration.json`): its format, and its load-time checks
//! against the model file it was made for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The levels every calibration computes.
pub const LEVELS: [f64; 4] = [0.8, 0.9, 0.95, 0.99];
/// The accepted-error targets every calibration computes (the model's own is added).
pub const REFER_TARGETS: [f64; 3] = [0.01, 0.02, 0.05];
/// The referral target of a model whose `model.json` names none.
pub const DEFAULT_REFER_TARGET: f64 = 0.02;
/// Confidence of the upper bound on the accepted-case error.
pub const REFER_CONFIDENCE: f64 = 0.95;
/// The level whose set sizes `mcd_prediction_set_size` records.
pub const METRIC_SET_LEVEL: f64 = 0.95;
pub const FORMAT: &str = "mcd-serve-calibration/1";

/// `<stem>.calibration.json` beside `<stem>.onnx`.
pub fn calibration_path(model_path: &Path) -> PathBuf {
    model_path.with_extension("calibration.json")
}

/// A level as the answers key it: "0.9", "0.95".
pub fn level_key(level: f64) -> String {
    format!("{level}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationFile {
    pub format: String,
    pub model_file: String,
    pub model_sha256: String,
    /// UTC, RFC 3339.
    pub created: String,
    pub n: usize,
    pub mc_samples: usize,
    /// Row i of the data file ran with seed `seed + i`.
    pub seed: u64,
    pub outputs: BTreeMap<String, OutputCalibration>,
    /// Per output, per monitored statistic, its value on each calibration row: the
    /// reference sample of drift detection (`core::drift`). Absent from files made before
    /// it existed: such a model is served without drift monitoring.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drift_reference: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// As `drift_reference`, of the eval answers on the same rows: what eval-mode rows are
    /// tested against.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drift_reference_eval: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputCalibration {
    Regression(RegressionCalibration),
    Probabilities(SetCalibration),
    /// A multi-label (Bernoulli) output: a set per label, and referral on the row.
    Labels(LabelCalibration),
}

/// What an output can be calibrated as, decided from the model at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calibrates {
    Regression,
    Probabilities,
    /// Bernoulli labels, this many a row.
    Labels(usize),
}

/// Per label, LAC on its two values (absent, present); referral on the row's mean
/// predictive entropy over its labels, where a row is wrong when any label is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelCalibration {
    pub method: String,
    pub labels: usize,
    pub sets: Vec<LabelSetLevel>,
    pub referral_confidence: f64,
    pub referral: Vec<Referral>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelSetLevel {
    pub level: f64,
    /// Per label: a value (absent, present) is in the label's set when 1 − P(value) is at
    /// most this (the more probable value always is); null: both values.
    pub threshold: Vec<Option<f64>>,
    /// Per label, on the calibration set itself.
    pub calibration_coverage: Vec<f64>,
    /// Labels a row left undecided (both values in the set), on average.
    pub calibration_mean_undecided: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegressionCalibration {
    /// Per element of one row.
    pub noise_variance: Vec<f64>,
    pub intervals: Vec<IntervalLevel>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntervalLevel {
    pub level: f64,
    /// Per element of one row; null: the calibration set is too small for this level, and
    /// the interval is unbounded.
    pub quantile: Vec<Option<f64>>,
    /// On the calibration set itself (in-sample; the guarantee is about new rows).
    pub calibration_coverage: f64,
    /// Per element; null where the interval is unbounded (as `quantile`). JSON has no
    /// infinity, so an unbounded width written as a number could not be read back.
    pub calibration_mean_width: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetCalibration {
    pub method: String,
    pub sets: Vec<SetLevel>,
    pub referral_confidence: f64,
    pub referral: Vec<Referral>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetLevel {
    pub level: f64,
    /// Class k is in the set when 1 − p_k is at most this (and the top class always is);
    /// null: every class.
    pub threshold: Option<f64>,
    pub calibration_coverage: f64,
    pub calibration_mean_size: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Referral {
    pub target_error: f64,
    /// Rows with predictive entropy above it are referred; null: no threshold meets the
    /// target on this calibration set, and every row is referred.
    pub threshold: Option<f64>,
    /// Share of calibration rows accepted, their error, and its upper bound.
    pub coverage: f64,
    pub accepted_error: f64,
    pub error_upper_bound: f64,
}

/// A model's checked calibration, with the referral target its `model.json` picked.
#[derive(Debug, Clone)]
pub struct ModelCalibration {
    pub file: CalibrationFile,
    pub path: PathBuf,
    pub refer_target: f64,
}

impl ModelCalibration {
    pub fn output(&self, name: &str) -> Option<&OutputCalibration> {
        self.file.outputs.get(name)
    }

    /// The referral at the model's target (present: checked at load).
    pub fn referral(&self, referral: &[Referral]) -> Option<Referral> {
        referral
            .iter()
            .find(|r| same_target(r.target_error, self.refer_target))
            .cloned()
    }
}

fn same_target(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// Refuses a file `mcd-serve calibrate` made (`written`) for another version of
/// `model_file` than the one beside it, by the SHA-256 it recorded.
pub fn made_for(model_file: &Path, recorded_sha256: &str, written: &Path) -> Result<(), String> {
    let hash = sha256_file(model_file).map_err(|e| format!("hashing {}: {e}", model_file.display()))?;
    if hash != recorded_sha256 {
        return Err(format!(
            "{} is stale: it was made for a model file with SHA-256 {recorded_sha256}, but {} has SHA-256 {hash}; \
             re-run `mcd-serve calibrate` on this model",
            written.display(),
            model_file.display()
        ));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the model's calibration, if it has one, and checks that it was made for this
/// very file, holds the method's invariants (validate.rs) and fits the model's outputs; a
/// calibration that does not is refused with the reason, never used.
///
/// `outputs` are the model's outputs by name, with what each can be calibrated as;
/// `refer_target_error` is what the model's `model.json` asks of referral, if anything.
pub fn load(
    model: &str,
    model_file: &Path,
    outputs: &[(&str, Calibrates)],
    refer_target_error: Option<f64>,
) -> Result<Option<ModelCalibration>, String> {
    let path = calibration_path(model_file);
    if !path.is_file() {
        return Ok(None);
    }
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {shown}: {e}"))?;
    let file: CalibrationFile = serde_json::from_str(&text).map_err(|e| format!("parsing {shown}: {e}"))?;
    if file.format != FORMAT {
        return Err(format!("{shown} has format '{}', expected '{FORMAT}'", file.format));
    }
    made_for(model_file, &file.model_sha256, &path)?;
    super::validate::validate(&file).map_err(|e| {
        format!("{shown} is invalid: {e}; it is not what `mcd-serve calibrate` writes, so re-run it on this model")
    })?;
    let refer_target = refer_target_error.unwrap_or(DEFAULT_REFER_TARGET);
    for (name, cal) in &file.outputs {
        let Some(&(_, can)) = outputs.iter().find(|(o, _)| o == name) else {
            return Err(format!(
                "{shown} calibrates output '{name}', which the model does not have"
            ));
        };
        let (as_what, referral) = match cal {
            OutputCalibration::Regression(_) => (Calibrates::Regression, None),
            OutputCalibration::Probabilities(s) => (Calibrates::Probabilities, Some(&s.referral)),
            OutputCalibration::Labels(l) => (Calibrates::Labels(l.labels), Some(&l.referral)),
        };
        if as_what != can {
            return Err(format!(
                "{shown} calibrates '{name}' as {}, but it is {}",
                describe(as_what),
                describe(can)
            ));
        }
        if let Some(referral) = referral
            && !referral.iter().any(|r| same_target(r.target_error, refer_target))
        {
            return Err(format!(
                "the referral target {refer_target} of model '{model}' is not among the targets {shown} was computed for; \
                 re-run `mcd-serve calibrate` (it adds the model's own target)"
            ));
        }
    }
    Ok(Some(ModelCalibration {
        file,
        path,
        refer_target,
    }))
}

/// Seconds since the epoch as RFC 3339 UTC (days to civil date: Howard Hinnant's algorithm).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn describe(c: Calibrates) -> String {
    match c {
        Calibrates::Regression => "a regression output".into(),
        Calibrates::Probabilities => "a probability output".into(),
        Calibrates::Labels(n) => format!("a multi-label output of {n} labels"),
    }
}
