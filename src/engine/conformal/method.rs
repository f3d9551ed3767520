//! The maths of split-conformal calibration, shared by `mcd-serve calibrate` and serving:
//! conformal quantiles, intervals, prediction sets, referral thresholds, binomial bounds.

use super::file::*;

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
                calibration_mean_width: widths.iter().map(|w| Some(w / n).filter(|w| w.is_finite())).collect(),
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

/// A label's predicted value: present when its probability is at least one half (as the
/// row summary's foreground and volumes read a Bernoulli output).
pub fn label_present(p: f64) -> bool {
    p >= 0.5
}

/// The set of one label at `threshold` (None: both values), as (absent in it, present in
/// it): the predicted value, and the other when its LAC score 1 − P(value) is within the
/// threshold. Never empty.
pub fn label_set(p: f64, threshold: Option<f64>) -> (bool, bool) {
    let within = |score: f64| threshold.is_none_or(|t| score <= t);
    let present = label_present(p);
    (!present || within(p), present || within(1.0 - p))
}

/// One calibration row of a multi-label output: each label's mean probability and true
/// value, and the row's mean predictive entropy over its labels.
pub struct LabelRow<'a> {
    pub probabilities: &'a [f64],
    pub mean_predictive_entropy: f64,
    pub target: &'a [bool],
}

/// Per label, LAC at each level (the score of a row is 1 − P(its true value)); referral
/// on the row's mean entropy, counting a row wrong when any of its labels is.
pub fn fit_labels(rows: &[LabelRow], targets: &[f64]) -> LabelCalibration {
    let labels = rows.first().map_or(0, |r| r.probabilities.len());
    let scores: Vec<Vec<f64>> = (0..labels)
        .map(|j| {
            rows.iter()
                .map(|r| {
                    let p = r.probabilities[j];
                    if r.target[j] { 1.0 - p } else { p }
                })
                .collect()
        })
        .collect();
    let n = rows.len().max(1) as f64;
    let sets = LEVELS
        .iter()
        .map(|&level| {
            let threshold: Vec<Option<f64>> = scores.iter().map(|s| conformal_quantile(s, level)).collect();
            let mut covered = vec![0usize; labels];
            let mut undecided = 0usize;
            for r in rows {
                for j in 0..labels {
                    let (absent, present) = label_set(r.probabilities[j], threshold[j]);
                    covered[j] += if r.target[j] { present } else { absent } as usize;
                    undecided += (absent && present) as usize;
                }
            }
            LabelSetLevel {
                level,
                threshold,
                calibration_coverage: covered.iter().map(|c| *c as f64 / n).collect(),
                calibration_mean_undecided: undecided as f64 / n,
            }
        })
        .collect();
    let entropies: Vec<(f64, bool)> = rows
        .iter()
        .map(|r| {
            let wrong = r
                .probabilities
                .iter()
                .zip(r.target)
                .any(|(p, y)| label_present(*p) != *y);
            (r.mean_predictive_entropy, wrong)
        })
        .collect();
    LabelCalibration {
        method: "lac_per_label".into(),
        labels,
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
