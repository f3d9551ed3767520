//! Loads ONNX files (with their `.model.json`) and prints what the server learns about each: `cargo run --example inspect -- FILE...`
use mcd_serve::engine::repo::load_model;

fn main() {
    for arg in std::env::args().skip(1) {
        let path = std::path::Path::new(&arg);
        let t = std::time::Instant::now();
        match load_model("m", path) {
            Err(e) => println!("{arg}: REFUSED: {e:#}"),
            Ok(m) => {
                println!("{arg}: loaded in {:?}", t.elapsed());
                println!("  inputs: {}", serde_json::to_string(&m.inputs).unwrap());
                println!("  outputs: {}", serde_json::to_string(&m.outputs).unwrap());
                println!("  sites: {}", serde_json::to_string(&m.sites).unwrap());
                println!("  fixes: {:?}", m.fixes);
                println!("  batch: {:?} prob: {:?}", m.batch_symbol, m.probability_classes);
                for c in &m.checks {
                    println!("  check {} {:?}: {}", c.check.as_str(), c.result, c.detail);
                }
                println!("  mc: {:?}", m.mc_unavailable_reason());
                println!("  passes: {:?}", m.passes());
            }
        }
    }
}
