//! The real binary: graceful shutdown on SIGTERM with a request in flight, and SIGHUP
//! reload that keeps the last good model.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn spawn(models: &std::path::Path, extra: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .args([
            "--models",
            models.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child);
    Proc {
        child,
        base: format!("http://{addr}"),
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

async fn wait_status(client: &reqwest::Client, url: &str, want: u16) {
    for _ in 0..600 {
        if let Ok(r) = client.get(url).send().await
            && r.status().as_u16() == want
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered {want}");
}

/// The server's own `mcd_inflight_requests`, parsed from its /metrics.
async fn inflight(client: &reqwest::Client, base: &str) -> f64 {
    metric_sum(&scrape(client, base).await, "mcd_inflight_requests", &[])
}

/// SIGTERM while a request is provably in flight: the server's gauge reads 1 and the
/// request has not answered when the signal is sent. Readiness turns 503 during the drain,
/// a new connection after the drain window is refused, the in-flight request still answers
/// 200, and the process exits 0. The request (2048 rows × 1000 samples on one worker) is
/// seconds of work, several times the drain; nothing here asserts how fast it runs.
#[tokio::test]
async fn sigterm_turns_readiness_off_and_finishes_in_flight_requests() {
    let drain = 0.5;
    let mut p = spawn(
        &models_dir(),
        &[
            "--shutdown-drain-secs",
            &drain.to_string(),
            "--workers",
            "1",
            "--max-inflight-cost",
            "3000000",
        ],
    );
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", p.base), 200).await;

    let d = read_json(&fixture("reference_outputs.json"))["breast_cancer"].clone();
    let rows: Vec<Value> = (0..256).flat_map(|_| d["inputs"].as_array().unwrap().clone()).collect();
    assert_eq!(rows.len(), 2048);
    let url = format!("{}/predict?mc_samples=1000&seed=5", p.base);
    let c = client.clone();
    let in_flight = tokio::spawn(async move { c.post(url).json(&json!({"inputs": rows})).send().await });
    let mut seen = false;
    for _ in 0..2000 {
        if inflight(&client, &p.base).await >= 1.0 {
            seen = true;
            break;
        }
        assert!(
            !in_flight.is_finished(),
            "the request answered before it was seen in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen, "mcd_inflight_requests never read 1");
    signal(&p, "TERM");
    let signalled = std::time::Instant::now();
    assert!(!in_flight.is_finished(), "the request answered before SIGTERM");
    wait_status(&client, &format!("{}/health/ready", p.base), 503).await;

    // After the drain window the listener is closed: a new connection is refused.
    tokio::time::sleep(Duration::from_secs_f64(drain + 1.0).saturating_sub(signalled.elapsed())).await;
    let late = reqwest::Client::new()
        .get(format!("{}/health/live", p.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match late {
        Err(e) => assert!(
            e.is_connect(),
            "a request after the drain failed, but not at connect: {e}"
        ),
        Ok(r) => panic!("a request after the drain window was answered {}", r.status()),
    }

    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request lost its connection");
    assert_eq!(r.status(), 200, "the in-flight request must finish");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["mc_samples"], 1000);
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..300 {
            if let Some(s) = p.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
    .await
    .unwrap();
    assert!(status.expect("the process did not exit after SIGTERM").success());
}

/// The real binary configured by environment only: the variables whose effect shows over
/// HTTP. tests/env_config.rs checks that every flag reads its variable.
#[tokio::test]
async fn the_binary_reads_its_settings_from_mcd_environment_variables() {
    let dir = model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("diabetes.onnx"),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .env("MCD_MODELS", dir.path())
        .env("MCD_ADDR", "127.0.0.1:0")
        .env("MCD_LOG_FORMAT", "json")
        .env("MCD_DEFAULT_MODEL", "diabetes")
        .env("MCD_MAX_MC_SAMPLES", "7")
        .env("MCD_MAX_BATCH_ROWS", "2")
        .env("MCD_BODY_LIMIT_BYTES", "100000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child);
    let p = Proc {
        child,
        base: format!("http://{addr}"),
    };
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", p.base), 200).await;
    let post = |path: &str, body: Value| {
        let r = client.post(format!("{}{path}", p.base)).json(&body).send();
        async move {
            let r = r.await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let diabetes_row = read_json(&fixture("reference_outputs.json"))["diabetes"]["inputs"][0].clone();
    // MCD_DEFAULT_MODEL: /predict is diabetes.
    let (st, b) = post("/predict", json!({"inputs": [diabetes_row]})).await;
    assert_eq!((st, b["model"].as_str()), (200, Some("diabetes")), "{b}");
    // MCD_MAX_MC_SAMPLES.
    assert_eq!(
        post("/predict?mc_samples=7", json!({"inputs": [diabetes_row]})).await.0,
        200
    );
    let (st, b) = post("/predict?mc_samples=8", json!({"inputs": [diabetes_row]})).await;
    assert_eq!((st, b["error_type"].as_str()), (422, Some("invalid_parameter")), "{b}");
    // MCD_MAX_BATCH_ROWS.
    let (st, b) = post(
        "/predict",
        json!({"inputs": [diabetes_row, diabetes_row, diabetes_row]}),
    )
    .await;
    assert_eq!((st, b["error_type"].as_str()), (413, Some("payload_too_large")), "{b}");
    // MCD_BODY_LIMIT_BYTES.
    let big = json!({"inputs": [vec![1.0; 40_000]]});
    let (st, b) = post("/predict", big).await;
    assert_eq!((st, b["error_type"].as_str()), (413, Some("payload_too_large")), "{b}");
    // MCD_LOG_FORMAT=json and MCD_ADDR: the address came from a JSON log line.
    drop(p);
}

/// The first JSON log line that names the listening address.
fn listening_addr(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent
                && let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(addr) = v["fields"]["addr"].as_str()
            {
                tx.send(addr.to_string()).unwrap();
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the server logged no listening address in JSON")
}

#[tokio::test]
async fn sighup_reload_keeps_the_last_good_model_when_the_file_breaks() {
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    let p = spawn(dir.path(), &[]);
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", p.base), 200).await;
    std::fs::write(dir.path().join("breast_cancer.onnx"), b"half a file").unwrap();
    signal(&p, "HUP");
    wait_status(&client, &format!("{}/health/ready", p.base), 503).await;
    let list: Value = client
        .get(format!("{}/models", p.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["load_failures"][0]["kept_previous"], true);
    let r = client
        .post(format!("{}/predict", p.base))
        .json(&json!({"inputs": [vec![10.0; 30]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the last good model keeps serving");
}

#[test]
fn healthcheck_subcommand_reports_readiness() {
    let fail = Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .args([
            "healthcheck",
            "--url",
            "http://127.0.0.1:9/health/ready",
            "--timeout-secs",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!fail.status.success());
    let p = spawn(&models_dir(), &[]);
    let url = format!("{}/health/ready", p.base);
    for _ in 0..600 {
        let ok = Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
            .args(["healthcheck", "--url", &url])
            .status()
            .unwrap();
        if ok.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("healthcheck never succeeded against a ready server");
}
