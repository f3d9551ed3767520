//! Dynamic batching: concurrent requests share passes, and a request's answer does not
//! depend on it. Every request's answer under concurrent mixed load (eval and MC with
//! fixed seeds, several row counts, `return_samples`, `auto`, on all three bundled models,
//! and on a MONAI U-Net and BERT from ../shared) must equal, bit for bit, its answer on an
//! idle server where it ran alone; and the server's own `mcd_batch_rows` must show that
//! passes were really shared (or, for BERT at a sequence length whose attention rows a
//! 64-byte boundary splits, that they were not: see `engine::kernels`).

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
    alone_in(models_dir(), requests).await
}

async fn alone_in(dir: std::path::PathBuf, requests: &[(String, Value)]) -> Vec<Value> {
    let s = TestServer::start(ServeArgs::for_models(dir)).await;
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
                let status = r.status();
                let answer = r.json::<Value>().await.unwrap();
                assert_eq!(status, 200, "{answer}");
                out.push((i, answer));
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

/// Every answer equals its answer alone, bit for bit.
fn assert_same(requests: &[(String, Value)], expected: &[Value], got: &BTreeMap<usize, Value>, what: &str) {
    assert_eq!(got.len(), requests.len());
    let mut differing = vec![];
    for (i, answer) in got {
        // serde_json prints the shortest representation that round-trips, so equal JSON
        // numbers are equal f64 bits.
        if *answer != expected[*i] {
            let inputs = &requests[*i].1["inputs"];
            let rows = inputs
                .as_array()
                .or_else(|| inputs.as_object().and_then(|o| o.values().next()?.as_array()))
                .map_or(0, |a| a.len());
            differing.push(format!("{} ({rows} rows)", requests[*i].0));
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

/// A made-up image or token batch for a model from ../shared, as nested JSON.
fn shared_body(model: &str, rows: usize, salt: u64) -> Value {
    let mut next = uniform(salt);
    if model == "bert_tiny_cls" {
        // seq 7: attention rows of 7 floats, which a 64-byte boundary splits by their place.
        let ids: Vec<Vec<i64>> = (0..rows)
            .map(|_| (0..7).map(|_| (next() * 400.0) as i64).collect())
            .collect();
        let mask: Vec<Vec<i64>> = (0..rows).map(|_| vec![1; 7]).collect();
        json!({"inputs": {"input_ids": ids, "attention_mask": mask}})
    } else {
        let image: Vec<Vec<Vec<Vec<f64>>>> = (0..rows)
            .map(|_| vec![(0..32).map(|_| (0..32).map(|_| next()).collect()).collect()])
            .collect();
        json!({"inputs": image})
    }
}

/// The same promise on real architectures: a MONAI U-Net, whose requests share passes, and
/// BERT at seq 7, whose requests run in passes of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_architectures_under_bursts_equal_answers_alone() {
    let Some(shared) = shared_models() else { return };
    let dir = model_folder(&[
        shared.join("medical/monai_basicunet_seg.onnx"),
        shared.join("medical/bert_tiny_cls.onnx"),
    ]);
    let mut requests = vec![];
    for model in ["monai_basicunet_seg", "bert_tiny_cls"] {
        let path = format!("/models/{model}/predict");
        for i in 0..6u64 {
            let rows = 1 + (i as usize) % 2;
            requests.push((path.clone(), shared_body(model, rows, i)));
            requests.push((
                format!("{path}?mc_samples=6&seed={i}"),
                shared_body(model, rows, 10 + i),
            ));
        }
    }
    let expected = alone_in(dir.path().to_path_buf(), &requests).await;
    let mut args = ServeArgs::for_models(dir.path().to_path_buf());
    args.workers = Some(1);
    args.max_batch_delay_us = 200_000;
    // All 24 at once: a nested image's row bound before decoding counts its brackets, so
    // each U-Net MC request first reserves ~35 rows' worth; give the burst room for that.
    args.max_memory_bytes = 64 << 30;
    let s = TestServer::start(args).await;
    for round in 0..2 {
        let got = concurrently(&s, &requests, &shuffled(requests.len(), round), requests.len()).await;
        assert_same(&requests, &expected, &got, "bursts on real architectures");
    }
    let scrape = s.metrics().await;
    for (mode, mc) in [("eval", false), ("mc_dropout", true)] {
        let (count, sum) = passes(&scrape, "monai_basicunet_seg", mode);
        assert_eq!(sum, 2.0 * rows_sent(&requests, "monai_basicunet_seg", mc));
        assert!(
            count < 12.0,
            "U-Net {mode}: {count} passes for 12 requests: the bursts were not merged"
        );
        let (count, _) = passes(&scrape, "bert_tiny_cls", mode);
        assert_eq!(
            count, 12.0,
            "BERT {mode}: requests whose rows must stay in place shared a pass"
        );
    }
    s.stop().await;
}
