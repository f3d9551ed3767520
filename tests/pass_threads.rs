//! A pass that runs alone may use every core (`--pass-threads`, engine::cores): tract then
//! splits its large products and element-wise ops between threads. That must not move a
//! bit. The same seeded requests, sent one at a time to a real server with one pass thread
//! and to one with two, answer alike byte for byte; the second ran them on its pool, the
//! first never did (`mcd_passes_total`). (That a pass beside a running one keeps its own
//! thread is `engine::cores`'s unit test.)

mod common;

use common::process::*;
use common::*;
use serde_json::{Value, json};

/// Each request: model, query, body.
fn requests() -> Vec<(String, String, Value)> {
    let refs = read_json(&fixture("reference_outputs.json"));
    let mut out = vec![];
    // digits_cnn at 256 rows: MC-20 passes of 5,120 images, products well over tract's
    // threading threshold; breast_cancer's small MLP stays under it (runs inline).
    for (model, rows) in [("digits_cnn", 256), ("breast_cancer", 64)] {
        let inputs: Vec<Value> = (0..rows).map(|i| refs[model]["inputs"][i % 8].clone()).collect();
        let body = json!({ "inputs": inputs });
        out.push((model.to_string(), String::new(), body.clone()));
        out.push((model.to_string(), "mc_samples=20&seed=11".to_string(), body));
    }
    if let Some(dir) = shared_models() {
        for model in ["monai_basicunet_seg", "monai_densenet_multilabel", "bert_tiny_cls"] {
            let spec = read_json(&dir.join(format!("medical/{model}.json")));
            let body = json!({ "inputs": spec["inputs"] });
            out.push((model.to_string(), String::new(), body.clone()));
            out.push((
                model.to_string(),
                "mc_samples=20&seed=11&statistics=mean,variance,predictive_entropy,mutual_information".to_string(),
                body,
            ));
        }
    }
    out
}

fn folder() -> common::tempdir::TempDir {
    let mut files = vec![
        models_dir().join("digits_cnn.onnx"),
        models_dir().join("breast_cancer.onnx"),
    ];
    if let Some(dir) = shared_models() {
        for m in ["monai_basicunet_seg", "monai_densenet_multilabel", "bert_tiny_cls"] {
            files.push(dir.join(format!("medical/{m}.onnx")));
        }
    }
    model_folder(&files)
}

/// The answers of a server with `threads` pass threads, one request at a time, and its
/// passes that ran on its pool.
async fn answers(dir: &std::path::Path, threads: &str) -> (Vec<String>, f64) {
    let server = spawn(dir, &["--pass-threads", threads, "--request-timeout-secs", "600"]);
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", server.base), 200).await;
    let before = scrape(&client, &server.base).await;
    let pool_before = metric_sum(&before, "mcd_passes_total", &[("threads", "pool")]);
    let mut got = vec![];
    for (model, query, body) in requests() {
        let r = client
            .post(format!("{}/models/{model}/predict?{query}", server.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{model} {query}: {text}");
        got.push(text);
    }
    let after = scrape(&client, &server.base).await;
    (
        got,
        metric_sum(&after, "mcd_passes_total", &[("threads", "pool")]) - pool_before,
    )
}

#[tokio::test]
async fn a_lone_pass_on_two_threads_gives_the_bits_of_one() {
    let dir = folder();
    let (one, pool_one) = answers(dir.path(), "1").await;
    let (two, pool_two) = answers(dir.path(), "2").await;
    let requests = requests();
    assert_eq!(pool_one, 0.0, "--pass-threads 1 ran passes on a pool");
    assert!(
        pool_two >= requests.len() as f64,
        "{pool_two} passes on the pool for {} requests sent one at a time",
        requests.len()
    );
    for ((a, b), (model, query, _)) in one.iter().zip(&two).zip(&requests) {
        assert!(a == b, "{model} {query}: one thread and two answer differently");
    }
}
