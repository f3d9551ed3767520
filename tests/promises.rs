//! README promises that no other test holds the server to: the in-flight gauge, admission
//! holding capacity until timed-out work ends, skipping work whose client has gone,
//! `--max-batch-rows`, `not_ready` while loading, `x-request-id`, and the load-failure and
//! panic metrics. Real servers on port 0, real HTTP, parsed Prometheus output.

mod common;

use std::time::Duration;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::{Value, json};

/// `rows` copies of breast_cancer's reference rows. With `mc_samples=1000` a batch of
/// 2048 rows is seconds of work on one worker: long enough to watch it run.
fn breast_cancer_rows(rows: usize) -> Value {
    let r = read_json(&fixture("reference_outputs.json"))["breast_cancer"]["inputs"].clone();
    let r = r.as_array().unwrap();
    json!((0..rows).map(|i| r[i % r.len()].clone()).collect::<Vec<_>>())
}

const HEAVY_ROWS: usize = 2048;
const HEAVY_PATH: &str = "/models/breast_cancer/predict?mc_samples=1000&seed=3";

/// Sends a request in the background and returns its status code.
fn send(s: &TestServer, path: &str, body: Value) -> tokio::task::JoinHandle<u16> {
    let c = s.client.clone();
    let url = s.url(path);
    tokio::spawn(async move { c.post(url).json(&body).send().await.unwrap().status().as_u16() })
}

/// Polls the server's own `mcd_inflight_requests` until it reaches `at_least`, failing if
/// `task` finishes first (then the request was never seen in flight).
async fn wait_inflight(s: &TestServer, at_least: f64, task: &tokio::task::JoinHandle<u16>) -> f64 {
    for _ in 0..2000 {
        let v = metric_sum(&s.metrics().await, "mcd_inflight_requests", &[]);
        if v >= at_least {
            return v;
        }
        assert!(
            !task.is_finished(),
            "the request finished before {at_least} were seen in flight (last {v})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("mcd_inflight_requests never reached {at_least}");
}

fn heavy_args() -> ServeArgs {
    let mut args = ServeArgs::for_models(models_dir());
    args.workers = Some(1);
    // Admission costs rows × samples, rows bounded by the body's '[' count (rows + 1).
    args.max_inflight_cost = (HEAVY_ROWS * 1000 + 100_000) as u32;
    args
}

#[tokio::test]
async fn the_inflight_gauge_counts_a_running_request_and_returns_to_zero() {
    let s = TestServer::start(heavy_args()).await;
    assert_eq!(metric_sum(&s.metrics().await, "mcd_inflight_requests", &[]), 0.0);
    let heavy = send(&s, HEAVY_PATH, json!({"inputs": breast_cancer_rows(HEAVY_ROWS)}));
    assert_eq!(wait_inflight(&s, 1.0, &heavy).await, 1.0);
    assert_eq!(heavy.await.unwrap(), 200);
    assert_eq!(metric_sum(&s.metrics().await, "mcd_inflight_requests", &[]), 0.0);
    s.stop().await;
}

/// A request that times out answers 504 at once, but its work keeps its admitted cost
/// until the computation really ends, shown in `mcd_held_cost`: meanwhile a request that
/// would not fit is refused with 429, and once the work ends the budget is whole again.
#[tokio::test]
async fn a_timed_out_request_holds_its_capacity_until_its_work_ends() {
    let mut args = heavy_args();
    args.max_inflight_cost = (HEAVY_ROWS * 1000) as u32;
    args.request_timeout_secs = 0.3;
    let s = TestServer::start(args).await;
    let (st, b, _) = s
        .post(HEAVY_PATH, &json!({"inputs": breast_cancer_rows(HEAVY_ROWS)}))
        .await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (504, "timeout"));
    // No request is in flight, and the cost the work holds shows (issue 25, F10): a 429
    // with the in-flight gauge at 0 is not a leak.
    let m = s.metrics().await;
    assert_eq!(metric_sum(&m, "mcd_inflight_requests", &[]), 0.0);
    assert_eq!(metric_sum(&m, "mcd_held_cost", &[]), (HEAVY_ROWS * 1000) as f64);
    // The work runs on: an eval of one row (cost 1) does not fit in what it holds.
    let one = json!({"inputs": breast_cancer_rows(1)});
    let (st, b, headers) = s.post("/predict", &one).await;
    assert_eq!((st, b["error_type"].as_str().unwrap()), (429, "overloaded"), "{b}");
    assert_eq!(headers["retry-after"], "1");
    // ... until it ends; then the same request is served.
    let mut served = false;
    for _ in 0..1200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (st, _, _) = s.post("/predict", &one).await;
        if st == 200 {
            served = true;
            break;
        }
        assert_eq!(st, 429);
    }
    assert!(served, "the budget never came back");
    let m = s.metrics().await;
    assert_eq!(metric_sum(&m, "mcd_held_cost", &[]), 0.0);
    assert_eq!(
        metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "timeout")]),
        1.0
    );
    assert!(metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "overloaded")]) >= 1.0);
    s.stop().await;
}

/// One worker, busy with a heavy request; a second request queues behind it and its
/// client hangs up. Its inference never runs: no diabetes inference is ever timed.
#[tokio::test]
async fn work_whose_client_has_gone_is_skipped() {
    let s = TestServer::start(heavy_args()).await;
    let heavy = send(&s, HEAVY_PATH, json!({"inputs": breast_cancer_rows(HEAVY_ROWS)}));
    wait_inflight(&s, 1.0, &heavy).await;
    let row = read_json(&fixture("reference_outputs.json"))["diabetes"]["inputs"][0].clone();
    let queued = send(&s, "/models/diabetes/predict?mc_samples=10", json!({"inputs": [row]}));
    wait_inflight(&s, 2.0, &heavy).await;
    queued.abort(); // drops the connection: the client has gone
    assert!(queued.await.unwrap_err().is_cancelled());
    // The server notices the hang-up: the queued request leaves the gauge while the heavy
    // one still runs.
    wait_inflight_exactly(&s, 1.0).await;
    assert_eq!(heavy.await.unwrap(), 200);
    // The worker semaphore is fair: a request sent now runs after anything still queued,
    // so once it has answered, the gone client's work would have run if it were not skipped.
    let (st, _, _) = s.post("/predict", &json!({"inputs": breast_cancer_rows(1)})).await;
    assert_eq!(st, 200);
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "mcd_inference_duration_seconds",
            &[("model", "breast_cancer"), ("mode", "mc_dropout")]
        ),
        1.0
    );
    assert_absent(&m, "mcd_inference_duration_seconds", &[("model", "diabetes")]);
    assert_eq!(metric_sum(&m, "mcd_inflight_requests", &[]), 0.0);
    s.stop().await;
}

async fn wait_inflight_exactly(s: &TestServer, want: f64) {
    for _ in 0..1000 {
        if metric_sum(&s.metrics().await, "mcd_inflight_requests", &[]) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("mcd_inflight_requests never came to {want}");
}

#[tokio::test]
async fn more_rows_than_max_batch_rows_is_413() {
    let mut args = ServeArgs::for_models(models_dir());
    args.max_batch_rows = 4;
    let s = TestServer::start(args).await;
    let (st, _, _) = s.post("/predict", &json!({"inputs": breast_cancer_rows(4)})).await;
    assert_eq!(st, 200);
    let (st, b, _) = s.post("/predict", &json!({"inputs": breast_cancer_rows(5)})).await;
    assert_eq!(
        (st, b["error_type"].as_str().unwrap()),
        (413, "payload_too_large"),
        "{b}"
    );
    assert!(b["error"].as_str().unwrap().contains('4'), "{b}");
    let (st, _, _) = s
        .post("/predict?mc_samples=5", &json!({"inputs": breast_cancer_rows(5)}))
        .await;
    assert_eq!(st, 413);
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "payload_too_large")]),
        2.0
    );
    s.stop().await;
}

/// `serve` answers before its models have loaded. The core is served here with no models
/// installed yet (what `serve` does until loading ends), then the models are installed.
#[tokio::test]
async fn predict_is_not_ready_with_retry_after_while_models_load() {
    let args = ServeArgs::for_models(models_dir());
    let core = mcd_serve::core::Core::new(
        Some("breast_cancer".into()),
        args.limits(),
        mcd_serve::core::auth::ApiKeys::open(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = mcd_serve::front::http::router(core.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    let client = reqwest::Client::new();
    let one = json!({"inputs": breast_cancer_rows(1)});
    let r = client.post(format!("{base}/predict")).json(&one).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error_type"], "not_ready", "{b}");
    let r = client.get(format!("{base}/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let b: Value = r.json().await.unwrap();
    assert!(b["reasons"].to_string().contains("still loading"), "{b}");
    assert_eq!(
        client.get(format!("{base}/health/live")).send().await.unwrap().status(),
        200
    );

    let repo = tokio::task::spawn_blocking(|| mcd_serve::engine::repo::load_dir(&models_dir(), None).unwrap())
        .await
        .unwrap();
    core.install(repo);
    let r = client.post(format!("{base}/predict")).json(&one).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = scrape(&client, &base).await;
    assert_eq!(
        metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "not_ready")]),
        1.0
    );
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn every_answer_carries_an_x_request_id_echoing_the_clients() {
    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    let one = json!({"inputs": breast_cancer_rows(1)});
    for (path, body) in [
        ("/predict", Some(&one)),
        ("/no/such/route", None),
        ("/health/ready", None),
    ] {
        let req = match body {
            Some(b) => s.client.post(s.url(path)).json(b),
            None => s.client.get(s.url(path)),
        };
        let r = req.header("x-request-id", "client-id-42").send().await.unwrap();
        assert_eq!(r.headers()["x-request-id"], "client-id-42", "{path}");
    }
    let mut ids = std::collections::HashSet::new();
    for _ in 0..3 {
        let r = s.client.post(s.url("/predict")).json(&one).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(!id.is_empty());
        assert!(ids.insert(id), "request ids repeat: {ids:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn load_failure_and_panic_metrics_are_exposed() {
    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    let m = s.metrics().await;
    assert_eq!(metric_sum(&m, "mcd_model_load_failures", &[]), 0.0);
    assert_eq!(metric_sum(&m, "mcd_internal_panics_total", &[]), 0.0);
    s.stop().await;

    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    std::fs::write(dir.path().join("broken.onnx"), b"not a protobuf").unwrap();
    std::fs::write(dir.path().join("also_broken.onnx"), b"").unwrap();
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    let s = TestServer::start(args).await;
    let m = s.metrics().await;
    assert_eq!(metric_sum(&m, "mcd_model_load_failures", &[]), 2.0);
    assert_eq!(metric_sum(&m, "mcd_internal_panics_total", &[]), 0.0);
    s.stop().await;
}

/// Probe finding c, through the batching queue: a request that reserved the whole budget
/// and was refused after decoding (413: too many rows) gives the budget back before its
/// answer is sent, so the client's next request, sent the moment it reads that answer,
/// is never refused 429.
#[tokio::test]
async fn a_refused_request_gives_its_budget_back_before_its_answer() {
    let mut args = ServeArgs::for_models(models_dir());
    args.max_batch_rows = 4;
    // The 5-row body's cost bound (its '[' count, 6) × 1000 samples is the whole budget.
    args.max_inflight_cost = 6000;
    let s = TestServer::start(args).await;
    let too_many = json!({"inputs": breast_cancer_rows(5)}).to_string();
    let small = json!({"inputs": breast_cancer_rows(1)}).to_string();
    let mut early = 0;
    for _ in 0..500 {
        let (st, _) = s.post_raw("/predict?mc_samples=1000&seed=1", too_many.clone()).await;
        assert_eq!(st, 413);
        let (st, _) = s.post_raw("/predict?mc_samples=1000&seed=1", small.clone()).await;
        early += (st == 429) as usize;
    }
    assert_eq!(
        early, 0,
        "requests refused 429 right after a refusal that held the budget"
    );
    s.stop().await;
}
