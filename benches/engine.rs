//! Engine benchmark: eval at batch 1, MC-50 as one batched pass, and MC-50 as 50
//! sequential passes, for each bundled model. `cargo bench --bench engine`.
//!
//! Timings are medians of interleaved rounds, so drift on a shared machine hits every
//! variant alike. Targets live here, never in tests.

use std::time::{Duration, Instant};

use mcd_serve::engine::model::{InputRows, LoadedModel, McSamples};
use mcd_serve::engine::repo::load_model;
use mcd_serve::front::native::decode::parse_request;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn first_row(model: &LoadedModel, reference: &serde_json::Value) -> InputRows {
    let row = reference["inputs"][0].clone();
    let body = serde_json::to_vec(&serde_json::json!({"inputs": [row]})).unwrap();
    model.input_rows(parse_request(model, &body).unwrap()).unwrap()
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/reference_outputs.json")).unwrap())
            .unwrap();
    let budget = Duration::from_secs_f64(
        std::env::var("MCD_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    );
    println!(
        "machine: {} cores; one inference thread; medians of interleaved rounds",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "{:<14} {:>12} {:>14} {:>16} {:>10} {:>12}",
        "model", "eval b=1", "MC-50 batched", "MC-50 sequential", "seq/batch", "batch/eval"
    );
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let model = load_model(name, &root.join(format!("models/{name}.onnx"))).unwrap();
        let batch = first_row(&model, &refs[name]);
        let n = McSamples::new(50).unwrap();
        let session = model.mc_session().unwrap();
        let (mut eval, mut batched, mut seq) = (vec![], vec![], vec![]);
        let start = Instant::now();
        let mut round = 0u64;
        while start.elapsed() < budget || round < 5 {
            let t = Instant::now();
            std::hint::black_box(model.eval_session().run(&batch).unwrap());
            eval.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(session.run(&batch, n, round, false).unwrap());
            batched.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(session.run_in_passes(&batch, n, round, false, 1).unwrap());
            seq.push(t.elapsed());
            round += 1;
        }
        let (e, b, s) = (median(eval), median(batched), median(seq));
        println!(
            "{name:<14} {:>10.1}µs {:>12.1}µs {:>14.1}µs {:>9.2}x {:>11.1}x",
            e.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            s.as_secs_f64() * 1e6,
            s.as_secs_f64() / b.as_secs_f64(),
            b.as_secs_f64() / e.as_secs_f64()
        );
    }
}
