//! Large tract graphs run a pass of several rows as one pass per row (engine::row_passes);
//! `"passes"` in `<stem>.model.json` forces either way. A real server serves each model
//! twice, once forced row by row and once batched, and the answers must agree:
//! - row by row, a row's eval is its one-row eval, bit for bit, wherever it sits in the
//!   request (a pass that stacked rows in another order, or read one row for all, fails);
//! - row by row and batched agree within float rounding on eval and on seeded MC (the
//!   masks are drawn the same way; a row that got another row's masks would move the MC
//!   statistics by the dropout's spread, far beyond rounding);
//! - GET /models/{name} says which way each runs, and the load-time checks still pass.

mod common;

use common::*;
use mcd_serve::config::ServeArgs;
use serde_json::{Value, json};

/// A folder holding `file` (and its model.json, if any) twice: `<stem>_rows` forced row by
/// row and `<stem>_batched` forced batched.
fn twins(file: &std::path::Path) -> common::tempdir::TempDir {
    let dir = common::tempdir::TempDir::new();
    let stem = file.file_stem().unwrap().to_str().unwrap();
    let cfg_path = file.with_extension("model.json");
    let base: Value = if cfg_path.is_file() {
        read_json(&cfg_path)
    } else {
        json!({})
    };
    for (suffix, passes) in [("rows", "row_by_row"), ("batched", "batched")] {
        let name = format!("{stem}_{suffix}");
        std::fs::copy(file, dir.path().join(format!("{name}.onnx"))).unwrap();
        let mut cfg = base.clone();
        cfg["passes"] = json!(passes);
        std::fs::write(dir.path().join(format!("{name}.model.json")), cfg.to_string()).unwrap();
    }
    dir
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Object(o) => o.values().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

/// Every element within float32 rounding of a different plan: 1e-5 relative, 1e-6 absolute.
fn assert_close(what: &str, a: &Value, b: &Value) {
    let (x, y) = (floats(a), floats(b));
    assert_eq!(x.len(), y.len(), "{what}: lengths");
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!(
            (p - q).abs() <= 1e-6 + 1e-5 * p.abs().max(q.abs()),
            "{what}: element {i}: {p} vs {q}"
        );
    }
}

/// Serves `file` twice (row by row and batched) and checks the answers on `inputs` (several
/// rows of one input), as the module says. `mc` is what GET /models says of the row-by-row
/// twin's MC passes.
async fn check(file: &std::path::Path, input: &str, rows: Vec<Value>, mc: &str) {
    let stem = file.file_stem().unwrap().to_str().unwrap().to_string();
    let dir = twins(file);
    let server = TestServer::start(ServeArgs::for_models(dir.path())).await;
    let (rows_name, batched_name) = (format!("{stem}_rows"), format!("{stem}_batched"));

    let (status, meta) = server.get(&format!("/models/{rows_name}")).await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["passes"]["eval"], "row_by_row", "{}", meta["passes"]);
    assert_eq!(meta["passes"]["mc"], mc, "{}", meta["passes"]);
    assert!(meta["passes"]["multiply_adds_per_row"].as_u64().unwrap() > 0);
    for c in meta["self_checks"].as_array().unwrap() {
        assert_ne!(c["result"], "fail", "{rows_name}: {c}");
    }
    let (_, meta) = server.get(&format!("/models/{batched_name}")).await;
    assert_eq!(meta["passes"]["eval"], "batched", "{}", meta["passes"]);
    assert_eq!(meta["passes"]["mc"], "batched", "{}", meta["passes"]);

    let body = json!({ "inputs": { input: rows } });
    let predict = |name: &str, query: &str| format!("/models/{name}/predict{query}");
    let (status, by_rows, _) = server.post(&predict(&rows_name, ""), &body).await;
    assert_eq!(status, 200, "{by_rows}");
    let (status, batched, _) = server.post(&predict(&batched_name, ""), &body).await;
    assert_eq!(status, 200, "{batched}");
    assert_close("eval, row by row vs batched", &by_rows["outputs"], &batched["outputs"]);

    // Each row alone, bit for bit: the JSON numbers print the same f32 bits.
    for (r, row) in rows.iter().enumerate() {
        let (status, alone, _) = server
            .post(&predict(&rows_name, ""), &json!({ "inputs": { input: [row] } }))
            .await;
        assert_eq!(status, 200, "{alone}");
        for (name, out) in alone["outputs"].as_object().unwrap() {
            let in_request = &by_rows["outputs"][name];
            let in_request = in_request.get("values").unwrap_or(in_request);
            let out = out.get("values").unwrap_or(out);
            assert_eq!(
                floats(&in_request[r]),
                floats(&out[0]),
                "{rows_name}: row {r} of a {}-row eval differs from its eval alone",
                rows.len()
            );
        }
    }

    let query = "?mc_samples=16&seed=7&statistics=mean,variance";
    let (status, mc_rows, _) = server.post(&predict(&rows_name, query), &body).await;
    assert_eq!(status, 200, "{mc_rows}");
    let (status, mc_batched, _) = server.post(&predict(&batched_name, query), &body).await;
    assert_eq!(status, 200, "{mc_batched}");
    for (name, out) in mc_rows["outputs"].as_object().unwrap() {
        for stat in ["mean", "variance"] {
            assert_close(
                &format!("MC-16 {name} {stat}, row by row vs batched"),
                &out[stat],
                &mc_batched["outputs"][name][stat],
            );
        }
    }
    server.stop().await;
}

/// digits_cnn forced row by row: its eval runs row by row; its MC keeps the shared trunk
/// (its dropout is in the head), batched over the samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cnn_forced_row_by_row_answers_as_batched_and_as_each_row_alone() {
    let refs = read_json(&fixture("reference_outputs.json"));
    let rows: Vec<Value> = (0..5).map(|i| refs["digits_cnn"]["inputs"][i].clone()).collect();
    check(&models_dir().join("digits_cnn.onnx"), "image", rows, "batched").await;
}

/// The MONAI DenseNet (dropout in every dense layer): forced row by row, its MC leaves the
/// shared trunk (the stem) for the full graph, row by row too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_densenet_forced_row_by_row_runs_its_mc_row_by_row_too() {
    let Some(dir) = shared_models() else { return };
    let spec = read_json(&dir.join("medical/monai_densenet_multilabel.json"));
    let rows = spec["inputs"]["image"].as_array().unwrap().clone();
    check(
        &dir.join("medical/monai_densenet_multilabel.onnx"),
        "image",
        rows,
        "row_by_row",
    )
    .await;
}
