//! The memory budget, read from the kernel: the real binary at its default limits answers
//! the largest requests those limits allow with its peak RSS under the budget (plus its
//! idle footprint), gives the memory back afterwards, and refuses with 413 what could
//! never fit. Tests run one after another (a mutex): RSS is per process, but the machine's
//! cores and memory are shared.

mod common;

use common::process::*;
use common::*;
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The default `--max-memory-bytes`.
const BUDGET: u64 = 512 << 20;
/// The default `--max-returned-samples`.
const MAX_RETURNED: usize = 1 << 20;
const MAX_ROWS: usize = 4096;
const MAX_SAMPLES: usize = 1000;

/// A field of /proc/PID/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

fn rows(model: &str, n: usize) -> Value {
    let refs = read_json(&fixture("reference_outputs.json"));
    Value::Array((0..n).map(|i| refs[model]["inputs"][i % 8].clone()).collect())
}

async fn post(client: &reqwest::Client, base: &str, model: &str, query: &str, inputs: &Value) -> (u16, Value) {
    let r = client
        .post(format!("{base}/models/{model}/predict?{query}"))
        .json(&json!({ "inputs": inputs }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[tokio::test]
async fn the_largest_requests_at_the_default_limits_stay_under_the_budget_and_give_memory_back() {
    let _serial = SERIAL.lock().await;
    // Default memory limits; only the timeout is raised, since the test machine's cores are
    // shared and the time a request takes is not what this test is about.
    let server = spawn(&models_dir(), &["--request-timeout-secs", "600"]);
    let pid = server.child.id();
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", server.base), 200).await;
    // One small request of each kind first, so that what stays after the first request
    // (plans, thread stacks, allocator arenas) counts in the baseline, not in the budget.
    for model in ["breast_cancer", "digits_cnn"] {
        let (status, _) = post(&client, &server.base, model, "mc_samples=2", &rows(model, 1)).await;
        assert_eq!(status, 200);
    }
    let idle = status_bytes(pid, "VmRSS");
    // Values per row of a `return_samples` answer: breast_cancer has 2 class probabilities,
    // digits_cnn 10.
    let cases = [
        ("breast_cancer", MAX_ROWS, format!("mc_samples={MAX_SAMPLES}&seed=1")),
        ("digits_cnn", MAX_ROWS, format!("mc_samples={MAX_SAMPLES}&seed=1")),
        ("digits_cnn", MAX_ROWS, String::new()),
        (
            "breast_cancer",
            MAX_ROWS,
            format!(
                "mc_samples={}&seed=1&return_samples=true",
                MAX_RETURNED / (MAX_ROWS * 2)
            ),
        ),
        (
            "digits_cnn",
            MAX_ROWS,
            format!(
                "mc_samples={}&seed=1&return_samples=true",
                MAX_RETURNED / (MAX_ROWS * 10)
            ),
        ),
        (
            "digits_cnn",
            MAX_RETURNED / (MAX_SAMPLES * 10),
            format!("mc_samples={MAX_SAMPLES}&seed=1&return_samples=true"),
        ),
    ];
    for (model, n, query) in &cases {
        let inputs = rows(model, *n);
        reset_peak(pid);
        let (status, body) = post(&client, &server.base, model, query, &inputs).await;
        assert_eq!(status, 200, "{model} {n} rows {query}: {body}");
        let peak = status_bytes(pid, "VmHWM");
        let after = status_bytes(pid, "VmRSS");
        println!(
            "{model}, {n} rows, {query:?}: peak {:.1} MiB, after {:.1} MiB (idle {:.1} MiB, budget {:.1} MiB)",
            mib(peak),
            mib(after),
            mib(idle),
            mib(BUDGET)
        );
        assert!(
            peak <= idle + BUDGET,
            "{model} {n} rows {query}: peak RSS {:.1} MiB is over the idle {:.1} MiB plus the budget {:.1} MiB",
            mib(peak),
            mib(idle),
            mib(BUDGET)
        );
        // What a request took comes back when it ends: at most a sliver of the budget stays.
        assert!(
            after <= idle + BUDGET / 16,
            "{model} {n} rows {query}: RSS {:.1} MiB after the request, idle was {:.1} MiB",
            mib(after),
            mib(idle)
        );
    }
}

#[tokio::test]
async fn requests_that_could_never_fit_are_refused_at_once_with_what_would_fit() {
    let _serial = SERIAL.lock().await;
    let server = spawn(&models_dir(), &[]);
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", server.base), 200).await;
    // Over the return_samples cap: 1000 samples × 4096 rows × 10 values.
    let (status, body) = post(
        &client,
        &server.base,
        "digits_cnn",
        "mc_samples=1000&return_samples=true",
        &rows("digits_cnn", MAX_ROWS),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error_type"], "payload_too_large");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("40960000 values")
            && message.contains("--max-returned-samples")
            && message.contains("at most 25 samples for these 4096 rows")
            && message.contains("at most 104 rows at mc_samples=1000"),
        "{message}"
    );
    drop(server);

    // Over the memory budget: a server with 8 MiB cannot hold MC-1000 of 4096 rows with
    // their samples; the message says how many rows would fit.
    let server = spawn(
        &models_dir(),
        &["--max-memory-bytes", "8388608", "--max-returned-samples", "100000000"],
    );
    wait_status(&client, &format!("{}/health/ready", server.base), 200).await;
    let (status, body) = post(
        &client,
        &server.base,
        "breast_cancer",
        "mc_samples=1000&return_samples=true",
        &rows("breast_cancer", MAX_ROWS),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("--max-memory-bytes") && message.contains("rows fit at mc_samples=1000"),
        "{message}"
    );
    let fit: usize = message
        .split("at most ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no row count in: {message}"));
    // What the message promises fits does.
    let (status, body) = post(
        &client,
        &server.base,
        "breast_cancer",
        "mc_samples=1000&return_samples=true",
        &rows("breast_cancer", fit),
    )
    .await;
    assert_eq!(status, 200, "{fit} rows: {body}");
    let scrape = scrape(&client, &server.base).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "mcd_rejected_requests_total",
            &[("reason", "payload_too_large")]
        ),
        1.0
    );
    let labels = [("model", "breast_cancer"), ("mode", "mc_dropout")];
    assert!(metric_sum(&scrape, "mcd_pass_memory_bytes_count", &labels) >= 1.0);
}
