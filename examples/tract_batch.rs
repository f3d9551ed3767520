//! Plain tract, no mcd-serve: one ONNX file with a 3x224x224 image input, specialised to a fixed batch size, optimised and run a few times (`cargo run --release --example tract_batch -- FILE BATCH [RUNS]`, `DUMP=1` prints the plan). It reproduces tract 0.23.9 running DenseNet121 slower per row at batch 2 than at 1 (engine::row_passes).
use std::time::Instant;
use tract_onnx::prelude::*;

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let b: usize = args[2].parse()?;
    let reps: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(3);
    let model = tract_onnx::onnx()
        .model_for_path(&args[1])?
        .with_input_fact(0, f32::fact([b, 3, 224, 224]).into())?
        .into_optimized()?;
    if std::env::var("DUMP").is_ok() {
        for n in model.eval_order()? {
            let node = model.node(n);
            println!(
                "{} {} {:?}",
                node.op().name(),
                node.name,
                model.outlet_fact(OutletId::new(n, 0))?.shape
            );
        }
    }
    let model = model.into_runnable()?;
    let x = Tensor::from_shape(&[b, 3, 224, 224], &vec![0.1f32; b * 3 * 224 * 224])?;
    for _ in 0..reps {
        let t = Instant::now();
        model.run(tvec!(x.clone().into()))?;
        println!("batch {b}: {:?} ({:?} per row)", t.elapsed(), t.elapsed() / b as u32);
    }
    Ok(())
}
