//! The HTTP contract, against a real server on a real TCP port.

mod common;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::{Value, json};

fn reference(name: &str) -> Value {
    read_json(&fixture("reference_outputs.json"))[name].clone()
}

async fn bundled() -> TestServer {
    TestServer::start(ServeArgs::for_models(models_dir())).await
}

fn shape(v: &Value) -> Vec<usize> {
    let mut s = vec![];
    let mut c = v;
    while let Value::Array(a) = c {
        s.push(a.len());
        match a.first() {
            Some(f) => c = f,
            None => break,
        }
    }
    s
}

#[tokio::test]
async fn health_listing_and_metadata() {
    let s = bundled().await;
    assert_eq!(s.get("/health/live").await.0, 200);
    assert_eq!(s.get("/health/ready").await.0, 200);
    let (st, list) = s.get("/models").await;
    assert_eq!(st, 200);
    assert_eq!(list["default_model"], "breast_cancer");
    let names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["breast_cancer", "diabetes", "digits_cnn"]);
    let (st, meta) = s.get("/models/breast_cancer").await;
    assert_eq!(st, 200);
    assert_eq!(meta["inputs"][0]["name"], "features");
    assert_eq!(meta["inputs"][0]["shape"], json!(["batch", 30]));
    assert_eq!(meta["inputs"][0]["dtype"], "float32");
    assert_eq!(meta["outputs"][0]["shape"], json!(["batch", 2]));
    assert_eq!(meta["probability_outputs"], json!(["probabilities"]));
    let sites = meta["dropout_sites"].as_array().unwrap();
    assert_eq!(sites.len(), 2);
    assert!(
        sites
            .iter()
            .all(|d| (d["ratio"].as_f64().unwrap() - 0.3).abs() < 1e-6 && d["node"].is_string())
    );
    assert_eq!(meta["mc_available"], true);
    assert!(meta["mc_unavailable_reason"].is_null());
    let checks: Vec<(&str, &str)> = meta["self_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["check"].as_str().unwrap(), c["result"].as_str().unwrap()))
        .collect();
    for c in [
        "eval_deterministic",
        "eval_row_independent",
        "mc_shared_trunk",
        "mc_matches_eval",
        "mc_live",
    ] {
        assert!(checks.contains(&(c, "pass")), "{c}: {checks:?}");
    }
    // Probe finding g: every known label series reads 0 before its first event (metric_sum
    // panics on a missing series), so rate() and alerts see the first one.
    let m = s.metrics().await;
    for reason in mcd_serve::core::admission::REJECT_REASONS {
        assert_eq!(
            metric_sum(&m, "mcd_rejected_requests_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    for model in ["breast_cancer", "diabetes", "digits_cnn"] {
        for reason in mcd_serve::core::mode::VIOLATION_REASONS {
            let labels = [("model", model), ("reason", reason)];
            assert_eq!(metric_sum(&m, "mcd_mode_violations_total", &labels), 0.0, "{labels:?}");
        }
    }
    for result in mcd_serve::core::metrics::RELOAD_RESULTS {
        assert_eq!(metric_sum(&m, "mcd_model_reloads_total", &[("result", result)]), 0.0);
    }
    for protocol in ["native", "oip", "grpc"] {
        assert_eq!(
            metric_sum(&m, "mcd_auth_failures_total", &[("protocol", protocol)]),
            0.0
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn eval_answers_match_onnxruntime_and_carry_the_mode() {
    let s = bundled().await;
    let r = reference("breast_cancer");
    let (st, body, headers) = s.post("/predict", &json!({"inputs": r["inputs"]})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(headers["x-inference-mode"], "eval");
    assert_eq!(body["mode"], "eval");
    assert_eq!(body["model"], "breast_cancer");
    let got = f64s(&body["outputs"]["probabilities"]);
    for (g, w) in got.iter().zip(f64s(&r["outputs"])) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    // Named inputs on a named route, and the same answer twice.
    let d = reference("digits_cnn");
    let (st, a, _) = s
        .post("/models/digits_cnn/predict", &json!({"inputs": {"image": d["inputs"]}}))
        .await;
    assert_eq!(st, 200, "{a}");
    let (_, b, _) = s
        .post("/models/digits_cnn/predict", &json!({"inputs": {"image": d["inputs"]}}))
        .await;
    assert_eq!(a, b);
    assert_eq!(shape(&a["outputs"]["probabilities"]), vec![8, 10]);
    s.stop().await;
}

#[tokio::test]
async fn mc_answers_are_shaped_by_contract_and_reproducible_per_seed() {
    let s = bundled().await;
    let r = reference("breast_cancer");
    let body = json!({"inputs": r["inputs"]});
    let (st, a, headers) = s.post("/predict?mc_samples=50&seed=7", &body).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(headers["x-inference-mode"], "mc_dropout");
    assert_eq!(a["mode"], "mc_dropout");
    assert_eq!(a["mc_samples"], 50);
    assert_eq!(a["seed"], 7);
    let p = &a["outputs"]["probabilities"];
    for k in ["mean", "variance", "std"] {
        assert_eq!(shape(&p[k]), vec![8, 2], "{k}");
    }
    for k in ["predictive_entropy", "expected_entropy", "mutual_information"] {
        assert_eq!(shape(&p[k]), vec![8], "{k}");
        assert!(
            f64s(&p[k]).iter().all(|&h| (0.0..=2f64.ln() + 1e-12).contains(&h)),
            "{k}"
        );
    }
    assert!(f64s(&p["variance"]).iter().any(|&v| v > 0.0));
    let (_, again, _) = s.post("/predict?mc_samples=50&seed=7", &body).await;
    assert_eq!(a, again, "same seed, same answer");
    let (_, other, _) = s.post("/predict?mc_samples=50&seed=8", &body).await;
    assert_ne!(a["outputs"], other["outputs"]);
    // A drawn seed is reported, and replays.
    let (_, drawn, _) = s.post("/predict?mc_samples=20", &body).await;
    let seed = drawn["seed"].as_u64().unwrap();
    assert!(seed < 1 << 53);
    let (_, replay, _) = s.post(&format!("/predict?mc_samples=20&seed={seed}"), &body).await;
    assert_eq!(drawn, replay);
    // Raw samples on request.
    let (st, raw, _) = s.post("/predict?mc_samples=10&seed=1&return_samples=true", &body).await;
    assert_eq!(st, 200);
    assert_eq!(shape(&raw["outputs"]["probabilities"]["samples"]), vec![10, 8, 2]);
    // Regression output: no entropies.
    let d = reference("diabetes");
    let (st, reg, _) = s
        .post(
            "/models/diabetes/predict?mc_samples=30&seed=3",
            &json!({"inputs": d["inputs"]}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(reg["outputs"]["prediction"].get("predictive_entropy").is_none());
    assert_eq!(shape(&reg["outputs"]["prediction"]["std"]), vec![8, 1]);
    s.stop().await;
}

async fn expect_error(s: &TestServer, path: &str, body: Value, status: u16, error_type: &str) -> String {
    let (st, b, headers) = s.post(path, &body).await;
    assert_eq!(
        (st, b["error_type"].as_str().unwrap_or("")),
        (status, error_type),
        "{path}: {b}"
    );
    assert!(headers.contains_key("x-inference-mode"));
    b["error"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn every_client_error_is_a_typed_4xx() {
    let dir = model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("digits_cnn.onnx"),
        fixture("no_dropout.onnx"),
        fixture("two_inputs.onnx"),
    ]);
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    args.max_mc_samples = 500;
    let s = TestServer::start(args).await;
    let row: Vec<f64> = reference("breast_cancer")["inputs"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();

    // Probe finding b: a path axum cannot decode (not UTF-8) is our JSON error on every
    // route, not axum's text/plain "Invalid URL".
    for path in [
        "/models/%FF/predict",
        "/v2/models/%FF/infer",
        "/v2/models/%FF/versions/1/infer",
    ] {
        let (st, b) = s.post_raw(path, "{}").await;
        assert_eq!(
            (st, b["error_type"].as_str().unwrap()),
            (400, "invalid_path"),
            "{path}: {b}"
        );
    }
    for path in ["/models/%FF", "/v2/models/%FF", "/v2/models/%FF/ready"] {
        let (st, b) = s.get(path).await;
        assert_eq!(
            (st, b["error_type"].as_str().unwrap()),
            (400, "invalid_path"),
            "{path}: {b}"
        );
    }
    let (st, b) = s.post_raw("/predict", "{\"inputs\": [[1, 2").await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (400, "malformed_json"));
    let (st, b) = s.post_raw("/predict", "[1, 2]").await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (400, "malformed_json"));
    let (st, b) = s.post_raw("/predict", "{\"inputs\": [[1e39, 0]]}").await;
    assert_eq!(st, 400, "{b}");
    expect_error(
        &s,
        "/predict",
        json!({"inputs": [row.clone(), row[..29].to_vec()]}),
        400,
        "ragged_array",
    )
    .await;
    let msg = expect_error(
        &s,
        "/predict",
        json!({"inputs": [row[..29].to_vec()]}),
        400,
        "shape_mismatch",
    )
    .await;
    assert!(
        msg.contains("'features'") && msg.contains("[batch, 30]") && msg.contains("[1, 29]"),
        "{msg}"
    );
    expect_error(&s, "/predict", json!({"inputs": row.clone()}), 400, "shape_mismatch").await;
    expect_error(
        &s,
        "/predict",
        json!({"inputs": {"feature": [row.clone()]}}),
        400,
        "unknown_input",
    )
    .await;
    expect_error(&s, "/predict", json!({"batch": [row.clone()]}), 400, "missing_input").await;
    expect_error(
        &s,
        "/models/two_inputs/predict",
        json!({"inputs": {"a": [[1.0, 2.0, 3.0]]}}),
        400,
        "missing_input",
    )
    .await;
    expect_error(
        &s,
        "/models/two_inputs/predict",
        json!({"inputs": [[1.0, 2.0, 3.0]]}),
        400,
        "missing_input",
    )
    .await;
    let mut bad = row.iter().map(|v| json!(v)).collect::<Vec<_>>();
    bad[3] = json!("x");
    let msg = expect_error(&s, "/predict", json!({"inputs": [bad]}), 400, "invalid_value").await;
    assert!(msg.contains("[0][3]"), "{msg}");
    let mut big = row.clone();
    big[0] = 1e39;
    expect_error(&s, "/predict", json!({"inputs": [big]}), 400, "invalid_value").await;
    expect_error(&s, "/predict", json!({"inputs": []}), 400, "shape_mismatch").await;

    expect_error(
        &s,
        "/models/nope/predict",
        json!({"inputs": [row.clone()]}),
        404,
        "model_not_found",
    )
    .await;
    let (st, b) = s.get("/nope").await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (404, "not_found"));
    let (st, b) = s.get("/predict").await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (405, "method_not_allowed"));

    for q in [
        "mc_samples=1",
        "mc_samples=501",
        "mc_samples=abc",
        "mc_samples=2.5",
        "mc_samples=-3",
        "mc_samples=10&seed=-1",
        "mc_samples=5&return_samples=maybe",
        "mc_sample=50",
        "mc_samples=5&mc_samples=6",
    ] {
        expect_error(
            &s,
            &format!("/predict?{q}"),
            json!({"inputs": [row.clone()]}),
            422,
            "invalid_parameter",
        )
        .await;
    }
    expect_error(
        &s,
        "/predict?seed=3",
        json!({"inputs": [row.clone()]}),
        422,
        "mode_mismatch",
    )
    .await;
    expect_error(
        &s,
        "/predict?return_samples=true",
        json!({"inputs": [row.clone()]}),
        422,
        "mode_mismatch",
    )
    .await;
    let msg = expect_error(
        &s,
        "/models/no_dropout/predict?mc_samples=10",
        json!({"inputs": [[1.0, 2.0, 3.0, 4.0]]}),
        422,
        "mc_unavailable",
    )
    .await;
    assert!(msg.contains("no Dropout"), "{msg}");
    // Eval on that model still works.
    let (st, _, _) = s
        .post("/models/no_dropout/predict", &json!({"inputs": [[1.0, 2.0, 3.0, 4.0]]}))
        .await;
    assert_eq!(st, 200);

    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_mode_violations_total", &[("reason", "seed_without_mc")]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_mode_violations_total",
            &[("reason", "return_samples_without_mc")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_mode_violations_total",
            &[("model", "no_dropout"), ("reason", "mc_unavailable")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "mcd_requests_total", &[("model", "_unknown"), ("status", "404")]),
        1.0
    );
    assert_absent(&m, "mcd_requests_total", &[("status", "500")]);
    s.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let mut args = ServeArgs::for_models(models_dir());
    args.body_limit_bytes = 4096;
    let s = TestServer::start(args).await;
    let rows: Vec<Vec<f64>> = vec![vec![1.0; 30]; 200];
    let (st, b, _) = s.post("/predict", &json!({"inputs": rows})).await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (413, "payload_too_large"));
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "payload_too_large")]),
        1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn overload_is_refused_fast_and_timeouts_are_504() {
    let d = reference("digits_cnn");
    let rows: Vec<Value> = (0..8).flat_map(|_| d["inputs"].as_array().unwrap().clone()).collect();
    let heavy = json!({"inputs": rows});

    let mut args = ServeArgs::for_models(models_dir());
    args.max_inflight_cost = 1;
    args.workers = Some(1);
    let s = TestServer::start(args).await;
    let c = s.client.clone();
    let url = s.url("/models/digits_cnn/predict?mc_samples=1000&seed=1");
    let slow = tokio::spawn({
        let heavy = heavy.clone();
        async move { c.post(url).json(&heavy).send().await.unwrap().status().as_u16() }
    });
    // Wait until the heavy request holds the budget, then knock.
    let mut refused = None;
    for _ in 0..200 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let r = s
            .client
            .post(s.url("/predict"))
            .json(&json!({"inputs": [vec![1.0; 30]]}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            let b: Value = r.json().await.unwrap();
            refused = Some(b["error_type"].as_str().unwrap().to_string());
            break;
        }
    }
    assert_eq!(refused.as_deref(), Some("overloaded"));
    assert_eq!(slow.await.unwrap(), 200);
    let m = s.metrics().await;
    assert!(metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "overloaded")]) >= 1.0);
    s.stop().await;

    let mut args = ServeArgs::for_models(models_dir());
    args.request_timeout_secs = 0.005;
    let s = TestServer::start(args).await;
    let (st, b, _) = s.post("/models/digits_cnn/predict?mc_samples=1000", &heavy).await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (504, "timeout"));
    s.stop().await;
}

#[tokio::test]
async fn concurrent_mixed_load_is_served_without_errors_and_metrics_add_up() {
    let s = bundled().await;
    let r = reference("breast_cancer");
    let rows = r["inputs"].as_array().unwrap().clone();
    let mut expected_mc = None;
    let mut tasks = vec![];
    let (eval_n, mc_n) = (120usize, 60usize);
    for i in 0..(eval_n + mc_n) {
        let c = s.client.clone();
        let row = rows[i % rows.len()].clone();
        let is_mc = i % 3 == 2;
        let url = if is_mc {
            s.url("/predict?mc_samples=50&seed=99")
        } else {
            s.url("/predict")
        };
        let body = if is_mc {
            json!({"inputs": rows.clone()})
        } else {
            json!({"inputs": [row]})
        };
        tasks.push(tokio::spawn(async move {
            let r = c.post(url).json(&body).send().await.unwrap();
            (is_mc, r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    for t in tasks {
        let (is_mc, st, body) = t.await.unwrap();
        assert_eq!(st, 200, "{body}");
        if is_mc {
            // Identical seeds give identical answers whatever else runs at the same time.
            match &expected_mc {
                None => expected_mc = Some(body),
                Some(e) => assert_eq!(e, &body),
            }
        }
    }
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "mcd_requests_total",
            &[("model", "breast_cancer"), ("mode", "eval"), ("status", "200")]
        ),
        eval_n as f64
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_requests_total",
            &[("model", "breast_cancer"), ("mode", "mc_dropout"), ("status", "200")]
        ),
        mc_n as f64
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_request_duration_seconds",
            &[("model", "breast_cancer"), ("mode", "eval")]
        ),
        eval_n as f64
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_inference_duration_seconds",
            &[("model", "breast_cancer"), ("mode", "mc_dropout")]
        ),
        mc_n as f64
    );
    assert_eq!(
        metric_sum(&m, "mcd_mc_samples", &[("model", "breast_cancer")]),
        mc_n as f64
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_predictive_entropy",
            &[("model", "breast_cancer"), ("output", "probabilities")]
        ),
        (mc_n * rows.len()) as f64,
        "one entropy observation per row"
    );
    assert_eq!(metric_sum(&m, "mcd_inflight_requests", &[]), 0.0);
    assert_eq!(metric_sum(&m, "mcd_ready", &[]), 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "mcd_model_info",
            &[("model", "breast_cancer"), ("dropout_sites", "2")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_mode_checks_total",
            &[("model", "breast_cancer"), ("check", "mc_live"), ("result", "pass")]
        ),
        1.0
    );
    assert_absent(&m, "mcd_mode_checks_total", &[("result", "fail")]);
    s.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_self_checks_and_load_failures() {
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx"), fixture("batch_dependent.onnx")]);
    std::fs::write(dir.path().join("broken.onnx"), b"not a protobuf at all").unwrap();
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    let s = TestServer::start(args).await;
    let (st, ready) = s.get("/health/ready").await;
    assert_eq!(st, 503);
    let reasons = ready["reasons"].to_string();
    assert!(
        reasons.contains("broken") && reasons.contains("eval_row_independent"),
        "{reasons}"
    );
    // The good model serves regardless; the failing one refuses with the reason.
    let row = reference("breast_cancer")["inputs"][0].clone();
    assert_eq!(s.post("/predict", &json!({"inputs": [row]})).await.0, 200);
    let (st, b, _) = s
        .post(
            "/models/batch_dependent/predict",
            &json!({"inputs": [[1.0, 2.0, 3.0, 4.0]]}),
        )
        .await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (503, "model_unhealthy"));
    let (_, list) = s.get("/models").await;
    assert_eq!(list["load_failures"][0]["model"], "broken");
    // Probe finding e: a model that never loaded is 503 model_unhealthy with its load
    // failure, on predict and on metadata, on both REST protocols; never "no model named".
    let oip = r#"{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}"#;
    for (path, body) in [
        ("/models/broken/predict", r#"{"inputs": [[1.0]]}"#),
        ("/v2/models/broken/infer", oip),
    ] {
        let (st, b) = s.post_raw(path, body).await;
        assert_eq!(
            (st, b["error_type"].as_str().unwrap()),
            (503, "model_unhealthy"),
            "{path}: {b}"
        );
        assert!(b["error"].as_str().unwrap().contains("failed to load"), "{path}: {b}");
    }
    let (st, meta) = s.get("/models/broken").await;
    assert_eq!(
        (st, meta["error_type"].as_str().unwrap()),
        (503, "model_unhealthy"),
        "{meta}"
    );
    assert!(meta["load_failure"]["reason"].is_string(), "{meta}");
    assert_eq!(meta["load_failure"]["kept_previous"], false);
    assert_eq!(s.get("/v2/models/broken").await.0, 503);
    let (st, ready) = s.get("/v2/models/broken/ready").await;
    assert_eq!((st, &ready["ready"]), (503, &json!(false)));
    assert_eq!(s.get("/models/nothing_here").await.0, 404);
    let m = s.metrics().await;
    assert_eq!(metric_sum(&m, "mcd_ready", &[]), 0.0);
    assert_eq!(
        metric_sum(
            &m,
            "mcd_mode_checks_total",
            &[
                ("model", "batch_dependent"),
                ("check", "eval_row_independent"),
                ("result", "fail")
            ]
        ),
        1.0
    );
    s.stop().await;
}

/// Probe finding f: a folder of models with none named the default serves, as Triton and
/// KServe users expect; only `POST /predict` has nothing to answer, and says why.
#[tokio::test]
async fn several_models_and_no_default_serve_by_name() {
    let dir = model_folder(&[models_dir().join("diabetes.onnx"), models_dir().join("digits_cnn.onnx")]);
    let s = TestServer::start(ServeArgs::for_models(dir.path())).await;
    assert_eq!(s.get("/health/ready").await.0, 200);
    let row = reference("diabetes")["inputs"][0].clone();
    let (st, b) = s
        .post_raw("/predict", json!({"inputs": [row.clone()]}).to_string())
        .await;
    assert_eq!(
        (st, b["error_type"].as_str().unwrap()),
        (404, "no_default_model"),
        "{b}"
    );
    let msg = b["error"].as_str().unwrap();
    assert!(
        msg.contains("diabetes") && msg.contains("digits_cnn") && msg.contains("--default-model"),
        "{msg}"
    );
    let (st, b, _) = s.post("/models/diabetes/predict", &json!({"inputs": [row]})).await;
    assert_eq!((st, b["model"].as_str()), (200, Some("diabetes")), "{b}");
    let (_, list) = s.get("/models").await;
    assert!(list["default_model"].is_null(), "{list}");
    assert!(list["models"].as_array().unwrap().iter().all(|m| m["default"] == false));
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_requests_total", &[("model", "_unknown"), ("status", "404")]),
        1.0
    );
    s.stop().await;
    // A folder with no model at all still refuses to start.
    let empty = model_folder(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = mcd_serve::server::serve(ServeArgs::for_models(empty.path()), listener, async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no *.onnx models"), "{err}");
}

#[test]
fn a_failed_reload_keeps_the_last_good_model() {
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    let first = mcd_serve::engine::repo::load_dir(dir.path(), None).unwrap();
    assert!(first.failures.is_empty());
    std::fs::write(dir.path().join("breast_cancer.onnx"), b"truncated").unwrap();
    let second = mcd_serve::engine::repo::load_dir(dir.path(), Some(&first)).unwrap();
    assert!(second.failures[0].kept_previous);
    assert!(std::sync::Arc::ptr_eq(
        &first.models["breast_cancer"],
        &second.models["breast_cancer"]
    ));
}

/// Issue 25 F9: a setting out of its range stops startup with the flag and the reason; no
/// value is silently raised to the nearest allowed one.
#[tokio::test]
async fn out_of_range_settings_refuse_to_start() {
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    let mut args = ServeArgs::for_models(dir.path());
    args.max_batch_rows = 0;
    args.max_memory_bytes = 1000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = mcd_serve::server::serve(args, listener, async {}).await.unwrap_err();
    let err = err.to_string();
    assert!(err.contains("--max-batch-rows is 0; it must be at least 1"), "{err}");
    assert!(
        err.contains("--max-memory-bytes is 1000; it must be at least 1048576"),
        "{err}"
    );
    // The binary says so and exits non-zero.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .args([
            "--models",
            dir.path().to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "",
        ])
        .args(["--max-batch-rows", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-batch-rows is 0"), "{stderr}");
}

/// Ambiguous bodies are refused, not read one way: `"inputs"` twice, or an input name
/// twice, is a 400 that names the repeat (before, the last one silently won), as OIP REST
/// refuses a repeated field.
#[tokio::test]
async fn repeated_keys_in_a_native_body_are_refused() {
    let s = bundled().await;
    let row = serde_json::to_string(&reference("breast_cancer")["inputs"][0]).unwrap();
    let zeros = serde_json::to_string(&vec![0.0; 30]).unwrap();
    for (body, named) in [
        (
            format!(r#"{{"inputs": [{row}], "inputs": [{zeros}]}}"#),
            "\"inputs\" twice",
        ),
        (
            format!(r#"{{"inputs": {{"features": [{row}], "features": [{zeros}]}}}}"#),
            "'features' twice",
        ),
    ] {
        for q in ["", "?mc_samples=5&seed=1"] {
            let (status, b) = s
                .post_raw(&format!("/models/breast_cancer/predict{q}"), body.clone())
                .await;
            assert_eq!((status, b["error_type"].as_str()), (400, Some("invalid_value")), "{b}");
            assert!(b["error"].as_str().unwrap().contains(named), "{b}");
        }
    }
    let (status, _) = s
        .post_raw("/models/breast_cancer/predict", format!(r#"{{"inputs": [{row}]}}"#))
        .await;
    assert_eq!(status, 200);
    s.stop().await;
}

/// Token ids outside BERT's vocabulary made tract's Gather panic, answered 500. The load
/// finds the inputs that index a table (`input_ids`, not `attention_mask`) and its size;
/// a value outside `-n..n` is a 400 naming the input, the element and the valid range, on
/// every protocol, and the server keeps serving. A negative id inside the range is valid
/// ONNX and is answered.
#[tokio::test]
async fn an_index_outside_its_table_is_a_400_on_every_protocol() {
    use mcd_serve::front::grpc::pb;
    let Some(shared) = shared_models() else { return };
    let dir = model_folder(&[shared.join("medical/bert_tiny_cls.onnx")]);
    let (s, grpc_url) = common::start_with_grpc(ServeArgs::for_models(dir.path())).await;
    let (status, meta) = s.get("/models/bert_tiny_cls").await;
    assert_eq!(status, 200);
    let inputs = meta["inputs"].as_array().unwrap();
    let limit_of = |name: &str| inputs.iter().find(|i| i["name"] == name).unwrap()["index_limit"].clone();
    let vocab = limit_of("input_ids").as_i64().expect("input_ids has an index limit");
    assert!(vocab > 400, "the shared BERT's vocabulary: {vocab}");
    assert_eq!(limit_of("attention_mask"), Value::Null);

    let body = |id: i64| json!({"inputs": {"input_ids": [[5, 7, id, 9]], "attention_mask": [[1, 1, 1, 1]]}});
    for (id, ok) in [
        (vocab, false),
        (-vocab - 1, false),
        (vocab - 1, true),
        (-vocab, true),
        (-3, true),
    ] {
        for query in ["", "?mc_samples=4&seed=1"] {
            let (status, answer, _) = s
                .post(&format!("/models/bert_tiny_cls/predict{query}"), &body(id))
                .await;
            if ok {
                assert_eq!(status, 200, "id {id}{query}: {answer}");
                continue;
            }
            assert_eq!(status, 400, "id {id}{query}: {answer}");
            assert_eq!(answer["error_type"], "invalid_value", "{answer}");
            let e = answer["error"].as_str().unwrap();
            for part in ["'input_ids'", "[0, 2]", &format!("= {id}"), &format!("{vocab} entries")] {
                assert!(e.contains(part), "{part} not in {e}");
            }
        }
    }
    let oip = json!({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, vocab + 1000]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]},
    ]});
    let (status, answer, _) = s.post("/v2/models/bert_tiny_cls/infer", &oip).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("[0, 2]"), "{answer}");

    let mut client = pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(grpc_url)
        .await
        .unwrap();
    let tensor = |name: &str, data: Vec<i64>| pb::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![1, 3],
        contents: Some(pb::InferTensorContents {
            int64_contents: data,
            ..Default::default()
        }),
        ..Default::default()
    };
    let request = pb::ModelInferRequest {
        model_name: "bert_tiny_cls".into(),
        inputs: vec![
            tensor("input_ids", vec![1, vocab, 2]),
            tensor("attention_mask", vec![1, 1, 1]),
        ],
        ..Default::default()
    };
    let e = client.model_infer(request).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("[0, 1]"), "{}", e.message());

    // Still serving, and no panic was counted.
    let (status, _, _) = s.post("/models/bert_tiny_cls/predict", &body(3)).await;
    assert_eq!(status, 200);
    assert_eq!(metric_sum(&s.metrics().await, "mcd_internal_panics_total", &[]), 0.0);
    s.stop().await;
}
