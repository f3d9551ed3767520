//! Output kinds and their per-position statistics on small hand-built ONNX models, served
//! by a real server: a Softmax over axis 1 of a 5-D tensor (a volume's class axis), an
//! opset-12 Softmax(axis=1) of a 4-D tensor (which ONNX normalises over C, H and W jointly,
//! so one distribution per row, never one per pixel), a Sigmoid (Bernoulli per element),
//! and a config that declares a kind.

mod common;

use common::*;
use mcd_serve::config::ServeArgs;
use mcd_serve::engine::statistics::{Requested, StatSet, Statistic};
use prost::Message;
use serde_json::{Value, json};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_proto::DataType, tensor_shape_proto, type_proto,
};

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = std::iter::once(tensor_shape_proto::dimension::Value::DimParam("batch".into()))
        .chain(dims.iter().map(|&d| tensor_shape_proto::dimension::Value::DimValue(d)))
        .map(|v| tensor_shape_proto::Dimension {
            value: Some(v),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{output}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

/// x [batch, dims] → Dropout(0.5, training) → `activation` (with `axis`, if given) → y.
fn model(opset: i64, dims: &[i64], activation: &str, axis: Option<i64>) -> Vec<u8> {
    model_with_ratio(opset, dims, activation, axis, 0.5)
}

/// The same with another dropout ratio.
fn model_with_ratio(opset: i64, dims: &[i64], activation: &str, axis: Option<i64>, ratio: f32) -> Vec<u8> {
    let attribute = axis
        .map(|i| {
            vec![AttributeProto {
                name: "axis".into(),
                r#type: 2, // INT
                i,
                ..Default::default()
            }]
        })
        .unwrap_or_default();
    let ratio = TensorProto {
        name: "ratio".into(),
        data_type: DataType::Float as i32,
        float_data: vec![ratio],
        ..Default::default()
    };
    let training = TensorProto {
        name: "training".into(),
        data_type: DataType::Bool as i32,
        int32_data: vec![1],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            name: "g".into(),
            node: vec![
                node("Dropout", &["x", "ratio", "training"], "d", vec![]),
                node(activation, &["d"], "y", attribute),
            ],
            input: vec![value_info("x", dims)],
            output: vec![value_info("y", dims)],
            initializer: vec![ratio, training],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Two rows of `per_row` inputs: the first row all zeros (every sample then gives the same
/// uniform distribution, or p = 0.5), the second made-up values.
fn rows(per_row: usize) -> Vec<f64> {
    let mut next = uniform(22);
    (0..2 * per_row)
        .map(|i| if i < per_row { 0.0 } else { 4.0 * next() - 2.0 })
        .collect()
}

fn nest(values: &[f64], shape: &[usize]) -> Value {
    if shape.len() == 1 {
        return json!(values);
    }
    let step = values.len() / shape[0];
    Value::Array(values.chunks(step).map(|c| nest(c, &shape[1..])).collect())
}

fn h(p: &[f64]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

/// The three statistics straight from the samples (sample-major, `len` values each): per
/// position, the distribution over `classes` values `inner` apart in blocks of
/// classes·inner; or, with `classes` 0, (p, 1 − p) per element.
fn direct(samples: &[f64], len: usize, classes: usize, inner: usize) -> [Vec<f64>; 3] {
    let at = |s: &[f64], j: usize| -> Vec<f64> {
        if classes == 0 {
            return vec![s[j], 1.0 - s[j]];
        }
        let (block, i) = (j / inner, j % inner);
        (0..classes)
            .map(|c| s[block * classes * inner + c * inner + i])
            .collect()
    };
    // Bernoulli (classes 0): one position per element.
    let positions = len.checked_div(classes).unwrap_or(len);
    let samples: Vec<&[f64]> = samples.chunks_exact(len).collect();
    let n = samples.len() as f64;
    let mut out = [vec![], vec![], vec![]];
    for j in 0..positions {
        let per: Vec<Vec<f64>> = samples.iter().map(|s| at(s, j)).collect();
        let k = per[0].len();
        let mean: Vec<f64> = (0..k).map(|c| per.iter().map(|p| p[c]).sum::<f64>() / n).collect();
        let predictive = h(&mean);
        let expected = per.iter().map(|p| h(p)).sum::<f64>() / n;
        out[0].push(predictive);
        out[1].push(expected);
        out[2].push((predictive - expected).max(0.0));
    }
    out
}

const STATS: [&str; 3] = ["predictive_entropy", "expected_entropy", "mutual_information"];

const ALL_STATISTICS: &str = "mean,variance,std,predictive_entropy,expected_entropy,mutual_information,summary";

/// An MC answer of `model` for x of `shape` ([2, ...]), with its samples and every statistic.
async fn mc(s: &TestServer, model: &str, x: &[f64], shape: &[usize]) -> Value {
    let body = json!({"inputs": {"x": nest(x, shape)}});
    // Every statistic the output has, asked for by name: a map's default leaves some out,
    // and naming one the model has none of is refused.
    let (_, meta) = s.get(&format!("/v2/models/{model}")).await;
    let offered: Vec<&str> = ALL_STATISTICS
        .split(',')
        .filter(|stat| {
            meta["outputs"].as_array().unwrap().iter().any(|o| {
                let name = o["name"].as_str().unwrap();
                name == format!("y.{stat}") || name.starts_with(&format!("y.{stat}.")) || *stat == "mean"
            })
        })
        .collect();
    let (st, a, _) = s
        .post(
            &format!(
                "/models/{model}/predict?mc_samples=300&seed=5&return_samples=true&statistics={}",
                offered.join(",")
            ),
            &body,
        )
        .await;
    assert_eq!(st, 200, "{a}");
    a["outputs"]["y"].clone()
}

fn close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-9, "{what}[{j}]: {g} vs {w}");
    }
}

struct Served {
    server: TestServer,
    _dir: tempdir::TempDir,
}

async fn serve() -> Served {
    let dir = tempdir::TempDir::new();
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(format!("{name}.onnx")), bytes).unwrap();
    write("volume", model(13, &[3, 2, 2, 2], "Softmax", Some(1)));
    std::fs::write(dir.path().join("volume.model.json"), r#"{"background_class": 0}"#).unwrap();
    write("flat12", model(12, &[3, 2, 2], "Softmax", Some(1)));
    write("labels", model(13, &[4], "Sigmoid", None));
    // The same sigmoid graph, declared as other outputs by its config: no entropies.
    write("declared", model(13, &[4], "Sigmoid", None));
    std::fs::write(
        dir.path().join("declared.model.json"),
        r#"{"output_kinds": {"y": {"kind": "other"}}}"#,
    )
    .unwrap();
    let server = TestServer::start(ServeArgs::for_models(dir.path())).await;
    Served { server, _dir: dir }
}

async fn kind(s: &TestServer, model: &str) -> Value {
    let (st, meta) = s.get(&format!("/models/{model}")).await;
    assert_eq!(st, 200, "{meta}");
    assert_eq!(meta["mc_available"], true, "{meta}");
    meta["output_kinds"]["y"].clone()
}

/// A 5-D output, softmax over axis 1: the entropies are per voxel, shaped [N, D, H, W],
/// equal to the direct computation from the answer's own samples along axis 1; where every
/// logit is 0, each sample is uniform: H = ln 3 exactly and no mutual information.
#[tokio::test]
async fn a_volume_has_per_voxel_entropies_along_its_class_axis() {
    let Served { server: s, _dir } = serve().await;
    assert_eq!(
        kind(&s, "volume").await,
        json!({"kind": "categorical", "class_axes": [1], "classes": 3})
    );
    let shape = [2, 3, 2, 2, 2];
    let x = rows(24);
    let y = mc(&s, "volume", &x, &shape).await;
    let want = direct(&f64s(&y["samples"]), 48, 3, 8);
    for (stat, w) in STATS.iter().zip(&want) {
        assert_eq!(nested_shape(&y[stat]), vec![2, 2, 2, 2], "{stat}");
        close(&f64s(&y[stat]), w, stat);
    }
    let pe = f64s(&y["predictive_entropy"]);
    let mi = f64s(&y["mutual_information"]);
    for j in 0..8 {
        assert!((pe[j] - 3f64.ln()).abs() < 1e-12, "{}", pe[j]);
        assert!(mi[j].abs() < 1e-12, "{}", mi[j]);
    }
    assert!(
        mi[8..].iter().any(|&v| v > 1e-3),
        "dropout moves the second row: {mi:?}"
    );
    // The summary: per row, the mean and the largest over its 8 voxels.
    let summary = &y["summary"];
    for r in 0..2 {
        let row = |v: &[f64]| v[r * 8..(r + 1) * 8].to_vec();
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / 8.0;
        let max = |v: Vec<f64>| v.iter().cloned().fold(f64::MIN, f64::max);
        let got = |k: &str| summary[k][r].as_f64().unwrap();
        assert!((got("mean_predictive_entropy") - mean(row(&pe))).abs() < 1e-12);
        assert_eq!(got("max_predictive_entropy"), max(row(&pe)));
        assert!((got("mean_mutual_information") - mean(row(&mi))).abs() < 1e-12);
        assert_eq!(got("max_mutual_information"), max(row(&mi)));
    }
    // Foreground (the config's background is class 0): voxels whose mean's top class is
    // not 0. Volumes: per row and class, the voxels each sample's argmax gives that class.
    let mean = f64s(&y["mean"]);
    let samples = f64s(&y["samples"]);
    let top = |v: &[f64], b: usize, i: usize| {
        (0..3)
            .max_by(|&a, &c| v[b * 24 + a * 8 + i].total_cmp(&v[b * 24 + c * 8 + i]).then(c.cmp(&a)))
            .unwrap()
    };
    for r in 0..2 {
        let fg: Vec<usize> = (0..8).filter(|&i| top(&mean, r, i) != 0).collect();
        let got = summary["foreground_mean_predictive_entropy"][r].as_f64();
        match fg.len() {
            0 => assert_eq!(got, None, "a row without foreground has none"),
            n => {
                let want = fg.iter().map(|&i| pe[r * 8 + i]).sum::<f64>() / n as f64;
                assert!((got.unwrap() - want).abs() < 1e-12, "row {r}: {got:?} vs {want}");
            }
        }
        for c in 0..3 {
            let counts: Vec<f64> = samples
                .chunks_exact(48)
                .map(|s| (0..8).filter(|&i| top(s, r, i) == c).count() as f64)
                .collect();
            let n = counts.len() as f64;
            let m = counts.iter().sum::<f64>() / n;
            let sd = (counts.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            let got = |k: &str| summary[k][r][c].as_f64();
            assert!((got("volume_mean").unwrap() - m).abs() < 1e-12, "row {r} class {c}");
            assert!((got("volume_std").unwrap() - sd).abs() < 1e-9, "row {r} class {c}");
            if m > 0.0 {
                assert!((got("volume_cv").unwrap() - sd / m).abs() < 1e-9);
            }
        }
    }
    // Eval: each voxel's classes sum to one.
    let (_, e, _) = s
        .post("/models/volume/predict", &json!({"inputs": {"x": nest(&x, &shape)}}))
        .await;
    let p = f64s(&e["outputs"]["y"]);
    for b in 0..2 {
        for i in 0..8 {
            let sum: f64 = (0..3).map(|c| p[b * 24 + c * 8 + i]).sum();
            assert!((sum - 1.0).abs() < 1e-6, "{sum}");
        }
    }
    s.stop().await;
}

/// Before opset 13, Softmax(axis=1) of [N, 3, 2, 2] is one distribution over all 12
/// values of a row: one entropy per row, over 12 classes, no per-pixel map and no summary.
#[tokio::test]
async fn an_opset_12_softmax_is_one_distribution_per_row_never_per_pixel() {
    let Served { server: s, _dir } = serve().await;
    assert_eq!(
        kind(&s, "flat12").await,
        json!({"kind": "categorical", "class_axes": [1, 2, 3], "classes": 12})
    );
    let shape = [2, 3, 2, 2];
    let x = rows(12);
    let y = mc(&s, "flat12", &x, &shape).await;
    let want = direct(&f64s(&y["samples"]), 24, 12, 1);
    for (stat, w) in STATS.iter().zip(&want) {
        assert_eq!(nested_shape(&y[stat]), vec![2], "{stat}");
        close(&f64s(&y[stat]), w, stat);
    }
    assert!((f64s(&y["predictive_entropy"])[0] - 12f64.ln()).abs() < 1e-12);
    assert!(y.get("summary").is_none(), "{}", y["summary"]);
    // The server's own softmax, as ONNX defines it: every sample's row sums to one.
    for sample in f64s(&y["samples"]).chunks_exact(12) {
        assert!((sample.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let (_, e, _) = s
        .post("/models/flat12/predict", &json!({"inputs": {"x": nest(&x, &shape)}}))
        .await;
    let p = f64s(&e["outputs"]["y"]);
    assert!((p[12..].iter().sum::<f64>() - 1.0).abs() < 1e-6);
    let per_pixel: f64 = (0..3).map(|c| p[12 + c * 4]).sum();
    assert!(
        (per_pixel - 1.0).abs() > 1e-3,
        "a pixel's classes do not sum to one: {per_pixel}"
    );
    s.stop().await;
}

/// A sigmoid output: each element its own Bernoulli, H(p) = −p ln p − (1−p) ln(1−p),
/// shaped like the output, with a summary over the row's labels. Where x = 0, p = 0.5 in
/// every sample: H = ln 2 and no mutual information. A config declaring the output as
/// other takes the entropies away.
#[tokio::test]
async fn a_sigmoid_output_has_a_bernoulli_entropy_per_element() {
    let Served { server: s, _dir } = serve().await;
    assert_eq!(kind(&s, "labels").await, json!({"kind": "bernoulli"}));
    let x = rows(4);
    let y = mc(&s, "labels", &x, &[2, 4]).await;
    let want = direct(&f64s(&y["samples"]), 8, 0, 1);
    for (stat, w) in STATS.iter().zip(&want) {
        assert_eq!(nested_shape(&y[stat]), vec![2, 4], "{stat}");
        close(&f64s(&y[stat]), w, stat);
    }
    let pe = f64s(&y["predictive_entropy"]);
    let mi = f64s(&y["mutual_information"]);
    assert!(pe[..4].iter().all(|h| (h - 2f64.ln()).abs() < 1e-12), "{pe:?}");
    assert!(mi[..4].iter().all(|v| v.abs() < 1e-12), "{mi:?}");
    let mean = pe[4..].iter().sum::<f64>() / 4.0;
    assert!((y["summary"]["mean_predictive_entropy"][1].as_f64().unwrap() - mean).abs() < 1e-12);
    // Foreground: labels whose mean p is at least 0.5; volume: labels at p ≥ 0.5 per sample.
    let p = f64s(&y["mean"]);
    let fg: Vec<usize> = (4..8).filter(|&j| p[j] >= 0.5).collect();
    let want = fg.iter().map(|&j| pe[j]).sum::<f64>() / fg.len() as f64;
    let got = y["summary"]["foreground_mean_predictive_entropy"][1].as_f64();
    assert!(
        fg.is_empty() || (got.unwrap() - want).abs() < 1e-12,
        "{got:?} vs {want}"
    );
    let counts: Vec<f64> = f64s(&y["samples"])
        .chunks_exact(8)
        .map(|s| s[4..].iter().filter(|&&v| v >= 0.5).count() as f64)
        .collect();
    let m = counts.iter().sum::<f64>() / counts.len() as f64;
    assert_eq!(nested_shape(&y["summary"]["volume_mean"]), vec![2, 1]);
    assert!((y["summary"]["volume_mean"][1][0].as_f64().unwrap() - m).abs() < 1e-12);

    assert_eq!(kind(&s, "declared").await, json!({"kind": "other"}));
    let y = mc(&s, "declared", &x, &[2, 4]).await;
    for key in STATS.iter().chain(&["summary"]) {
        assert!(y.get(key).is_none(), "{key}: {y}");
    }
    // Still the sigmoid's probabilities: the server applies the graph's activation.
    assert!(f64s(&y["mean"]).iter().all(|p| (0.0..=1.0).contains(p)));
    s.stop().await;
}

/// The answer estimate counts what a map returns: three entropies (and their running sum)
/// per position, not per row; and a config naming an output the model lacks, or a class
/// axis it does not have, fails the load with the reason.
#[test]
fn the_answer_estimate_counts_every_position_and_bad_declarations_are_refused() {
    use mcd_serve::engine::footprint::ENCODED_BYTES_PER_VALUE;
    use mcd_serve::engine::repo::load_model;
    let dir = tempdir::TempDir::new();
    let path = |name: &str| dir.path().join(format!("{name}.onnx"));
    for name in ["labels", "declared", "wrong_name", "wrong_axis"] {
        std::fs::write(path(name), model(13, &[4], "Sigmoid", None)).unwrap();
    }
    let config = |name: &str, text: &str| std::fs::write(dir.path().join(format!("{name}.model.json")), text).unwrap();
    config("declared", r#"{"output_kinds": {"y": {"kind": "other"}}}"#);
    config("wrong_name", r#"{"output_kinds": {"z": {"kind": "bernoulli"}}}"#);
    config(
        "wrong_axis",
        r#"{"output_kinds": {"y": {"kind": "categorical", "class_axis": 2}}}"#,
    );
    let labels = load_model("labels", &path("labels")).unwrap();
    let declared = load_model("declared", &path("declared")).unwrap();
    for rows in [1, 3] {
        // Every statistic asked for: the entropies are what the Bernoulli kind adds.
        let all = Requested::Every(StatSet::of(Statistic::ALL));
        let extra = labels.mc_answer_bytes(rows, 10, all, false) - declared.mc_answer_bytes(rows, 10, all, false);
        assert_eq!(extra, rows as u64 * 4 * (4 * 8 + 3 * ENCODED_BYTES_PER_VALUE));
        // By default the labels return mean, predictive entropy and mutual information (3
        // values a label) besides the summary; asked for the summary alone, none of them.
        let summary = Requested::Every(StatSet::of([Statistic::Summary]));
        let saved = labels.mc_answer_bytes(rows, 10, Requested::Defaults, false)
            - labels.mc_answer_bytes(rows, 10, summary, false);
        assert_eq!(saved, rows as u64 * 4 * 3 * ENCODED_BYTES_PER_VALUE);
        // Samples count only where they come back.
        let named = |stats: &[Statistic]| Requested::Union(StatSet::of(stats.iter().copied()));
        assert_eq!(labels.returned_values(rows, 10, named(&[Statistic::Mean])), 0);
        assert_eq!(
            labels.returned_values(rows, 10, named(&[Statistic::Samples])),
            rows as u64 * 10 * 4
        );
    }
    let err = load_model("wrong_name", &path("wrong_name")).err().unwrap();
    assert!(err.contains("output 'z'") && err.contains("'y'"), "{err}");
    let err = load_model("wrong_axis", &path("wrong_axis")).err().unwrap();
    assert!(err.contains("class_axis 2"), "{err}");
}

/// A choice of statistics that cannot be met is refused with what the model offers, on
/// every spelling; and what an answer returns is what the budget counts: a request whose
/// samples would pass `--max-returned-samples` is refused natively, and answered on OIP when
/// its `outputs` leave the samples out.
#[tokio::test]
async fn statistics_are_chosen_refused_with_the_offer_and_counted_as_returned() {
    let dir = tempdir::TempDir::new();
    std::fs::write(dir.path().join("labels.onnx"), model(13, &[4], "Sigmoid", None)).unwrap();
    std::fs::write(dir.path().join("declared.onnx"), model(13, &[4], "Sigmoid", None)).unwrap();
    std::fs::write(
        dir.path().join("declared.model.json"),
        r#"{"output_kinds": {"y": {"kind": "other"}}}"#,
    )
    .unwrap();
    let mut args = ServeArgs::for_models(dir.path());
    // 2 rows × 300 samples × 4 elements = 2,400 sample values.
    args.max_returned_samples = 1000;
    let s = TestServer::start(args).await;
    let x = json!({"inputs": {"x": [[0.5, -1.0, 2.0, 0.0], [3.0, 0.1, -2.0, 1.0]]}});
    let native = |model: &str, query: &str| format!("/models/{model}/predict?mc_samples=300&seed=1{query}");

    let (st, a, _) = s.post(&native("labels", "&statistics=summary,std"), &x).await;
    assert_eq!(st, 200, "{a}");
    let mut keys: Vec<&String> = a["outputs"]["y"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["std", "summary"], "{a}");
    for (model, query, says) in [
        ("labels", "&statistics=entropy", "unknown statistic 'entropy'"),
        ("labels", "&statistics=", "names none"),
        ("labels", "&statistics=samples", "return_samples"),
        ("declared", "&statistics=mean,summary", "no output with summary"),
    ] {
        let (st, a, _) = s.post(&native(model, query), &x).await;
        assert_eq!(
            (st, a["error_type"].as_str()),
            (422, Some("invalid_parameter")),
            "{query}: {a}"
        );
        assert!(a["error"].as_str().unwrap().contains(says), "{query}: {a}");
    }
    let (st, a, _) = s.post("/models/labels/predict?statistics=mean", &x).await;
    assert_eq!((st, a["error_type"].as_str()), (422, Some("mode_mismatch")), "{a}");

    // OIP REST: the same choice as a request parameter; or through `outputs`, not both.
    let oip = |params: Value, outputs: Option<Vec<&str>>| {
        let mut body = json!({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                        "data": [0.5, -1.0, 2.0, 0.0, 3.0, 0.1, -2.0, 1.0]}],
            "parameters": params,
        });
        if let Some(names) = outputs {
            body["outputs"] = names.iter().map(|n| json!({"name": n})).collect();
        }
        body
    };
    let names = |a: &Value| -> Vec<String> {
        a["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mc = json!({"mc_samples": 300, "seed": 1});
    let (st, a, _) = s
        .post(
            "/v2/models/labels/infer",
            &oip(json!({"mc_samples": 300, "statistics": "mean,std"}), None),
        )
        .await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(names(&a), ["y", "y.std"]);
    let (st, a, _) = s
        .post(
            "/v2/models/labels/infer",
            &oip(json!({"mc_samples": 300, "statistics": "std"}), Some(vec!["y.std"])),
        )
        .await;
    assert_eq!((st, a["error_type"].as_str()), (422, Some("invalid_parameter")), "{a}");

    // The samples: refused where they would come back, answered where they would not.
    let (st, a, _) = s.post(&native("labels", "&return_samples=true"), &x).await;
    assert_eq!((st, a["error_type"].as_str()), (413, Some("payload_too_large")), "{a}");
    let mut with_samples = mc.clone();
    with_samples["return_samples"] = json!(true);
    let (st, a, _) = s
        .post("/v2/models/labels/infer", &oip(with_samples.clone(), None))
        .await;
    assert_eq!(st, 413, "{a}");
    let (st, a, _) = s
        .post(
            "/v2/models/labels/infer",
            &oip(with_samples, Some(vec!["y", "y.mutual_information"])),
        )
        .await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(names(&a), ["y", "y.mutual_information"]);
    s.stop().await;
}

/// `mcd-serve calibrate` refuses an output with per-position uncertainty (here a binary
/// mask, a Bernoulli map), with the reason, rather than claim a guarantee no method behind
/// it gives.
#[test]
fn calibrate_refuses_per_position_outputs_with_the_reason() {
    let dir = tempdir::TempDir::new();
    std::fs::write(dir.path().join("mask.onnx"), model(13, &[1, 2, 2], "Sigmoid", None)).unwrap();
    let lines: Vec<String> = (0..30)
        .map(|i| {
            json!({"inputs": {"x": [[[[0.1 * i as f64, -0.5], [1.0, 0.0]]]]}, "target": [[[[1, 0], [1, 0]]]]})
                .to_string()
        })
        .collect();
    let out = run_calibrate(dir.path(), "mask", &lines);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("per position") && err.contains("'y'"), "{err}");
    assert!(!dir.path().join("mask.calibration.json").exists());
}

/// Multi-label calibration on a generated set: the model is y_j = sigmoid(dropout(x_j))
/// (ratio 0.05),
/// with x_j ~ N(0, 5²) and labels 1[x_j + N(0, 0.5²) > 0]. `calibrate` fits LAC per label; the
/// server's sets on fresh rows then cover each label at each level (up to sampling error),
/// and a row is referred exactly when its mean predictive entropy over the labels is above
/// the calibration's threshold.
#[tokio::test]
async fn multi_label_sets_cover_each_label_and_refer_by_the_rows_entropy() {
    use rand::{Rng, SeedableRng};
    const LABELS: usize = 4;
    let (n_cal, n_test) = (1000usize, 1500usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut normal = move || {
        // Box–Muller.
        let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let mut draw = |rows: usize| -> Vec<(Vec<f64>, Vec<u8>)> {
        (0..rows)
            .map(|_| {
                let x: Vec<f64> = (0..LABELS).map(|_| 5.0 * normal()).collect();
                // Labels are wrong only near x = 0, so that rows far from it on every label
                // are right, and referral at 2 % can accept them.
                let y = x.iter().map(|&x| (x + 0.5 * normal() > 0.0) as u8).collect();
                (x, y)
            })
            .collect()
    };
    let (cal, test) = (draw(n_cal), draw(n_test));
    let dir = tempdir::TempDir::new();
    // A small ratio: at 0.5 on the logits themselves, half the samples are p = 0.5 and the
    // row's entropy would measure how many were dropped more than how far x is from 0.
    let onnx = model_with_ratio(13, &[LABELS as i64], "Sigmoid", None, 0.05);
    std::fs::write(dir.path().join("labels.onnx"), onnx).unwrap();
    let lines: Vec<String> = cal
        .iter()
        .map(|(x, y)| json!({"inputs": {"x": [x]}, "target": y}).to_string())
        .collect();
    let out = run_calibrate(dir.path(), "labels", &lines);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = read_json(&dir.path().join("labels.calibration.json"));
    let cal_file = &file["outputs"]["y"];
    assert_eq!(cal_file["kind"], "labels", "{cal_file}");
    assert_eq!(cal_file["labels"], LABELS);

    let s = TestServer::start(ServeArgs::for_models(dir.path())).await;
    let xs: Vec<&Vec<f64>> = test.iter().map(|(x, _)| x).collect();
    let (st, a, _) = s
        .post(
            "/models/labels/predict?mc_samples=30&seed=9",
            &json!({"inputs": {"x": xs}}),
        )
        .await;
    assert_eq!(st, 200, "{a}");
    let y = &a["outputs"]["y"];
    let threshold = y["refer_threshold"].as_f64();
    let pe = f64s(&y["predictive_entropy"]);
    let refer: Vec<bool> = y["refer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    for (r, referred) in refer.iter().enumerate() {
        let h = pe[r * LABELS..(r + 1) * LABELS].iter().sum::<f64>() / LABELS as f64;
        assert_eq!(
            *referred,
            threshold.is_none_or(|t| h > t),
            "row {r}: entropy {h}, threshold {threshold:?}"
        );
    }
    assert!(
        refer.iter().any(|r| !r) && refer.iter().any(|r| *r),
        "referral decides nothing: {threshold:?}"
    );
    for (level, sets) in y["prediction_sets"].as_object().unwrap() {
        let level: f64 = level.parse().unwrap();
        // Split conformal: coverage on fresh rows is at least the level in expectation, and
        // varies by the calibration draw (~1/n_cal) and the test draw (~1/n_test); 4 sd of
        // both is a bound a correct method fails with odds below 1e-4 per label and level.
        let tolerance = 4.0 * (level * (1.0 - level) * (1.0 / n_cal as f64 + 1.0 / n_test as f64)).sqrt();
        let mut undecided = 0usize;
        for j in 0..LABELS {
            let covered = test
                .iter()
                .enumerate()
                .filter(|(r, (_, truth))| {
                    let set: Vec<u64> = sets[*r][j]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap())
                        .collect();
                    undecided += (set.len() == 2) as usize;
                    set.contains(&(truth[j] as u64))
                })
                .count();
            let coverage = covered as f64 / n_test as f64;
            assert!(
                coverage >= level - tolerance,
                "label {j} at {level}: coverage {coverage} below {level} − {tolerance}"
            );
        }
        // Sets that always hold both values would cover trivially: at the lowest level most
        // labels are decided.
        if level <= 0.8 {
            assert!(undecided < n_test * LABELS / 2, "{undecided} undecided at {level}");
        }
    }
    s.stop().await;
}
