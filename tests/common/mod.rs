//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mcd_serve::config::ServeArgs;
use mcd_serve::engine::backend::Backend;
use mcd_serve::engine::model::{LoadedModel, ModelConfig};
use mcd_serve::engine::repo::ModelRepo;

/// The backend the engine-level tests load models on: `MCD_BACKEND` (default tract), the
/// variable the server reads, so that CI runs the same tests on each backend. With
/// onnxruntime the library is `MCD_ORT_LIB`'s.
pub fn test_backend() -> Backend {
    let backend = match std::env::var("MCD_BACKEND") {
        Ok(s) if !s.is_empty() => s.parse().unwrap_or_else(|e| panic!("MCD_BACKEND: {e}")),
        _ => Backend::Tract,
    };
    if backend == Backend::Onnxruntime {
        backend
            .compiled()
            .unwrap_or_else(|e| panic!("MCD_BACKEND=onnxruntime: {e}"));
        let lib = std::env::var_os("MCD_ORT_LIB").filter(|p| !p.is_empty()).unwrap_or_else(|| {
            panic!("MCD_BACKEND=onnxruntime needs MCD_ORT_LIB, the path of libonnxruntime.so.1.31.1 (README, \"Backends\")")
        });
        mcd_serve::engine::backend::set_onnxruntime_library(Some(lib.into()));
    }
    backend
}

/// True (with a `SKIPPED` line) when [`test_backend`] is not tract: for tests of what only
/// tract does (the shared trunk, its kernels and plans).
pub fn tract_only(test: &str) -> bool {
    let backend = test_backend();
    if backend != Backend::Tract {
        announce_skip(&format!("SKIPPED {test}: tests tract only, the backend is {backend}"));
    }
    backend != Backend::Tract
}

/// [`mcd_serve::engine::repo::load_model`] on [`test_backend`].
pub fn load_model(name: &str, path: &Path) -> Result<LoadedModel, String> {
    mcd_serve::engine::repo::load_model_on(name, path, test_backend())
}

/// [`LoadedModel::load`] on [`test_backend`].
pub fn load_with(name: &str, path: &Path, config: ModelConfig) -> anyhow::Result<LoadedModel> {
    LoadedModel::load_on(name, path, config, test_backend())
}

/// [`mcd_serve::engine::repo::load_dir`] on [`test_backend`].
pub fn load_dir(dir: &Path, previous: Option<&ModelRepo>) -> std::io::Result<ModelRepo> {
    mcd_serve::engine::repo::load_folder(dir, None, previous, None, test_backend())
}

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

/// `../shared/real-models` (or `$MCD_SHARED_MODELS`), or None when it is absent. CI sets
/// MCD_REQUIRE_SHARED=1 so that its absence fails instead of skipping.
///
/// A skip is announced on the process's real stderr, not with `eprintln!`: the test
/// harness captures `print!`/`eprint!` output and throws it away for passing tests, but
/// not writes to the stderr handle itself. So a default `cargo test` shows, between the
/// test lines,
///
///     SKIPPED light_alexnet_matches_upstream: ../shared/real-models is absent ...
///
/// and the summary of a skipping test is not a silent "ok".
pub fn shared_models() -> Option<PathBuf> {
    let dir = std::env::var_os("MCD_SHARED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/real-models"));
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("MCD_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{} is missing and MCD_REQUIRE_SHARED=1", dir.display());
    }
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    announce_skip(&format!(
        "SKIPPED {test}: {} is absent, so this test checked nothing (a fresh clone has no ../shared; \
         MCD_REQUIRE_SHARED=1 makes this a failure)",
        dir.display()
    ));
    None
}

/// Writes a line past the harness's output capture, so that it shows for passing tests.
pub fn announce_skip(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

/// Uniform numbers in [0, 1) from a seed (xorshift64): made-up inputs that a test can
/// replay, without an RNG crate.
pub fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The shape of nested JSON arrays, read along each first element.
pub fn nested_shape(v: &serde_json::Value) -> Vec<usize> {
    let mut shape = vec![];
    let mut at = v;
    while let Some(a) = at.as_array() {
        shape.push(a.len());
        at = &a[0];
    }
    shape
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
        scrape(&self.client, &self.base).await
    }

    /// Stops the server and checks how it stopped: `serve` must return Ok, within the
    /// drain time plus a margin for in-flight work (the default drain is 1 s).
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(15)).await
    }

    pub async fn stop_within(mut self, limit: Duration) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(limit, self.handle).await {
            Err(_) => panic!(
                "the server at {} did not stop within {limit:?} of its shutdown",
                self.base
            ),
            Ok(Err(join)) => panic!("the server task at {} failed: {join}", self.base),
            Ok(Ok(Err(e))) => panic!("the server at {} stopped with an error: {e:#}", self.base),
            Ok(Ok(Ok(()))) => {}
        }
    }
}

/// Sum of a counter's (or gauge's) samples whose labels include every given pair. Panics
/// when no such series exists, so that `== 0` cannot pass on a missing metric: a test
/// that means absence says so with [`assert_absent`].
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching = series(scrape, name, labels);
    assert!(
        !matching.is_empty(),
        "no series {name}{labels:?} in the scrape; series named {name}: {:?}",
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| &s.labels)
            .collect::<Vec<_>>()
    );
    sum_of(&matching)
}

/// Asserts that no series of `name` carries all of `labels`.
pub fn assert_absent(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) {
    let matching = series(scrape, name, labels);
    assert!(
        matching.is_empty(),
        "{name}{labels:?} should be absent; found {:?}",
        matching.iter().map(|s| (&s.labels, &s.value)).collect::<Vec<_>>()
    );
}

/// Whether a metric family is exposed at all (any sample of that name, including a
/// histogram's `_bucket`/`_sum`/`_count` as parsed).
pub fn metric_exposed(scrape: &prometheus_parse::Scrape, name: &str) -> bool {
    scrape.samples.iter().any(|s| s.metric == name)
}

fn series<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

fn sum_of(samples: &[&prometheus_parse::Sample]) -> f64 {
    samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => panic!("{}: summaries are not summed", s.metric),
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

/// A server's /metrics, parsed as Prometheus text.
pub async fn scrape(client: &reqwest::Client, base: &str) -> prometheus_parse::Scrape {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

/// Little-endian FP32 bytes (OIP binary data, gRPC raw contents) as f64 values.
pub fn le_f32(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect()
}

/// Little-endian FP64 bytes as values.
pub fn le_f64(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `mcd-serve calibrate` on `lines` (JSON Lines rows) for `model` in `dir`: 30 MC samples,
/// seed 3. The data file is written beside the model.
pub fn run_calibrate(dir: &Path, model: &str, lines: &[String]) -> std::process::Output {
    let data = dir.join(format!("{model}.rows.jsonl"));
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .args(["calibrate", "--models"])
        .arg(dir)
        .args(["--model", model, "--data"])
        .arg(&data)
        .args(["--mc-samples", "30", "--seed", "3"])
        .output()
        .unwrap()
}

/// erfc, Numerical Recipes' `erfcc` (relative error below 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ]
    .iter()
    .rev()
    .fold(0.0, |acc, c| acc * t + c);
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// z such that P(|Z| > z) = alpha for a standard normal Z (bisection).
pub fn two_sided_z(alpha: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if erfc(mid / std::f64::consts::SQRT_2) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}
