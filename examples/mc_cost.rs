//! Where a large model's MC time goes: eval of 1 and of N rows against MC-N of one row, in one
//! pass and in passes of one sample. `cargo run --release --example mc_cost -- FILE [N]`
use std::time::Instant;

use mcd_serve::engine::model::{LoadedModel, McSamples, ModelConfig};
use tract_onnx::prelude::*;

fn rows_of(m: &LoadedModel, rows: usize) -> mcd_serve::engine::model::InputRows {
    let tensors = m
        .inputs
        .iter()
        .map(|spec| {
            // Any other symbol (a sequence length) at 128.
            let shape = m.input_shape(spec, rows, |_| 128);
            let len: usize = shape.iter().product();
            let t =
                Tensor::from_shape(&shape, &(0..len).map(|i| ((i % 17) as f32) / 17.0).collect::<Vec<_>>()).unwrap();
            if spec.datum.is_float() {
                t
            } else {
                Tensor::zero_dt(spec.datum, &shape).unwrap()
            }
        })
        .collect();
    m.input_rows(tensors).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let t = Instant::now();
    let m = LoadedModel::load("m", std::path::Path::new(&args[1]), ModelConfig::default()).unwrap();
    println!("loaded in {:?}", t.elapsed());
    for c in &m.checks {
        println!("  check {} {:?} {:.2}s", c.check.as_str(), c.result, c.seconds);
    }
    let one = rows_of(&m, 1);
    let many = rows_of(&m, n);
    let s = m.mc_session().unwrap();
    let k = McSamples::new(n).unwrap();
    for round in 0..2 {
        let t = Instant::now();
        m.eval_session().run(&one).unwrap();
        let e1 = t.elapsed();
        let t = Instant::now();
        m.eval_session().run(&many).unwrap();
        let en = t.elapsed();
        let t = Instant::now();
        s.run(&one, k, round, false).unwrap();
        let mc = t.elapsed();
        let t = Instant::now();
        s.run_in_passes(&one, k, round, false, 1).unwrap();
        let mc1 = t.elapsed();
        println!("eval 1 row {e1:?}; eval {n} rows {en:?}; MC-{n} one pass {mc:?}; MC-{n} passes of 1 {mc1:?}");
    }
}
