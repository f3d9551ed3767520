//! The real binary as a child process: spawned on free ports, its JSON log lines kept,
//! signalled like an operator would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

pub struct Proc {
    pub child: Child,
    pub base: String,
    /// Every line the server has written to stdout so far (JSON logs).
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub fn spawn(models: &std::path::Path, extra: &[&str]) -> Proc {
    spawn_with_env(models, extra, &[])
}

/// As [`spawn`], with environment variables (e.g. `RUST_LOG`).
pub fn spawn_with_env(models: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn_logging(models, "json", extra, env)
}

/// As [`spawn`], logging in the text format (`logs` then holds text lines).
pub fn spawn_text(models: &std::path::Path, extra: &[&str]) -> Proc {
    spawn_logging(models, "text", extra, &[])
}

fn spawn_logging(models: &std::path::Path, format: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .envs(env.iter().copied())
        .args([
            "--models",
            models.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-format",
            format,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (addr, logs) = listening_addr(&mut child);
    Proc {
        child,
        base: format!("http://{addr}"),
        logs,
    }
}

pub fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

pub async fn wait_status(client: &reqwest::Client, url: &str, want: u16) {
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

/// A field of a log line, JSON (`fields.<name>`) or text (`<name>=<value>`).
fn log_field(line: &str, name: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        return v["fields"][name].as_str().map(str::to_string);
    }
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split(' ').next().map(str::to_string)
}

/// The address of the first log line that names one, and every line as it comes.
pub fn listening_addr(child: &mut Child) -> (String, Arc<Mutex<Vec<String>>>) {
    let stdout = child.stdout.take().unwrap();
    let logs = Arc::new(Mutex::new(vec![]));
    let kept = logs.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Kept before the address is sent, so the caller finds the line in `logs`.
            kept.lock().unwrap().push(line.clone());
            if !sent && let Some(addr) = log_field(&line, "addr") {
                tx.send(addr).unwrap();
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server logged no listening address");
    (addr, logs)
}

impl Proc {
    /// A field of the server's "listening" log line (`grpc_addr`, `metrics_addr`, ...).
    pub fn listening_field(&self, field: &str) -> String {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .find_map(|l| log_field(l, field))
            .unwrap_or_else(|| panic!("no log line has fields.{field}"))
    }
}
