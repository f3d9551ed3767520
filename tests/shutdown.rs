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
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server logged no listening address");
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

#[tokio::test]
async fn sigterm_turns_readiness_off_and_finishes_in_flight_requests() {
    let mut p = spawn(&models_dir(), &["--shutdown-drain-secs", "1.5", "--workers", "1"]);
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", p.base), 200).await;

    let d = read_json(&fixture("reference_outputs.json"))["digits_cnn"].clone();
    let rows: Vec<Value> = (0..8).flat_map(|_| d["inputs"].as_array().unwrap().clone()).collect();
    let url = format!("{}/models/digits_cnn/predict?mc_samples=500&seed=5", p.base);
    let c = client.clone();
    let in_flight = tokio::spawn(async move { c.post(url).json(&json!({"inputs": rows})).send().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(150)).await;
    signal(&p, "TERM");
    wait_status(&client, &format!("{}/health/ready", p.base), 503).await;
    let r = in_flight.await.unwrap();
    assert_eq!(r.status(), 200, "the in-flight request must finish");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["mc_samples"], 500);
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
