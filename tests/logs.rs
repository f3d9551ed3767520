//! The text log format against hostile clients: the real binary, a model name with a
//! newline, NUL and escape from a REST path and from a gRPC `model_name`, and no line of
//! the log that the client wrote.

mod common;

use std::time::Duration;

use common::process::{spawn_text, wait_status};
use common::*;
use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;

const FORGED: &str = "2026-01-01T00:00:00.000000Z ERROR FORGED";

#[tokio::test]
async fn client_model_names_cannot_forge_text_log_lines() {
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    let p = spawn_text(dir.path(), &[]);
    let client = reqwest::Client::new();
    wait_status(&client, &format!("{}/health/ready", p.base), 200).await;

    // REST: the path's model name is percent-decoded before it reaches the core.
    let path = "/models/x%0A2026-01-01T00:00:00.000000Z%20ERROR%20FORGED_REST%00%1B%5B31m/predict";
    let r = client
        .post(format!("{}{path}", p.base))
        .body("{}")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // gRPC: the model name is any string the client likes.
    let grpc = format!("http://{}", p.listening_field("grpc_addr"));
    let mut c = GrpcInferenceServiceClient::connect(grpc).await.unwrap();
    let e = c
        .model_infer(pb::ModelInferRequest {
            model_name: format!("y\r\n{FORGED}_GRPC\0\u{1b}[31m"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .model_metadata(pb::ModelMetadataRequest {
            name: format!("z\n{FORGED}_META"),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Both predict refusals log at info; wait until they are written.
    let mut logs = vec![];
    for _ in 0..600 {
        logs = p.logs.lock().unwrap().clone();
        if logs.iter().filter(|l| l.contains("predict refused")).count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused: Vec<&String> = logs.iter().filter(|l| l.contains("predict refused")).collect();
    assert_eq!(refused.len(), 2, "{logs:#?}");
    for line in &logs {
        assert!(
            !line.starts_with("2026-01-01"),
            "a client wrote a log line: {line:?}\n{logs:#?}"
        );
        assert!(
            !line.contains('\0') && !line.contains('\r') && !line.contains('\u{1b}'),
            "a raw control character in {line:?}"
        );
    }
    // The names are still there, escaped, on the line that logged them.
    for (tag, escaped) in [("FORGED_REST", "x\\n2026"), ("FORGED_GRPC", "y\\r\\n2026")] {
        let line = logs
            .iter()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("no line names {tag}: {logs:#?}"));
        assert!(line.contains("predict refused"), "{line}");
        assert!(line.contains(escaped) && line.contains("\\u{0}"), "{line}");
    }
}
