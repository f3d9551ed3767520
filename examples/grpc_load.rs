//! A small closed-loop gRPC load generator for bench/run (ghz is not in the registries):
//! C concurrent callers each send ModelInfer for D seconds over one HTTP/2 connection per
//! caller, and it prints one line `GRPCJSON {...}` with throughput, latency percentiles
//! and errors, shaped like bench/wrk_post.lua's.
//!
//!     grpc_load URL MODEL INPUT_JSON CONCURRENCY SECONDS [MC_SAMPLES]
//!
//! INPUT_JSON is a file holding one nested array (the rows of the model's only input,
//! FP32); it is sent as raw_input_contents, as tritonclient does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::infer_parameter::ParameterChoice;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 6,
        "usage: grpc_load URL MODEL INPUT_JSON CONCURRENCY SECONDS [MC_SAMPLES]"
    );
    let (url, model) = (args[1].clone(), args[2].clone());
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[3])?)?;
    let concurrency: usize = args[4].parse()?;
    let seconds: f64 = args[5].parse()?;
    let mc: Option<i64> = args.get(6).map(|s| s.parse()).transpose()?;

    let mut shape = vec![];
    let mut cursor = &rows;
    while let serde_json::Value::Array(a) = cursor {
        shape.push(a.len() as i64);
        cursor = &a[0];
    }
    fn flat(v: &serde_json::Value, out: &mut Vec<u8>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.extend((x.as_f64().unwrap_or(0.0) as f32).to_le_bytes()),
        }
    }
    let mut raw = vec![];
    flat(&rows, &mut raw);
    let metadata = GrpcInferenceServiceClient::connect(url.clone())
        .await?
        .model_metadata(pb::ModelMetadataRequest {
            name: model.clone(),
            version: String::new(),
        })
        .await?
        .into_inner();
    let mut parameters = HashMap::new();
    if let Some(n) = mc {
        parameters.insert(
            "mc_samples".to_string(),
            pb::InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(n)),
            },
        );
    }
    let request = pb::ModelInferRequest {
        model_name: model,
        parameters,
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: metadata.inputs[0].name.clone(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    };

    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut callers = vec![];
    for _ in 0..concurrency {
        let (url, request) = (url.clone(), request.clone());
        callers.push(tokio::spawn(async move {
            let mut client = GrpcInferenceServiceClient::connect(url).await?;
            let (mut latencies, mut errors) = (vec![], 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.model_infer(request.clone()).await {
                    Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            anyhow::Ok((latencies, errors))
        }));
    }
    let (mut latencies, mut errors) = (vec![], 0);
    for c in callers {
        let (l, e) = c.await??;
        latencies.extend(l);
        errors += e;
    }
    let duration = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "GRPCJSON {}",
        serde_json::json!({
            "requests": latencies.len(),
            "duration_us": duration.as_micros() as u64,
            "errors": errors,
            "p50_us": pct(0.50),
            "p90_us": pct(0.90),
            "p99_us": pct(0.99),
        })
    );
    Ok(())
}
