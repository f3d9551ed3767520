//! What a calibration file must hold to be served: the invariants `mcd-serve calibrate`
//! produces by construction (method.rs), checked at load so that an edited or corrupted
//! file is refused with its reason instead of serving inverted intervals or "unbounded"
//! ones by accident.
//!
//! - `n` and `mc_samples` are at least 1; each output's levels lie in (0, 1), distinct.
//! - A quantile or set threshold is null exactly when ⌈(n+1)·level⌉ > n ([`conformal_rank`]):
//!   `n` is consistent with the levels it claims.
//! - Interval quantiles (|residual| / std_total) are finite and ≥ 0; set thresholds (LAC
//!   scores, 1 − p) lie in [0, 1]; both are non-decreasing in the level, null counting as
//!   unbounded.
//! - Noise variances are finite and ≥ 0, one per element, as many as each level's
//!   quantiles.
//! - The set method is `lac`, the only one served; referral targets and confidence lie in
//!   (0, 1); referral thresholds (predictive entropies) are finite and ≥ 0, or null;
//!   calibration coverages, accepted errors and their bounds are shares, in [0, 1].

use super::file::{
    CalibrationFile, LabelCalibration, OutputCalibration, Referral, RegressionCalibration, SetCalibration,
};
use super::method::conformal_rank;

/// Why `file` cannot be served, if it cannot.
pub fn validate(file: &CalibrationFile) -> Result<(), String> {
    if file.n == 0 {
        return Err("n is 0: a calibration needs at least one row".into());
    }
    if file.mc_samples == 0 {
        return Err("mc_samples is 0".into());
    }
    for (name, cal) in &file.outputs {
        match cal {
            OutputCalibration::Regression(r) => regression(file.n, r),
            OutputCalibration::Probabilities(s) => sets(file.n, s),
            OutputCalibration::Labels(l) => labels(file.n, l),
        }
        .map_err(|e| format!("output '{name}': {e}"))?;
    }
    Ok(())
}

fn regression(n: usize, r: &RegressionCalibration) -> Result<(), String> {
    for (j, v) in r.noise_variance.iter().enumerate() {
        if !(v.is_finite() && *v >= 0.0) {
            return Err(format!("noise_variance[{j}] is {v}; it must be finite and at least 0"));
        }
    }
    let levels: Vec<f64> = r.intervals.iter().map(|i| i.level).collect();
    let order = levels_in_order(&levels)?;
    for i in &r.intervals {
        let at = format!("the {} level", i.level);
        if i.quantile.len() != r.noise_variance.len() {
            return Err(format!(
                "{at} has {} quantiles for {} noise variances (one per element each)",
                i.quantile.len(),
                r.noise_variance.len()
            ));
        }
        for (j, q) in i.quantile.iter().enumerate() {
            if let Some(q) = q
                && !(q.is_finite() && *q >= 0.0)
            {
                return Err(format!("{at}: quantile[{j}] is {q}; it must be finite and at least 0"));
            }
            rank_consistent(n, i.level, q.is_some(), &format!("{at}: quantile[{j}]"))?;
        }
        share(i.calibration_coverage, &format!("{at}: calibration_coverage"))?;
    }
    for pair in order.windows(2) {
        let (lo, hi) = (&r.intervals[pair[0]], &r.intervals[pair[1]]);
        for (j, (a, b)) in lo.quantile.iter().zip(&hi.quantile).enumerate() {
            if unbounded(*a) > unbounded(*b) {
                return Err(format!(
                    "quantile[{j}] decreases with the level: {} at {} but {} at {}",
                    shown(*a),
                    lo.level,
                    shown(*b),
                    hi.level
                ));
            }
        }
    }
    Ok(())
}

fn sets(n: usize, s: &SetCalibration) -> Result<(), String> {
    if s.method != "lac" {
        return Err(format!("method '{}' is not one the server applies (lac)", s.method));
    }
    let levels: Vec<f64> = s.sets.iter().map(|l| l.level).collect();
    let order = levels_in_order(&levels)?;
    for l in &s.sets {
        let at = format!("the {} level", l.level);
        if let Some(t) = l.threshold
            && !(0.0..=1.0).contains(&t)
        {
            return Err(format!("{at}: threshold {t} is outside [0, 1] (a LAC score is 1 − p)"));
        }
        rank_consistent(n, l.level, l.threshold.is_some(), &format!("{at}: threshold"))?;
        share(l.calibration_coverage, &format!("{at}: calibration_coverage"))?;
    }
    for pair in order.windows(2) {
        let (lo, hi) = (&s.sets[pair[0]], &s.sets[pair[1]]);
        if unbounded(lo.threshold) > unbounded(hi.threshold) {
            return Err(format!(
                "the set threshold decreases with the level: {} at {} but {} at {}",
                shown(lo.threshold),
                lo.level,
                shown(hi.threshold),
                hi.level
            ));
        }
    }
    referrals(s.referral_confidence, &s.referral)
}

fn labels(n: usize, l: &LabelCalibration) -> Result<(), String> {
    if l.method != "lac_per_label" {
        return Err(format!(
            "method '{}' is not one the server applies to labels (lac_per_label)",
            l.method
        ));
    }
    if l.labels == 0 {
        return Err("labels is 0".into());
    }
    let levels: Vec<f64> = l.sets.iter().map(|s| s.level).collect();
    let order = levels_in_order(&levels)?;
    for s in &l.sets {
        let at = format!("the {} level", s.level);
        if s.threshold.len() != l.labels || s.calibration_coverage.len() != l.labels {
            return Err(format!(
                "{at} has {} thresholds and {} coverages for {} labels (one per label each)",
                s.threshold.len(),
                s.calibration_coverage.len(),
                l.labels
            ));
        }
        for (j, (t, c)) in s.threshold.iter().zip(&s.calibration_coverage).enumerate() {
            if let Some(t) = t
                && !(0.0..=1.0).contains(t)
            {
                return Err(format!(
                    "{at}: threshold[{j}] {t} is outside [0, 1] (a LAC score is 1 − p)"
                ));
            }
            rank_consistent(n, s.level, t.is_some(), &format!("{at}: threshold[{j}]"))?;
            share(*c, &format!("{at}: calibration_coverage[{j}]"))?;
        }
        if !(0.0..=l.labels as f64).contains(&s.calibration_mean_undecided) {
            return Err(format!(
                "{at}: calibration_mean_undecided {} is outside [0, {}]",
                s.calibration_mean_undecided, l.labels
            ));
        }
    }
    for pair in order.windows(2) {
        let (lo, hi) = (&l.sets[pair[0]], &l.sets[pair[1]]);
        for (j, (a, b)) in lo.threshold.iter().zip(&hi.threshold).enumerate() {
            if unbounded(*a) > unbounded(*b) {
                return Err(format!(
                    "threshold[{j}] decreases with the level: {} at {} but {} at {}",
                    shown(*a),
                    lo.level,
                    shown(*b),
                    hi.level
                ));
            }
        }
    }
    referrals(l.referral_confidence, &l.referral)
}

fn referrals(confidence: f64, referral: &[Referral]) -> Result<(), String> {
    open_share(confidence, "referral_confidence")?;
    for (i, r) in referral.iter().enumerate() {
        open_share(r.target_error, &format!("referral[{i}].target_error"))?;
        if referral[..i].iter().any(|o| o.target_error == r.target_error) {
            return Err(format!("referral target {} appears twice", r.target_error));
        }
        let at = format!("the referral at target {}", r.target_error);
        if let Some(t) = r.threshold
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!(
                "{at}: threshold {t} must be a predictive entropy (finite, at least 0) or null"
            ));
        }
        share(r.coverage, &format!("{at}: coverage"))?;
        share(r.accepted_error, &format!("{at}: accepted_error"))?;
        share(r.error_upper_bound, &format!("{at}: error_upper_bound"))?;
    }
    Ok(())
}

/// The indices of `levels` from lowest to highest, once each checked in (0, 1) and
/// distinct.
fn levels_in_order(levels: &[f64]) -> Result<Vec<usize>, String> {
    if let Some(l) = levels.iter().find(|l| !(**l > 0.0 && **l < 1.0)) {
        return Err(format!("level {l} is outside (0, 1)"));
    }
    let mut order: Vec<usize> = (0..levels.len()).collect();
    order.sort_by(|&a, &b| levels[a].total_cmp(&levels[b]));
    if let Some(pair) = order.windows(2).find(|p| levels[p[0]] == levels[p[1]]) {
        return Err(format!("level {} appears twice", levels[pair[0]]));
    }
    Ok(order)
}

/// A quantile is null exactly when the calibration set is too small for its level.
fn rank_consistent(n: usize, level: f64, present: bool, what: &str) -> Result<(), String> {
    match (conformal_rank(n, level).is_some(), present) {
        (true, false) => Err(format!(
            "{what} is null (unbounded), but n = {n} rows are enough for the {level} level"
        )),
        (false, true) => Err(format!(
            "{what} has a value, but n = {n} rows are too few for the {level} level (it must be null)"
        )),
        _ => Ok(()),
    }
}

fn share(v: f64, what: &str) -> Result<(), String> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("{what} is {v}; it must lie in [0, 1]"))
    }
}

fn open_share(v: f64, what: &str) -> Result<(), String> {
    if v > 0.0 && v < 1.0 {
        Ok(())
    } else {
        Err(format!("{what} is {v}; it must lie in (0, 1)"))
    }
}

fn unbounded(q: Option<f64>) -> f64 {
    q.unwrap_or(f64::INFINITY)
}

fn shown(q: Option<f64>) -> String {
    q.map_or("null (unbounded)".into(), |q| q.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::file::*;
    use super::super::method::{ClassRow, RegressionRow, fit_regression, fit_sets};
    use super::*;

    /// A file as `calibrate` writes it: one regression output of two elements and one
    /// probability output, fitted on `n` made-up rows.
    fn fitted(n: usize) -> CalibrationFile {
        let rows: Vec<([f64; 2], [f64; 2], [f64; 2])> = (0..n)
            .map(|i| {
                let x = i as f64;
                (
                    [x, -x],
                    [1.0 + x % 3.0, 2.0],
                    [x + (x % 5.0) - 2.0, -x + (x % 7.0) - 3.0],
                )
            })
            .collect();
        let reg: Vec<RegressionRow> = rows
            .iter()
            .map(|(m, s, t)| RegressionRow {
                mean: m,
                std: s,
                target: t,
            })
            .collect();
        let probs: Vec<[f64; 3]> = (0..n)
            .map(|i| {
                let a = 0.5 + (i % 4) as f64 * 0.1;
                [a, (1.0 - a) * 0.7, (1.0 - a) * 0.3]
            })
            .collect();
        let cls: Vec<ClassRow> = probs
            .iter()
            .enumerate()
            .map(|(i, p)| ClassRow {
                probabilities: p,
                predictive_entropy: (i % 10) as f64 * 0.05,
                target: usize::from(i % 9 == 0),
            })
            .collect();
        CalibrationFile {
            format: FORMAT.into(),
            model_file: "m.onnx".into(),
            model_sha256: String::new(),
            created: rfc3339(0),
            n,
            mc_samples: 10,
            seed: 0,
            drift_reference: Default::default(),
            drift_reference_eval: Default::default(),
            outputs: [
                ("y".to_string(), OutputCalibration::Regression(fit_regression(&reg))),
                (
                    "p".to_string(),
                    OutputCalibration::Probabilities(fit_sets(&cls, &REFER_TARGETS)),
                ),
            ]
            .into(),
        }
    }

    fn reg(f: &mut CalibrationFile) -> &mut RegressionCalibration {
        match f.outputs.get_mut("y") {
            Some(OutputCalibration::Regression(r)) => r,
            _ => unreachable!(),
        }
    }

    fn set(f: &mut CalibrationFile) -> &mut SetCalibration {
        match f.outputs.get_mut("p") {
            Some(OutputCalibration::Probabilities(s)) => s,
            _ => unreachable!(),
        }
    }

    fn refused(f: &CalibrationFile, says: &str) {
        let e = validate(f).expect_err("the file should be refused");
        assert!(e.contains(says), "{e:?} should say {says:?}");
    }

    #[test]
    fn what_calibrate_writes_is_valid() {
        for n in [1, 5, 18, 19, 99, 200] {
            validate(&fitted(n)).unwrap_or_else(|e| panic!("n = {n}: {e}"));
        }
    }

    #[test]
    fn n_and_mc_samples_are_positive() {
        let mut f = fitted(200);
        f.n = 0;
        refused(&f, "n is 0");
        let mut f = fitted(200);
        f.mc_samples = 0;
        refused(&f, "mc_samples is 0");
    }

    #[test]
    fn quantiles_are_finite_and_non_negative() {
        let mut f = fitted(200);
        reg(&mut f).intervals[0].quantile[0] = Some(-5.0);
        refused(&f, "quantile[0] is -5");
        let mut f = fitted(200);
        reg(&mut f).intervals[1].quantile[1] = Some(f64::NAN);
        refused(&f, "quantile[1] is NaN");
        let mut f = fitted(200);
        reg(&mut f).intervals[3].quantile[1] = Some(f64::INFINITY);
        refused(&f, "must be finite");
    }

    #[test]
    fn quantiles_do_not_decrease_with_the_level() {
        let mut f = fitted(200);
        let r = reg(&mut f);
        r.intervals[2].quantile[0] = Some(r.intervals[1].quantile[0].unwrap() / 2.0);
        refused(&f, "decreases with the level");
        // Listed out of order, the file is still judged by level.
        let mut f = fitted(200);
        reg(&mut f).intervals.reverse();
        validate(&f).unwrap();
    }

    #[test]
    fn a_null_quantile_matches_n() {
        // 200 rows are enough for every level: a null there is not the method's.
        let mut f = fitted(200);
        reg(&mut f).intervals[3].quantile[0] = None;
        refused(&f, "are enough for the 0.99 level");
        // 18 rows are too few for 0.95 and 0.99: a value there is not either.
        let mut f = fitted(18);
        reg(&mut f).intervals[2].quantile[0] = Some(100.0);
        refused(&f, "too few for the 0.95 level");
        // n claims more rows than the file was fitted on.
        let mut f = fitted(18);
        f.n = 500;
        refused(&f, "n = 500 rows are enough");
    }

    #[test]
    fn levels_lie_in_the_unit_interval_once_each() {
        let mut f = fitted(200);
        reg(&mut f).intervals[0].level = 1.5;
        refused(&f, "level 1.5 is outside (0, 1)");
        let mut f = fitted(200);
        set(&mut f).sets[1].level = 0.8;
        refused(&f, "level 0.8 appears twice");
    }

    #[test]
    fn noise_variances_are_finite_non_negative_one_per_element() {
        let mut f = fitted(200);
        reg(&mut f).noise_variance[1] = -1.0;
        refused(&f, "noise_variance[1] is -1");
        let mut f = fitted(200);
        reg(&mut f).noise_variance[0] = f64::INFINITY;
        refused(&f, "noise_variance[0] is inf");
        let mut f = fitted(200);
        reg(&mut f).noise_variance.pop();
        refused(&f, "2 quantiles for 1 noise variances");
    }

    #[test]
    fn set_thresholds_are_lac_scores_non_decreasing() {
        let mut f = fitted(200);
        set(&mut f).sets[0].threshold = Some(1.5);
        refused(&f, "outside [0, 1]");
        let mut f = fitted(200);
        set(&mut f).sets[0].threshold = Some(-0.1);
        refused(&f, "outside [0, 1]");
        let mut f = fitted(200);
        let s = set(&mut f);
        s.sets[0].threshold = Some(0.9);
        s.sets[1].threshold = Some(0.1);
        refused(&f, "set threshold decreases");
        let mut f = fitted(200);
        set(&mut f).method = "aps".into();
        refused(&f, "method 'aps'");
    }

    #[test]
    fn referrals_are_in_range() {
        let mut f = fitted(200);
        set(&mut f).referral[0].threshold = Some(-1.0);
        refused(&f, "must be a predictive entropy");
        let mut f = fitted(200);
        set(&mut f).referral[0].threshold = Some(f64::NAN);
        refused(&f, "must be a predictive entropy");
        let mut f = fitted(200);
        set(&mut f).referral[1].target_error = 1.5;
        refused(&f, "target_error is 1.5");
        let mut f = fitted(200);
        let s = set(&mut f);
        s.referral[1].target_error = s.referral[0].target_error;
        refused(&f, "appears twice");
        let mut f = fitted(200);
        set(&mut f).referral_confidence = 1.0;
        refused(&f, "referral_confidence is 1");
        let mut f = fitted(200);
        set(&mut f).referral[2].error_upper_bound = 2.0;
        refused(&f, "error_upper_bound is 2");
        // A null threshold (every row referred) is the method's own answer.
        let mut f = fitted(200);
        set(&mut f).referral[0].threshold = None;
        validate(&f).unwrap();
    }

    #[test]
    fn coverages_are_shares() {
        let mut f = fitted(200);
        reg(&mut f).intervals[0].calibration_coverage = 1.2;
        refused(&f, "calibration_coverage is 1.2");
        let mut f = fitted(200);
        set(&mut f).sets[0].calibration_coverage = -0.1;
        refused(&f, "calibration_coverage is -0.1");
    }
}
