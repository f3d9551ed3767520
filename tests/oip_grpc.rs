//! The Open Inference Protocol v2 over gRPC, against a real server on real TCP ports:
//! every RPC with a tonic client, raw and typed inputs, MC through request parameters,
//! each error code, gRPC health, metrics, and an in-flight MC request across SIGTERM.

mod common;

use std::collections::HashMap;

use common::*;
use mcd_serve::config::ServeArgs;
use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::infer_parameter::ParameterChoice;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

fn reference(name: &str) -> Value {
    read_json(&fixture("reference_outputs.json"))[name].clone()
}

async fn server() -> (TestServer, GrpcInferenceServiceClient<Channel>, tempdir::TempDir) {
    let (s, url, dir) = server_url().await;
    (s, GrpcInferenceServiceClient::connect(url).await.unwrap(), dir)
}

async fn server_url() -> (TestServer, String, tempdir::TempDir) {
    let dir = model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("digits_cnn.onnx"),
        fixture("no_dropout.onnx"),
        fixture("int_input.onnx"),
    ]);
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    args.body_limit_bytes = 1 << 20;
    let (s, url) = start_with_grpc(args).await;
    (s, url, dir)
}

fn param(choice: ParameterChoice) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(choice),
    }
}

fn bc_x() -> Vec<f32> {
    f64s(&reference("breast_cancer")["inputs"])
        .iter()
        .map(|&v| v as f32)
        .collect()
}

/// A ModelInfer request for the 8 breast-cancer rows, raw or typed.
fn bc_request(raw: bool, params: &[(&str, ParameterChoice)]) -> pb::ModelInferRequest {
    let x = bc_x();
    let mut input = pb::model_infer_request::InferInputTensor {
        name: "features".into(),
        datatype: "FP32".into(),
        shape: vec![8, 30],
        ..Default::default()
    };
    let mut request = pb::ModelInferRequest {
        model_name: "breast_cancer".into(),
        id: "g-1".into(),
        parameters: params.iter().map(|(k, v)| (k.to_string(), param(v.clone()))).collect(),
        ..Default::default()
    };
    if raw {
        request.raw_input_contents = vec![x.iter().flat_map(|v| v.to_le_bytes()).collect()];
    } else {
        input.contents = Some(pb::InferTensorContents {
            fp32_contents: x,
            ..Default::default()
        });
    }
    request.inputs = vec![input];
    request
}

/// Output `name` of an answer: its datatype, shape and raw bytes.
fn output<'a>(r: &'a pb::ModelInferResponse, name: &str) -> (&'a str, &'a [i64], &'a [u8]) {
    let i = r
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    let o = &r.outputs[i];
    assert!(o.contents.is_none(), "outputs go in raw_output_contents only");
    (
        o.datatype.as_str(),
        o.shape.as_slice(),
        r.raw_output_contents[i].as_slice(),
    )
}

async fn expect_code(
    client: &mut GrpcInferenceServiceClient<Channel>,
    request: pb::ModelInferRequest,
    code: Code,
) -> String {
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(status.metadata().get("error-type").is_some());
    status.message().to_string()
}

#[tokio::test]
async fn health_and_metadata_rpcs() {
    let (s, url, _dir) = server_url().await;
    let mut c = GrpcInferenceServiceClient::connect(url.clone()).await.unwrap();
    assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| pb::ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        c.model_ready(ready("breast_cancer", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        c.model_ready(ready("breast_cancer", "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert_eq!(
        c.model_ready(ready("nope", "")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        c.model_ready(ready("breast_cancer", "2")).await.unwrap_err().code(),
        Code::NotFound
    );

    let meta = c
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "mcd-serve");
    assert!(meta.extensions.contains(&"mc_dropout".to_string()));

    let m = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "breast_cancer".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (m.name.as_str(), m.versions.as_slice()),
        ("breast_cancer", &["1".to_string()][..])
    );
    assert_eq!(m.inputs.len(), 1);
    assert_eq!(
        (m.inputs[0].datatype.as_str(), m.inputs[0].shape.as_slice()),
        ("FP32", &[-1, 30][..])
    );
    let outputs: Vec<(&str, &str, &[i64])> = m
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(outputs[0], ("probabilities", "FP32", &[-1, 2][..]));
    assert_eq!(outputs[3], ("probabilities.predictive_entropy", "FP64", &[-1][..]));
    assert_eq!(m.properties["mc_available"], "true");
    assert!(m.properties["mc_only_outputs"].contains("probabilities.std"));
    let none = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "no_dropout".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (none.outputs.len(), none.properties["mc_available"].as_str()),
        (1, "false")
    );

    // The gRPC health-checking protocol follows readiness.
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "inference.GRPCInferenceService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    s.stop().await;
}

/// Issue 25 (F10): a client that compresses with gzip and accepts gzip (tritonclient's
/// `compression_algorithm="gzip"`) is served, with the same answer as an uncompressed one,
/// and answered in gzip.
#[tokio::test]
async fn a_gzip_client_is_read_and_answered_in_gzip() {
    use tonic::codec::CompressionEncoding::Gzip;
    let (s, mut plain, _dir) = server().await;
    let mut gzip = plain.clone().send_compressed(Gzip).accept_compressed(Gzip);
    let params = [
        ("mc_samples", ParameterChoice::Int64Param(20)),
        ("seed", ParameterChoice::Int64Param(5)),
    ];
    let want = plain.model_infer(bc_request(false, &params)).await.unwrap();
    assert!(want.metadata().get("grpc-encoding").is_none());
    let got = gzip.model_infer(bc_request(false, &params)).await.unwrap();
    assert_eq!(
        got.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    assert_eq!(got.into_inner(), want.into_inner());
    s.stop().await;
}

#[tokio::test]
async fn infer_raw_and_typed_equals_native_in_both_modes() {
    let (s, mut c, _dir) = server().await;
    let r = reference("breast_cancer");
    let (_, native, _) = s.post("/predict", &json!({"inputs": r["inputs"]})).await;
    let want = f64s(&native["outputs"]["probabilities"]);
    for raw in [true, false] {
        let a = c.model_infer(bc_request(raw, &[])).await.unwrap();
        assert_eq!(a.metadata().get("x-inference-mode").unwrap(), "eval");
        let a = a.into_inner();
        assert_eq!(
            (a.model_name.as_str(), a.id.as_str(), a.model_version.as_str()),
            ("breast_cancer", "g-1", "1")
        );
        let (dt, shape, bytes) = output(&a, "probabilities");
        assert_eq!((dt, shape), ("FP32", &[8, 2][..]));
        assert_eq!(le_f32(bytes), want, "eval, raw={raw}");
    }

    let (_, native_mc, _) = s
        .post(
            "/predict?mc_samples=50&seed=7&return_samples=true",
            &json!({"inputs": r["inputs"]}),
        )
        .await;
    let nm = &native_mc["outputs"]["probabilities"];
    // tritonclient sends an int as int64_param and a float as double_param; KServe strings.
    for (count, seed) in [
        (ParameterChoice::Int64Param(50), ParameterChoice::Int64Param(7)),
        (ParameterChoice::DoubleParam(50.0), ParameterChoice::Uint64Param(7)),
        (
            ParameterChoice::StringParam("50".into()),
            ParameterChoice::StringParam("7".into()),
        ),
    ] {
        let params = [
            ("mc_samples", count),
            ("seed", seed),
            ("return_samples", ParameterChoice::BoolParam(true)),
        ];
        let a = c.model_infer(bc_request(true, &params)).await.unwrap();
        assert_eq!(a.metadata().get("x-inference-mode").unwrap(), "mc_dropout");
        let a = a.into_inner();
        assert_eq!(
            a.parameters["mode"].parameter_choice,
            Some(ParameterChoice::StringParam("mc_dropout".into()))
        );
        assert_eq!(
            a.parameters["mc_samples"].parameter_choice,
            Some(ParameterChoice::Int64Param(50))
        );
        assert_eq!(
            a.parameters["seed"].parameter_choice,
            Some(ParameterChoice::Int64Param(7))
        );
        let (dt, _, mean) = output(&a, "probabilities");
        assert_eq!(dt, "FP32");
        let want_mean: Vec<f64> = f64s(&nm["mean"]).iter().map(|v| *v as f32 as f64).collect();
        assert_eq!(le_f32(mean), want_mean);
        for (name, key, shape) in [
            ("probabilities.variance", "variance", vec![8, 2]),
            ("probabilities.mutual_information", "mutual_information", vec![8]),
            ("probabilities.samples", "samples", vec![50, 8, 2]),
        ] {
            let (dt, s, bytes) = output(&a, name);
            assert_eq!((dt, s), ("FP64", shape.as_slice()), "{name}");
            assert_eq!(le_f64(bytes), f64s(&nm[key]), "{name} equals native");
        }
    }

    // Requested outputs filter the answer; an INT64 input takes narrower typed integers.
    let mut filtered = bc_request(true, &[("mc_samples", ParameterChoice::Int64Param(5))]);
    filtered.outputs = vec![pb::model_infer_request::InferRequestedOutputTensor {
        name: "probabilities.std".into(),
        parameters: HashMap::new(),
    }];
    let a = c.model_infer(filtered).await.unwrap().into_inner();
    assert_eq!(a.outputs.len(), 1);
    assert_eq!(a.raw_output_contents.len(), 1);
    let ids = |dt: &str, contents: pb::InferTensorContents| pb::ModelInferRequest {
        model_name: "int_input".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "ids".into(),
            datatype: dt.into(),
            shape: vec![2, 4],
            contents: Some(contents),
            ..Default::default()
        }],
        ..Default::default()
    };
    let a64 = c
        .model_infer(ids(
            "INT64",
            pb::InferTensorContents {
                int64_contents: (1..=8).collect(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let a32 = c
        .model_infer(ids(
            "INT32",
            pb::InferTensorContents {
                int_contents: (1..=8).collect(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a64.raw_output_contents, a32.raw_output_contents);
    s.stop().await;
}

#[tokio::test]
async fn every_error_has_its_code_and_is_counted() {
    let (s, mut c, _dir) = server().await;
    expect_code(
        &mut c,
        bc_request(true, &[("seed", ParameterChoice::Int64Param(1))]),
        Code::InvalidArgument,
    )
    .await;
    let e = expect_code(
        &mut c,
        bc_request(true, &[("mc_sample", ParameterChoice::Int64Param(5))]),
        Code::InvalidArgument,
    )
    .await;
    assert!(e.contains("'mc_sample'"), "{e}");
    expect_code(
        &mut c,
        bc_request(true, &[("mc_samples", ParameterChoice::DoubleParam(2.5))]),
        Code::InvalidArgument,
    )
    .await;
    let mut wrong_shape = bc_request(true, &[]);
    wrong_shape.inputs[0].shape = vec![16, 15];
    let e = expect_code(&mut c, wrong_shape, Code::InvalidArgument).await;
    assert!(e.contains("features") && e.contains("[batch, 30]"), "{e}");
    let mut short = bc_request(true, &[]);
    short.raw_input_contents[0].truncate(100);
    expect_code(&mut c, short, Code::InvalidArgument).await;
    let mut two_raw = bc_request(true, &[]);
    two_raw.raw_input_contents.push(vec![0; 4]);
    expect_code(&mut c, two_raw, Code::InvalidArgument).await;
    // Raw and typed values at once: refused, not one silently preferred (issue 25 F9).
    let mut both = bc_request(true, &[]);
    both.inputs[0].contents = bc_request(false, &[]).inputs[0].contents.clone();
    let e = expect_code(&mut c, both, Code::InvalidArgument).await;
    assert!(e.contains("raw_input_contents") && e.contains("'features'"), "{e}");
    let mut unknown = bc_request(true, &[]);
    unknown.model_name = "nope".into();
    expect_code(&mut c, unknown, Code::NotFound).await;
    let mut version = bc_request(true, &[]);
    version.model_version = "3".into();
    expect_code(&mut c, version, Code::NotFound).await;
    let no_mc = pb::ModelInferRequest {
        model_name: "no_dropout".into(),
        parameters: HashMap::from([("mc_samples".into(), param(ParameterChoice::Int64Param(5)))]),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            contents: Some(pb::InferTensorContents {
                fp32_contents: vec![1.0, 2.0, 3.0, 4.0],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    expect_code(&mut c, no_mc, Code::FailedPrecondition).await;
    // Over the message limit (the HTTP body limit, 1 MiB here).
    let mut big = bc_request(true, &[]);
    big.raw_input_contents[0] = vec![0; 2 << 20];
    let status = c.model_infer(big).await.unwrap_err();
    // tonic refuses an oversized message itself, before any handler, with OUT_OF_RANGE.
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );

    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_mode_violations_total", &[("reason", "seed_without_mc")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "mcd_mode_violations_total", &[("reason", "mc_unavailable")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "mcd_requests_total", &[("protocol", "grpc"), ("status", "404")]),
        2.0
    );
    // Counted with the status the same error has over HTTP: four 400s, four 422s.
    assert_eq!(
        metric_sum(&m, "mcd_requests_total", &[("protocol", "grpc"), ("status", "400")]),
        4.0
    );
    assert_eq!(
        metric_sum(&m, "mcd_requests_total", &[("protocol", "grpc"), ("status", "422")]),
        4.0
    );
    s.stop().await;
}

#[tokio::test]
async fn an_in_flight_grpc_mc_request_completes_across_sigterm() {
    let (s, mut c, _dir) = server().await;
    let d = reference("digits_cnn");
    let x: Vec<f32> = f64s(&d["inputs"]).iter().map(|&v| v as f32).collect();
    // Large enough to be running when the signal arrives: 8 rows × 1000 samples, repeated.
    let rows = 8 * 32;
    let raw: Vec<u8> = x.iter().cycle().take(rows * 64).flat_map(|v| v.to_le_bytes()).collect();
    let request = pb::ModelInferRequest {
        model_name: "digits_cnn".into(),
        parameters: HashMap::from([("mc_samples".into(), param(ParameterChoice::Int64Param(1000)))]),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 1, 8, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    };
    let call = tokio::spawn(async move { c.model_infer(request).await });
    // Wait until the server itself reports the request in flight, then stop it.
    let mut inflight = 0.0;
    for _ in 0..500 {
        inflight = metric_sum(&s.metrics().await, "mcd_inflight_requests", &[]);
        if inflight > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(inflight > 0.0, "the request never showed in flight");
    let base = s.base.clone();
    let stop = tokio::spawn(s.stop());
    let answer = call.await.unwrap().expect("the in-flight MC request is answered");
    let answer = answer.into_inner();
    let (_, shape, _) = output(&answer, "probabilities.std");
    assert_eq!(shape, &[rows as i64, 10]);
    stop.await.unwrap();
    assert!(
        reqwest::get(format!("{base}/health/live")).await.is_err(),
        "the listener is closed"
    );
}

/// Bytes in, bytes out: a gRPC call whose message is whatever the test writes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// A message prost cannot decode is the client's error on every method, the health
/// service's included: INVALID_ARGUMENT with an `error-type`, counted.
#[tokio::test]
async fn undecodable_protobuf_is_invalid_argument_on_every_method() {
    let (s, url, _dir) = server_url().await;
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let methods = [
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/ModelReady",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/grpc.health.v1.Health/Check",
    ];
    for method in methods {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        // 0xff starts a varint that never ends: no message type decodes it.
        let status = grpc
            .unary(
                tonic::Request::new(vec![0xffu8]),
                tonic::codegen::http::uri::PathAndQuery::from_static(method),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert_eq!(
            status.metadata().get("error-type").map(|v| v.to_str().unwrap()),
            Some("malformed_protobuf"),
            "{method}: {status:?}"
        );
        assert!(status.message().contains(method), "{method}: {status:?}");
    }
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "mcd_rejected_requests_total", &[("reason", "malformed_protobuf")]),
        methods.len() as f64
    );
    assert_eq!(
        metric_sum(&m, "mcd_requests_total", &[("protocol", "grpc"), ("status", "400")]),
        methods.len() as f64
    );
    s.stop().await;
}
