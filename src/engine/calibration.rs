//! Split-conformal calibration of MC answers: the `<stem>.calibration.json` file, its
//! load-time check against the model file, and the maths that both `mcd-serve calibrate`
//! and serving use.
//!
//! - Regression: the score is |y − mean| / std_total with std_total² = std² + noise, the
//!   noise variance fitted on the calibration set (MC dropout's spread leaves the target's
//!   own noise out). The interval at level 1 − α is mean ± q·std_total, q the
//!   ⌈(n+1)(1−α)⌉-th smallest score.
//! - Probability outputs: LAC sets (Sadinle, Lei and Wasserman 2019; score 1 − p_y), which
//!   have the smallest expected size of all valid sets. APS was tried first and dropped:
//!   without randomisation its score for a confident, correct row is ≈ 1, so on the bundled
//!   models every set at every level held (nearly) all classes; with randomisation the same
//!   request would get different sets. LAC alone can return an empty set (no class
//!   plausible enough); ours always keeps the top class, a superset, so the coverage
//!   guarantee still holds and a clinician is never handed an empty set.
//! - Referral: refer a row when its predictive entropy is above a threshold chosen so that
//!   a one-sided Clopper–Pearson upper bound on the error among accepted calibration rows
//!   stays at or below the target. Thresholds are tested from the most confident end and
//!   the scan stops at the first that fails (fixed-sequence testing, as in Learn-then-Test),
//!   so trying many thresholds does not spend the confidence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::model::LoadedModel;

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputCalibration {
    Regression(RegressionCalibration),
    Probabilities(SetCalibration),
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
    pub calibration_mean_width: Vec<f64>,
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
    pub fn referral(&self, cal: &SetCalibration) -> Option<Referral> {
        cal.referral
            .iter()
            .find(|r| same_target(r.target_error, self.refer_target))
            .cloned()
    }
}

fn same_target(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the model's calibration, if it has one, and checks that it was made for this
/// very file and fits the model's outputs; a calibration that does not is refused with the
/// reason, never used.
pub fn load(model: &LoadedModel) -> Result<Option<ModelCalibration>, String> {
    let path = calibration_path(&model.path);
    if !path.is_file() {
        return Ok(None);
    }
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {shown}: {e}"))?;
    let file: CalibrationFile = serde_json::from_str(&text).map_err(|e| format!("parsing {shown}: {e}"))?;
    if file.format != FORMAT {
        return Err(format!("{shown} has format '{}', expected '{FORMAT}'", file.format));
    }
    let hash = sha256_file(&model.path).map_err(|e| format!("hashing {}: {e}", model.path.display()))?;
    if hash != file.model_sha256 {
        return Err(format!(
            "{shown} is stale: it was made for a model file with SHA-256 {}, but {} has SHA-256 {hash}; \
             re-run `mcd-serve calibrate` on this model",
            file.model_sha256,
            model.path.display()
        ));
    }
    let refer_target = model.config.refer_target_error.unwrap_or(DEFAULT_REFER_TARGET);
    for (name, cal) in &file.outputs {
        let Some(ix) = model.outputs.iter().position(|o| &o.name == name) else {
            return Err(format!(
                "{shown} calibrates output '{name}', which the model does not have"
            ));
        };
        let probability = model.probability_classes[ix].is_some();
        match cal {
            OutputCalibration::Regression(_) if probability => {
                return Err(format!(
                    "{shown} calibrates '{name}' as a regression output, but it is a probability output"
                ));
            }
            OutputCalibration::Probabilities(_) if !probability => {
                return Err(format!(
                    "{shown} calibrates '{name}' as a probability output, but it is not one"
                ));
            }
            OutputCalibration::Probabilities(s)
                if !s.referral.iter().any(|r| same_target(r.target_error, refer_target)) =>
            {
                return Err(format!(
                    "the referral target {refer_target} of model '{}' is not among the targets {shown} was computed for; \
                     re-run `mcd-serve calibrate` (it adds the model's own target)",
                    model.name
                ));
            }
            _ => {}
        }
    }
    Ok(Some(ModelCalibration {
        file,
        path,
        refer_target,
    }))
}

/// The index k (1-based) of the conformal quantile among n sorted scores at `level`:
/// ⌈(n+1)·level⌉, or None when it exceeds n (the set is too small for the level). The
/// product is nudged down so that e.g. 100·0.9 = 90.00000000000001 does not round up.
pub fn conformal_rank(n: usize, level: f64) -> Option<usize> {
    let k = ((n as f64 + 1.0) * level - 1e-9).ceil().max(1.0) as usize;
    (k <= n).then_some(k)
}

/// The conformal quantile of `scores` at `level`; None: unbounded.
pub fn conformal_quantile(scores: &[f64], level: f64) -> Option<f64> {
    let k = conformal_rank(scores.len(), level)?;
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(sorted[k - 1])
}

/// The noise variance of one element: the mean of (y − mean)² − std², at least 0.
pub fn noise_variance(residuals: &[f64], stds: &[f64]) -> f64 {
    let n = residuals.len().max(1) as f64;
    let excess: f64 = residuals.iter().zip(stds).map(|(r, s)| r * r - s * s).sum();
    (excess / n).max(0.0)
}

pub fn std_total(std: f64, noise: f64) -> f64 {
    (std * std + noise).sqrt()
}

/// One calibration row of a regression output: means, stds and targets of its elements.
pub struct RegressionRow<'a> {
    pub mean: &'a [f64],
    pub std: &'a [f64],
    pub target: &'a [f64],
}

/// Fits a regression output: per element, the noise variance and the quantiles.
pub fn fit_regression(rows: &[RegressionRow]) -> RegressionCalibration {
    let columns = rows.first().map_or(0, |r| r.mean.len());
    let column = |f: &dyn Fn(&RegressionRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let mut noise = vec![];
    let mut scores = vec![];
    for j in 0..columns {
        let residuals = column(&|r| r.target[j] - r.mean[j]);
        let stds = column(&|r| r.std[j]);
        let v = noise_variance(&residuals, &stds);
        scores.push(
            residuals
                .iter()
                .zip(&stds)
                .map(|(r, s)| r.abs() / std_total(*s, v))
                .collect::<Vec<f64>>(),
        );
        noise.push(v);
    }
    let intervals = LEVELS
        .iter()
        .map(|&level| {
            let quantile: Vec<Option<f64>> = scores.iter().map(|s| conformal_quantile(s, level)).collect();
            let mut covered = 0usize;
            let mut widths = vec![0.0; columns];
            for r in rows {
                let mut all = true;
                for j in 0..columns {
                    let (lo, hi) = interval(r.mean[j], r.std[j], noise[j], quantile[j]);
                    all &= lo <= r.target[j] && r.target[j] <= hi;
                    widths[j] += hi - lo;
                }
                covered += all as usize;
            }
            let n = rows.len().max(1) as f64;
            IntervalLevel {
                level,
                quantile,
                calibration_coverage: covered as f64 / n,
                calibration_mean_width: widths.iter().map(|w| w / n).collect(),
            }
        })
        .collect();
    RegressionCalibration {
        noise_variance: noise,
        intervals,
    }
}

/// The interval of one element: mean ± q·std_total (unbounded without a quantile).
pub fn interval(mean: f64, std: f64, noise: f64, quantile: Option<f64>) -> (f64, f64) {
    match quantile {
        Some(q) => {
            let half = q * std_total(std, noise);
            (mean - half, mean + half)
        }
        None => (f64::NEG_INFINITY, f64::INFINITY),
    }
}

/// The classes of one row from most to least probable (ties: lower index first).
fn ranked(p: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order
}

/// LAC score of class `y`: one minus its probability.
pub fn lac_score(p: &[f64], y: usize) -> f64 {
    1.0 - p[y]
}

/// The set at `threshold` (None: every class), most probable first: the top class, and
/// every class whose score is within the threshold. Never empty.
pub fn prediction_set(p: &[f64], threshold: Option<f64>) -> Vec<usize> {
    let order = ranked(p);
    let Some(t) = threshold else {
        return order;
    };
    order
        .into_iter()
        .enumerate()
        .take_while(|&(rank, k)| rank == 0 || lac_score(p, k) <= t)
        .map(|(_, k)| k)
        .collect()
}

/// One calibration row of a probability output.
pub struct ClassRow<'a> {
    pub probabilities: &'a [f64],
    pub predictive_entropy: f64,
    pub target: usize,
}

pub fn fit_sets(rows: &[ClassRow], targets: &[f64]) -> SetCalibration {
    let scores: Vec<f64> = rows.iter().map(|r| lac_score(r.probabilities, r.target)).collect();
    let n = rows.len().max(1) as f64;
    let sets = LEVELS
        .iter()
        .map(|&level| {
            let threshold = conformal_quantile(&scores, level);
            let (mut covered, mut size) = (0usize, 0usize);
            for r in rows {
                let set = prediction_set(r.probabilities, threshold);
                covered += set.contains(&r.target) as usize;
                size += set.len();
            }
            SetLevel {
                level,
                threshold,
                calibration_coverage: covered as f64 / n,
                calibration_mean_size: size as f64 / n,
            }
        })
        .collect();
    let entropies: Vec<(f64, bool)> = rows
        .iter()
        .map(|r| (r.predictive_entropy, argmax(r.probabilities) != r.target))
        .collect();
    SetCalibration {
        method: "lac".into(),
        sets,
        referral_confidence: REFER_CONFIDENCE,
        referral: targets
            .iter()
            .map(|&t| referral_threshold(&entropies, t, REFER_CONFIDENCE))
            .collect(),
    }
}

pub fn argmax(p: &[f64]) -> usize {
    ranked(p).first().copied().unwrap_or(0)
}

/// The largest entropy threshold whose accepted rows (entropy at or below it) have an
/// error upper bound at most `target`, testing thresholds from the lowest entropy up and
/// stopping at the first that fails. Rows are `(predictive entropy, wrong)`.
pub fn referral_threshold(rows: &[(f64, bool)], target: f64, confidence: f64) -> Referral {
    let mut sorted = rows.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = sorted.len();
    // Fewer accepted rows than this cannot meet the target even with no error: a bound
    // that depends on n alone, so starting the sequence there costs no confidence.
    let min_accepted = (1..=n).find(|&m| clopper_pearson_upper(0, m, confidence) <= target);
    let mut best = Referral {
        target_error: target,
        threshold: None,
        coverage: 0.0,
        accepted_error: 0.0,
        error_upper_bound: 1.0,
    };
    let Some(min_accepted) = min_accepted else {
        return best;
    };
    let mut errors = 0usize;
    let mut i = 0;
    while i < n {
        // Rows of equal entropy are accepted or referred together.
        let h = sorted[i].0;
        while i < n && sorted[i].0 == h {
            errors += sorted[i].1 as usize;
            i += 1;
        }
        if i < min_accepted {
            continue;
        }
        let upper = clopper_pearson_upper(errors, i, confidence);
        if upper > target {
            break;
        }
        best = Referral {
            target_error: target,
            threshold: Some(h),
            coverage: i as f64 / n as f64,
            accepted_error: errors as f64 / i as f64,
            error_upper_bound: upper,
        };
    }
    best
}

/// ln P(X ≤ k) for X ~ Binomial(n, p).
fn ln_binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    if p <= 0.0 || k >= n {
        return 0.0;
    }
    if p >= 1.0 {
        return f64::NEG_INFINITY;
    }
    // Terms from i = 0 by their ratio, in logs: (1-p)^n underflows for large n.
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    let mut term = n as f64 * lq;
    let mut acc = term;
    for i in 0..k {
        term += ((n - i) as f64).ln() - ((i + 1) as f64).ln() + lp - lq;
        let (hi, lo) = if acc > term { (acc, term) } else { (term, acc) };
        acc = hi + (lo - hi).exp().ln_1p();
    }
    acc.min(0.0)
}

pub fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    ln_binomial_cdf(k, n, p).exp()
}

/// One-sided Clopper–Pearson upper bound at `confidence` on a rate with `k` events in `n`
/// trials: the p at which P(X ≤ k) = 1 − confidence.
pub fn clopper_pearson_upper(k: usize, n: usize, confidence: f64) -> f64 {
    if n == 0 || k >= n {
        return 1.0;
    }
    let alpha = 1.0 - confidence;
    let (mut lo, mut hi) = (k as f64 / n as f64, 1.0);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if binomial_cdf(k, n, mid) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// The central interval of Binomial(n, p) that holds all but `tail` of its mass on each
/// side: the counts a test may see from a rate p without failing by chance.
pub fn binomial_bounds(n: usize, p: f64, tail: f64) -> (usize, usize) {
    if p <= 0.0 || p >= 1.0 {
        let k = if p <= 0.0 { 0 } else { n };
        return (k, k);
    }
    // One pass over the pmf, each term from the last by their ratio (in logs).
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    let mut ln_pmf = n as f64 * lq;
    let mut cdf = 0.0;
    let mut lower = None;
    for k in 0..=n {
        if k > 0 {
            ln_pmf += ((n - k + 1) as f64).ln() - (k as f64).ln() + lp - lq;
        }
        cdf += ln_pmf.exp();
        if lower.is_none() && cdf > tail {
            lower = Some(k);
        }
        if cdf >= 1.0 - tail {
            return (lower.unwrap_or(k), k);
        }
    }
    (lower.unwrap_or(n), n)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A test that fails by chance once in 10^6 runs per bound.
    const TAIL: f64 = 5e-7;

    #[test]
    fn conformal_rank_uses_the_finite_sample_correction() {
        assert_eq!(conformal_rank(99, 0.9), Some(90)); // ⌈100·0.9⌉ exactly, not 91
        assert_eq!(conformal_rank(100, 0.9), Some(91)); // ⌈90.9⌉
        assert_eq!(conformal_rank(19, 0.95), Some(19));
        assert_eq!(conformal_rank(18, 0.95), None); // ⌈18.05⌉ = 19 > 18: unbounded
        assert_eq!(conformal_rank(98, 0.99), None);
        assert_eq!(conformal_rank(99, 0.99), Some(99));
        let scores: Vec<f64> = (1..=9).map(f64::from).rev().collect();
        assert_eq!(conformal_quantile(&scores, 0.8), Some(8.0));
    }

    #[test]
    fn clopper_pearson_closed_forms() {
        // No events: the bound solves (1-p)^n = 1 - confidence.
        let u = clopper_pearson_upper(0, 149, 0.95);
        assert!((u - (1.0 - 0.05f64.powf(1.0 / 149.0))).abs() < 1e-9, "{u}");
        assert!(u < 0.02 && clopper_pearson_upper(0, 147, 0.95) > 0.02);
        // n - 1 events of n: 1 - p^n... the bound solves 1 - p^n = 0.05.
        let u = clopper_pearson_upper(9, 10, 0.95);
        assert!((u - 0.95f64.powf(0.1)).abs() < 1e-9, "{u}");
        assert!((binomial_cdf(1, 2, 0.5) - 0.75).abs() < 1e-12);
        let (lo, hi) = binomial_bounds(1000, 0.5, 1e-3);
        assert!(lo < 500 && hi > 500 && lo > 440 && hi < 560, "{lo} {hi}");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_792_506), "2026-11-27T15:15:06Z");
    }

    #[test]
    fn sets_by_hand() {
        let p = [0.1, 0.6, 0.3];
        assert_eq!(lac_score(&p, 1), 0.4);
        assert_eq!(prediction_set(&p, Some(0.5)), vec![1]);
        assert_eq!(prediction_set(&p, Some(0.7)), vec![1, 2]);
        assert_eq!(prediction_set(&p, Some(0.9)), vec![1, 2, 0]);
        // Below the top class's own score the set still holds it.
        assert_eq!(prediction_set(&p, Some(0.1)), vec![1]);
        assert_eq!(prediction_set(&p, None), vec![1, 2, 0]);
    }

    #[test]
    fn referral_stops_at_the_first_threshold_that_fails() {
        // 200 rows with no error at low entropy, then an error: 149 error-free rows are
        // the fewest that meet 2% at 95%.
        let mut rows: Vec<(f64, bool)> = (0..200).map(|i| (i as f64, false)).collect();
        rows[150].1 = true;
        let r = referral_threshold(&rows, 0.02, 0.95);
        assert_eq!(r.threshold, Some(149.0));
        assert_eq!(r.coverage, 150.0 / 200.0);
        assert_eq!(r.accepted_error, 0.0);
        // Too few rows for the target: everything is referred.
        let r = referral_threshold(&rows[..100], 0.02, 0.95);
        assert_eq!(r.threshold, None);
        // An early error stops the scan although later prefixes might pass again.
        let mut rows: Vec<(f64, bool)> = (0..2000).map(|i| (i as f64, false)).collect();
        rows[160].1 = true;
        rows[161].1 = true;
        let r = referral_threshold(&rows, 0.02, 0.95);
        assert!(r.threshold.unwrap() < 200.0, "{r:?}");
    }

    /// y = sin(3x) + (0.1 + x)·ε: the noise grows with x, and the "model" sees only half
    /// of it in its MC std, as MC dropout does.
    fn heteroscedastic(rng: &mut ChaCha8Rng) -> (f64, f64, f64) {
        let x: f64 = rng.random();
        let sigma = 0.1 + x;
        let e = normal(rng);
        let y = (3.0 * x).sin() + sigma * e;
        let mean = (3.0 * x).sin() + 0.05;
        (mean, 0.5 * sigma, y)
    }

    /// A standard normal draw (Box–Muller), without another crate.
    fn normal(rng: &mut ChaCha8Rng) -> f64 {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Split conformal on a fresh calibration set per seed, one test row each, so the
    /// covered count is Binomial(seeds, π) with π in [level, level + 1/(n+1)] for every
    /// level: the count must fall inside the 1e-6 central intervals of those two ends.
    #[test]
    fn regression_coverage_is_within_binomial_bounds_over_many_seeds() {
        // n = 50: (n+1)·level is no integer, so dropping the +1 changes the rank.
        let (seeds, n) = (20_000usize, 50usize);
        let mut covered = [0usize; LEVELS.len()];
        for seed in 0..seeds {
            let mut rng = ChaCha8Rng::seed_from_u64(seed as u64);
            let data: Vec<(f64, f64, f64)> = (0..n + 1).map(|_| heteroscedastic(&mut rng)).collect();
            let rows: Vec<RegressionRow> = data[..n]
                .iter()
                .map(|(m, s, y)| RegressionRow {
                    mean: std::slice::from_ref(m),
                    std: std::slice::from_ref(s),
                    target: std::slice::from_ref(y),
                })
                .collect();
            let cal = fit_regression(&rows);
            let (m, s, y) = data[n];
            for (i, level) in cal.intervals.iter().enumerate() {
                let (lo, hi) = interval(m, s, cal.noise_variance[0], level.quantile[0]);
                covered[i] += (lo <= y && y <= hi) as usize;
            }
        }
        for (i, &level) in LEVELS.iter().enumerate() {
            let (lo, _) = binomial_bounds(seeds, level, TAIL);
            let (_, hi) = binomial_bounds(seeds, level + 1.0 / (n as f64 + 1.0), TAIL);
            assert!(
                (lo..=hi).contains(&covered[i]),
                "level {level}: {} of {seeds} covered, bounds [{lo}, {hi}]",
                covered[i]
            );
        }
    }

    fn softmax(l: &[f64]) -> Vec<f64> {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    /// Five classes; the label is drawn from the softmax of the logits, the "model" reports
    /// an overconfident softmax (temperature 2/3). LAC covers at least the level (and
    /// keeping the top class only adds), so the count must clear the lower 1e-6 bound of Binomial(seeds, level);
    /// its sets must also be smaller than all five classes on average (else covering would
    /// be trivial). Only the lower bound is tested: the top class, kept when LAC would
    /// drop it, may push coverage above level + 1/(n+1).
    #[test]
    fn set_coverage_is_within_binomial_bounds_over_many_seeds() {
        let (seeds, n, k) = (20_000usize, 99usize, 5usize);
        let mut covered = [0usize; LEVELS.len()];
        let mut sizes = [0usize; LEVELS.len()];
        for seed in 0..seeds {
            let mut rng = ChaCha8Rng::seed_from_u64(1_000_000 + seed as u64);
            let mut draw = || {
                let logits: Vec<f64> = (0..k).map(|_| 6.0 * rng.random::<f64>()).collect();
                let truth = softmax(&logits);
                let u: f64 = rng.random();
                let mut acc = 0.0;
                let y = truth.iter().position(|p| {
                    acc += p;
                    u < acc
                });
                let model = softmax(&logits.iter().map(|l| 1.5 * l).collect::<Vec<_>>());
                (model, y.unwrap_or(k - 1))
            };
            let data: Vec<(Vec<f64>, usize)> = (0..n + 1).map(|_| draw()).collect();
            let rows: Vec<ClassRow> = data[..n]
                .iter()
                .map(|(p, y)| ClassRow {
                    probabilities: p,
                    predictive_entropy: 0.0,
                    target: *y,
                })
                .collect();
            let cal = fit_sets(&rows, &[]);
            let (p, y) = &data[n];
            for (i, level) in cal.sets.iter().enumerate() {
                let set = prediction_set(p, level.threshold);
                covered[i] += set.contains(y) as usize;
                sizes[i] += set.len();
            }
        }
        for (i, &level) in LEVELS.iter().enumerate() {
            let (lo, _) = binomial_bounds(seeds, level, TAIL);
            assert!(
                covered[i] >= lo,
                "level {level}: {} of {seeds} covered, lower bound {lo}",
                covered[i]
            );
            // At 0.99, 99 rows make the threshold the largest score: sets are near-total.
            let mean_size = sizes[i] as f64 / seeds as f64;
            let most = if level < 0.99 { k as f64 - 0.5 } else { k as f64 };
            assert!(mean_size < most, "level {level}: mean set size {mean_size}");
        }
    }

    proptest! {
        /// Intervals contain the mean and nest by level; sets are never empty, hold the
        /// top class first, are the LAC set whenever that is non-empty, and nest.
        #[test]
        fn intervals_contain_the_mean_and_sets_are_never_empty(
            mean in -1e6f64..1e6,
            std in 0.0f64..1e3,
            noise in 0.0f64..1e3,
            qs in proptest::collection::vec(0.0f64..10.0, 4),
            logits in proptest::collection::vec(-8.0f64..8.0, 2..12),
            t in 0.0f64..1.0,
        ) {
            let mut qs = qs;
            qs.sort_by(f64::total_cmp);
            let mut last = (mean, mean);
            for q in qs {
                let (lo, hi) = interval(mean, std, noise, Some(q));
                prop_assert!(lo <= mean && mean <= hi);
                prop_assert!(lo <= last.0 && hi >= last.1);
                last = (lo, hi);
            }
            let p = softmax(&logits);
            let top = argmax(&p);
            let set = prediction_set(&p, Some(t));
            prop_assert!(!set.is_empty());
            prop_assert_eq!(set[0], top);
            // A threshold at or above the top class's score: exactly the LAC set.
            if lac_score(&p, top) <= t {
                let lac: Vec<usize> = (0..p.len()).filter(|&k| lac_score(&p, k) <= t).collect();
                let mut sorted = set.clone();
                sorted.sort();
                prop_assert_eq!(sorted, lac);
            }
            let bigger = prediction_set(&p, Some((t + 0.1).min(1.0)));
            prop_assert!(bigger.len() >= set.len() && bigger[..set.len()] == set[..]);
        }
    }
}
