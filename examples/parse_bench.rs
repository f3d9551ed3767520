//! How long turning a request body into input tensors takes, on the native `/predict` body
//! and the OIP REST JSON body: one breast_cancer row (30 floats), 64 digits_cnn images
//! (64 × 1 × 8 × 8) and 4096 breast_cancer rows. For docs/performance.md, not a test.
//!
//! The machine is shared, so the cases are timed in interleaved rounds and the table
//! gives the median time per parse over all rounds.
//!
//! `cargo run --release --example parse_bench [-- ROUNDS]`

use std::path::Path;
use std::time::Instant;

use axum::body::Bytes;
use mcd_serve::core::Inputs;
use mcd_serve::engine::model::LoadedModel;
use mcd_serve::engine::repo::load_model;
use mcd_serve::front::native::decode::parse_request;
use mcd_serve::front::oip::request::decode;
use serde_json::{Value, json};

/// A benign tumour from the held-out set (the README's row B).
const ROW: [f64; 30] = [
    13.46, 28.21, 85.89, 562.1, 0.07517, 0.04726, 0.01271, 0.01117, 0.1421, 0.05763, 0.1689, 1.15, 1.4, 14.91,
    0.004942, 0.01203, 0.007508, 0.005179, 0.01442, 0.001684, 14.69, 35.63, 97.11, 680.6, 0.1108, 0.1457, 0.07934,
    0.05781, 0.2694, 0.07061,
];

/// `rows` tumours, each feature scaled a little per row so that no two rows print alike.
fn tumours(rows: usize) -> Value {
    let rows: Vec<Value> = (0..rows)
        .map(|r| json!(ROW.iter().map(|x| x * (1.0 + r as f64 * 1e-4)).collect::<Vec<f64>>()))
        .collect();
    json!(rows)
}

/// `n` 8×8 images of pixels 0–16, as the digits data set has them.
fn images(n: usize) -> Value {
    let image = |i: usize| {
        let rows: Vec<Vec<f64>> = (0..8)
            .map(|y| (0..8).map(|x| ((i * 7 + y * 5 + x * 3) % 17) as f64).collect())
            .collect();
        json!([rows])
    };
    json!((0..n).map(image).collect::<Vec<Value>>())
}

struct Case {
    label: String,
    model: &'static str,
    run: Box<dyn Fn(&LoadedModel) -> usize>,
}

fn native(label: &str, model: &'static str, inputs: Value) -> Case {
    let body = serde_json::to_vec(&json!({ "inputs": inputs })).unwrap();
    Case {
        label: format!("native {label} ({} bytes)", body.len()),
        model,
        run: Box::new(move |m| parse_request(m, &body).expect("parses").len()),
    }
}

fn oip(label: &str, model: &'static str, input: &str, inputs: Value, shape: Vec<usize>) -> Case {
    let data: Vec<f64> = mcd_flat(&inputs);
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": input, "shape": shape, "datatype": "FP32", "data": data}]
    }))
    .unwrap();
    let body = Bytes::from(body);
    Case {
        label: format!("OIP JSON {label} ({} bytes)", body.len()),
        model,
        run: Box::new(move |m| {
            let request = decode(body.clone(), None).map_err(|(_, e)| e).expect("decodes");
            request.inputs.decode(m).expect("parses").len()
        }),
    }
}

fn mcd_flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(mcd_flat).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(15, |s| s.parse().expect("ROUNDS"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let bc = load_model("breast_cancer", &root.join("breast_cancer.onnx")).unwrap();
    let digits = load_model("digits_cnn", &root.join("digits_cnn.onnx")).unwrap();
    let cases = [
        native("breast_cancer, 1 row", "bc", tumours(1)),
        native("digits_cnn, 64 rows", "digits", images(64)),
        native("breast_cancer, 4096 rows", "bc", tumours(4096)),
        oip("breast_cancer, 1 row", "bc", "features", tumours(1), vec![1, 30]),
        oip("digits_cnn, 64 rows", "digits", "image", images(64), vec![64, 1, 8, 8]),
        oip(
            "breast_cancer, 4096 rows",
            "bc",
            "features",
            tumours(4096),
            vec![4096, 30],
        ),
    ];
    let model = |c: &Case| if c.model == "bc" { &bc } else { &digits };
    // Each round times every case for ~20 ms; per-call times of all rounds are pooled.
    let mut times: Vec<Vec<f64>> = cases.iter().map(|_| vec![]).collect();
    for _ in 0..rounds {
        for (c, t) in cases.iter().zip(&mut times) {
            let m = model(c);
            let started = Instant::now();
            while started.elapsed().as_secs_f64() < 0.02 {
                let one = Instant::now();
                std::hint::black_box((c.run)(m));
                t.push(one.elapsed().as_secs_f64());
            }
        }
    }
    println!("| body | median per parse | calls timed |");
    println!("|---|---:|---:|");
    for (c, t) in cases.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let median = t[t.len() / 2];
        let shown = if median < 1e-3 {
            format!("{:.1} µs", median * 1e6)
        } else {
            format!("{:.2} ms", median * 1e3)
        };
        println!("| {} | {shown} | {} |", c.label, t.len());
    }
}
