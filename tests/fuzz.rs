//! A seeded fuzzer against the release binary: over 10,000 generated and mutated requests
//! across native REST, OIP REST (JSON and binary) and OIP gRPC, from a few concurrent
//! connections.
//!
//! It is a test of this crate rather than a script so that the README's test command runs
//! it, against the binary the same build made (`CARGO_BIN_EXE_mcd-serve`), on kernel-chosen
//! ports. HTTP goes over raw TCP: the fuzzer must be able to send what no HTTP client
//! library would (bad bytes in paths and headers, lying Content-Lengths).
//!
//! Promises checked: no 5xx and no INTERNAL/UNKNOWN gRPC status; no request unanswered
//! after 5 s; every 4xx that the application answers is the JSON error body; at the end
//! the process is alive and ready, and its peak RSS is under [`RSS_BOUND_KIB`].

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::infer_parameter::ParameterChoice;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEED: u64 = 13;
const HTTP_CASES: usize = 9_000;
const GRPC_CASES: usize = 2_000;
const CONNECTIONS: usize = 4;
/// An answer later than this is a hang.
const HANG: Duration = Duration::from_secs(5);
/// The whole run; far above what it takes on two busy cores.
const OVERALL: Duration = Duration::from_secs(300);
const BODY_LIMIT: usize = 1 << 20;
const MAX_MC: u64 = 20;
/// Peak resident memory of the server (VmHWM). The three models and the worker pool
/// take well under 100 MiB; the bound leaves room for in-flight bodies up to the limit
/// on every connection, and catches a leak or an unbounded allocation.
const RSS_BOUND_KIB: u64 = 512 * 1024;

/// The models of `models/`, as the fuzzer needs to know them to make valid seeds.
const MODELS: [(&str, &str, &[usize]); 3] = [
    ("breast_cancer", "features", &[30]),
    ("diabetes", "features", &[10]),
    ("digits_cnn", "image", &[1, 8, 8]),
];

struct Server {
    proc: common::process::Proc,
    http: String,
    grpc: String,
}

fn spawn() -> Server {
    let proc = common::process::spawn_with_env(
        &common::models_dir(),
        &[
            "--default-model",
            "breast_cancer",
            "--body-limit-bytes",
            &BODY_LIMIT.to_string(),
            "--max-mc-samples",
            &MAX_MC.to_string(),
        ],
        &[("RUST_LOG", "warn,mcd_serve=info")],
    );
    let http = proc.base.trim_start_matches("http://").to_string();
    let grpc = proc.listening_field("grpc_addr");
    Server { proc, http, grpc }
}

// ---- The corpus ------------------------------------------------------------------------

enum Case {
    Http(HttpCase),
    Grpc(GrpcCase),
}

struct HttpCase {
    family: &'static str,
    bytes: Vec<u8>,
    /// The request is well-formed HTTP, so the application answers it: a 4xx must be
    /// our JSON error. Otherwise hyper may refuse it bare, or close.
    framed: bool,
    /// The body is shorter than its Content-Length: close our side once it is sent.
    half_close: bool,
}

enum GrpcCase {
    Infer(pb::ModelInferRequest),
    Metadata(pb::ModelMetadataRequest),
    Ready(pb::ModelReadyRequest),
}

fn http_request(method: &str, target: &[u8], headers: &[(&str, Vec<u8>)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

fn rows(rng: &mut ChaCha8Rng, dims: &[usize], n: usize) -> Value {
    fn nest(rng: &mut ChaCha8Rng, dims: &[usize]) -> Value {
        match dims.split_first() {
            None => json!(rng.random_range(-20.0f32..20.0)),
            Some((&d, rest)) => Value::Array((0..d).map(|_| nest(rng, rest)).collect()),
        }
    }
    Value::Array((0..n).map(|_| nest(rng, dims)).collect())
}

/// A random JSON value of bounded depth: the generated (structure-free) half of the corpus.
fn random_json(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    let pick = if depth == 0 {
        rng.random_range(0..5)
    } else {
        rng.random_range(0..7)
    };
    match pick {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random::<f64>() * 10f64.powi(rng.random_range(-5..300))),
        3 => json!(rng.random::<i64>()),
        4 => json!(
            ["", "NaN", "inf", "features", "mc_samples", "FP32", "\u{0}", "é"]
                .choose(rng)
                .unwrap()
        ),
        5 => Value::Array(
            (0..rng.random_range(0..6))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "inputs",
                "features",
                "image",
                "name",
                "shape",
                "datatype",
                "data",
                "parameters",
                "outputs",
                "x",
            ];
            Value::Object(
                (0..rng.random_range(0..5))
                    .map(|_| (keys.choose(rng).unwrap().to_string(), random_json(rng, depth - 1)))
                    .collect(),
            )
        }
    }
}

const JUNK: [&[u8]; 14] = [
    b"NaN",
    b"\"NaN\"",
    b"Infinity",
    b"1e999",
    b"-1e400",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\xff\xfe",
    b"\xc3\x28",
    b"null",
    b"{}",
    b"[]",
    b"\"",
    b"\\u0000",
];

/// Mutates a valid body: byte flips, truncation, insertions, junk numbers, bad UTF-8, deep
/// nesting, duplicated spans.
fn mutate(rng: &mut ChaCha8Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..4) {
        let at = if b.is_empty() { 0 } else { rng.random_range(0..b.len()) };
        match rng.random_range(0..7) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.random_range(0..8),
            1 => b.truncate(at),
            2 => {
                let junk = JUNK.choose(rng).unwrap();
                b.splice(at..at, junk.iter().copied());
            }
            3 => {
                // Replace a number with junk.
                if let Some(start) = (at..b.len()).find(|&i| b[i].is_ascii_digit()) {
                    let end = (start..b.len())
                        .find(|&i| !b"0123456789.e-".contains(&b[i]))
                        .unwrap_or(b.len());
                    b.splice(start..end, JUNK.choose(rng).unwrap().iter().copied());
                }
            }
            4 => {
                let depth = *[64usize, 200, 5_000, 100_000].choose(rng).unwrap();
                let deep: Vec<u8> = std::iter::repeat_n(b'[', depth)
                    .chain(std::iter::repeat_n(b']', depth))
                    .collect();
                b.splice(at..at, deep);
            }
            5 if !b.is_empty() => {
                let end = (at + rng.random_range(1..64)).min(b.len());
                let span = b[at..end].to_vec();
                b.splice(at..at, span);
            }
            _ => b.insert(at, rng.random()),
        }
    }
    b
}

fn query(rng: &mut ChaCha8Rng, valid: bool) -> String {
    if valid {
        return match rng.random_range(0..4) {
            0 => String::new(),
            1 => format!(
                "?mc_samples={}&seed={}",
                rng.random_range(2..=MAX_MC),
                rng.random::<u32>()
            ),
            2 => format!("?mc_samples={}&return_samples=true", rng.random_range(2..=5)),
            _ => format!("?mc_samples={}", rng.random_range(2..=MAX_MC)),
        };
    }
    let keys = [
        "mc_samples",
        "seed",
        "return_samples",
        "mc%5Fsamples",
        "MC_SAMPLES",
        "mc_sample",
        "",
        "%FF",
        "mc_max",
        "mc_se",
    ];
    let values = [
        "",
        "0",
        "1",
        "2",
        "-1",
        "1e3",
        "abc",
        "%FF",
        "%",
        "99999999999999999999",
        "true",
        "auto",
        "5",
        "%00",
        "+5",
    ];
    let mut q = String::from("?");
    for i in 0..rng.random_range(1..5) {
        if i > 0 {
            q.push(*['&', ';', '&'].choose(rng).unwrap());
        }
        q.push_str(keys.choose(rng).unwrap());
        if rng.random_bool(0.9) {
            q.push('=');
            q.push_str(values.choose(rng).unwrap());
        }
    }
    q
}

fn model_name(rng: &mut ChaCha8Rng, valid: bool) -> String {
    if valid {
        return MODELS.choose(rng).unwrap().0.to_string();
    }
    let long = "a".repeat(3000);
    let names = [
        "nope",
        "%FF",
        "%2F",
        "..",
        "%00",
        "%C3%A9",
        "breast_cancer%20",
        "BREAST_CANCER",
        &long,
        "%E2%82",
    ];
    names.choose(rng).unwrap().to_string()
}

fn native_body(rng: &mut ChaCha8Rng, model: usize) -> Vec<u8> {
    let (_, input, dims) = MODELS[model];
    let n = rng.random_range(1..4);
    let inputs = if rng.random_bool(0.5) {
        rows(rng, dims, n)
    } else {
        json!({ input: rows(rng, dims, n) })
    };
    serde_json::to_vec(&json!({ "inputs": inputs })).unwrap()
}

fn oip_json_body(rng: &mut ChaCha8Rng, model: usize) -> Vec<u8> {
    let (_, input, dims) = MODELS[model];
    let n = rng.random_range(1..4);
    let data: Vec<f32> = (0..n * dims.iter().product::<usize>())
        .map(|_| rng.random_range(-5.0..5.0))
        .collect();
    let mut shape = vec![n];
    shape.extend(dims);
    let mut req = json!({"id": "fuzz", "inputs": [{"name": input, "shape": shape, "datatype": "FP32", "data": data}]});
    if rng.random_bool(0.5) {
        req["parameters"] = json!({"mc_samples": rng.random_range(2..=MAX_MC), "seed": rng.random::<u32>()});
    }
    if rng.random_bool(0.3) {
        let name = ["probabilities", "prediction", "probabilities.std"]
            .choose(rng)
            .unwrap();
        req["outputs"] = json!([{ "name": name }]);
    }
    serde_json::to_vec(&req).unwrap()
}

/// The JSON header and the raw FP32 values after it.
fn oip_binary_body(rng: &mut ChaCha8Rng, model: usize) -> (Vec<u8>, usize) {
    let (_, input, dims) = MODELS[model];
    let n = rng.random_range(1..4);
    let values: Vec<u8> = (0..n * dims.iter().product::<usize>())
        .flat_map(|_| rng.random_range(-5.0f32..5.0).to_le_bytes())
        .collect();
    let mut shape = vec![n];
    shape.extend(dims);
    let mut header = json!({"inputs": [{"name": input, "shape": shape, "datatype": "FP32",
        "parameters": {"binary_data_size": values.len()}}]});
    if rng.random_bool(0.5) {
        header["parameters"] = json!({"binary_data_output": true, "mc_samples": rng.random_range(2..=MAX_MC)});
    }
    let mut body = serde_json::to_vec(&header).unwrap();
    let len = body.len();
    body.extend(values);
    (body, len)
}

fn http_case(rng: &mut ChaCha8Rng) -> HttpCase {
    let model = rng.random_range(0..MODELS.len());
    let valid_name = rng.random_bool(0.85);
    let name = model_name(rng, valid_name);
    let valid_query = rng.random_bool(0.6);
    let q = query(rng, valid_query);
    // Most bodies are mutated seeds, some fully generated, a few left valid.
    let shape_body = |rng: &mut ChaCha8Rng, valid: Vec<u8>| match rng.random_range(0..10) {
        0..=5 => mutate(rng, valid),
        6..=7 => serde_json::to_vec(&random_json(rng, 5)).unwrap(),
        8 => serde_json::to_vec(&json!({"inputs": random_json(rng, 5)})).unwrap(),
        _ => valid,
    };
    let content_type = || -> Vec<u8> { b"application/json".to_vec() };
    let mut headers: Vec<(&str, Vec<u8>)> = vec![];
    let (family, target, body) = match rng.random_range(0..10) {
        0..=3 => {
            let body = native_body(rng, model);
            let body = shape_body(rng, body);
            headers.push(("content-type", content_type()));
            let target = if rng.random_bool(0.4) {
                format!("/predict{q}")
            } else {
                format!("/models/{name}/predict{q}")
            };
            ("native", target, body)
        }
        4..=5 => {
            let body = oip_json_body(rng, model);
            let body = shape_body(rng, body);
            let version = if rng.random_bool(0.2) {
                format!("/versions/{}", ["1", "2", "0", "%FF", "latest"].choose(rng).unwrap())
            } else {
                String::new()
            };
            ("oip_json", format!("/v2/models/{name}{version}/infer"), body)
        }
        6..=7 => {
            let (body, len) = oip_binary_body(rng, model);
            let body = if rng.random_bool(0.5) { mutate(rng, body) } else { body };
            let len_header: Vec<u8> = match rng.random_range(0..8) {
                0 => b"0".to_vec(),
                1 => (len + 1).to_string().into_bytes(),
                2 => (body.len() + 10).to_string().into_bytes(),
                3 => b"-1".to_vec(),
                4 => b"18446744073709551616".to_vec(),
                5 => b"\xff12".to_vec(),
                _ => len.to_string().into_bytes(),
            };
            headers.push(("inference-header-content-length", len_header));
            headers.push(("content-type", b"application/octet-stream".to_vec()));
            ("oip_binary", format!("/v2/models/{name}/infer"), body)
        }
        _ => {
            // Metadata, health and unknown routes, with the wrong method now and then.
            let paths = [
                format!("/models/{name}"),
                "/models".to_string(),
                format!("/v2/models/{name}"),
                format!("/v2/models/{name}/ready"),
                format!("/v2/models/{name}/versions/1"),
                "/v2".to_string(),
                "/v2/health/ready".to_string(),
                "/health/live".to_string(),
                "/metrics".to_string(),
                "/openapi.json".to_string(),
                format!("/nope/{name}"),
            ];
            let path = paths.choose(rng).unwrap().clone();
            let method = *["GET", "GET", "GET", "POST", "DELETE", "PUT"].choose(rng).unwrap();
            let bytes = http_request(method, format!("{path}{q}").as_bytes(), &[], b"");
            return HttpCase {
                family: "metadata",
                bytes,
                framed: true,
                half_close: false,
            };
        }
    };
    if rng.random_bool(0.05) {
        headers.push(("x-request-id", b"id-\xff\xfe".to_vec()));
    }
    if rng.random_bool(0.05) {
        headers.push(("content-type", b"text/plain; charset=\xff".to_vec()));
    }
    let mut target = target.into_bytes();
    let mut body = body;
    let mut framed = true;
    let mut half_close = false;
    let mut bytes = None;
    match rng.random_range(0..100) {
        // Bytes HTTP forbids in a request target or a header value: hyper's to refuse.
        0..=1 => {
            target.insert(1, *[0xffu8, b' ', 0x7f, 0].choose(rng).unwrap());
            framed = false;
        }
        2 => {
            headers.push(("x-bad", b"a\rb".to_vec()));
            framed = false;
        }
        // A Content-Length longer than the body, the sender gone quiet.
        3..=4 => {
            let mut b = http_request("POST", &target, &headers, &body);
            let cl = format!("content-length: {}", body.len());
            let at = b.windows(cl.len()).position(|w| w == cl.as_bytes()).unwrap();
            b.splice(
                at..at + cl.len(),
                format!("content-length: {}", body.len() + 100).into_bytes(),
            );
            bytes = Some(b);
            framed = false;
            half_close = true;
        }
        // Over the body limit.
        5 => body = vec![b'['; BODY_LIMIT + 1 + rng.random_range(0..1000)],
        _ => {}
    }
    let bytes = bytes.unwrap_or_else(|| http_request("POST", &target, &headers, &body));
    HttpCase {
        family,
        bytes,
        framed,
        half_close,
    }
}

fn grpc_param(rng: &mut ChaCha8Rng) -> pb::InferParameter {
    let choice = match rng.random_range(0..6) {
        0 => ParameterChoice::Int64Param(rng.random_range(-3..40)),
        1 => ParameterChoice::Uint64Param(*[0, 2, 5, u64::MAX].choose(rng).unwrap()),
        2 => ParameterChoice::DoubleParam(*[2.0, 5.5, f64::NAN, f64::INFINITY, -1.0, 1e300].choose(rng).unwrap()),
        3 => ParameterChoice::BoolParam(rng.random_bool(0.5)),
        _ => ParameterChoice::StringParam(["5", "abc", "", "auto", "\u{0}"].choose(rng).unwrap().to_string()),
    };
    pb::InferParameter {
        parameter_choice: if rng.random_bool(0.95) { Some(choice) } else { None },
    }
}

fn grpc_case(rng: &mut ChaCha8Rng) -> GrpcCase {
    let model = rng.random_range(0..MODELS.len());
    let valid = rng.random_bool(0.8);
    let name = if valid {
        MODELS[model].0.to_string()
    } else {
        ["nope", "", "..", "\u{ff}", "breast_cancer\u{0}"]
            .choose(rng)
            .unwrap()
            .to_string()
    };
    let version = if rng.random_bool(0.85) {
        String::new()
    } else {
        ["1", "2", "x"].choose(rng).unwrap().to_string()
    };
    match rng.random_range(0..10) {
        0 => return GrpcCase::Metadata(pb::ModelMetadataRequest { name, version }),
        1 => return GrpcCase::Ready(pb::ModelReadyRequest { name, version }),
        _ => {}
    }
    let (_, input, dims) = MODELS[model];
    let n = rng.random_range(0..4);
    let count = n * dims.iter().product::<usize>();
    let mut shape: Vec<i64> = std::iter::once(n as i64)
        .chain(dims.iter().map(|&d| d as i64))
        .collect();
    // Wrong shapes: a changed dim, a dropped or added axis, negative and huge dims.
    if rng.random_bool(0.3) {
        let i = rng.random_range(0..shape.len());
        match rng.random_range(0..5) {
            0 => shape[i] = -1,
            1 => shape[i] = i64::MAX,
            2 => shape[i] += 1,
            3 => {
                shape.remove(i);
            }
            _ => shape.push(rng.random_range(0..3)),
        }
    }
    let datatype = if rng.random_bool(0.85) {
        "FP32".to_string()
    } else {
        ["FP64", "INT64", "BOOL", "BYTES", "FP16", "UINT8", "fp32", "", "COMPLEX"]
            .choose(rng)
            .unwrap()
            .to_string()
    };
    let mut values: Vec<f32> = (0..count).map(|_| rng.random_range(-5.0..5.0)).collect();
    if rng.random_bool(0.2) {
        values.truncate(rng.random_range(0..=values.len()));
    }
    if rng.random_bool(0.1) && !values.is_empty() {
        values[0] = *[f32::NAN, f32::INFINITY, f32::MAX].choose(rng).unwrap();
    }
    let mut tensor = pb::model_infer_request::InferInputTensor {
        name: if rng.random_bool(0.9) {
            input.to_string()
        } else {
            "x".to_string()
        },
        datatype,
        shape,
        ..Default::default()
    };
    let mut raw = vec![];
    match rng.random_range(0..4) {
        0 => {
            tensor.contents = Some(pb::InferTensorContents {
                fp32_contents: values,
                ..Default::default()
            })
        }
        1 => {
            let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            if rng.random_bool(0.5) {
                bytes = mutate(rng, bytes);
            }
            raw.push(bytes);
        }
        2 => {
            // Contents of another kind, or both contents and raw.
            tensor.contents = Some(pb::InferTensorContents {
                int64_contents: (0..count as i64).collect(),
                bytes_contents: vec![b"\xff".to_vec(); rng.random_range(0..3)],
                ..Default::default()
            });
            if rng.random_bool(0.5) {
                raw.push(vec![0; 4]);
            }
        }
        _ => raw.push(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
    let mut parameters = std::collections::HashMap::new();
    for _ in 0..rng.random_range(0..3) {
        let key = [
            "mc_samples",
            "seed",
            "return_samples",
            "binary_data_output",
            "mc_sample",
            "",
        ]
        .choose(rng)
        .unwrap();
        parameters.insert(key.to_string(), grpc_param(rng));
    }
    let mut inputs = vec![tensor];
    if rng.random_bool(0.05) {
        inputs.push(inputs[0].clone());
    }
    let outputs = if rng.random_bool(0.2) {
        vec![pb::model_infer_request::InferRequestedOutputTensor {
            name: ["probabilities", "nope", "probabilities.variance", "prediction.samples"]
                .choose(rng)
                .unwrap()
                .to_string(),
            parameters: Default::default(),
        }]
    } else {
        vec![]
    };
    GrpcCase::Infer(pb::ModelInferRequest {
        model_name: name,
        model_version: version,
        id: "fuzz".into(),
        parameters,
        inputs,
        outputs,
        raw_input_contents: raw,
    })
}

// ---- Running it ---------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    histogram: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Tally {
    fn count(&mut self, key: String) {
        *self.histogram.entry(key).or_default() += 1;
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
        self.count("FAILURE".into());
    }
}

fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()
}

/// The status, headers and body of an HTTP/1.1 answer read to EOF, or None.
fn parse_answer(raw: &[u8]) -> Option<(u16, String, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    // Lossy: an echoed x-request-id may hold any obs-text byte.
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), raw[end + 4..].to_vec()))
}

async fn run_http(addr: &str, case: &HttpCase, tally: &Mutex<Tally>) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        // The server may answer (413) and close before reading all of a body: keep reading.
        let _ = stream.write_all(&case.bytes).await;
        if case.half_close {
            let _ = stream.shutdown().await;
        }
        let mut answer = vec![];
        let _ = stream.read_to_end(&mut answer).await;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(HANG, exchange).await {
        Err(_) => {
            return tally
                .lock()
                .unwrap()
                .fail(format!("hang over {HANG:?}: {}", excerpt(&case.bytes)));
        }
        Ok(Err(e)) => {
            return tally.lock().unwrap().fail(format!("could not connect: {e}"));
        }
        Ok(Ok(a)) => a,
    };
    let mut t = tally.lock().unwrap();
    let Some((status, head, body)) = parse_answer(&answer) else {
        if case.framed {
            t.fail(format!(
                "no HTTP answer to a well-formed request: {}",
                excerpt(&case.bytes)
            ));
        } else {
            t.count(format!("http {} closed", case.family));
        }
        return;
    };
    t.count(format!("http {} {status}", case.family));
    if status >= 500 {
        t.fail(format!("{status} {}\n  for {}", excerpt(&body), excerpt(&case.bytes)));
    } else if (400..500).contains(&status) && case.framed {
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let ok = json
            .as_ref()
            .is_some_and(|v| v["error"].is_string() && v["error_type"].is_string())
            && head.contains("content-type: application/json");
        if !ok {
            t.fail(format!(
                "{status} without the JSON error body: {}\n  for {}",
                excerpt(&body),
                excerpt(&case.bytes)
            ));
        }
    }
}

async fn run_grpc(
    client: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    case: GrpcCase,
    tally: &Mutex<Tally>,
) {
    let (rpc, result) = match case {
        GrpcCase::Infer(r) => (
            "infer",
            tokio::time::timeout(HANG, client.model_infer(r))
                .await
                .map(|r| r.map(drop)),
        ),
        GrpcCase::Metadata(r) => (
            "metadata",
            tokio::time::timeout(HANG, client.model_metadata(r))
                .await
                .map(|r| r.map(drop)),
        ),
        GrpcCase::Ready(r) => (
            "ready",
            tokio::time::timeout(HANG, client.model_ready(r))
                .await
                .map(|r| r.map(drop)),
        ),
    };
    let mut t = tally.lock().unwrap();
    match result {
        Err(_) => t.fail(format!("gRPC {rpc}: hang over {HANG:?}")),
        Ok(Ok(())) => t.count(format!("grpc {rpc} Ok")),
        Ok(Err(status)) => {
            t.count(format!("grpc {rpc} {:?}", status.code()));
            if matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown) {
                t.fail(format!("gRPC {rpc}: {:?} {}", status.code(), status.message()));
            }
        }
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_fuzzed_requests_get_no_5xx_no_hang_and_leave_the_server_ready() {
    let mut server = spawn();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut corpus: Vec<Case> = (0..HTTP_CASES).map(|_| Case::Http(http_case(&mut rng))).collect();
    corpus.extend((0..GRPC_CASES).map(|_| Case::Grpc(grpc_case(&mut rng))));
    // Interleaved, so every connection sends every kind.
    let mut order: Vec<usize> = (0..corpus.len()).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);

    let mut families: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &corpus {
        *families
            .entry(match c {
                Case::Http(h) => h.family,
                Case::Grpc(_) => "grpc",
            })
            .or_default() += 1;
    }
    println!("fuzz corpus: {} requests from seed {SEED}: {families:?}", corpus.len());

    let client = reqwest::Client::new();
    let ready = format!("http://{}/health/ready", server.http);
    for _ in 0..300 {
        if client.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grpc = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();

    let mut slots: Vec<Option<Case>> = corpus.into_iter().map(Some).collect();
    let queue: Vec<Case> = order.into_iter().filter_map(|i| slots[i].take()).collect();
    let corpus = Arc::new(Mutex::new(queue));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (corpus, tally, addr, mut grpc) = (corpus.clone(), tally.clone(), server.http.clone(), grpc.clone());
            tokio::spawn(async move {
                loop {
                    let Some(case) = corpus.lock().unwrap().pop() else {
                        break;
                    };
                    match case {
                        Case::Http(h) => run_http(&addr, &h, &tally).await,
                        Case::Grpc(g) => run_grpc(&mut grpc, g, &tally).await,
                    }
                }
            })
        })
        .collect();
    let all = async {
        for w in workers {
            w.await.unwrap();
        }
    };
    tokio::time::timeout(OVERALL, all)
        .await
        .unwrap_or_else(|_| panic!("the fuzz run took over {OVERALL:?}"));
    let elapsed = started.elapsed();

    let alive = server.proc.child.try_wait().unwrap().is_none();
    let ready_status = client.get(&ready).send().await.map(|r| r.status().as_u16());
    let rss = peak_rss_kib(server.proc.child.id());
    let t = tally.lock().unwrap();
    println!(
        "fuzz: {} requests in {elapsed:.1?} over {CONNECTIONS} connections",
        HTTP_CASES + GRPC_CASES
    );
    for (k, n) in &t.histogram {
        println!("  {k:<28} {n}");
    }
    println!(
        "fuzz: server peak RSS {} MiB (bound {} MiB)",
        rss / 1024,
        RSS_BOUND_KIB / 1024
    );
    assert!(t.failures.is_empty(), "fuzz failures:\n{}", t.failures.join("\n"));
    assert!(alive, "the server exited during the fuzz run");
    assert_eq!(ready_status.ok(), Some(200), "/health/ready after the fuzz run");
    assert!(
        rss < RSS_BOUND_KIB,
        "peak RSS {rss} KiB over the bound of {RSS_BOUND_KIB} KiB"
    );
}
