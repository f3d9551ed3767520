//! The Open Inference Protocol v2 over REST, against a real server on a real TCP port:
//! every route, JSON and binary bodies, MC through request parameters, every error class,
//! and that an OIP request means what the same native request means.

mod common;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::{Value, json};

fn reference(name: &str) -> Value {
    read_json(&fixture("reference_outputs.json"))[name].clone()
}

/// The breast-cancer reference rows, flat, and their count.
fn bc_rows() -> (Vec<f64>, usize) {
    let r = reference("breast_cancer");
    let rows = r["inputs"].as_array().unwrap().len();
    (f64s(&r["inputs"]), rows)
}

async fn server() -> (TestServer, tempdir::TempDir) {
    let dir = model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("diabetes.onnx"),
        fixture("no_dropout.onnx"),
        fixture("int_input.onnx"),
        fixture("two_inputs.onnx"),
    ]);
    let mut args = ServeArgs::for_models(dir.path());
    args.default_model = Some("breast_cancer".into());
    args.max_mc_samples = 500;
    args.body_limit_bytes = 1 << 20;
    (TestServer::start(args).await, dir)
}

/// POSTs raw bytes with optional extra headers and no Content-Type (as tritonclient does).
async fn post_bytes(
    s: &TestServer,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = s.client.post(s.url(path)).body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.bytes().await.unwrap().to_vec())
}

/// A refused request: its status and error type, from a JSON body.
async fn refused(s: &TestServer, path: &str, body: Vec<u8>, headers: &[(&str, String)]) -> (u16, String) {
    let (st, h, bytes) = post_bytes(s, path, body, headers).await;
    assert_eq!(h["content-type"], "application/json");
    let e: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(!e["error"].as_str().unwrap().is_empty(), "{e}");
    (st, e["error_type"].as_str().unwrap().to_string())
}

/// A JSON infer call: status, body, headers. Every answer, success or error, is JSON.
async fn infer(s: &TestServer, model: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let (st, h, bytes) = post_bytes(
        s,
        &format!("/v2/models/{model}/infer"),
        serde_json::to_vec(body).unwrap(),
        &[],
    )
    .await;
    assert_eq!(
        h["content-type"],
        "application/json",
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    (st, serde_json::from_slice(&bytes).unwrap(), h)
}

fn output<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {answer}"))
}

fn bc_request(params: Value) -> Value {
    let (x, rows) = bc_rows();
    json!({
        "id": "req-1",
        "model_name": "breast_cancer",
        "parameters": params,
        "inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32", "data": x}],
    })
}

async fn expect_error(s: &TestServer, model: &str, body: Value, status: u16, error_type: &str) -> String {
    let (st, b, _) = infer(s, model, &body).await;
    assert_eq!(
        (st, b["error_type"].as_str().unwrap_or("")),
        (status, error_type),
        "{b}"
    );
    b["error"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn server_and_model_metadata_health_and_readiness() {
    let (s, _dir) = server().await;
    let (st, meta) = s.get("/v2").await;
    assert_eq!(st, 200);
    assert_eq!(meta["name"], "mcd-serve");
    let ext: Vec<&str> = meta["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        ext.contains(&"binary_tensor_data") && ext.contains(&"mc_dropout"),
        "{ext:?}"
    );
    assert_eq!(s.get("/v2/health/live").await, (200, json!({"live": true})));
    let (st, ready) = s.get("/v2/health/ready").await;
    assert_eq!((st, &ready["ready"]), (200, &json!(true)));

    for path in ["/v2/models/breast_cancer", "/v2/models/breast_cancer/versions/1"] {
        let (st, m) = s.get(path).await;
        assert_eq!(st, 200, "{m}");
        assert_eq!(m["name"], "breast_cancer");
        assert_eq!(
            m["inputs"],
            json!([{"name": "features", "datatype": "FP32", "shape": [-1, 30]}])
        );
        let outputs: Vec<(&str, &str, Value, bool)> = m["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["name"].as_str().unwrap(),
                    o["datatype"].as_str().unwrap(),
                    o["shape"].clone(),
                    o["parameters"]["mc_only"] == true,
                )
            })
            .collect();
        assert_eq!(
            outputs,
            vec![
                ("probabilities", "FP32", json!([-1, 2]), false),
                ("probabilities.variance", "FP64", json!([-1, 2]), true),
                ("probabilities.std", "FP64", json!([-1, 2]), true),
                ("probabilities.predictive_entropy", "FP64", json!([-1]), true),
                ("probabilities.expected_entropy", "FP64", json!([-1]), true),
                ("probabilities.mutual_information", "FP64", json!([-1]), true),
                ("probabilities.samples", "FP64", json!([-1, -1, 2]), true),
            ]
        );
    }
    // A regression output has no entropies; a model without live dropout no MC outputs.
    let (_, d) = s.get("/v2/models/diabetes").await;
    let names: Vec<&str> = d["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "prediction",
            "prediction.variance",
            "prediction.std",
            "prediction.samples"
        ]
    );
    let (_, n) = s.get("/v2/models/no_dropout").await;
    assert_eq!(n["outputs"].as_array().unwrap().len(), 1, "{n}");
    assert_eq!(n["parameters"]["mc_available"], false);
    let (_, i) = s.get("/v2/models/int_input").await;
    assert_eq!(i["inputs"][0]["datatype"], "INT64");

    for path in [
        "/v2/models/breast_cancer/ready",
        "/v2/models/breast_cancer/versions/1/ready",
    ] {
        assert_eq!(
            s.get(path).await,
            (200, json!({"name": "breast_cancer", "ready": true}))
        );
    }
    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/breast_cancer/versions/2",
        "/v2/models/breast_cancer/versions/2/ready",
    ] {
        let (st, e) = s.get(path).await;
        assert_eq!(
            (st, e["error_type"].as_str().unwrap()),
            (404, "model_not_found"),
            "{path}: {e}"
        );
        assert!(e["error"].as_str().unwrap().len() > 10);
    }
    s.stop().await;
}

#[tokio::test]
async fn json_infer_means_what_the_native_request_means() {
    let (s, _dir) = server().await;
    let r = reference("breast_cancer");
    let (_, native, _) = s.post("/predict", &json!({"inputs": r["inputs"]})).await;

    // Eval: flat data, nested data, the versioned route; no Content-Type needed.
    let (st, a, h) = infer(&s, "breast_cancer", &bc_request(json!({}))).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(h["x-inference-mode"], "eval");
    assert_eq!(a["model_name"], "breast_cancer");
    assert_eq!(a["id"], "req-1");
    assert_eq!(a["parameters"]["mode"], "eval");
    let p = output(&a, "probabilities");
    assert_eq!((&p["datatype"], &p["shape"]), (&json!("FP32"), &json!([8, 2])));
    assert_eq!(
        f64s(&p["data"]),
        f64s(&native["outputs"]["probabilities"]),
        "eval equals native"
    );
    let mut nested = bc_request(json!({}));
    nested["inputs"][0]["data"] = r["inputs"].clone();
    let (st, _, b) = post_bytes(
        &s,
        "/v2/models/breast_cancer/versions/1/infer",
        serde_json::to_vec(&nested).unwrap(),
        &[],
    )
    .await;
    assert_eq!(st, 200);
    let b: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(output(&b, "probabilities")["data"], p["data"]);

    // MC through parameters, however the count is spelled, equals native MC for the seed.
    let (_, native_mc, _) = s
        .post(
            "/predict?mc_samples=50&seed=7&return_samples=true",
            &json!({"inputs": r["inputs"]}),
        )
        .await;
    let nm = &native_mc["outputs"]["probabilities"];
    for count in [json!(50), json!(50.0), json!("50")] {
        let (st, mc, h) = infer(
            &s,
            "breast_cancer",
            &bc_request(json!({"mc_samples": count, "seed": 7, "return_samples": true})),
        )
        .await;
        assert_eq!(st, 200, "{mc}");
        assert_eq!(h["x-inference-mode"], "mc_dropout");
        assert_eq!(
            mc["parameters"],
            json!({"mode": "mc_dropout", "mc_samples": 50, "seed": 7})
        );
        let mean = output(&mc, "probabilities");
        assert_eq!(mean["datatype"], "FP32");
        for (g, w) in f64s(&mean["data"]).iter().zip(f64s(&nm["mean"])) {
            assert_eq!(*g, w as f32 as f64, "the mean is native's, rounded to FP32");
        }
        for (name, key, shape) in [
            ("probabilities.variance", "variance", json!([8, 2])),
            ("probabilities.std", "std", json!([8, 2])),
            ("probabilities.predictive_entropy", "predictive_entropy", json!([8])),
            ("probabilities.expected_entropy", "expected_entropy", json!([8])),
            ("probabilities.mutual_information", "mutual_information", json!([8])),
            ("probabilities.samples", "samples", json!([50, 8, 2])),
        ] {
            let o = output(&mc, name);
            assert_eq!((&o["datatype"], &o["shape"]), (&json!("FP64"), &shape), "{name}");
            assert_eq!(f64s(&o["data"]), f64s(&nm[key]), "{name} equals native");
        }
    }

    // The outputs list filters and orders the answer.
    let mut filtered = bc_request(json!({"mc_samples": 10, "seed": 1}));
    filtered["outputs"] = json!([{"name": "probabilities.std"}, {"name": "probabilities"}]);
    let (st, f, _) = infer(&s, "breast_cancer", &filtered).await;
    assert_eq!(st, 200, "{f}");
    let names: Vec<&str> = f["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["probabilities.std", "probabilities"]);

    // Regression: the mean under the output's name, no entropies.
    let d = reference("diabetes");
    let (_, native_d, _) = s
        .post(
            "/models/diabetes/predict?mc_samples=30&seed=3",
            &json!({"inputs": d["inputs"]}),
        )
        .await;
    let body = json!({
        "parameters": {"mc_samples": 30, "seed": 3},
        "inputs": [{"name": "features", "shape": [8, 10], "datatype": "FP64", "data": d["inputs"]}],
    });
    let (st, dm, _) = infer(&s, "diabetes", &body).await;
    assert_eq!(st, 200, "{dm}");
    let names: Vec<&str> = dm["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["prediction", "prediction.variance", "prediction.std"]);
    assert_eq!(
        f64s(&output(&dm, "prediction.std")["data"]),
        f64s(&native_d["outputs"]["prediction"]["std"])
    );
    s.stop().await;
}

/// Splits a binary-extension answer into its JSON header and binary tail.
fn split_binary(headers: &reqwest::header::HeaderMap, body: &[u8]) -> (Value, Vec<u8>) {
    let n: usize = headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (serde_json::from_slice(&body[..n]).unwrap(), body[n..].to_vec())
}

/// A binary-extension infer call that must succeed: the answer's JSON header and tail.
async fn infer_binary(s: &TestServer, body: Vec<u8>, header_length: usize) -> (Value, Vec<u8>) {
    let (st, h, answer) = post_bytes(
        s,
        "/v2/models/breast_cancer/infer",
        body,
        &[("Inference-Header-Content-Length", header_length.to_string())],
    )
    .await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&answer));
    split_binary(&h, &answer)
}

#[tokio::test]
async fn binary_tensor_data_in_and_out() {
    let (s, _dir) = server().await;
    let r = reference("breast_cancer");
    let (x, rows) = bc_rows();
    let raw: Vec<u8> = x.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
    let binary_request = |params: Value, outputs: Option<Value>| {
        let mut header = json!({
            "parameters": params,
            "inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32",
                        "parameters": {"binary_data_size": raw.len()}}],
        });
        if let Some(o) = outputs {
            header["outputs"] = o;
        }
        let mut body = serde_json::to_vec(&header).unwrap();
        let n = body.len();
        body.extend_from_slice(&raw);
        (body, n)
    };

    // Binary in, binary out (tritonclient's default), eval.
    let (body, n) = binary_request(json!({"binary_data_output": true}), None);
    let (header, tail) = infer_binary(&s, body, n).await;
    let o = &header["outputs"][0];
    assert_eq!(o["parameters"]["binary_data_size"], 8 * 2 * 4);
    assert!(o.get("data").is_none());
    let (_, native, _) = s.post("/predict", &json!({"inputs": r["inputs"]})).await;
    assert_eq!(le_f32(&tail), f64s(&native["outputs"]["probabilities"]));

    // MC: per-output choice, the FP32 mean and FP64 statistics in order.
    let (body, n) = binary_request(
        json!({"mc_samples": 20, "seed": 5}),
        Some(json!([
            {"name": "probabilities", "parameters": {"binary_data": true}},
            {"name": "probabilities.variance", "parameters": {"binary_data": true}},
            {"name": "probabilities.predictive_entropy"},
        ])),
    );
    let (header, tail) = infer_binary(&s, body, n).await;
    let (_, native_mc, _) = s
        .post("/predict?mc_samples=20&seed=5", &json!({"inputs": r["inputs"]}))
        .await;
    let nm = &native_mc["outputs"]["probabilities"];
    assert_eq!(tail.len(), 16 * 4 + 16 * 8);
    let want_mean: Vec<f64> = f64s(&nm["mean"]).iter().map(|v| *v as f32 as f64).collect();
    assert_eq!(le_f32(&tail[..64]), want_mean);
    assert_eq!(le_f64(&tail[64..]), f64s(&nm["variance"]));
    let entropy = &header["outputs"][2];
    assert_eq!(f64s(&entropy["data"]), f64s(&nm["predictive_entropy"]));

    // Binary sections that do not add up are refused, not misread.
    let (mut body, n) = binary_request(json!({}), None);
    body.pop();
    let (st, e) = refused(
        &s,
        "/v2/models/breast_cancer/infer",
        body.clone(),
        &[("Inference-Header-Content-Length", n.to_string())],
    )
    .await;
    assert_eq!((st, e.as_str()), (400, "malformed_json"));
    let (st, e) = refused(
        &s,
        "/v2/models/breast_cancer/infer",
        body.clone(),
        &[("Inference-Header-Content-Length", (body.len() + 1).to_string())],
    )
    .await;
    assert_eq!((st, e.as_str()), (400, "malformed_json"));
    s.stop().await;
}

#[tokio::test]
async fn datatypes_convert_only_where_no_value_changes() {
    let (s, _dir) = server().await;
    let (x, rows) = bc_rows();
    let with = |datatype: &str, data: Value| json!({"inputs": [{"name": "features", "shape": [rows, 30], "datatype": datatype, "data": data}]});
    let (_, fp32, _) = infer(&s, "breast_cancer", &with("FP32", json!(x))).await;
    let (st, fp64, _) = infer(&s, "breast_cancer", &with("FP64", json!(x))).await;
    assert_eq!(st, 200, "{fp64}");
    assert_eq!(fp64["outputs"], fp32["outputs"], "FP64 rows that FP32 holds");
    let ints: Vec<i64> = x.iter().map(|v| v.round() as i64).collect();
    let (st, a, _) = infer(&s, "breast_cancer", &with("INT64", json!(ints))).await;
    assert_eq!(st, 200, "exact integers feed a float input: {a}");
    let mut big = ints.clone();
    big[3] = (1 << 24) + 1;
    let e = expect_error(&s, "breast_cancer", with("INT64", json!(big)), 400, "invalid_value").await;
    assert!(e.contains("features") && e.contains("not exact in FP32"), "{e}");
    let mut huge = x.clone();
    huge[0] = 1e300;
    let e = expect_error(&s, "breast_cancer", with("FP64", json!(huge)), 400, "invalid_value").await;
    assert!(e.contains("out of range for FP32"), "{e}");
    for (dt, data) in [
        ("BOOL", json!(vec![true; rows * 30])),
        ("BYTES", json!(vec!["a"; rows * 30])),
    ] {
        let e = expect_error(&s, "breast_cancer", with(dt, data), 400, "invalid_value").await;
        assert!(e.contains("'features'") && e.contains("FP32") && e.contains(dt), "{e}");
    }
    let e = expect_error(&s, "breast_cancer", with("FP16X", json!(x)), 400, "invalid_value").await;
    assert!(e.contains("unknown datatype"), "{e}");

    // An INT64 input takes narrower integers, not floats and not wider unsigned ones.
    let ids =
        |dt: &str, data: Value| json!({"inputs": [{"name": "ids", "shape": [2, 4], "datatype": dt, "data": data}]});
    let (_, want, _) = infer(&s, "int_input", &ids("INT64", json!([1, 2, 3, 4, 5, 6, 7, 8]))).await;
    let (st, got, _) = infer(&s, "int_input", &ids("INT32", json!([1, 2, 3, 4, 5, 6, 7, 8]))).await;
    assert_eq!((st, &got["outputs"]), (200, &want["outputs"]));
    let (st, got, _) = infer(&s, "int_input", &ids("UINT8", json!([1, 2, 3, 4, 5, 6, 7, 8]))).await;
    assert_eq!((st, &got["outputs"]), (200, &want["outputs"]));
    expect_error(
        &s,
        "int_input",
        ids("UINT64", json!([1, 2, 3, 4, 5, 6, 7, 8])),
        400,
        "invalid_value",
    )
    .await;
    expect_error(
        &s,
        "int_input",
        ids("FP32", json!([1, 2, 3, 4, 5, 6, 7, 8])),
        400,
        "invalid_value",
    )
    .await;
    let e = expect_error(
        &s,
        "int_input",
        ids("INT8", json!([1, 2, 3, 400, 5, 6, 7, 8])),
        400,
        "invalid_value",
    )
    .await;
    assert!(e.contains("out of range for INT8"), "{e}");
    s.stop().await;
}

#[tokio::test]
async fn every_error_is_a_json_4xx_with_its_type_and_mode_violations_count() {
    let (s, _dir) = server().await;
    let (x, rows) = bc_rows();
    let input =
        |shape: Value, data: Vec<f64>| json!({"name": "features", "shape": shape, "datatype": "FP32", "data": data});

    let (st, e) = refused(&s, "/v2/models/breast_cancer/infer", b"{\"inputs\": [".to_vec(), &[]).await;
    assert_eq!((st, e.as_str()), (400, "malformed_json"));
    expect_error(&s, "breast_cancer", json!({"inputs": "x"}), 400, "malformed_json").await;
    expect_error(&s, "breast_cancer", json!({"inputs": []}), 400, "missing_input").await;
    let e = expect_error(
        &s,
        "breast_cancer",
        json!({"inputs": [input(json!([rows, 30]), x.clone()), {"name": "other", "shape": [1], "datatype": "FP32", "data": [1]}]}),
        400,
        "unknown_input",
    )
    .await;
    assert!(e.contains("'other'") && e.contains("'features'"), "{e}");
    let e = expect_error(
        &s,
        "breast_cancer",
        json!({"inputs": [input(json!([rows * 2, 15]), x.clone())]}),
        400,
        "shape_mismatch",
    )
    .await;
    assert!(
        e.contains("features") && e.contains("[batch, 30]") && e.contains("[16, 15]"),
        "{e}"
    );
    let e = expect_error(
        &s,
        "breast_cancer",
        json!({"inputs": [input(json!([rows, 30]), x[..100].to_vec())]}),
        400,
        "shape_mismatch",
    )
    .await;
    assert!(e.contains("holds 240 values, got 100"), "{e}");

    // Parameters: unknown ones are refused by name; mode contradictions are violations.
    let body = |params: Value| json!({"parameters": params, "inputs": [input(json!([rows, 30]), x.clone())]});
    // A refusal still reports the mode the request asked for.
    let (st, _, h) = infer(&s, "breast_cancer", &body(json!({"mc_samples": 5, "mc_sampels": 1}))).await;
    assert_eq!((st, h["x-inference-mode"].to_str().unwrap()), (422, "mc_dropout"));
    let e = expect_error(
        &s,
        "breast_cancer",
        body(json!({"mc_sample": 50})),
        422,
        "invalid_parameter",
    )
    .await;
    assert!(e.contains("'mc_sample'"), "{e}");
    for (params, status, error_type) in [
        (json!({"mc_samples": 1}), 422, "invalid_parameter"),
        (json!({"mc_samples": 501}), 422, "invalid_parameter"),
        (json!({"mc_samples": 2.5}), 422, "invalid_parameter"),
        (json!({"mc_samples": [2]}), 422, "invalid_parameter"),
        (json!({"mc_samples": 5, "seed": -1}), 422, "invalid_parameter"),
        (json!({"seed": 3}), 422, "mode_mismatch"),
        (json!({"return_samples": true}), 422, "mode_mismatch"),
    ] {
        expect_error(&s, "breast_cancer", body(params), status, error_type).await;
    }
    let mut eval_with_mc_output = body(json!({}));
    eval_with_mc_output["outputs"] = json!([{"name": "probabilities.std"}]);
    expect_error(&s, "breast_cancer", eval_with_mc_output, 422, "mode_mismatch").await;
    let mut unknown_output = body(json!({}));
    unknown_output["outputs"] = json!([{"name": "logits"}]);
    let e = expect_error(&s, "breast_cancer", unknown_output, 400, "invalid_value").await;
    assert!(e.contains("'logits'") && e.contains("'probabilities'"), "{e}");
    let nd = json!({"parameters": {"mc_samples": 5},
                    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    expect_error(&s, "no_dropout", nd, 422, "mc_unavailable").await;
    expect_error(&s, "nope", body(json!({})), 404, "model_not_found").await;
    let (st, e) = refused(
        &s,
        "/v2/models/breast_cancer/versions/3/infer",
        serde_json::to_vec(&body(json!({}))).unwrap(),
        &[],
    )
    .await;
    assert_eq!((st, e.as_str()), (404, "model_not_found"));
    let (st, e) = refused(&s, "/v2/models/breast_cancer/infer", vec![b' '; 2 << 20], &[]).await;
    assert_eq!((st, e.as_str()), (413, "payload_too_large"));
    let r = s
        .client
        .get(s.url("/v2/models/breast_cancer/infer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);

    // Counted like the native API's: the same reasons, one per refusal, with the protocol.
    let m = s.metrics().await;
    for reason in ["seed_without_mc", "return_samples_without_mc", "mc_unavailable"] {
        assert_eq!(
            metric_sum(&m, "mcd_mode_violations_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        metric_sum(
            &m,
            "mcd_requests_total",
            &[("protocol", "oip"), ("status", "422"), ("model", "breast_cancer")]
        ),
        10.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "mcd_requests_total",
            &[("protocol", "oip"), ("status", "404"), ("model", "_unknown")]
        ),
        1.0
    );
    assert_absent(&m, "mcd_requests_total", &[("protocol", "native")]);
    s.stop().await;
}

#[tokio::test]
async fn oip_and_native_requests_are_counted_alike_with_their_protocol() {
    let (s, _dir) = server().await;
    let r = reference("breast_cancer");
    for _ in 0..3 {
        let (st, _, _) = infer(&s, "breast_cancer", &bc_request(json!({"mc_samples": 5}))).await;
        assert_eq!(st, 200);
    }
    let (st, _, _) = infer(&s, "breast_cancer", &bc_request(json!({}))).await;
    assert_eq!(st, 200);
    let (st, _, _) = s.post("/predict?mc_samples=5", &json!({"inputs": r["inputs"]})).await;
    assert_eq!(st, 200);
    let m = s.metrics().await;
    let count = |protocol: &str, mode: &str| {
        metric_sum(
            &m,
            "mcd_requests_total",
            &[
                ("protocol", protocol),
                ("mode", mode),
                ("status", "200"),
                ("model", "breast_cancer"),
            ],
        )
    };
    assert_eq!(count("oip", "mc_dropout"), 3.0);
    assert_eq!(count("oip", "eval"), 1.0);
    assert_eq!(count("native", "mc_dropout"), 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "mcd_request_duration_seconds",
            &[("protocol", "oip"), ("mode", "mc_dropout")]
        ),
        3.0
    );
    assert_eq!(metric_sum(&m, "mcd_mc_samples", &[("model", "breast_cancer")]), 4.0);
    s.stop().await;
}
