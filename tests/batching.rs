//! Dynamic batching: concurrent requests share passes, and a request's answer does not
//! depend on it. Every request's answer under concurrent mixed load (eval and MC with
//! fixed seeds, several row counts, `return_samples`, `auto`, on all three bundled models)
//! must equal, bit for bit, its answer on an idle server where it ran alone; and the
//! server's own `mcd_batch_rows` must show that passes were really shared.

mod common;

use std::collections::BTreeMap;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::{Value, json};

const MODELS: [&str; 3] = ["breast_cancer", "diabetes", "digits_cnn"];

/// The mix: per model, eval and MC requests of 1-3 rows. The MC requests share a sample
/// count (so they may share passes) but each has its own seed; a few differ in count,
/// return their samples or use `auto`, which must not disturb the others.
fn requests() -> Vec<(String, Value)> {
    let reference = read_json(&fixture("reference_outputs.json"));
    let mut out = vec![];
    for model in MODELS {
        let rows = reference[model]["inputs"].as_array().unwrap().clone();
        let body = |first: usize, n: usize| json!({"inputs": (0..n).map(|i| rows[(first + i) % rows.len()].clone()).collect::<Vec<_>>()});
        for i in 0..12 {
            let n = 1 + i % 3;
            let path = format!("/models/{model}/predict");
            out.push((path.clone(), body(i, n)));
            let query = match i {
                0 => "mc_samples=30&seed=7&return_samples=true".to_string(),
                1 => "mc_samples=12&seed=1".to_string(),
                2 => "mc_samples=auto&mc_max=64&seed=5".to_string(),
                _ => format!("mc_samples=20&seed={}", 100 + i),
            };
            out.push((format!("{path}?{query}"), body(i + 5, n)));
        }
    }
    out
}

/// Each request alone, one after another, on an idle server.
async fn alone(requests: &[(String, Value)]) -> Vec<Value> {
    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    let mut answers = vec![];
    for (path, body) in requests {
        let (status, answer, _) = s.post(path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        answers.push(answer);
    }
    s.stop().await;
    answers
}

/// Sends every request of `order` (indices into `requests`) at once, from `clients`
/// concurrent connections; returns the answers by request index.
async fn concurrently(
    s: &TestServer,
    requests: &[(String, Value)],
    order: &[usize],
    clients: usize,
) -> BTreeMap<usize, Value> {
    let mut tasks = vec![];
    for c in 0..clients {
        let mine: Vec<(usize, String, Value)> = order
            .iter()
            .skip(c)
            .step_by(clients)
            .map(|&i| (i, s.url(&requests[i].0), requests[i].1.clone()))
            .collect();
        let client = reqwest::Client::new();
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            for (i, url, body) in mine {
                let r = client.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                out.push((i, r.json::<Value>().await.unwrap()));
            }
            out
        }));
    }
    let mut answers = BTreeMap::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    answers
}

/// A deterministic shuffle (no RNG crate needed in the tests).
fn shuffled(n: usize, round: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// Passes and request rows per model and mode, from the server's own histogram.
fn passes(scrape: &prometheus_parse::Scrape, model: &str, mode: &str) -> (f64, f64) {
    let labels = [("model", model), ("mode", mode)];
    (
        metric_sum(scrape, "mcd_batch_rows_count", &labels),
        metric_sum(scrape, "mcd_batch_rows_sum", &labels),
    )
}

fn rows_sent(requests: &[(String, Value)], model: &str, mc: bool) -> f64 {
    requests
        .iter()
        .filter(|(p, _)| p.contains(&format!("/{model}/")) && p.contains("mc_samples") == mc)
        .map(|(_, b)| b["inputs"].as_array().unwrap().len() as f64)
        .sum()
}

/// The most a digits_cnn eval answer may move with its place in a pass: its last bits
/// follow where it falls in the pass's buffer (see `engine::model::merged::tests`, which
/// measures it).
const EVAL_SOFTMAX_ULPS: i64 = 8;

fn f32_ulps(a: &[f64], b: &[f64]) -> i64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| ((*x as f32).to_bits() as i64 - (*y as f32).to_bits() as i64).abs())
        .max()
        .unwrap_or(0)
}

/// Every answer equals its answer alone, bit for bit, except digits_cnn's eval answers,
/// which may move by [`EVAL_SOFTMAX_ULPS`] and nothing else.
fn assert_same(requests: &[(String, Value)], expected: &[Value], got: &BTreeMap<usize, Value>, what: &str) {
    assert_eq!(got.len(), requests.len());
    let mut differing = vec![];
    for (i, answer) in got {
        // serde_json prints the shortest representation that round-trips, so equal JSON
        // numbers are equal f64 bits.
        if *answer == expected[*i] {
            continue;
        }
        let path = &requests[*i].0;
        let within = path == "/models/digits_cnn/predict" && {
            let (mut a, mut b) = (answer.clone(), expected[*i].clone());
            let ulps = f32_ulps(
                &f64s(&a["outputs"]["probabilities"]),
                &f64s(&b["outputs"]["probabilities"]),
            );
            a["outputs"] = Value::Null;
            b["outputs"] = Value::Null;
            a == b && ulps <= EVAL_SOFTMAX_ULPS
        };
        if !within {
            differing.push(format!(
                "{path} ({} rows)",
                requests[*i].1["inputs"].as_array().unwrap().len()
            ));
        }
    }
    assert!(
        differing.is_empty(),
        "{what}: {} of {} answers differ from the same request alone: {differing:?}",
        differing.len(),
        requests.len()
    );
}

/// One worker that waits up to 50 ms for company: every burst of concurrent requests is
/// merged as far as the pass classes allow. Then the defaults (a worker per core, no
/// delay) under sustained load, where merging comes only from requests that arrive
/// during a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_under_concurrent_mixed_load_equal_answers_alone() {
    let requests = requests();
    let expected = alone(&requests).await;

    let mut args = ServeArgs::for_models(models_dir());
    args.workers = Some(1);
    args.max_batch_delay_us = 50_000;
    let s = TestServer::start(args).await;
    for round in 0..3 {
        let got = concurrently(&s, &requests, &shuffled(requests.len(), round), requests.len()).await;
        assert_same(&requests, &expected, &got, "gathered bursts");
    }
    let scrape = s.metrics().await;
    for model in MODELS {
        for (mode, mc) in [("eval", false), ("mc_dropout", true)] {
            let (count, sum) = passes(&scrape, model, mode);
            assert_eq!(
                sum,
                3.0 * rows_sent(&requests, model, mc),
                "{model} {mode}: rows counted"
            );
            // 12 requests of each kind per round: without merging, 36 passes.
            assert!(
                count <= 18.0,
                "{model} {mode}: {count} passes for 36 requests: the bursts were not merged"
            );
        }
    }
    s.stop().await;

    let s = TestServer::start(ServeArgs::for_models(models_dir())).await;
    for round in 0..4 {
        let order: Vec<usize> = (0..8)
            .flat_map(|r| shuffled(requests.len(), 10 + round * 8 + r))
            .collect();
        let got = concurrently(&s, &requests, &order, 16).await;
        assert_same(&requests, &expected, &got, "sustained load, default settings");
    }
    let scrape = s.metrics().await;
    let (count, sum): (f64, f64) = MODELS
        .iter()
        .flat_map(|m| [passes(&scrape, m, "eval"), passes(&scrape, m, "mc_dropout")])
        .fold((0.0, 0.0), |(c, s), (c2, s2)| (c + c2, s + s2));
    let requests_sent = 4.0 * 8.0 * requests.len() as f64;
    assert!(
        sum > 0.0 && count < requests_sent,
        "no pass was shared under sustained load"
    );
    eprintln!(
        "sustained load: {requests_sent} requests in {count} passes ({:.2} rows per pass)",
        sum / count
    );
    s.stop().await;
}
