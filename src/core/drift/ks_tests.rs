// Reference values from scipy 1.17.1 (numpy 2.4.6), computed on 2026-12-06 with
// `scipy.stats.ks_2samp(a, b, method='exact')` (and, for `big`, `method='asymp'` and
// `scipy.stats.kstwobign.sf(sqrt(en) * D)`), where the generated samples are
// `xs(n, a, p) = [((i*a) % 1.0)**p for i in range(1, n+1)]`.
use super::*;

fn xs(n: usize, a: f64, p: f64) -> Vec<f64> {
    (1..=n).map(|i| ((i as f64 * a) % 1.0).powf(p)).collect()
}

fn close(got: KsResult, statistic: f64, p_value: f64, tol: f64) {
    assert!((got.statistic - statistic).abs() < 1e-12, "D {} vs {statistic}", got.statistic);
    assert!(
        (got.p_value - p_value).abs() <= tol * p_value.max(1e-300),
        "p {} vs {p_value}",
        got.p_value
    );
}

#[test]
fn small_samples_match_scipy_exact() {
    let a = [0.1, 0.4, 0.7, 1.2, 2.5, 0.3, 0.9, 1.1, 0.05, 0.8, 1.6, 2.2];
    let b = [
        0.5, 0.6, 1.9, 2.8, 3.1, 1.4, 0.2, 2.7, 3.3, 1.8, 2.4, 0.95, 1.7, 2.9, 3.6,
    ];
    close(ks_2samp(&a, &b), 0.5, 0.050718482546454, 1e-9);
    // Symmetric in its samples.
    close(ks_2samp(&b, &a), 0.5, 0.050718482546454, 1e-9);
}

#[test]
fn ties_match_scipy_exact() {
    let a = [0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 1.0];
    let b = [1.0, 1.0, 1.0, 1.0, 0.0, 0.25, 1.0, 1.0, 1.0, 0.75];
    close(ks_2samp(&a, &b), 0.3, 0.7227478403948991, 1e-9);
}

#[test]
fn window_sized_samples_match_scipy_exact() {
    let g = 0.6180339887;
    let s = 0.41421356;
    close(ks_2samp(&xs(50, g, 1.0), &xs(200, s, 1.0)), 0.025, 1.0, 1e-9);
    close(ks_2samp(&xs(50, g, 1.0), &xs(200, s, 1.6)), 0.185, 0.11997595308993365, 1e-7);
    close(
        ks_2samp(&xs(200, g, 1.0), &xs(200, 0.7320508, 1.2)),
        0.075,
        0.6284308022715471,
        1e-7,
    );
    close(
        ks_2samp(&xs(60, g, 1.0), &xs(575, s, 1.3)),
        0.11130434782608696,
        0.4752830980750759,
        1e-7,
    );
    close(ks_2samp(&xs(50, g, 1.0), &xs(200, s, 3.0)), 0.41, 1.684977296459535e-06, 1e-6);
}

#[test]
fn beyond_max_exact_the_kolmogorov_limit() {
    // scipy's method='asymp' (kstwo.sf(D, round(en))) gives 0.00012997640187583121 here;
    // the Kolmogorov limit, what this implements, 0.00015227412167502855.
    let r = ks_2samp(&xs(12000, 0.6180339887, 1.0), &xs(200, 0.41421356, 1.5));
    close(r, 0.15525, 0.00015227412167502855, 1e-6);
}

#[test]
fn empty_and_identical_samples() {
    assert_eq!(ks_2samp(&[], &[1.0]).p_value, 1.0);
    let r = ks_2samp(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
    assert_eq!((r.statistic, r.p_value), (0.0, 1.0));
}
