//! API keys (`--api-key-file`): predict and metadata need `Authorization: Bearer <key>` on
//! every protocol; health and metrics stay open; failures are 401 JSON `unauthorized` (gRPC
//! UNAUTHENTICATED) and counted; keys are re-read on SIGHUP and never logged; `/metrics`
//! can move to a listener of its own.

mod common;

use common::process::*;
use common::*;
use mcd_serve::config::ServeArgs;
use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::{Value, json};
use tonic::Code;

const KEY_A: &str = "k-alpha-7f3c91d2e8";
const KEY_B: &str = "k-beta-04ab66e1c9";
const WRONG: &str = "k-wrong-5d2e0f7a13";

fn key_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("api-keys");
    std::fs::write(&path, text).unwrap();
    path
}

fn bc_row() -> Value {
    read_json(&fixture("reference_outputs.json"))["breast_cancer"]["inputs"][0].clone()
}

/// Status and parsed body of a request with an optional bearer key.
async fn call(s: &TestServer, method: &str, path: &str, body: Option<Value>, key: Option<&str>) -> (u16, Value) {
    let mut r = s.client.request(method.parse().unwrap(), s.url(path));
    if let Some(b) = body {
        r = r.json(&b);
    }
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    if status == 401 {
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn keys_guard_predict_and_metadata_on_every_protocol_and_nothing_else() {
    let keys_dir = tempdir::TempDir::new();
    let mut args = ServeArgs::for_models(models_dir());
    args.api_key_file = Some(key_file(keys_dir.path(), &format!("# ops\n{KEY_A}\n\n{KEY_B}\n")));
    let (s, grpc_url) = start_with_grpc(args).await;
    let predict = json!({"inputs": [bc_row()]});
    let infer = json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": bc_row()}]});

    let guarded: Vec<(&str, &str, Option<Value>)> = vec![
        ("POST", "/predict", Some(predict.clone())),
        ("POST", "/predict?mc_samples=5&seed=1", Some(predict.clone())),
        ("POST", "/models/breast_cancer/predict", Some(predict.clone())),
        ("GET", "/models", None),
        ("GET", "/models/breast_cancer", None),
        ("GET", "/v2", None),
        ("GET", "/v2/models/breast_cancer", None),
        ("POST", "/v2/models/breast_cancer/infer", Some(infer.clone())),
    ];
    let (mut native, mut oip) = (0.0, 0.0);
    for (method, path, body) in &guarded {
        for key in [None, Some(WRONG), Some(&KEY_A[..KEY_A.len() - 1])] {
            let (st, b) = call(&s, method, path, body.clone(), key).await;
            assert_eq!(
                (st, b["error_type"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} {key:?}: {b}"
            );
            if path.starts_with("/v2") {
                oip += 1.0
            } else {
                native += 1.0
            }
        }
        for key in [KEY_A, KEY_B] {
            let (st, b) = call(&s, method, path, body.clone(), Some(key)).await;
            assert_eq!(st, 200, "{method} {path}: {b}");
        }
    }
    // Probes and scrapers carry no key.
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/breast_cancer/ready",
    ] {
        assert_eq!(call(&s, "GET", path, None, None).await.0, 200, "{path}");
    }

    // gRPC: the same key in `authorization` metadata.
    let mut c = GrpcInferenceServiceClient::connect(grpc_url).await.unwrap();
    let infer_request = |key: Option<&str>| {
        let mut r = tonic::Request::new(pb::ModelInferRequest {
            model_name: "breast_cancer".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![1, 30],
                contents: Some(pb::InferTensorContents {
                    fp32_contents: f64s(&bc_row()).iter().map(|&v| v as f32).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        if let Some(k) = key {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        r
    };
    for key in [None, Some(WRONG)] {
        let e = c.model_infer(infer_request(key)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert_eq!(e.metadata().get("error-type").unwrap(), "unauthorized");
    }
    let e = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "breast_cancer".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c.server_metadata(pb::ServerMetadataRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(c.model_infer(infer_request(Some(KEY_B))).await.is_ok());
    assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = c
        .model_ready(pb::ModelReadyRequest {
            name: "breast_cancer".into(),
            version: String::new(),
        })
        .await;
    assert!(ready.unwrap().into_inner().ready);

    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_auth_failures_total", &[("protocol", "native")]),
        native
    );
    assert_eq!(metric_sum(&m, "mcd_auth_failures_total", &[("protocol", "oip")]), oip);
    assert_eq!(metric_sum(&m, "mcd_auth_failures_total", &[("protocol", "grpc")]), 4.0);
    s.stop().await;
}

/// Two `Authorization` headers (or gRPC metadata entries) are refused, even when one
/// of them holds a good key: which one a proxy or server reads differs (first or last),
/// so accepting either is a guess. Before the fix the first one won.
#[tokio::test]
async fn repeated_authorization_is_refused_on_every_protocol() {
    let keys_dir = tempdir::TempDir::new();
    let mut args = ServeArgs::for_models(models_dir());
    args.api_key_file = Some(key_file(keys_dir.path(), &format!("{KEY_A}\n")));
    let (s, grpc_url) = start_with_grpc(args).await;
    for (path, body) in [
        ("/predict", json!({"inputs": [bc_row()]})),
        (
            "/v2/models/breast_cancer/infer",
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": bc_row()}]}),
        ),
    ] {
        for pair in [[KEY_A, WRONG], [WRONG, KEY_A], [KEY_A, KEY_A]] {
            let r = s
                .client
                .post(s.url(path))
                .json(&body)
                .header("authorization", format!("Bearer {}", pair[0]))
                .header("authorization", format!("Bearer {}", pair[1]))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 401, "{path} {pair:?}");
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error_type"], "unauthorized");
            assert!(b["error"].as_str().unwrap().contains("2 Authorization headers"), "{b}");
        }
        let (status, _) = call(&s, "POST", path, Some(body.clone()), Some(KEY_A)).await;
        assert_eq!(status, 200, "one good key still passes");
    }
    let mut c = GrpcInferenceServiceClient::connect(grpc_url).await.unwrap();
    let mut r = tonic::Request::new(pb::ServerMetadataRequest {});
    r.metadata_mut()
        .append("authorization", format!("Bearer {KEY_A}").parse().unwrap());
    r.metadata_mut()
        .append("authorization", format!("Bearer {WRONG}").parse().unwrap());
    let e = c.server_metadata(r).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("2 Authorization headers"), "{e:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_key_file_that_holds_no_key_refuses_to_start() {
    let keys_dir = tempdir::TempDir::new();
    let mut args = ServeArgs::for_models(models_dir());
    args.api_key_file = Some(key_file(keys_dir.path(), "# keys go here\n\n"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = mcd_serve::server::serve(args, listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("holds no key"), "{err}");
}

/// The real binary: SIGHUP swaps the keys; no key (right or wrong) appears in any log
/// line, even at debug; `--metrics-addr` moves `/metrics` off the main port.
#[tokio::test]
async fn keys_reload_on_sighup_stay_out_of_the_logs_and_metrics_can_move() {
    let keys_dir = tempdir::TempDir::new();
    let path = key_file(keys_dir.path(), &format!("{KEY_A}\n"));
    let p = spawn_with_env(
        &models_dir(),
        &[
            "--api-key-file",
            path.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "debug")],
    );
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", p.base), 200).await;
    let predict = |key: &'static str| {
        let r = client
            .post(format!("{}/predict", p.base))
            .bearer_auth(key)
            .json(&json!({"inputs": [bc_row()]}))
            .send();
        async move { r.await.unwrap().status().as_u16() }
    };
    assert_eq!(predict(KEY_A).await, 200);
    assert_eq!(predict(KEY_B).await, 401);
    assert_eq!(predict(WRONG).await, 401);

    std::fs::write(&path, format!("{KEY_B}\n")).unwrap();
    signal(&p, "HUP");
    let (mut swapped, mut refused_while_reloading) = (false, 0.0);
    for _ in 0..200 {
        if predict(KEY_B).await == 200 {
            swapped = true;
            break;
        }
        refused_while_reloading += 1.0;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(swapped, "the new key never worked after SIGHUP");
    assert_eq!(predict(KEY_A).await, 401, "the removed key still works");
    // A reload that finds no key keeps the keys in force.
    std::fs::write(&path, "").unwrap();
    signal(&p, "HUP");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(predict(KEY_B).await, 200);

    // /metrics on its own listener, and not on the main one.
    let metrics_addr = p.listening_field("metrics_addr");
    let m = scrape(&client, &format!("http://{metrics_addr}")).await;
    let refused = 3.0 + refused_while_reloading;
    assert_eq!(
        metric_sum(&m, "mcd_auth_failures_total", &[("protocol", "native")]),
        refused
    );
    assert_eq!(
        client.get(format!("{}/metrics", p.base)).send().await.unwrap().status(),
        404
    );

    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let logs = p.logs.lock().unwrap().clone();
    assert!(logs.iter().any(|l| l.contains("unauthorized")), "refusals are logged");
    for key in [KEY_A, KEY_B, WRONG, "k-alpha", "k-beta", "k-wrong"] {
        assert!(!logs.iter().any(|l| l.contains(key)), "a log line holds {key}");
    }
}
