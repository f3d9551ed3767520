//! Dataset-shift detection end to end (issue 24): `mcd-serve calibrate` stores a drift
//! reference (of labelled rows in the calibration, or of unlabelled rows in its own file);
//! served MC and eval rows fill windows that are KS-tested against it off the request
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

/// Sends `rows` as eval requests of 10 rows each.
async fn replay_eval(s: &TestServer, model: &str, rows: &[Value]) {
    for chunk in rows.chunks(10) {
        let (status, body, _) = s
            .post(&format!("/models/{model}/predict"), &json!({ "inputs": chunk }))
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The drift report once its monitor `key` ("drift": MC, "eval_drift": eval) has tested
/// `windows` windows (the drift thread runs after the answers; this waits for it, and
/// gives up only when it hangs).
async fn tested_in(s: &TestServer, model: &str, key: &str, windows: u64) -> Value {
    for _ in 0..6000 {
        let (status, d) = s.get(&format!("/models/{model}/drift")).await;
        assert_eq!(status, 200, "{d}");
        if d[key]["windows_tested"].as_u64().unwrap_or(0) >= windows {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the drift thread never tested {windows} {key} windows of {model}");
}

async fn tested(s: &TestServer, model: &str, windows: u64) -> Value {
    tested_in(s, model, "drift", windows).await
}

fn args(dir: &Path) -> ServeArgs {
    args_with(dir, W)
}

fn args_with(dir: &Path, w: usize) -> ServeArgs {
    let mut args = ServeArgs::for_models(dir);
    args.drift_window = w;
    args.default_model = Some("breast_cancer".into());
    args
}

fn summary(d: &Value) -> String {
    summary_of(&d["drift"])
}

fn summary_of(monitor: &Value) -> String {
    let windows = monitor["last_windows"].as_array().unwrap();
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

/// Null: 13 MC windows over the three models (breast_cancer 91 rows → 3, diabetes 42 → 1,
/// digits_cnn 287 → 9), and the same 13 again from the same rows served in eval mode. At
/// α = 0.01 per window, the number of false alarms among the 13 MC windows is at most
/// Binomial(13, 0.01) (Bonferroni and the exact test's discreteness only lower it; the
/// windows of one model share its reference, which this treats as independent): P(X ≥ 3)
/// = 2.6e-4, so more than 2 drifting windows fails; the same bound holds for the eval
/// windows on their own. The windows are counted exactly: ⌊rows / W⌋ tested, rows mod W
/// in the current window (an off-by-one window fails).
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
    let mut eval_drifting = 0;
    for (m, reference, rows) in &replays {
        replay(&s, m, rows).await;
        replay_eval(&s, m, rows).await;
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
        // Eval rows: one statistic per output (top-class probability, or the value),
        // against the eval reference of the same calibration rows.
        let d = tested_in(&s, m, "eval_drift", windows).await;
        let eval = &d["eval_drift"];
        assert_eq!(eval["mode"], "eval");
        assert_eq!(eval["windows_tested"], windows, "{m}: {eval}");
        assert_eq!(eval["current_window_rows"], rows.len() % W, "{m}");
        let names: Vec<&str> = eval["statistics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["statistic"].as_str().unwrap())
            .collect();
        let expected = if *m == "diabetes" {
            "value"
        } else {
            "top_class_probability"
        };
        assert_eq!(names, [expected], "{m}");
        assert!(eval["reference"].get("mc_samples").is_none(), "{eval}");
        eprintln!(
            "null {m} eval: {} of {windows} drifting: {}",
            eval["windows_drifting"],
            summary_of(eval)
        );
        eval_drifting += eval["windows_drifting"].as_u64().unwrap();
    }
    assert_eq!(total, 13);
    assert!(drifting <= 2, "{drifting} false alarms in {total} MC windows");
    assert!(
        eval_drifting <= 2,
        "{eval_drifting} false alarms in {total} eval windows"
    );
    let scrape = s.metrics().await;
    for (m, _, rows) in &replays {
        let windows = (rows.len() / W) as f64;
        for mode in ["mc_dropout", "eval"] {
            let labels = [("model", *m), ("mode", mode)];
            let counted = metric_sum(&scrape, "mcd_drift_windows_total", &labels);
            assert_eq!(counted, windows, "{m} {mode}");
            assert_eq!(
                metric_sum(&scrape, "mcd_drift_window_rows", &labels),
                (rows.len() % W) as f64
            );
        }
    }
    assert!(metric_exposed(&scrape, "mcd_drift_p_value"));
    assert!(metric_exposed(&scrape, "mcd_drift_ks_statistic"));
    s.stop().await;
}

/// splitmix64: a fixed stream of uniforms in [0, 1) for the shifts.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.next().max(1e-300);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.next()).cos()
    }
}

/// A digits image's 64 pixels, flat, and back.
fn pixels(row: &Value) -> Vec<f64> {
    row[0]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|line| line.as_array().unwrap().iter().map(|p| p.as_f64().unwrap()))
        .collect()
}

fn image(px: &[f64]) -> Value {
    json!([px.chunks(8).collect::<Vec<_>>()])
}

/// The shifts of the power test: a name, the model, and the shifted replay rows.
fn shifts() -> Vec<(&'static str, &'static str, Vec<Value>)> {
    let held_out = |m: &str| halves(m).1.iter().map(|l| row(l)).collect::<Vec<Value>>();
    let mut rng = Rng(24);
    let mut out = vec![];
    // A unit error: mean radius in other units (×18, as mg/dL read for mmol/L).
    let scaled = held_out("breast_cancer")
        .into_iter()
        .map(|mut r| {
            r[0] = json!(r[0].as_f64().unwrap() * 18.0);
            r
        })
        .collect();
    out.push(("mean radius x18", "breast_cancer", scaled));
    // diabetes' features are centred and scaled by sklearn; bmi (feature 2) read ×10.
    let bmi = held_out("diabetes")
        .into_iter()
        .map(|mut r| {
            r[2] = json!(r[2].as_f64().unwrap() * 10.0);
            r
        })
        .collect();
    out.push(("bmi x10", "diabetes", bmi));
    let digits = held_out("digits_cnn");
    let map = |f: &mut dyn FnMut(Vec<f64>) -> Vec<f64>| -> Vec<Value> {
        digits.iter().map(|r| image(&f(pixels(r)))).collect()
    };
    out.push((
        "inverted (16 - pixel)",
        "digits_cnn",
        map(&mut |px| px.iter().map(|p| 16.0 - p).collect()),
    ));
    out.push((
        "pixels shuffled",
        "digits_cnn",
        map(&mut |mut px| {
            for i in (1..px.len()).rev() {
                let j = (rng.next() * (i + 1) as f64) as usize;
                px.swap(i, j.min(i));
            }
            px
        }),
    ));
    let mut rng = Rng(25);
    out.push((
        "Gaussian noise, sd 4 of 16",
        "digits_cnn",
        map(&mut |px| px.iter().map(|p| (p + 4.0 * rng.normal()).clamp(0.0, 16.0)).collect()),
    ));
    out
}

/// Windows of shifted rows until the monitor `key` calls one drifting (from 1), feeding
/// W rows at a time and cycling through `rows`; None when `max` windows pass unflagged.
async fn delay(s: &TestServer, model: &str, key: &str, rows: &[Value], max: usize) -> Option<usize> {
    delay_at(s, model, key, rows, max, W).await
}

async fn delay_at(s: &TestServer, model: &str, key: &str, rows: &[Value], max: usize, w: usize) -> Option<usize> {
    let (_, d) = s.get(&format!("/models/{model}/drift")).await;
    let before = d[key]["windows_tested"].as_u64().unwrap();
    assert_eq!(d[key]["current_window_rows"], 0, "a shift starts on a window boundary");
    for k in 1..=max {
        let window: Vec<Value> = (0..w).map(|i| rows[((k - 1) * w + i) % rows.len()].clone()).collect();
        if key == "drift" {
            replay(s, model, &window).await;
        } else {
            replay_eval(s, model, &window).await;
        }
        let d = tested_in(s, model, key, before + k as u64).await;
        if d[key]["last_windows"][0]["drift"] == true {
            eprintln!("power {model} {key}: found in window {k}: {}", summary_of(&d[key]));
            return Some(k);
        }
    }
    None
}

/// Power: every shift is found, by the MC and by the eval monitor, within the number of
/// windows measured here (W = 30 rows; the replay is deterministic, so the bound is the
/// measurement, kept as a regression bound): a unit error in one feature of
/// breast_cancer (mean radius ×18) and diabetes (bmi ×10), and digits_cnn images
/// inverted, with pixels shuffled, or with Gaussian noise of sd 4 (a quarter of the
/// pixel range) added.
#[tokio::test]
async fn shifted_rows_drift_within_the_measured_windows() {
    let models = ["breast_cancer", "diabetes", "digits_cnn"];
    let dir = model_folder(&models.map(|m| models_dir().join(format!("{m}.onnx"))));
    for m in models {
        calibrate(dir.path(), m, &halves(m).0);
    }
    let s = TestServer::start(args(dir.path())).await;
    let mut found = vec![];
    for (shift, model, rows) in shifts() {
        for key in ["drift", "eval_drift"] {
            let k = delay(&s, model, key, &rows, 4).await;
            eprintln!("delay {model} {shift} {key}: {k:?} windows of {W} rows");
            found.push((model, shift, key, k));
        }
    }
    for (model, shift, key, k) in &found {
        assert!(
            k.is_some_and(|k| k <= 1),
            "{model} {shift} {key}: not found in the first window ({k:?})"
        );
    }
    let scrape = s.metrics().await;
    assert!(
        metric_sum(
            &scrape,
            "mcd_drift_windows_total",
            &[("model", "digits_cnn"), ("result", "drift")]
        ) >= 6.0
    );
    s.stop().await;
}

/// The same shifts at the default window (W = 200; the held-out rows are cycled where a
/// model has fewer). A measurement for the README, not a check: run with `--ignored`.
#[tokio::test]
#[ignore]
async fn delays_at_the_default_window() {
    let w = 200;
    let models = ["breast_cancer", "diabetes", "digits_cnn"];
    let dir = model_folder(&models.map(|m| models_dir().join(format!("{m}.onnx"))));
    for m in models {
        calibrate(dir.path(), m, &halves(m).0);
    }
    let s = TestServer::start(args_with(dir.path(), w)).await;
    for (shift, model, rows) in shifts() {
        for key in ["drift", "eval_drift"] {
            let k = delay_at(&s, model, key, &rows, 3, w).await;
            eprintln!("delay at W = {w}: {model} {shift} {key}: {k:?} windows");
        }
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
    cal.as_object_mut().unwrap().remove("drift_reference_eval").unwrap();
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

/// A model without a calibration takes a reference made by `mcd-serve calibrate` from
/// unlabelled rows (`<stem>.drift-reference.json`) and is monitored in both modes; a
/// shift is found against it. Labelled and unlabelled lines in one file are refused, and
/// so is a model with two references (its calibration's and a reference file).
#[tokio::test]
async fn unlabelled_rows_make_a_reference_for_a_model_without_a_calibration() {
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    let unlabelled: Vec<String> = halves("breast_cancer")
        .0
        .iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("target");
            v.to_string()
        })
        .collect();
    let mixed = [unlabelled[0].clone(), halves("breast_cancer").0[1].clone()];
    let out = run_calibrate(dir.path(), "breast_cancer", &mixed);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("though the first row has none"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    calibrate(dir.path(), "breast_cancer", &unlabelled);
    assert!(dir.path().join("breast_cancer.drift-reference.json").is_file());
    assert!(!dir.path().join("breast_cancer.calibration.json").exists());
    let s = TestServer::start(args(dir.path())).await;
    let (_, d) = s.get("/models/breast_cancer/drift").await;
    assert_eq!(d["monitored"], true, "{d}");
    for key in ["drift", "eval_drift"] {
        assert_eq!(d[key]["reference"]["file"], "breast_cancer.drift-reference.json");
        assert_eq!(d[key]["reference"]["n"], unlabelled.len());
    }
    let (_, rows) = shifts()
        .into_iter()
        .find(|(_, m, _)| *m == "breast_cancer")
        .map(|(_, _, r)| ((), r))
        .unwrap();
    assert_eq!(delay(&s, "breast_cancer", "drift", &rows, 1).await, Some(1));
    assert_eq!(delay(&s, "breast_cancer", "eval_drift", &rows, 1).await, Some(1));
    s.stop().await;

    // A calibration beside the reference file: calibrate refuses to make it, and a
    // model that has both anyway is refused at load, with the reason.
    let labelled = halves("breast_cancer").0;
    let out = run_calibrate(dir.path(), "breast_cancer", &labelled);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("remove it first"));
    let reference = dir.path().join("breast_cancer.drift-reference.json");
    let kept = std::fs::read(&reference).unwrap();
    std::fs::remove_file(&reference).unwrap();
    calibrate(dir.path(), "breast_cancer", &labelled);
    std::fs::write(&reference, kept).unwrap();
    std::fs::copy(models_dir().join("diabetes.onnx"), dir.path().join("diabetes.onnx")).unwrap();
    let mut a = args(dir.path());
    a.default_model = Some("diabetes".into());
    let s = TestServer::start(a).await;
    let (_, models) = s.get("/models").await;
    let reason = models["load_failures"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("both") && reason.contains("drift reference"),
        "{models}"
    );
    s.stop().await;
}

/// `drift_window` in `<stem>.model.json` sets that model's window; others keep the
/// server's. A window fills at exactly its size.
#[tokio::test]
async fn a_model_json_sets_its_own_drift_window() {
    let models = ["breast_cancer", "digits_cnn"];
    let dir = model_folder(&models.map(|m| models_dir().join(format!("{m}.onnx"))));
    for m in models {
        calibrate(dir.path(), m, &halves(m).0);
    }
    std::fs::write(dir.path().join("breast_cancer.model.json"), r#"{"drift_window": 7}"#).unwrap();
    let s = TestServer::start(args(dir.path())).await;
    let rows: Vec<Value> = halves("breast_cancer").1.iter().take(15).map(|l| row(l)).collect();
    replay(&s, "breast_cancer", &rows).await;
    let d = tested(&s, "breast_cancer", 2).await;
    assert_eq!(
        (d["drift"]["window"].clone(), d["drift"]["current_window_rows"].clone()),
        (json!(7), json!(1)),
        "{d}"
    );
    let (_, d) = s.get("/models/digits_cnn/drift").await;
    assert_eq!(d["drift"]["window"], W);
    s.stop().await;
}

/// Every protocol's answers are monitored, in their mode: 4 rows each over the native
/// route, OIP REST and OIP gRPC, in MC and in eval, fill each monitor's window with 12.
#[tokio::test]
async fn answers_of_every_protocol_fill_the_windows() {
    use mcd_serve::front::grpc::pb;
    use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
    use pb::infer_parameter::ParameterChoice;

    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    calibrate(dir.path(), "breast_cancer", &halves("breast_cancer").0);
    let (s, url) = start_with_grpc(args(dir.path())).await;
    let rows: Vec<Value> = halves("breast_cancer").1.iter().take(4).map(|l| row(l)).collect();
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
        .collect();
    replay(&s, "breast_cancer", &rows).await;
    replay_eval(&s, "breast_cancer", &rows).await;
    for params in [json!({"mc_samples": 30, "seed": 1}), json!({})] {
        let body = json!({
            "parameters": params,
            "inputs": [{"name": "features", "shape": [4, 30], "datatype": "FP32", "data": flat}],
        });
        let (status, b, _) = s.post("/v2/models/breast_cancer/infer", &body).await;
        assert_eq!(status, 200, "{b}");
    }
    let mut client = GrpcInferenceServiceClient::connect(url).await.unwrap();
    for mc in [true, false] {
        let parameters = if mc {
            [(
                "mc_samples".to_string(),
                pb::InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(30)),
                },
            )]
            .into()
        } else {
            Default::default()
        };
        let request = pb::ModelInferRequest {
            model_name: "breast_cancer".into(),
            parameters,
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![4, 30],
                contents: Some(pb::InferTensorContents {
                    fp32_contents: flat.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        client.model_infer(request).await.unwrap();
    }
    // A row is recorded before its answer is sent.
    let (_, d) = s.get("/models/breast_cancer/drift").await;
    assert_eq!(d["drift"]["current_window_rows"], 12, "{d}");
    assert_eq!(d["eval_drift"]["current_window_rows"], 12, "{d}");
    s.stop().await;
}
