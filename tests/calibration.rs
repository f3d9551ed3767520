//! Calibration end to end: `mcd-serve calibrate` on real rows, the file it writes served on
//! every front end, a stale file refused at load, and `mc_samples=auto`.

mod common;

use common::*;
use mcd_serve::config::ServeArgs;
use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::infer_parameter::ParameterChoice;
use serde_json::{Value, json};

const LEVELS: [&str; 4] = ["0.8", "0.9", "0.95", "0.99"];

/// The README's borderline breast-cancer row `U`.
const BORDERLINE: [f64; 30] = [
    13.667, 26.071, 89.593, 581.535, 0.0988, 0.1167, 0.0834, 0.0436, 0.1912, 0.0661, 0.345, 1.3673, 2.305, 28.7905,
    0.0077, 0.0273, 0.0232, 0.0115, 0.0201, 0.0047, 15.449, 34.0832, 102.2218, 742.355, 0.1502, 0.29, 0.2281, 0.112,
    0.3244, 0.098,
];

/// The first `n` lines of a bundled calibration data file.
fn rows(model: &str, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(format!("tools/calibration-data/{model}.jsonl"))).unwrap();
    text.lines().take(n).map(str::to_string).collect()
}

fn folder() -> tempdir::TempDir {
    model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("diabetes.onnx"),
    ])
}

/// Rows of the test split as the fixtures hold them.
fn bc_rows() -> Value {
    let r = read_json(&fixture("reference_outputs.json"))["breast_cancer"].clone();
    let x = f64s(&r["inputs"]);
    json!(x.chunks(30).take(3).collect::<Vec<_>>())
}

fn diabetes_rows() -> Value {
    let r = read_json(&fixture("reference_outputs.json"))["diabetes"].clone();
    let x = f64s(&r["inputs"]);
    json!(x.chunks(10).take(3).collect::<Vec<_>>())
}

#[tokio::test]
async fn calibrate_writes_a_file_that_every_front_end_serves() {
    let dir = folder();
    for model in ["breast_cancer", "diabetes"] {
        let out = run_calibrate(dir.path(), model, &rows(model, 120));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains("120 rows") && report.contains("level 0.95"), "{report}");
    }
    let cal = read_json(&dir.path().join("breast_cancer.calibration.json"));
    assert_eq!(
        (cal["n"].as_u64(), cal["mc_samples"].as_u64(), cal["seed"].as_u64()),
        (Some(120), Some(30), Some(3))
    );
    let hash = mcd_serve::engine::conformal::sha256_file(&dir.path().join("breast_cancer.onnx")).unwrap();
    assert_eq!(cal["model_sha256"], hash.as_str());
    assert_eq!(cal["outputs"]["probabilities"]["method"], "lac");

    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    let (s, grpc_url) = start_with_grpc(args).await;

    // Native: intervals shaped like the mean, sets per row, referral per row.
    let (status, d, _) = s
        .post(
            "/models/diabetes/predict?mc_samples=20&seed=1",
            &json!({"inputs": diabetes_rows()}),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    let p = &d["outputs"]["prediction"];
    let mean = f64s(&p["mean"]);
    for level in LEVELS {
        let i = &p["intervals"][level];
        let (lo, hi) = (f64s(&i["lower"]), f64s(&i["upper"]));
        assert_eq!(i["lower"].as_array().unwrap().len(), 3);
        assert_eq!(
            i["lower"][0].as_array().unwrap().len(),
            1,
            "shaped like the mean [3, 1]"
        );
        for j in 0..3 {
            assert!(
                lo[j] < mean[j] && mean[j] < hi[j],
                "{level}: {} {} {}",
                lo[j],
                mean[j],
                hi[j]
            );
        }
    }
    let w = |l: &str| f64s(&p["intervals"][l]["upper"])[0] - f64s(&p["intervals"][l]["lower"])[0];
    assert!(w("0.8") < w("0.9") && w("0.9") < w("0.95"), "intervals nest by level");

    let (status, b, _) = s
        .post("/predict?mc_samples=20&seed=1", &json!({"inputs": bc_rows()}))
        .await;
    assert_eq!(status, 200, "{b}");
    let pr = &b["outputs"]["probabilities"];
    for level in LEVELS {
        let sets = pr["prediction_sets"][level].as_array().unwrap();
        assert_eq!(sets.len(), 3);
        for set in sets {
            let set = set.as_array().unwrap();
            assert!(
                !set.is_empty() && set.iter().all(|k| k.as_u64().unwrap() < 2),
                "{set:?}"
            );
        }
    }
    let refer = pr["refer"].as_array().unwrap();
    assert_eq!(refer.len(), 3);
    assert!(refer.iter().all(Value::is_boolean));
    assert_eq!(pr["refer_target_error"], 0.02);
    let threshold = pr["refer_threshold"].as_f64();
    let entropy = f64s(&pr["predictive_entropy"]);
    for (r, h) in refer.iter().zip(&entropy) {
        assert_eq!(r.as_bool().unwrap(), threshold.is_none_or(|t| *h > t));
    }
    assert!(b.get("mc_converged").is_none(), "auto fields only for auto");

    // Model metadata: the summary.
    let (_, m) = s.get("/models/breast_cancer").await;
    assert_eq!(m["calibration"]["file"], "breast_cancer.calibration.json");
    assert_eq!(m["calibration"]["summary"]["n"], 120);
    assert_eq!(m["refer_target_error"], 0.02);

    // OIP REST: derived outputs, listed in metadata.
    let (_, meta) = s.get("/v2/models/diabetes").await;
    let listed: Vec<&str> = meta["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&"prediction.interval_0.95_lower") && listed.contains(&"prediction.interval_0.99_upper"));
    let (_, meta) = s.get("/v2/models/breast_cancer").await;
    let outputs = meta["outputs"].as_array().unwrap();
    let find = |n: &str| {
        outputs
            .iter()
            .find(|o| o["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed"))
    };
    assert_eq!(find("probabilities.set_0.9")["datatype"], "BOOL");
    assert_eq!(find("probabilities.refer")["shape"], json!([-1]));
    let x = f64s(&bc_rows());
    let body = json!({
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [3, 30], "data": x}],
        "parameters": {"mc_samples": 20, "seed": 1},
    });
    let (status, o, _) = s.post("/v2/models/breast_cancer/infer", &body).await;
    assert_eq!(status, 200, "{o}");
    let out = |n: &str| {
        o["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .cloned()
            .unwrap()
    };
    let set = out("probabilities.set_0.95");
    assert_eq!(
        (set["datatype"].clone(), set["shape"].clone()),
        (json!("BOOL"), json!([3, 2]))
    );
    let mask: Vec<bool> = set["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    for (r, native) in pr["prediction_sets"]["0.95"].as_array().unwrap().iter().enumerate() {
        let members: Vec<u64> = (0..2).filter(|&k| mask[r * 2 + k as usize]).collect();
        let mut native: Vec<u64> = native.as_array().unwrap().iter().map(|k| k.as_u64().unwrap()).collect();
        native.sort();
        assert_eq!(members, native, "OIP mask row {r} equals the native set");
    }
    assert_eq!(out("probabilities.refer")["data"], pr["refer"]);
    assert_eq!(out("probabilities.refer")["shape"], json!([3]));

    // gRPC: the same outputs, raw bytes.
    let mut client = GrpcInferenceServiceClient::connect(grpc_url).await.unwrap();
    let request = pb::ModelInferRequest {
        model_name: "diabetes".into(),
        parameters: [("mc_samples", 20i64), ("seed", 1)]
            .into_iter()
            .map(|(k, v)| {
                let p = pb::InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(v)),
                };
                (k.to_string(), p)
            })
            .collect(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![3, 10],
            ..Default::default()
        }],
        raw_input_contents: vec![
            f64s(&diabetes_rows())
                .iter()
                .flat_map(|v| (*v as f32).to_le_bytes())
                .collect(),
        ],
        ..Default::default()
    };
    let r = client.model_infer(request).await.unwrap().into_inner();
    let i = r
        .outputs
        .iter()
        .position(|o| o.name == "prediction.interval_0.95_upper")
        .unwrap();
    assert_eq!(
        (r.outputs[i].datatype.as_str(), r.outputs[i].shape.as_slice()),
        ("FP64", &[3i64, 1][..])
    );
    assert_eq!(
        le_f64(&r.raw_output_contents[i]),
        f64s(&p["intervals"]["0.95"]["upper"])
    );

    // Metrics: referrals counted per row, set sizes observed per row.
    let scrape = s.metrics().await;
    let labels = [("model", "breast_cancer"), ("output", "probabilities")];
    let referred = refer.iter().filter(|r| r.as_bool().unwrap()).count() as f64;
    assert_eq!(
        metric_sum(&scrape, "mcd_referrals_total", &labels),
        2.0 * referred,
        "native + OIP"
    );
    assert_eq!(metric_sum(&scrape, "mcd_prediction_set_size_count", &labels), 6.0);
    s.stop().await;
}

#[tokio::test]
async fn bad_lines_are_refused_with_their_line_number() {
    let dir = folder();
    let mut lines = rows("breast_cancer", 5);
    lines[2] = lines[2].replace("\"target\":", "\"label\":");
    let out = run_calibrate(dir.path(), "breast_cancer", &lines);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rows.jsonl:3:") && err.contains("target"), "{err}");
    let mut lines = rows("breast_cancer", 5);
    lines[3] = r#"{"inputs": [[1, 2, 3]], "target": 0}"#.into();
    let err = String::from_utf8_lossy(&run_calibrate(dir.path(), "breast_cancer", &lines).stderr).to_string();
    assert!(err.contains("rows.jsonl:4:") && err.contains("shape"), "{err}");
    let mut lines = rows("breast_cancer", 5);
    lines[4] = lines[4]
        .replace("\"target\":1", "\"target\":2")
        .replace("\"target\":0", "\"target\":2");
    let err = String::from_utf8_lossy(&run_calibrate(dir.path(), "breast_cancer", &lines).stderr).to_string();
    assert!(err.contains("rows.jsonl:5:") && err.contains("class index"), "{err}");
    assert!(
        !dir.path().join("breast_cancer.calibration.json").exists(),
        "nothing written"
    );
}

#[tokio::test]
async fn a_calibration_made_for_another_model_file_is_refused_at_load() {
    let dir = folder();
    let out = run_calibrate(dir.path(), "diabetes", &rows("diabetes", 100));
    assert!(out.status.success());
    // The model file changes after calibration: one byte of its doc string.
    let onnx = dir.path().join("diabetes.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let at = bytes.windows(8).position(|w| w == b"Diabetes").unwrap();
    bytes[at] = b'd';
    std::fs::write(&onnx, bytes).unwrap();
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    let s = TestServer::start(args).await;
    let (status, ready) = s.get("/health/ready").await;
    assert_eq!(status, 503);
    let reasons = ready["reasons"].to_string();
    assert!(
        reasons.contains("diabetes") && reasons.contains("stale") && reasons.contains("SHA-256"),
        "{reasons}"
    );
    let (_, models) = s.get("/models").await;
    assert!(
        models["load_failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("re-run `mcd-serve calibrate`")
    );
    let (status, body, _) = s
        .post(
            "/models/diabetes/predict?mc_samples=5",
            &json!({"inputs": diabetes_rows()}),
        )
        .await;
    // Not served, and says why: a model that never loaded is 503 with its load failure.
    assert_eq!(
        (status, body["error_type"].as_str()),
        (503, Some("model_unhealthy")),
        "a model with a stale calibration is not served: {body}"
    );
    assert!(body["error"].as_str().unwrap().contains("stale"), "{body}");
    s.stop().await;
}

/// The bundled diabetes calibration in a temporary folder, with `edit` applied to it.
fn edited_diabetes(edit: impl FnOnce(&mut Value)) -> tempdir::TempDir {
    let dir = folder();
    let mut cal = read_json(&models_dir().join("diabetes.calibration.json"));
    edit(&mut cal);
    std::fs::write(
        dir.path().join("diabetes.calibration.json"),
        serde_json::to_string_pretty(&cal).unwrap(),
    )
    .unwrap();
    dir
}

/// Issue 25 F5: a calibration whose values break the method's invariants is refused at
/// load with the reason, like a stale one, never served (here a negative quantile, which
/// would serve intervals with lower above upper).
#[tokio::test]
async fn a_calibration_with_impossible_values_is_refused_at_load() {
    let dir = edited_diabetes(|cal| cal["outputs"]["prediction"]["intervals"][0]["quantile"][0] = json!(-5.0));
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    let s = TestServer::start(args).await;
    let (status, ready) = s.get("/health/ready").await;
    assert_eq!(status, 503, "{ready}");
    let (_, models) = s.get("/models").await;
    let reason = models["load_failures"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("diabetes.calibration.json is invalid")
            && reason.contains("output 'prediction'")
            && reason.contains("quantile[0] is -5")
            && reason.contains("at least 0"),
        "{reason}"
    );
    let (status, body, _) = s
        .post(
            "/models/diabetes/predict?mc_samples=5",
            &json!({"inputs": diabetes_rows()}),
        )
        .await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (503, Some("model_unhealthy")),
        "{body}"
    );
    s.stop().await;
}

/// On SIGHUP an edited calibration (here a negative noise variance, which made every
/// interval null, "unbounded") fails that reload: the previous version and its
/// calibration keep serving, and the reason shows in `/models`.
#[tokio::test]
async fn an_edited_calibration_on_reload_keeps_the_last_good_one_serving() {
    let dir = edited_diabetes(|_| {});
    let p = common::process::spawn(dir.path(), &[]);
    let client = reqwest::Client::new();
    common::process::wait_status(&client, &format!("{}/health/ready", p.base), 200).await;
    let mut cal = read_json(&dir.path().join("diabetes.calibration.json"));
    cal["outputs"]["prediction"]["noise_variance"][0] = json!(-1.0);
    std::fs::write(dir.path().join("diabetes.calibration.json"), cal.to_string()).unwrap();
    common::process::signal(&p, "HUP");
    let mut reloaded = false;
    for _ in 0..600 {
        let m = scrape(&client, &p.base).await;
        if metric_exposed(&m, "mcd_model_reloads_total")
            && metric_sum(&m, "mcd_model_reloads_total", &[("result", "partial")]) >= 1.0
        {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reloaded, "no partial reload was counted");
    let models: Value = client
        .get(format!("{}/models", p.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let failure = &models["load_failures"][0];
    assert_eq!(failure["model"], "diabetes", "{models}");
    assert_eq!(failure["kept_previous"], true, "{models}");
    assert!(
        failure["reason"].as_str().unwrap().contains("noise_variance[0] is -1"),
        "{failure}"
    );
    let d: Value = client
        .post(format!("{}/models/diabetes/predict?mc_samples=20&seed=1", p.base))
        .json(&json!({"inputs": diabetes_rows()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for level in LEVELS {
        let i = &d["outputs"]["prediction"]["intervals"][level];
        let (lo, hi) = (f64s(&i["lower"]), f64s(&i["upper"]));
        assert_eq!(lo.len(), 3, "{d}");
        assert!(lo.iter().zip(&hi).all(|(l, h)| l < h), "{level}: {lo:?} {hi:?}");
    }
}

/// The largest std/√n over an answer's output elements.
fn max_se(answer: &Value, output: &str) -> f64 {
    let n = answer["mc_samples"].as_f64().unwrap();
    f64s(&answer["outputs"][output]["std"])
        .iter()
        .fold(0.0, |m, s| f64::max(m, s / n.sqrt()))
}

#[tokio::test]
async fn auto_stops_at_the_criterion_and_equals_the_fixed_count() {
    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    // A borderline row (std of its probabilities ≈ 0.35) among clear ones: at mc_se 0.05
    // it needs several chunks.
    let mut rows = bc_rows().as_array().unwrap().clone();
    rows.push(json!(BORDERLINE));
    let body = json!({ "inputs": rows });
    let (status, a, _) = s.post("/predict?mc_samples=auto&mc_se=0.05&seed=7", &body).await;
    assert_eq!(status, 200, "{a}");
    let n = a["mc_samples"].as_u64().unwrap();
    assert_eq!(
        (a["mc_converged"].clone(), a["mc_se"].clone(), a["mc_max"].clone()),
        (json!(true), json!(0.05), json!(1000))
    );
    assert!(n.is_multiple_of(16) && n > 16, "whole chunks, more than one: {n}");
    assert!(max_se(&a, "probabilities") <= 0.05);
    // The same seed and count asked for directly: the same answer, bit for bit; one chunk
    // fewer had not met the criterion.
    let (_, fixed, _) = s.post(&format!("/predict?mc_samples={n}&seed=7"), &body).await;
    assert_eq!(fixed["outputs"], a["outputs"], "auto with seed 7 equals mc_samples={n}");
    let (_, fewer, _) = s.post(&format!("/predict?mc_samples={}&seed=7", n - 16), &body).await;
    assert!(max_se(&fewer, "probabilities") > 0.05, "stopped late: {n}");

    // A criterion that cannot be met stops at mc_max, a partial last chunk included.
    let body = json!({"inputs": diabetes_rows()});
    let (_, d, _) = s
        .post("/models/diabetes/predict?mc_samples=auto&mc_max=40&seed=2", &body)
        .await;
    assert_eq!(
        (d["mc_samples"].clone(), d["mc_converged"].clone()),
        (json!(40), json!(false))
    );
    let (_, fixed, _) = s.post("/models/diabetes/predict?mc_samples=40&seed=2", &body).await;
    assert_eq!(fixed["outputs"], d["outputs"]);

    // OIP: the string parameter, and the outcome in the response parameters.
    let x = f64s(&json!(rows));
    let oip = json!({
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [4, 30], "data": x}],
        "parameters": {"mc_samples": "auto", "mc_se": 0.05, "seed": 7},
    });
    let (status, o, _) = s.post("/v2/models/breast_cancer/infer", &oip).await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["parameters"]["mc_samples"], n);
    assert_eq!(o["parameters"]["mc_converged"], true);

    // mcd_mc_samples records the count each request drew: 40 for both diabetes answers.
    let scrape = s.metrics().await;
    let sum = metric_sum(&scrape, "mcd_mc_samples_sum", &[("model", "diabetes")]);
    assert_eq!(sum, 80.0);

    for bad in [
        "mc_samples=5&mc_se=0.1",
        "mc_samples=auto&mc_se=-1",
        "mc_samples=auto&mc_max=1",
        "mc_max=5",
    ] {
        let (status, e, _) = s.post(&format!("/predict?{bad}"), &json!({"inputs": bc_rows()})).await;
        assert_eq!(
            (status, e["error_type"].as_str()),
            (422, Some("invalid_parameter")),
            "{bad}: {e}"
        );
    }
    s.stop().await;
}
