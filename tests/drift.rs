//! Dataset-shift detection end to end (issue 24): `mcd-serve calibrate` stores a drift
//! reference; served MC rows fill windows that are KS-tested against it off the request
//! path; `GET /models/{name}/drift` and the `mcd_drift_*` metrics report the tests.
//!
//! Every model is calibrated on the even lines of its bundled calibration rows (held out
//! from training by the sklearn split, in the split's shuffled order) and replayed with
//! the odd lines: exchangeable with the reference, so any drift found there is a false
//! alarm. Windows are W = 30 rows, α = 0.01 (the default), MC with 30 samples like the
//! reference.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::{Value, json};

const W: usize = 30;

/// The lines of a bundled calibration data file, split into (reference, replay): even and
/// odd lines; for diabetes (142 rows) the first 100 and the rest, so that its regression
/// calibration keeps every level bounded (the 0.99 level needs at least 99 rows) and the
/// test's window counts stay those measured.
fn halves(model: &str) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(repo_root().join(format!("tools/calibration-data/{model}.jsonl"))).unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if model == "diabetes" {
        return (lines[..100].to_vec(), lines[100..].to_vec());
    }
    let even = lines.iter().step_by(2).cloned().collect();
    let odd = lines.iter().skip(1).step_by(2).cloned().collect();
    (even, odd)
}

fn calibrate(dir: &Path, model: &str, lines: &[String]) {
    let out = run_calibrate(dir, model, lines);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("drift reference"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A line's one row (its `inputs` hold a batch of one).
fn row(line: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap();
    v["inputs"][0].clone()
}

/// Sends `rows` as MC requests of 10 rows each (mc_samples 30, a seed per request).
async fn replay(s: &TestServer, model: &str, rows: &[Value]) {
    for (k, chunk) in rows.chunks(10).enumerate() {
        let (status, body, _) = s
            .post(
                &format!("/models/{model}/predict?mc_samples=30&seed={}", 1000 + k),
                &json!({ "inputs": chunk }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The drift report once `windows` windows have been tested (the drift thread runs after
/// the answers; this waits for it, and gives up only when it hangs).
async fn tested(s: &TestServer, model: &str, windows: u64) -> Value {
    for _ in 0..6000 {
        let (status, d) = s.get(&format!("/models/{model}/drift")).await;
        assert_eq!(status, 200, "{d}");
        if d["drift"]["windows_tested"].as_u64().unwrap_or(0) >= windows {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the drift thread never tested {windows} windows of {model}");
}

fn args(dir: &Path) -> ServeArgs {
    let mut args = ServeArgs::for_models(dir);
    args.drift_window = W;
    args.default_model = Some("breast_cancer".into());
    args
}

fn summary(d: &Value) -> String {
    let windows = d["drift"]["last_windows"].as_array().unwrap();
    windows
        .iter()
        .rev()
        .map(|w| {
            format!(
                "#{} drift={} min_p={:.3e}",
                w["window"],
                w["drift"],
                w["min_p_value"].as_f64().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Null: 13 windows over the three models (breast_cancer 91 rows → 3, diabetes 42 → 1,
/// digits_cnn 287 → 9). At α = 0.01 per window, the number of false alarms is at most
/// Binomial(13, 0.01) (Bonferroni and the exact test's discreteness only lower it; the
/// windows of one model share its reference, which this treats as independent): P(X ≥ 3)
/// = 2.6e-4, so more than 2 drifting windows fails. The windows are counted exactly:
/// ⌊rows / W⌋ tested, rows mod W in the current window (an off-by-one window fails).
#[tokio::test]
async fn null_replay_of_held_out_rows_drifts_within_binomial_bounds() {
    let models = ["breast_cancer", "diabetes", "digits_cnn"];
    let dir = model_folder(&models.map(|m| models_dir().join(format!("{m}.onnx"))));
    let mut replays = vec![];
    for m in models {
        let (even, odd) = halves(m);
        calibrate(dir.path(), m, &even);
        replays.push((m, even.len(), odd.iter().map(|l| row(l)).collect::<Vec<_>>()));
    }
    let s = TestServer::start(args(dir.path())).await;
    let mut drifting = 0;
    let mut total = 0;
    for (m, reference, rows) in &replays {
        replay(&s, m, rows).await;
        let windows = (rows.len() / W) as u64;
        let d = tested(&s, m, windows).await;
        let drift = &d["drift"];
        assert_eq!(d["monitored"], true);
        assert_eq!(drift["windows_tested"], windows, "{m}: {drift}");
        assert_eq!(drift["current_window_rows"], rows.len() % W, "{m}");
        assert_eq!(drift["window"], W);
        assert_eq!(drift["reference"]["n"], *reference);
        let m_stats = drift["statistics"].as_array().unwrap().len();
        assert_eq!(m_stats, if *m == "diabetes" { 2 } else { 3 });
        assert!((drift["threshold"].as_f64().unwrap() - 0.01 / m_stats as f64).abs() < 1e-15);
        eprintln!(
            "null {m}: {} of {windows} drifting: {}",
            drift["windows_drifting"],
            summary(&d)
        );
        drifting += drift["windows_drifting"].as_u64().unwrap();
        total += windows;
    }
    assert_eq!(total, 13);
    assert!(drifting <= 2, "{drifting} false alarms in {total} windows");
    let scrape = s.metrics().await;
    for (m, _, rows) in &replays {
        let windows = (rows.len() / W) as f64;
        let counted = metric_sum(&scrape, "mcd_drift_windows_total", &[("model", m)]);
        assert_eq!(counted, windows, "{m}");
        assert_eq!(
            metric_sum(&scrape, "mcd_drift_window_rows", &[("model", m)]),
            (rows.len() % W) as f64
        );
    }
    assert!(metric_exposed(&scrape, "mcd_drift_p_value"));
    assert!(metric_exposed(&scrape, "mcd_drift_ks_statistic"));
    s.stop().await;
}

/// Power: breast_cancer rows with their first feature (mean radius) scaled ×18, a unit
/// error like mg/dL read as mmol/L, and digits_cnn images inverted (16 − pixel), are found
/// in the first window (30 rows).
#[tokio::test]
async fn unit_errors_and_inverted_images_drift_in_the_first_window() {
    let models = ["breast_cancer", "digits_cnn"];
    let dir = model_folder(&models.map(|m| models_dir().join(format!("{m}.onnx"))));
    for m in models {
        calibrate(dir.path(), m, &halves(m).0);
    }
    let s = TestServer::start(args(dir.path())).await;

    let scaled: Vec<Value> = halves("breast_cancer")
        .1
        .iter()
        .take(W)
        .map(|l| {
            let mut r = row(l);
            r[0] = json!(r[0].as_f64().unwrap() * 18.0);
            r
        })
        .collect();
    replay(&s, "breast_cancer", &scaled).await;
    let d = tested(&s, "breast_cancer", 1).await;
    eprintln!("power breast_cancer x18: {}", summary(&d));
    assert_eq!(d["drift"]["last_windows"][0]["drift"], true, "{d}");

    let inverted: Vec<Value> = halves("digits_cnn")
        .1
        .iter()
        .take(W)
        .map(|l| {
            let mut r = row(l);
            for line in r[0].as_array_mut().unwrap() {
                for px in line.as_array_mut().unwrap() {
                    *px = json!(16.0 - px.as_f64().unwrap());
                }
            }
            r
        })
        .collect();
    replay(&s, "digits_cnn", &inverted).await;
    let d = tested(&s, "digits_cnn", 1).await;
    eprintln!("power digits_cnn inverted: {}", summary(&d));
    assert_eq!(d["drift"]["last_windows"][0]["drift"], true, "{d}");

    let scrape = s.metrics().await;
    for m in models {
        assert_eq!(
            metric_sum(&scrape, "mcd_drift_windows_total", &[("model", m), ("result", "drift")]),
            1.0
        );
    }
    s.stop().await;
}

/// A model without a calibration, or with one made before drift references existed, is
/// served without drift monitoring, and says why.
#[tokio::test]
async fn a_model_without_a_reference_is_not_monitored() {
    let dir = model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("diabetes.onnx"),
    ]);
    let (even, _) = halves("diabetes");
    calibrate(dir.path(), "diabetes", &even);
    let path = dir.path().join("diabetes.calibration.json");
    let mut cal = read_json(&path);
    cal.as_object_mut().unwrap().remove("drift_reference").unwrap();
    std::fs::write(&path, serde_json::to_vec(&cal).unwrap()).unwrap();
    let s = TestServer::start(args(dir.path())).await;
    let (status, d) = s.get("/models/breast_cancer/drift").await;
    assert_eq!(status, 200);
    assert_eq!(
        (d["monitored"].clone(), d["drift"].clone()),
        (json!(false), Value::Null)
    );
    assert!(d["reason"].as_str().unwrap().contains("no calibration"), "{d}");
    let (_, d) = s.get("/models/diabetes/drift").await;
    assert_eq!(d["monitored"], false);
    assert!(d["reason"].as_str().unwrap().contains("re-run"), "{d}");
    let (status, _) = s.get("/models/nope/drift").await;
    assert_eq!(status, 404);
    s.stop().await;
}
