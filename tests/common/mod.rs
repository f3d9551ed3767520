//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mcd_serve::config::ServeArgs;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn models_dir() -> PathBuf {
    repo_root().join("models")
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `../shared/real-models`, or None with a printed notice when it is absent. CI sets
/// MCD_REQUIRE_SHARED=1 so that its absence fails instead of skipping silently.
pub fn shared_models() -> Option<PathBuf> {
    let dir = repo_root().join("../shared/real-models");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("MCD_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{} is missing and MCD_REQUIRE_SHARED=1", dir.display());
    }
    eprintln!(
        "NOTICE: skipping: {} is absent (a fresh clone has no ../shared)",
        dir.display()
    );
    None
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    fn walk(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
            serde_json::Value::Bool(b) => out.push(*b as u8 as f64),
            other => panic!("not numeric: {other}"),
        }
    }
    let mut out = vec![];
    walk(v, &mut out);
    out
}

/// A real server on 127.0.0.1:0 in this process, with a shutdown trigger.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(args: ServeArgs) -> TestServer {
        Self::start_unready(args).await.wait_ready().await
    }

    pub async fn start_unready(args: ServeArgs) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(mcd_serve::server::serve(args, listener, async move {
            let _ = rx.await;
        }));
        TestServer {
            base,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            handle,
        }
    }

    /// Waits until readiness answers (200 or a settled 503 with models loaded).
    pub async fn wait_ready(self) -> TestServer {
        for _ in 0..1200 {
            if let Ok(r) = self.client.get(format!("{}/health/ready", self.base)).send().await {
                if r.status() == 200 {
                    return self;
                }
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                let loading = body["reasons"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r.as_str().unwrap_or("").contains("still loading")));
                if !loading {
                    return self;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server at {} never finished loading", self.base);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
        let r = self.client.post(self.url(path)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON answer ({status}) {text:?}: {e}"));
        (status, json, headers)
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON answer ({status}) {text:?}: {e}")),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON answer ({status}) {text:?}: {e}")),
        )
    }

    pub async fn metrics(&self) -> prometheus_parse::Scrape {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
    }
}

/// Sum of a counter's (or gauge's) samples whose labels include every given pair.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// A folder holding copies of the given files (so a test can choose which models a server sees).
pub fn model_folder(files: &[PathBuf]) -> tempdir::TempDir {
    let dir = tempdir::TempDir::new();
    for f in files {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
        let cfg = f.with_extension("model.json");
        if cfg.is_file() {
            std::fs::copy(&cfg, dir.path().join(cfg.file_name().unwrap())).unwrap();
        }
    }
    dir
}

pub mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A uniquely named folder under the target dir, removed on drop.
    pub struct TempDir(PathBuf);
    static NEXT: AtomicU64 = AtomicU64::new(0);
    impl TempDir {
        pub fn new() -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "mcd-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A real server with the OIP gRPC service too, each on its own 127.0.0.1:0 port; ready.
/// Returns the server and the gRPC endpoint URL.
#[allow(dead_code)]
pub async fn start_with_grpc(args: ServeArgs) -> (TestServer, String) {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(mcd_serve::server::serve_all(args, http, Some(grpc), async move {
        let _ = rx.await;
    }));
    let server = TestServer {
        base,
        client: reqwest::Client::new(),
        shutdown: Some(tx),
        handle,
    }
    .wait_ready()
    .await;
    (server, grpc_url)
}
