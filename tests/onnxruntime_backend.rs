//! The onnxruntime backend (`--features onnxruntime`), against tract and against the
//! references: a real server on port 0 for the bundled models, the engine for the shared
//! real models (`../shared/real-models/torch` and `medical`).
//!
//! Needs `MCD_ORT_LIB`: the path of `libonnxruntime.so.1.31.1` (`.ci/run` extracts it from
//! the hash-pinned wheel; README "Backends").
//!
//! Tolerance. The masks are the same bits on both backends (the engine draws them from the
//! seed), so each MC sample is the same function of the same numbers; only the arithmetic
//! differs: onnxruntime fuses and orders its float32 sums otherwise than tract. Over the
//! few hundred to few thousand terms of these models' dot products that moves a value by
//! well under 1e-6 of its size (measured below 2e-7 on the bundled models); 1e-5 of the
//! value, with 1 as the floor of the scale (probabilities, entropies near 0), leaves room
//! for deeper nets and still catches any real difference (a wrong mask, a dropped
//! activation, a misplaced row: all move values by percents).
#![cfg(feature = "onnxruntime")]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mcd_serve::config::ServeArgs;
use mcd_serve::engine::backend::{Backend, set_onnxruntime_library};
use mcd_serve::engine::model::{LoadedModel, McSamples, Outcome, to_f64};
use mcd_serve::engine::repo::load_model_on;
use serde_json::{Value, json};
use tract_onnx::prelude::*;

const TOL: f64 = 1e-5;

fn ort_lib() -> PathBuf {
    match std::env::var_os("MCD_ORT_LIB") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "these tests run the onnxruntime backend (the `onnxruntime` feature is on), and need MCD_ORT_LIB: \
             the path of libonnxruntime.so.1.31.1 from the onnxruntime wheel (see README \"Backends\", .ci/run)"
        ),
    }
}

fn args(dir: &Path, backend: Backend) -> ServeArgs {
    let mut a = ServeArgs::for_models(dir);
    a.backend = backend;
    a.ort_lib = Some(ort_lib());
    a
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * b.abs().max(1.0)
}

/// Every number of `a` against `b`'s (same JSON shape): the worst |difference| scaled as
/// [`close`] scales it, and the first place that is not close. Non-numbers must be equal.
fn compare(a: &Value, b: &Value, at: &str, worst: &mut f64, problems: &mut Vec<String>) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            *worst = worst.max((x - y).abs() / y.abs().max(1.0));
            if !close(x, y) {
                problems.push(format!("{at}: onnxruntime {x} vs tract {y}"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                compare(x, y, &format!("{at}[{i}]"), worst, problems);
            }
        }
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => compare(v, w, &format!("{at}.{k}"), worst, problems),
                    None => problems.push(format!("{at}.{k}: only onnxruntime has it")),
                }
            }
        }
        _ if a == b => {}
        _ => problems.push(format!("{at}: onnxruntime {a} vs tract {b}")),
    }
}

/// The bundled models on a server whose `--backend` is onnxruntime, beside one on tract:
/// - metadata and `mcd_model_info` name the backend, and every self-check passes or is
///   skipped for a stated reason (the shared trunk is tract's only);
/// - eval equals tract's within [`TOL`], and the reference outputs (onnxruntime 1.32 in
///   Python, `tests/fixtures/reference_outputs.json`) within 1e-6;
/// - MC with a seed: every returned sample, and so every statistic, equals tract's for the
///   same seed within [`TOL`], and the same request gives the same bits again.
#[tokio::test]
async fn bundled_models_on_onnxruntime_equal_tract_and_the_references() {
    let ort = TestServer::start(args(&models_dir(), Backend::Onnxruntime)).await;
    let tract = TestServer::start(args(&models_dir(), Backend::Tract)).await;
    let refs = read_json(&fixture("reference_outputs.json"));
    let mut problems = vec![];
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let (status, meta) = ort.get(&format!("/models/{name}")).await;
        assert_eq!(status, 200, "{meta}");
        assert_eq!(meta["backend"], "onnxruntime", "{name}");
        assert_eq!(tract.get(&format!("/models/{name}")).await.1["backend"], "tract");
        assert_eq!(meta["healthy"], true, "{name}: {meta}");
        assert_eq!(meta["mc_available"], true, "{name}: {meta}");
        for c in meta["self_checks"].as_array().unwrap() {
            match (c["check"].as_str().unwrap(), c["result"].as_str().unwrap()) {
                (_, "pass") => {}
                ("mc_shared_trunk", "skipped") => {
                    assert!(c["detail"].as_str().unwrap().contains("onnxruntime"), "{c}")
                }
                _ => panic!("{name}: self-check {c}"),
            }
        }

        let r = &refs[name];
        let body = json!({"inputs": r["inputs"]});
        let path = format!("/models/{name}/predict");
        let (s1, eval, _) = ort.post(&path, &body).await;
        let (s2, eval_tract, _) = tract.post(&path, &body).await;
        assert_eq!((s1, s2), (200, 200), "{eval} {eval_tract}");
        let mut worst = 0.0;
        compare(
            &eval["outputs"],
            &eval_tract["outputs"],
            name,
            &mut worst,
            &mut problems,
        );
        let got = f64s(&eval["outputs"][r["output_name"].as_str().unwrap()]);
        let want = f64s(&r["outputs"]);
        assert_eq!(got.len(), want.len(), "{name}");
        let reference_err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
        // The same runtime (onnxruntime 1.31 here, 1.32 there) on the same graph: float32
        // output rounding, apart from our f64 softmax.
        assert!(
            reference_err <= 1e-6 * want.iter().fold(1.0f64, |m, w| m.max(w.abs())),
            "{name}: eval vs the reference outputs: max |diff| {reference_err:.2e}"
        );

        let mc = format!("{path}?mc_samples=20&seed=7&return_samples=true");
        let (s1, a, _) = ort.post(&mc, &body).await;
        let (s2, b, _) = tract.post(&mc, &body).await;
        assert_eq!((s1, s2), (200, 200), "{a} {b}");
        let mut mc_worst = 0.0;
        compare(&a["outputs"], &b["outputs"], name, &mut mc_worst, &mut problems);
        let (_, again, _) = ort.post(&mc, &body).await;
        assert_eq!(
            again["outputs"], a["outputs"],
            "{name}: the same seed gave another answer"
        );
        println!("{name}: eval vs tract {worst:.2e}, vs reference {reference_err:.2e}; MC-20 vs tract {mc_worst:.2e}");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let scrape = ort.metrics().await;
    assert_eq!(
        metric_sum(&scrape, "mcd_model_info", &[("backend", "onnxruntime")]),
        3.0
    );
    assert_absent(&scrape, "mcd_model_info", &[("backend", "tract")]);
    ort.stop().await;
    tract.stop().await;
}

/// `"backend"` in a model's `model.json` wins over the server's: a tract server runs it on
/// onnxruntime. A backend name the server does not know refuses that model, with the
/// reason, and the other models still serve.
#[tokio::test]
async fn model_json_chooses_the_backend_and_an_unknown_one_is_refused() {
    let dir = model_folder(&[
        models_dir().join("breast_cancer.onnx"),
        models_dir().join("diabetes.onnx"),
    ]);
    let set = |file: &str, value: &str| {
        let path = dir.path().join(file);
        let mut cfg = if path.is_file() { read_json(&path) } else { json!({}) };
        cfg["backend"] = json!(value);
        std::fs::write(&path, cfg.to_string()).unwrap();
    };
    set("breast_cancer.model.json", "onnxruntime");
    set("diabetes.model.json", "cuda");
    let s = TestServer::start(args(dir.path(), Backend::Tract)).await;
    let (status, meta) = s.get("/models/breast_cancer").await;
    assert_eq!(status, 200);
    assert_eq!(meta["backend"], "onnxruntime");
    let (status, _, _) = s
        .post(
            "/models/breast_cancer/predict?mc_samples=4&seed=1",
            &json!({"inputs": [vec![0.0; 30]]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = s.get("/models/diabetes").await;
    assert_ne!(status, 200, "{body}");
    let (_, ready) = s.get("/health/ready").await;
    assert!(
        ready.to_string().contains("unknown variant `cuda`"),
        "the reason is shown: {ready}"
    );
    s.stop().await;
}

/// A library that is not there stops a server whose backend is onnxruntime at startup,
/// with the path and the reason (never a panic, never a silent fall back to tract).
#[test]
fn a_missing_library_stops_the_server_with_the_reason() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mcd-serve"))
        .args([
            "--models",
            models_dir().to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "",
            "--backend",
            "onnxruntime",
            "--ort-lib",
            "/nonexistent/libonnxruntime.so.1.31.1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that starts anyway would never exit: give it 30 s.
    let mut exited = None;
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        exited.is_some_and(|s| !s.success()),
        "the server kept running or exited 0: {text}"
    );
    assert!(
        text.contains("loading onnxruntime from /nonexistent/libonnxruntime.so.1.31.1"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// The inputs of a shared model's reference JSON: `input` (torch/) or `inputs` by name
/// with `input_dtypes` (medical/).
fn reference_inputs(m: &LoadedModel, spec: &Value) -> Vec<Tensor> {
    m.inputs
        .iter()
        .map(|i| {
            let (v, dtype) = match spec.get("inputs") {
                Some(named) => (&named[&i.name], spec["input_dtypes"][&i.name].as_str().unwrap()),
                None => (&spec["input"], "float32"),
            };
            let shape = nested_shape(v);
            match dtype {
                "int64" => Tensor::from_shape(&shape, &f64s(v).iter().map(|&x| x as i64).collect::<Vec<_>>()),
                _ => Tensor::from_shape(&shape, &f64s(v).iter().map(|&x| x as f32).collect::<Vec<_>>()),
            }
            .unwrap()
        })
        .collect()
}

/// PyTorch's own exports and the medical architectures (MONAI BasicUNet, DenseNet, a BERT
/// classifier), each loaded on both backends:
/// - each loads on onnxruntime with MC available, its self-checks passing (the shared
///   trunk skipped: tract's only);
/// - eval equals PyTorch's (the JSON's `eval`) within 1e-5 of the value, as tract's does
///   (tests/real_models.rs), and tract's within [`TOL`];
/// - 8 MC samples with the same seed equal tract's, sample by sample, within [`TOL`].
///
/// The MC statistics against PyTorch's own MC dropout are tests/real_models.rs and
/// tests/medical_maps.rs, run with `MCD_BACKEND=onnxruntime` (.ci/run).
#[test]
fn shared_models_on_onnxruntime_equal_tract_and_pytorch() {
    let Some(dir) = shared_models() else { return };
    set_onnxruntime_library(Some(ort_lib()));
    let files = [
        "torch/mlp_bn_legacy_training",
        "torch/mlp_dynamo",
        "torch/cnn_dropout2d_dynamo",
        "torch/conv1d_dropout1d_dynamo",
        "torch/selu_alphadropout_dynamo",
        "medical/monai_basicunet_seg",
        "medical/monai_basicunet_binary_seg",
        "medical/monai_densenet_multilabel",
        "medical/bert_tiny_cls",
    ];
    let mut problems = vec![];
    for file in files {
        let path = dir.join(format!("{file}.onnx"));
        let spec = read_json(&dir.join(format!("{file}.json")));
        let t0 = std::time::Instant::now();
        let ort = load_model_on(file, &path, Backend::Onnxruntime).unwrap_or_else(|e| panic!("{file}: {e}"));
        let ort_load = t0.elapsed();
        let tract = load_model_on(file, &path, Backend::Tract).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(ort.backend, Backend::Onnxruntime);
        assert!(
            ort.mc_unavailable_reason().is_none(),
            "{file}: {:?}",
            ort.mc_unavailable_reason()
        );
        for c in &ort.checks {
            let trunk_skipped = c.check.as_str() == "mc_shared_trunk" && c.result == Outcome::Skipped;
            assert!(
                c.result == Outcome::Pass || trunk_skipped,
                "{file}: {} {:?} {}",
                c.check.as_str(),
                c.result,
                c.detail
            );
        }
        let rows = |m: &LoadedModel| m.input_rows(reference_inputs(m, &spec)).unwrap();
        let (b_ort, b_tract) = (rows(&ort), rows(&tract));

        let t0 = std::time::Instant::now();
        let eval = to_f64(&ort.eval_session().run(&b_ort).unwrap()[0].tensor).unwrap();
        let ort_eval = t0.elapsed();
        let t0 = std::time::Instant::now();
        let eval_tract = to_f64(&tract.eval_session().run(&b_tract).unwrap()[0].tensor).unwrap();
        let tract_eval = t0.elapsed();
        let want = f64s(&spec["eval"]);
        assert_eq!(eval.len(), want.len(), "{file}");
        let (mut vs_torch, mut vs_tract) = (0.0f64, 0.0f64);
        for ((g, t), w) in eval.iter().zip(&eval_tract).zip(&want) {
            vs_torch = vs_torch.max((g - w).abs());
            vs_tract = vs_tract.max((g - t).abs() / t.abs().max(1.0));
            if (g - w).abs() > 1e-5 * w.abs().max(1.0) {
                problems.push(format!("{file}: eval {g} vs PyTorch {w}"));
            }
            if !close(*g, *t) {
                problems.push(format!("{file}: eval {g} vs tract {t}"));
            }
        }

        let n = McSamples::new(8).unwrap();
        let t0 = std::time::Instant::now();
        let mc = ort.mc_session().unwrap().run(&b_ort, n, 20_261_207, true).unwrap();
        let ort_mc = t0.elapsed();
        let t0 = std::time::Instant::now();
        let mc_tract = tract.mc_session().unwrap().run(&b_tract, n, 20_261_207, true).unwrap();
        let tract_mc = t0.elapsed();
        let mut mc_worst = 0.0f64;
        for (o, t) in mc.iter().zip(&mc_tract) {
            let (a, b) = (o.stats.samples.as_ref().unwrap(), t.stats.samples.as_ref().unwrap());
            assert_eq!(a.len(), b.len(), "{file}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                mc_worst = mc_worst.max((x - y).abs() / y.abs().max(1.0));
                if !close(*x, *y) {
                    problems.push(format!("{file}: MC sample value {i}: onnxruntime {x} vs tract {y}"));
                    break;
                }
            }
        }
        println!(
            "{file}: eval vs PyTorch {vs_torch:.2e}, vs tract {vs_tract:.2e}; MC-8 samples vs tract {mc_worst:.2e}; \
             onnxruntime load {:.2}s eval {:.1}ms MC-8 {:.1}ms; tract eval {:.1}ms MC-8 {:.1}ms",
            ort_load.as_secs_f64(),
            ort_eval.as_secs_f64() * 1e3,
            ort_mc.as_secs_f64() * 1e3,
            tract_eval.as_secs_f64() * 1e3,
            tract_mc.as_secs_f64() * 1e3,
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
