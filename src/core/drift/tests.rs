use super::*;
use std::collections::BTreeMap;

/// splitmix64: a fixed stream of uniforms in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The monitored statistics: one eval regression output "y" of three elements per row.
const NAMES: [&str; 3] = ["value[0]", "value[1]", "value[2]"];

fn info(n: usize) -> ReferenceInfo {
    ReferenceInfo {
        n,
        file: "t.calibration.json".into(),
        created: "2026-12-06T00:00:00Z".into(),
        mc_samples: None,
    }
}

/// A monitor of the three statistics, each `n` uniforms.
fn monitor(rng: &mut Rng, n: usize, window: usize, alpha: f64) -> Monitor {
    let stats = NAMES
        .iter()
        .map(|s| (s.to_string(), (0..n).map(|_| rng.next()).collect()))
        .collect();
    let samples = BTreeMap::from([("y".to_string(), stats)]);
    let gauge = IntGauge::new("t", "t").unwrap();
    Monitor::from_reference(
        "m",
        DriftMode::Eval,
        &samples,
        info(n),
        DriftSettings { window, alpha },
        gauge,
    )
    .unwrap()
}

/// An answer of `rows` rows of "y" with `elements` elements each, uniforms (+ `shift` on
/// element 0).
fn answer(rng: &mut Rng, rows: usize, elements: usize, shift: f64) -> Vec<f64> {
    (0..rows * elements)
        .map(|i| rng.next() + if i % elements == 0 { shift } else { 0.0 })
        .collect()
}

fn record(m: &Monitor, values: Vec<f64>, rows: usize) -> Vec<Vec<f64>> {
    let observed = [Observed::Eval {
        name: "y",
        values: observe::Values::new(values),
        probability: false,
    }];
    m.record(&observed, rows)
}

/// `rows` rows of the three statistics.
fn rows(rng: &mut Rng, rows: usize, shift: f64) -> Vec<f64> {
    answer(rng, rows, 3, shift)
}

#[test]
fn a_window_is_full_at_exactly_w_rows_and_windows_do_not_overlap() {
    let mut rng = Rng(1);
    let m = monitor(&mut rng, 100, 5, 0.01);
    assert!(record(&m, rows(&mut rng, 4, 0.0), 4).is_empty());
    assert_eq!(m.current_rows(), 4);
    let full = record(&m, rows(&mut rng, 1, 0.0), 1);
    assert_eq!(full.len(), 1);
    assert_eq!(full[0].len(), 5 * 3, "W rows × m statistics");
    assert_eq!(m.current_rows(), 0);
    // One answer of 12 rows fills two windows and starts the next with 2 rows.
    let full = record(&m, rows(&mut rng, 12, 0.0), 12);
    assert_eq!(full.iter().map(Vec::len).collect::<Vec<_>>(), vec![15, 15]);
    assert_eq!(m.current_rows(), 2);
    let r = m.test(&full[0]);
    assert_eq!((r.window, r.rows, r.statistics.len()), (1, 5, 3));
    assert_eq!(m.window_rows.get(), 2, "the gauge follows the window");
    // An answer missing a statistic (two elements a row: no value[2]) is not recorded.
    assert!(record(&m, answer(&mut rng, 3, 2, 0.0), 3).is_empty());
    assert_eq!(m.current_rows(), 2);
}

#[test]
fn the_threshold_is_alpha_over_the_monitored_statistics() {
    let m = monitor(&mut Rng(2), 50, 10, 0.01);
    assert!((m.threshold() - 0.01 / 3.0).abs() < 1e-15);
    assert_eq!(m.report().threshold, m.threshold());
}

/// Null: windows of W = 50 rows drawn from the reference's own distribution, each against a
/// fresh reference of 200, m = 3 independent statistics, α = 0.05 per window. Bonferroni
/// keeps the false-alarm rate at most α (1 − (1 − α/3)³ = 0.0492 for continuous p-values;
/// the exact test's discreteness makes it smaller). Over N = 1000 windows the count of
/// drifting windows is then at most Binomial(1000, 0.05): mean 50, sd 6.9, and
/// P(X > 76) < 0.001. A missing Bonferroni divisor raises the rate to about
/// 1 − 0.95³ = 0.14 (about 140 windows); a count below 25 (P < 0.001 at a true rate of
/// 0.045) means the test is far more conservative than it claims.
#[test]
fn null_windows_drift_at_most_at_rate_alpha() {
    let mut rng = Rng(42);
    let trials = 1000;
    let mut drifting = 0;
    for _ in 0..trials {
        let m = monitor(&mut rng, 200, 50, 0.05);
        let full = record(&m, rows(&mut rng, 50, 0.0), 50);
        assert_eq!(full.len(), 1);
        drifting += m.test(&full[0]).drift as usize;
    }
    eprintln!("null: {drifting} of {trials} windows drifting at alpha 0.05");
    assert!((25..=76).contains(&drifting), "{drifting} of {trials}");
}

/// Power: a shift of 0.3 (30% of the range) in one statistic is found in every window.
#[test]
fn a_shifted_statistic_drifts_and_is_reported() {
    let mut rng = Rng(7);
    let m = monitor(&mut rng, 200, 50, 0.01);
    for _ in 0..5 {
        let full = record(&m, rows(&mut rng, 50, 0.3), 50);
        let r = m.test(&full[0]);
        assert!(r.drift, "{r:?}");
        assert!(r.statistics[0].statistic == "value[0]" && r.statistics[0].p_value < m.threshold());
    }
    let report = m.report();
    assert_eq!(
        (
            report.windows_tested,
            report.windows_drifting,
            report.consecutive_drifting
        ),
        (5, 5, 5)
    );
    assert_eq!(report.last_windows[0].window, 5, "most recent first");
    assert_eq!(report.reference.n, 200);
}
