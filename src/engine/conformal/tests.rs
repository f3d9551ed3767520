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

/// Fewer than 99 rows leave the 0.99 interval unbounded: its mean width is null, and the
/// file reads back (an infinite width used to be written as null into an f64 and made the
/// calibration unloadable).
#[test]
fn a_small_regression_calibration_round_trips_through_json() {
    let (m, s, y): (Vec<f64>, Vec<f64>, Vec<f64>) = (
        (0..50).map(|i| i as f64).collect(),
        vec![1.0; 50],
        (0..50).map(|i| i as f64 + (i % 7) as f64 - 3.0).collect(),
    );
    let rows: Vec<RegressionRow> = (0..50)
        .map(|i| RegressionRow {
            mean: std::slice::from_ref(&m[i]),
            std: std::slice::from_ref(&s[i]),
            target: std::slice::from_ref(&y[i]),
        })
        .collect();
    let cal = fit_regression(&rows);
    let widths = |c: &RegressionCalibration, level: f64| {
        c.intervals
            .iter()
            .find(|l| l.level == level)
            .unwrap()
            .calibration_mean_width
            .clone()
    };
    assert_eq!(widths(&cal, 0.99), vec![None]);
    assert!(widths(&cal, 0.8)[0].is_some_and(|w| w.is_finite() && w > 0.0));
    let text = serde_json::to_string(&cal).unwrap();
    let back: RegressionCalibration = serde_json::from_str(&text).unwrap();
    assert_eq!(widths(&back, 0.99), vec![None]);
    assert_eq!(widths(&back, 0.8), widths(&cal, 0.8));
}
