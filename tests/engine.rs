//! The model engine against closed forms and independent references (numpy, onnxruntime).

mod common;

use std::collections::HashMap;

use common::*;
use mcd_serve::engine::model::{Dim, InputRows, LoadedModel, McOutput, McSamples, ModelConfig, Outcome, to_f64};
use mcd_serve::engine::onnx_graph::SiteKind;
use mcd_serve::front::native::decode::parse_request;
use serde_json::{Value, json};

fn load(path: &std::path::Path) -> LoadedModel {
    load_model(path.file_stem().unwrap().to_str().unwrap(), path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn batch(model: &LoadedModel, inputs: Value) -> InputRows {
    let body = serde_json::to_vec(&json!({ "inputs": inputs })).unwrap();
    model.input_rows(parse_request(model, &body).unwrap()).unwrap()
}

fn eval(model: &LoadedModel, b: &InputRows) -> Vec<Vec<f64>> {
    model
        .eval_session()
        .run(b)
        .unwrap()
        .iter()
        .map(|o| to_f64(&o.tensor).unwrap())
        .collect()
}

fn mc(model: &LoadedModel, b: &InputRows, n: usize, seed: u64, keep: bool) -> Vec<McOutput> {
    model
        .mc_session()
        .unwrap()
        .run(b, McSamples::new(n).unwrap(), seed, keep)
        .unwrap()
}

fn check(model: &LoadedModel, name: &str) -> Outcome {
    model
        .checks
        .iter()
        .find(|c| c.check.as_str() == name)
        .unwrap_or_else(|| panic!("no check {name}"))
        .result
}

/// y = Dropout_p(x)·W. Mean and variance against their closed forms, with tolerances from
/// the sampling distribution of the estimators (5 standard errors, exact fourth moments).
#[test]
fn linear_dropout_matches_closed_forms() {
    let spec = read_json(&fixture("linear_dropout.json"));
    let model = load(&fixture("linear_dropout.onnx"));
    let p = spec["ratio_as_float32"].as_f64().unwrap();
    let w: Vec<Vec<f64>> = serde_json::from_value(spec["W"].clone()).unwrap();
    let want_var: Vec<Vec<f64>> = serde_json::from_value(spec["expected_var"].clone()).unwrap();
    assert_linear_closed_forms(&model, spec["x"].clone(), 0, &w, p, Some(&want_var));
}

/// Two sites with ratios 0.1 and 0.5 side by side: each output has the closed forms of its
/// own ratio. A sampler that drew every site at one ratio (say the first site's) gets the
/// mean and variance of the other site wrong by far more than 5 standard errors.
#[test]
fn each_dropout_site_drops_at_its_own_ratio() {
    let spec = read_json(&fixture("linear_dropout.json"));
    let model = load(&fixture("mixed_ratios.onnx"));
    assert_eq!(check(&model, "mc_live"), Outcome::Pass);
    let w: Vec<Vec<f64>> = serde_json::from_value(spec["W"].clone()).unwrap();
    let x = json!([[1.0, 2.0, -1.0, 0.5], [0.0, -3.0, 2.0, 4.0]]);
    for (output, name, p) in [(0, "low", 0.1f32), (1, "high", 0.5f32)] {
        assert_eq!(model.outputs[output].name, name);
        assert_linear_closed_forms(&model, x.clone(), output, &w, p as f64, None);
    }
}

/// y = x·Dropout_p(W) (DropConnect): the mask has no batch axis, so each sample must run
/// its own pass. Had samples shared a batched pass, they would share one weight mask, and
/// the load-time liveness check would see zero variance. Each element of y has the same
/// closed forms as y = Dropout_p(x)·W, since each term x_j·W_jk is dropped independently.
#[test]
fn dropconnect_masks_without_a_batch_axis_match_closed_forms() {
    let spec = read_json(&fixture("linear_dropout.json"));
    let model = load(&fixture("dropconnect.onnx"));
    assert_eq!(check(&model, "mc_live"), Outcome::Pass);
    let p = spec["ratio_as_float32"].as_f64().unwrap();
    let w: Vec<Vec<f64>> = serde_json::from_value(spec["W"].clone()).unwrap();
    assert_linear_closed_forms(
        &model,
        json!([[1.0, 2.0, -1.0, 0.5], [0.0, -3.0, 2.0, 4.0]]),
        0,
        &w,
        p,
        None,
    );
}

/// Runs 20,000 MC samples of a model whose output is sum_j x_j·W_jk with every term dropped
/// independently at ratio p, and checks mean, variance and std per element.
fn assert_linear_closed_forms(
    model: &LoadedModel,
    x: Value,
    output: usize,
    w: &[Vec<f64>],
    p: f64,
    fixture_var: Option<&[Vec<f64>]>,
) {
    let xs: Vec<Vec<f64>> = serde_json::from_value(x.clone()).unwrap();
    let s = 20_000usize;
    let out = &mc(model, &batch(model, x), s, 42, false)[output];
    assert_eq!(out.shape, vec![xs.len(), 3]);
    for (r, x) in xs.iter().enumerate() {
        for k in 0..3 {
            let a: Vec<f64> = (0..x.len()).map(|j| x[j] * w[j][k]).collect();
            let mean: f64 = a.iter().sum();
            let var: f64 = a.iter().map(|a| a * a * p / (1.0 - p)).sum();
            // Each term a_j(b_j - 1), b_j in {0, 1/(1-p)}: its 4th cumulant, summed.
            let kappa4: f64 = a
                .iter()
                .map(|a| {
                    let m4 = p * a.powi(4) + (1.0 - p) * (a * p / (1.0 - p)).powi(4);
                    m4 - 3.0 * (a * a * p / (1.0 - p)).powi(2)
                })
                .sum();
            let mu4 = kappa4 + 3.0 * var * var;
            let se_mean = (var / s as f64).sqrt();
            let se_var = ((mu4 - var * var) / s as f64).sqrt();
            let got_mean = out.stats.mean[r * 3 + k];
            let got_var = out.stats.variance[r * 3 + k];
            if let Some(fixture_var) = fixture_var {
                assert!(
                    (fixture_var[r][k] - var).abs() < 1e-6 * var.max(1.0),
                    "fixture closed form disagrees with ours"
                );
            }
            assert!(
                (got_mean - mean).abs() <= 5.0 * se_mean + 1e-12,
                "row {r} out {k}: mean {got_mean} vs {mean} (se {se_mean})"
            );
            assert!(
                (got_var - var).abs() <= 5.0 * se_var + 1e-12,
                "row {r} out {k}: var {got_var} vs {var} (se {se_var})"
            );
            assert!((out.stats.std[r * 3 + k] - got_var.sqrt()).abs() < 1e-12);
        }
    }
}

#[test]
fn same_seed_same_answer_on_any_thread_and_other_seeds_differ() {
    let model = std::sync::Arc::new(load(&models_dir().join("breast_cancer.onnx")));
    let refs = read_json(&fixture("reference_outputs.json"));
    let inputs = refs["breast_cancer"]["inputs"].clone();
    let b = batch(&model, inputs.clone());
    let first = mc(&model, &b, 50, 7, true);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let model = model.clone();
            let inputs = inputs.clone();
            std::thread::spawn(move || {
                let b = batch(&model, inputs);
                (0..5)
                    .map(|_| mc(&model, &b, 50, 7, true)[0].stats.samples.clone().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for samples in t.join().unwrap() {
            assert_eq!(samples, *first[0].stats.samples.as_ref().unwrap());
        }
    }
    let other = mc(&model, &b, 50, 8, true);
    assert_ne!(other[0].stats.samples, first[0].stats.samples);
}

/// The seed is a u64: every bit of it counts. Seeds that share their low (or high) 32 bits
/// draw different masks.
#[test]
fn seeds_above_2_pow_32_differ_from_their_low_32_bits() {
    let model = load(&models_dir().join("breast_cancer.onnx"));
    let inputs = read_json(&fixture("reference_outputs.json"))["breast_cancer"]["inputs"].clone();
    let b = batch(&model, inputs);
    let samples = |seed: u64| mc(&model, &b, 20, seed, true)[0].stats.samples.clone().unwrap();
    for low in [0u64, 7, 0xdead_beef] {
        let base = samples(low);
        for high in [1u64 << 32, 5 << 32, 1 << 63, 0xffff_ffff_0000_0000] {
            assert_ne!(
                samples(low | high),
                base,
                "seed {:#x} answers like {low:#x}",
                low | high
            );
        }
    }
}

#[test]
fn bundled_models_eval_matches_onnxruntime_and_is_deterministic_and_row_independent() {
    let refs = read_json(&fixture("reference_outputs.json"));
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let model = load(&models_dir().join(format!("{name}.onnx")));
        for c in &model.checks {
            assert_ne!(c.result, Outcome::Fail, "{name}: {c:?}");
        }
        assert_eq!(check(&model, "mc_live"), Outcome::Pass, "{name}");
        let r = &refs[name];
        let b = batch(&model, r["inputs"].clone());
        let got = eval(&model, &b);
        let want = f64s(&r["outputs"]);
        assert_eq!(got[0].len(), want.len());
        for (g, w) in got[0].iter().zip(&want) {
            // float32 arithmetic in two runtimes: a few ulps of the magnitude.
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{name}: {g} vs onnxruntime {w}"
            );
        }
        assert_eq!(got, eval(&model, &b), "{name}: eval is not bit-identical across calls");
        // Each row alone gives its row of the batch answer.
        let rows = r["inputs"].as_array().unwrap();
        let per_row = got[0].len() / rows.len();
        for (i, row) in rows.iter().enumerate() {
            let alone = eval(&model, &batch(&model, json!([row])));
            for (a, g) in alone[0].iter().zip(&got[0][i * per_row..(i + 1) * per_row]) {
                assert!(
                    (a - g).abs() <= 1e-6 * g.abs().max(1.0),
                    "{name} row {i}: {a} alone vs {g} in batch"
                );
            }
        }
    }
}

#[test]
fn bundled_models_have_accuracy_their_config_reports() {
    // The reference rows' labels: eval argmax should mostly agree (the held-out accuracy is
    // in the model config; 8 rows is a smoke check that labels and classes line up).
    let refs = read_json(&fixture("reference_outputs.json"));
    for name in ["breast_cancer", "digits_cnn"] {
        let model = load(&models_dir().join(format!("{name}.onnx")));
        let r = &refs[name];
        let got = eval(&model, &batch(&model, r["inputs"].clone()));
        let labels = f64s(&r["labels"]);
        let k = got[0].len() / labels.len();
        let correct = labels
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                let row = &got[0][i * k..(i + 1) * k];
                let argmax = (0..k).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                argmax as f64 == **l
            })
            .count();
        assert!(correct >= 7, "{name}: only {correct}/8 reference rows classified right");
    }
}

#[test]
fn mc_statistics_are_consistent_on_a_real_classifier() {
    let model = load(&models_dir().join("digits_cnn.onnx"));
    let refs = read_json(&fixture("reference_outputs.json"));
    let b = batch(&model, refs["digits_cnn"]["inputs"].clone());
    let out = &mc(&model, &b, 100, 3, true)[0];
    let e = out.stats.entropy.as_ref().expect("softmax output gets entropies");
    let ln_k = 10f64.ln();
    for r in 0..8 {
        assert!((0.0..=ln_k).contains(&e.predictive_entropy[r]));
        assert!((0.0..=ln_k).contains(&e.expected_entropy[r]));
        assert!(e.mutual_information[r] >= 0.0);
        let row_mean: f64 = out.stats.mean[r * 10..(r + 1) * 10].iter().sum();
        assert!((row_mean - 1.0).abs() < 1e-5, "MC mean of a softmax sums to 1");
    }
    // The statistics are those of the returned samples.
    let samples = out.stats.samples.as_ref().unwrap();
    assert_eq!(samples.len(), 100 * 80);
    let j = 13;
    let m: f64 = (0..100).map(|s| samples[s * 80 + j]).sum::<f64>() / 100.0;
    let v: f64 = (0..100).map(|s| (samples[s * 80 + j] - m).powi(2)).sum::<f64>() / 99.0;
    assert!((out.stats.mean[j] - m).abs() < 1e-12 && (out.stats.variance[j] - v).abs() < 1e-12);
}

#[test]
fn fixtures_eval_matches_onnxruntime_on_their_eval_copies() {
    let refs = read_json(&fixture("fixture_eval_outputs.json"));
    for (file, r) in refs.as_object().unwrap() {
        let path = fixture(file);
        let model = match load_model("f", &path) {
            Ok(m) => m,
            Err(e) => {
                assert!(file == "dropout_in_subgraph.onnx", "{file} refused: {e}");
                continue;
            }
        };
        let inputs: serde_json::Map<String, Value> = r["inputs"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| model.inputs.iter().any(|s| &s.name == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let b = batch(&model, Value::Object(inputs));
        let got = model.eval_session().run(&b).unwrap();
        for o in got {
            let want = f64s(&r["outputs"][&o.name]);
            let g = to_f64(&o.tensor).unwrap();
            assert_eq!(g.len(), want.len(), "{file}/{}", o.name);
            for (g, w) in g.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{file}/{}: {g} vs {w}",
                    o.name
                );
            }
        }
    }
}

#[test]
fn batchnorm_exported_in_training_mode_is_served_with_running_statistics() {
    let spec = read_json(&fixture("bn_training_mode.json"));
    let model = load(&fixture("bn_training_mode.onnx"));
    assert!(
        model.fixes.iter().any(|f| f.contains("running statistics")),
        "{:?}",
        model.fixes
    );
    assert_eq!(check(&model, "eval_row_independent"), Outcome::Pass);
    let got = &eval(&model, &batch(&model, spec["x"].clone()))[0];
    let running = f64s(&spec["expected_eval_output"]);
    let batch_stats = f64s(&spec["batch_stats_output"]);
    let max_diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(max_diff(got, &running) < 1e-5, "not the running-statistics answer");
    assert!(max_diff(got, &batch_stats) > 0.1, "looks like batch statistics");

    let err = load_model("bn", &fixture("bn_training_extra_output_used.onnx"))
        .err()
        .expect("must be refused");
    assert!(
        err.contains("BatchNormalization") && err.contains("bn_running_mean_out"),
        "{err}"
    );
}

#[test]
fn dropout_inside_a_subgraph_is_refused_with_the_node_name() {
    let err = load_model("s", &fixture("dropout_in_subgraph.onnx"))
        .err()
        .expect("must be refused");
    assert!(err.contains("Dropout node") && err.contains("If node"), "{err}");
}

#[test]
fn a_used_mask_output_is_all_true_in_eval_and_the_real_mask_in_mc() {
    let model = load(&fixture("dropout_mask_used.onnx"));
    let x: Vec<f64> = (0..16).map(|i| i as f64 - 7.5).collect();
    let b = batch(&model, json!([x]));
    let out = eval(&model, &b);
    assert_eq!(out[0], x);
    assert!(out[1].iter().all(|&m| m == 1.0));
    let outs = mc(&model, &b, 200, 5, true);
    let ys = outs[0].stats.samples.as_ref().unwrap();
    let masks = outs[1].stats.samples.as_ref().unwrap();
    let mut dropped = 0;
    for (i, (y, m)) in ys.iter().zip(masks).enumerate() {
        let xi = x[i % 16];
        if *m == 1.0 {
            assert!((y - 2.0 * xi).abs() < 1e-6, "kept value not scaled by 1/(1-0.5)");
        } else {
            assert_eq!(*m, 0.0);
            assert_eq!(*y, 0.0);
            dropped += 1;
        }
    }
    let n = 200.0 * 16.0;
    let sd = (n * 0.25f64).sqrt();
    assert!((dropped as f64 - n * 0.5).abs() < 5.0 * sd, "dropped {dropped} of {n}");
}

#[test]
fn a_ratio_given_as_graph_input_refuses_mc_unless_the_config_fixes_it() {
    let path = fixture("dropout_ratio_input.onnx");
    let model = load(&path);
    assert_eq!(
        model.inputs.len(),
        1,
        "the ratio input is no part of the served interface"
    );
    let reason = model.mc_unavailable_reason().expect("MC must be refused");
    assert!(
        reason.contains("graph input 'ratio'") && reason.contains("dropout_ratios"),
        "{reason}"
    );
    let x = vec![1.0f64; 8];
    assert_eq!(eval(&model, &batch(&model, json!([x])))[0], x);

    let config = ModelConfig {
        dropout_ratios: HashMap::from([("ratio".to_string(), 0.25)]),
        ..Default::default()
    };
    let model = load_with("r", &path, config).unwrap();
    assert!(model.mc_unavailable_reason().is_none());
    let out = &mc(&model, &batch(&model, json!([x])), 400, 1, true)[0];
    let samples = out.stats.samples.as_ref().unwrap();
    let dropped = samples.iter().filter(|&&v| v == 0.0).count() as f64;
    let n = samples.len() as f64;
    assert!(samples.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    assert!((dropped - 0.25 * n).abs() < 5.0 * (n * 0.25 * 0.75).sqrt());
}

/// Issue 25 F9: a model config that says something the server would not do fails that
/// model's load with the reason: an unknown key (here a misspelt `dropout_ratios`), or
/// `dropout_ratios` naming something that gives no Dropout node its ratio.
#[test]
fn a_model_config_with_an_unknown_key_or_a_wrong_ratio_input_fails_the_load() {
    let dir = model_folder(&[fixture("dropout_ratio_input.onnx")]);
    let model = dir.path().join("dropout_ratio_input.onnx");
    let config = dir.path().join("dropout_ratio_input.model.json");
    std::fs::write(&config, r#"{"dropout_ratio": {"ratio": 0.25}}"#).unwrap();
    let e = load_model("m", &model).err().expect("an unknown key fails the load");
    assert!(e.contains("unknown field `dropout_ratio`"), "{e}");
    std::fs::write(&config, r#"{"dropout_ratios": {"x": 0.25}}"#).unwrap();
    let e = load_model("m", &model)
        .err()
        .expect("a ratio for no ratio input fails the load");
    assert!(e.contains("dropout_ratios names 'x'") && e.contains("\"ratio\""), "{e}");
    // The right name loads, as do the bundled configs' notes (`metrics`, `training`).
    std::fs::write(
        &config,
        r#"{"dropout_ratios": {"ratio": 0.25}, "training": {"epochs": 3}}"#,
    )
    .unwrap();
    assert!(load_model("m", &model).unwrap().mc_unavailable_reason().is_none());
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        load_model(name, &models_dir().join(format!("{name}.onnx"))).unwrap();
    }
}

/// Probe finding h: a variance above zero is not evidence that dropout moves a model.
/// `dead_dropout` adds 1e-6·Dropout(x) to 1: its MC variance is rounding (a few float32
/// ulps), and a saturated softmax hid the same in breast_cancer (variance 1.1e-39). The
/// check measures the logits' spread against their scale.
#[test]
fn mc_live_asks_for_a_spread_far_above_float_rounding() {
    let m = load(&fixture("dead_dropout.onnx"));
    assert_eq!(check(&m, "mc_live"), Outcome::Fail);
    let reason = m.mc_unavailable_reason().unwrap();
    assert!(reason.contains("float rounding"), "{reason}");
    assert!(m.healthy(), "eval stays available");
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let m = load(&models_dir().join(format!("{name}.onnx")));
        let live = m.checks.iter().find(|c| c.check.as_str() == "mc_live").unwrap();
        assert_eq!(live.result, Outcome::Pass, "{name}: {}", live.detail);
        let spread: f64 = live
            .detail
            .split(" by ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            spread > 1e-2,
            "{name}: dropout moves the logits by only {spread:e} of their scale"
        );
    }
}

#[test]
fn degenerate_or_absent_dropout_refuses_mc_with_the_reason() {
    let m = load(&fixture("no_dropout.onnx"));
    assert!(m.mc_unavailable_reason().unwrap().contains("no Dropout"));
    assert!(m.mc_session().is_err());
    assert_eq!(check(&m, "mc_live"), Outcome::Skipped);
    let m = load(&fixture("zero_ratio.onnx"));
    assert!(
        m.mc_unavailable_reason().unwrap().contains("ratio 0"),
        "{:?}",
        m.mc_unavailable_reason()
    );
    assert!(m.healthy(), "eval stays available");
}

#[test]
fn a_batch_dependent_model_fails_its_row_independence_check() {
    let m = load(&fixture("batch_dependent.onnx"));
    assert_eq!(check(&m, "eval_row_independent"), Outcome::Fail);
    assert!(!m.healthy());
}

#[test]
fn fixed_batch_models_run_mc_in_chunks() {
    let m = load(&fixture("fixed_batch.onnx"));
    assert!(m.batch_symbol.is_none());
    let b = batch(&m, json!([[0.5, -1.0, 2.0, 0.0, 1.0]]));
    let a = mc(&m, &b, 30, 9, true);
    assert_eq!(a[0].shape, vec![1, 3]);
    assert_eq!(a[0].stats.count, 30);
    assert!(a[0].stats.variance.iter().any(|&v| v > 0.0));
    assert_eq!(a[0].stats.samples, mc(&m, &b, 30, 9, true)[0].stats.samples);
}

#[test]
fn integer_inputs_and_several_inputs_and_outputs() {
    let m = load(&fixture("int_input.onnx"));
    assert_eq!(m.inputs[0].dtype, "int64");
    let out = eval(&m, &batch(&m, json!([[1, 0, 2, 3], [0, 0, 0, 1]])));
    assert_eq!(out[0].len(), 6);
    let body = serde_json::to_vec(&json!({"inputs": [[1.5, 0, 2, 3]]})).unwrap();
    let err = parse_request(&m, &body).err().unwrap();
    assert_eq!(err.error_type(), "invalid_value");

    let m = load(&fixture("two_inputs.onnx"));
    let b = batch(&m, json!({"a": [[1.0, 2.0, 3.0]], "b": [[0.5, -0.5]]}));
    let outs = mc(&m, &b, 64, 2, false);
    assert_eq!(outs.len(), 2);
    assert!(outs[0].stats.entropy.is_none());
    assert!(outs[1].stats.entropy.is_some(), "z is a softmax output");
}

#[test]
fn every_model_reproduces_eval_with_keep_all_masks() {
    // The p = 0 limit: masks of ones make the MC graph compute exactly the eval answer.
    for path in ["breast_cancer", "diabetes", "digits_cnn"].map(|n| models_dir().join(format!("{n}.onnx"))) {
        assert_eq!(
            check(&load(&path), "mc_matches_eval"),
            Outcome::Pass,
            "{}",
            path.display()
        );
    }
}

mod properties {
    use super::*;
    use mcd_serve::engine::masks::MaskSampler;
    use proptest::prelude::*;
    use tract_onnx::prelude::DatumType;

    fn model() -> &'static LoadedModel {
        static MODEL: std::sync::OnceLock<LoadedModel> = std::sync::OnceLock::new();
        MODEL.get_or_init(|| load(&models_dir().join("breast_cancer.onnx")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any rows, any seed: the same seed gives the same output; variance >= 0; entropies
        /// in [0, ln 2]; mutual information >= 0; std = sqrt(variance).
        #[test]
        fn mc_on_random_rows(rows in proptest::collection::vec(proptest::collection::vec(-50.0f64..1000.0, 30), 1..4), seed in any::<u64>(), n in 2usize..40) {
            let m = model();
            let b = batch(m, json!(rows));
            let a = mc(m, &b, n, seed, true);
            let again = mc(m, &b, n, seed, true);
            prop_assert_eq!(&a[0].stats.samples, &again[0].stats.samples);
            prop_assert_eq!(&a[0].stats.mean, &again[0].stats.mean);
            let s = &a[0].stats;
            prop_assert!(s.variance.iter().all(|&v| v >= 0.0));
            prop_assert!(s.variance.iter().zip(&s.std).all(|(v, sd)| (v.sqrt() - sd).abs() < 1e-15));
            let e = s.entropy.as_ref().unwrap();
            for r in 0..rows.len() {
                prop_assert!((0.0..=2f64.ln()).contains(&e.predictive_entropy[r]));
                prop_assert!((0.0..=2f64.ln()).contains(&e.expected_entropy[r]));
                prop_assert!(e.mutual_information[r] >= 0.0);
            }
        }

        /// p = 0 keeps every unit at scale 1, which the `mc_matches_eval` self-check shows
        /// reproduces eval exactly; p > 0 gives only 0 or 1/(1-p); a seed fixes the mask.
        #[test]
        fn masks(seed in any::<u64>(), p in 0.0f32..0.95, len in 1usize..2000) {
            let ones = MaskSampler::new(seed).sample(0.0, &[len], DatumType::F32).unwrap();
            prop_assert!(to_f64(&ones).unwrap().iter().all(|&v| v == 1.0));
            let m = to_f64(&MaskSampler::new(seed).sample(p, &[len], DatumType::F32).unwrap()).unwrap();
            let scale = (1.0 / (1.0 - p as f64)) as f32 as f64;
            prop_assert!(m.iter().all(|&v| v == 0.0 || v == scale));
            let again = to_f64(&MaskSampler::new(seed).sample(p, &[len], DatumType::F32).unwrap()).unwrap();
            prop_assert_eq!(m, again);
        }
    }
}

/// Each batch size runs a plan specialised to it, cached for recent sizes. An answer must
/// not depend on the cache: evicting and rebuilding a size's plan gives the same bits.
#[test]
fn answers_do_not_depend_on_the_plan_cache() {
    let model = load(&models_dir().join("breast_cancer.onnx"));
    let rows = read_json(&fixture("reference_outputs.json"))["breast_cancer"]["inputs"].clone();
    let one = batch(&model, json!([rows[0]]));
    let first_eval = eval(&model, &one);
    let first_mc = mc(&model, &one, 7, 123, true)[0].stats.samples.clone();
    for n in 2..=40 {
        let many: Vec<Value> = (0..n).map(|i| rows[i % 8].clone()).collect();
        eval(&model, &batch(&model, json!(many)));
        mc(&model, &one, n, 1, false);
    }
    assert_eq!(eval(&model, &one), first_eval);
    assert_eq!(mc(&model, &one, 7, 123, true)[0].stats.samples, first_mc);
}

fn mc_in_passes(model: &LoadedModel, b: &InputRows, n: usize, seed: u64, per_pass: usize) -> Vec<McOutput> {
    model
        .mc_session()
        .unwrap()
        .run_in_passes(b, McSamples::new(n).unwrap(), seed, true, per_pass)
        .unwrap()
}

/// The shared trunk (the part upstream of every mask) runs once per row and is tiled per
/// sample, and sample s reads its masks from its own stretch of the seed's stream. So one batched
/// pass, passes of 7 and one pass per sample (whose trunk runs every time) must see the same
/// masks and give the same samples, up to float32 summation order; and the samples of
/// `mc_samples=8` are the first 8 of `mc_samples=20`.
#[test]
fn shared_trunk_batched_and_sequential_passes_give_the_same_samples() {
    if tract_only("shared_trunk_batched_and_sequential_passes_give_the_same_samples") {
        return;
    }
    let refs = read_json(&fixture("reference_outputs.json"));
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let model = load(&models_dir().join(format!("{name}.onnx")));
        assert_eq!(check(&model, "mc_shared_trunk"), Outcome::Pass, "{name}");
        let rows: Vec<Value> = refs[name]["inputs"].as_array().unwrap()[..3].to_vec();
        let b = batch(&model, json!(rows));
        let batched = mc_in_passes(&model, &b, 20, 99, 20);
        for per_pass in [1, 7] {
            let other = mc_in_passes(&model, &b, 20, 99, per_pass);
            for (x, y) in batched.iter().zip(&other) {
                let (xs, ys) = (x.stats.samples.as_ref().unwrap(), y.stats.samples.as_ref().unwrap());
                assert_eq!(xs.len(), ys.len());
                let scale = xs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (j, (a, c)) in xs.iter().zip(ys).enumerate() {
                    assert!(
                        (a - c).abs() <= 1e-5 * scale,
                        "{name}, {per_pass} per pass, element {j}: {a} vs {c}"
                    );
                }
            }
        }
        // The samples really differ from one another, so equal samples above are not trivial.
        let s = batched[0].stats.samples.as_ref().unwrap();
        let per_sample = s.len() / 20;
        assert_ne!(s[..per_sample], s[per_sample..2 * per_sample], "{name}");
        let fewer = mc_in_passes(&model, &b, 8, 99, 8);
        let scale = s.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (j, (a, c)) in fewer[0].stats.samples.as_ref().unwrap().iter().zip(s).enumerate() {
            assert!(
                (a - c).abs() <= 1e-5 * scale,
                "{name}, 8 of 20 samples, element {j}: {a} vs {c}"
            );
        }
    }
}

/// Where there is no trunk (the first dropout reads the input) or no batch axis, MC runs
/// the full graph and the report says why.
#[test]
fn shared_trunk_is_skipped_with_a_reason_when_it_does_not_apply() {
    if tract_only("shared_trunk_is_skipped_with_a_reason_when_it_does_not_apply") {
        return;
    }
    for (file, why) in [
        ("linear_dropout.onnx", "no trunk to share"),
        ("fixed_batch.onnx", "fixes the batch size"),
    ] {
        let model = load(&fixture(file));
        let c = model
            .checks
            .iter()
            .find(|c| c.check.as_str() == "mc_shared_trunk")
            .unwrap();
        assert_eq!(c.result, Outcome::Skipped, "{file}");
        assert!(c.detail.contains(why), "{file}: {}", c.detail);
        assert_eq!(check(&model, "mc_live"), Outcome::Pass, "{file}");
    }
}

/// The MC graph stops at the logits of a final Softmax and the server applies it in f64:
/// every sample row is then a distribution to f64 precision, and keep-all masks reproduce
/// eval (tract's float32 Softmax) to float32 precision.
#[test]
fn mc_softmax_outputs_are_distributions_in_f64() {
    let refs = read_json(&fixture("reference_outputs.json"));
    for (name, classes) in [("breast_cancer", 2), ("digits_cnn", 10)] {
        let model = load(&models_dir().join(format!("{name}.onnx")));
        assert_eq!(check(&model, "mc_matches_eval"), Outcome::Pass, "{name}");
        let b = batch(&model, refs[name]["inputs"].clone());
        let out = &mc(&model, &b, 30, 5, true)[0];
        for row in out.stats.samples.as_ref().unwrap().chunks(classes) {
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-12, "{name}: row sums to {sum}");
            assert!(row.iter().all(|p| (0.0..=1.0).contains(p)), "{name}: {row:?}");
        }
    }
}

/// PyTorch's Dropout1d as its exporter writes it (random ops, no Dropout node), followed by
/// a linear map: y_k = Σ_c m_c·S_ck with one mask value m_c per (row, channel). Mean and
/// variance against their closed forms (5 standard errors, exact fourth moments); every
/// sample is one of the 2^C channel patterns; and the variance that element-wise masks
/// would give lies far outside the bound, so the test tells the two apart.
#[test]
fn channel_dropout_written_as_random_ops_matches_closed_forms() {
    let spec = read_json(&fixture("channel_dropout.json"));
    let model = load(&fixture("channel_dropout.onnx"));
    assert_eq!(model.sites.len(), 1);
    let site = &model.sites[0];
    assert_eq!(site.kind, SiteKind::Channel);
    assert_eq!(site.node, "mul");
    assert_eq!(
        site.mask_shape,
        Some(vec![Dim::Symbol("batch".into()), Dim::Fixed(4), Dim::Fixed(1)])
    );
    assert_eq!(site.keep_probability, Some(0.6));
    for c in [
        "eval_deterministic",
        "eval_row_independent",
        "mc_matches_eval",
        "mc_live",
    ] {
        assert_eq!(check(&model, c), Outcome::Pass, "{c}");
    }
    let q = spec["keep_as_float32"].as_f64().unwrap();
    let sums: Vec<Vec<Vec<f64>>> = serde_json::from_value(spec["channel_sums"].clone()).unwrap();
    let element_var: Vec<Vec<f64>> = serde_json::from_value(spec["elementwise_var"].clone()).unwrap();
    let b = batch(&model, spec["x"].clone());
    let want_eval: Vec<Vec<f64>> = serde_json::from_value(spec["expected_mean"].clone()).unwrap();
    for (g, w) in eval(&model, &b)[0].iter().zip(want_eval.iter().flatten()) {
        assert!((g - w).abs() < 1e-5, "eval {g} vs {w}");
    }

    let s = 20_000usize;
    let out = &mc(&model, &b, s, 42, true)[0];
    let (rows, classes) = (sums.len(), 2);
    let mut told_apart = 0;
    for (r, row) in sums.iter().enumerate() {
        for k in 0..classes {
            let a: Vec<f64> = row.iter().map(|c| c[k]).collect();
            let mean: f64 = a.iter().sum();
            let var: f64 = a.iter().map(|a| a * a * (1.0 - q) / q).sum();
            // Each term a_c(m_c - 1), m_c in {0, 1/q}: its 4th cumulant, summed.
            let kappa4: f64 = a
                .iter()
                .map(|a| {
                    let m4 = (1.0 - q) * a.powi(4) + q * (a * (1.0 - q) / q).powi(4);
                    m4 - 3.0 * (a * a * (1.0 - q) / q).powi(2)
                })
                .sum();
            let mu4 = kappa4 + 3.0 * var * var;
            let (se_mean, se_var) = ((var / s as f64).sqrt(), ((mu4 - var * var) / s as f64).sqrt());
            let (got_mean, got_var) = (out.stats.mean[r * classes + k], out.stats.variance[r * classes + k]);
            assert!(
                (got_mean - mean).abs() <= 5.0 * se_mean,
                "row {r} out {k}: mean {got_mean} vs {mean}"
            );
            assert!(
                (got_var - var).abs() <= 5.0 * se_var,
                "row {r} out {k}: var {got_var} vs {var}"
            );
            let fixture_var: f64 = spec["expected_var"][r][k].as_f64().unwrap();
            assert!((fixture_var - var).abs() < 1e-9 * var.max(1.0));
            println!(
                "row {r} out {k}: var {got_var:.4} (closed form {var:.4}, se {se_var:.4}); element-wise masks: {:.4}",
                element_var[r][k]
            );
            if (element_var[r][k] - var).abs() > 10.0 * se_var {
                told_apart += 1;
            }
        }
    }
    assert!(
        told_apart >= 3,
        "element-wise masks would pass the bounds on most outputs"
    );
    // Every sample of every row is Σ_c m_c·S_c for one of the 2^C channel masks.
    let samples = out.stats.samples.as_ref().unwrap();
    for (i, y) in samples.chunks(classes).enumerate() {
        let row = &sums[i % rows];
        let closest = (0..1u32 << row.len())
            .map(|mask| {
                (0..classes)
                    .map(|k| {
                        let want: f64 = (0..row.len())
                            .filter(|c| mask & (1 << c) != 0)
                            .map(|c| row[c][k] / q)
                            .sum();
                        (want - y[k]).abs()
                    })
                    .fold(0.0, f64::max)
            })
            .fold(f64::INFINITY, f64::min);
        assert!(closest < 1e-4, "sample row {i}: {y:?} is no channel-dropout sample");
    }
}

/// PyTorch's AlphaDropout(0.2) as its exporter writes it: a kept unit becomes a·x + α·a·p,
/// a dropped one -α·a·(1-p). Eval is the identity (as PyTorch's); per element, mean
/// a(1-p)·x and variance p(1-p)·a²(x+α)² (5 standard errors, exact fourth moments of the
/// two-point law); and on a row with mean 0 and mean square 1 (the SELU fixed point) each
/// sample keeps mean 0 and mean square 1 in expectation: what alpha dropout exists for.
#[test]
fn alpha_dropout_written_as_random_ops_keeps_mean_and_variance() {
    let spec = read_json(&fixture("alpha_dropout.json"));
    let model = load(&fixture("alpha_dropout.onnx"));
    assert_eq!(model.sites.len(), 1);
    let site = &model.sites[0];
    assert_eq!(site.kind, SiteKind::Alpha);
    assert_eq!(site.keep_probability, Some(0.8));
    let (p, alpha, a) = ["p", "saturation", "a"].map(|k| spec[k].as_f64().unwrap()).into();
    let correction = site.alpha_correction.as_ref().unwrap();
    assert!((correction.saturation - alpha).abs() < 1e-6 * alpha, "{correction:?}");
    assert!((correction.scale - a).abs() < 1e-6 * a, "{correction:?}");
    for c in [
        "eval_deterministic",
        "eval_row_independent",
        "mc_matches_eval",
        "mc_live",
    ] {
        assert_eq!(check(&model, c), Outcome::Pass, "{c}");
    }
    let q = 1.0 - p;
    let xs: Vec<Vec<f64>> = serde_json::from_value(spec["x"].clone()).unwrap();
    let b = batch(&model, spec["x"].clone());
    assert_eq!(eval(&model, &b)[0], xs.concat(), "eval is the identity");

    let s = 20_000usize;
    let out = &mc(&model, &b, s, 7, true)[0];
    let d = xs[0].len();
    let dropped = -alpha * a * q;
    for (i, &x) in xs.concat().iter().enumerate() {
        let (mean, var) = (a * q * x, p * q * (a * (x + alpha)).powi(2));
        let mu4 = p * q * (p.powi(3) + q.powi(3)) * (a * (x + alpha)).powi(4);
        let (se_mean, se_var) = ((var / s as f64).sqrt(), ((mu4 - var * var) / s as f64).sqrt());
        let (got_mean, got_var) = (out.stats.mean[i], out.stats.variance[i]);
        assert!(
            (got_mean - mean).abs() <= 5.0 * se_mean,
            "element {i}: mean {got_mean} vs {mean}"
        );
        assert!(
            (got_var - var).abs() <= 5.0 * se_var,
            "element {i}: var {got_var} vs {var}"
        );
    }
    // Row 0 (x = ±1): each sample's mean and mean square over the row.
    let samples = out.stats.samples.as_ref().unwrap();
    let kept: Vec<f64> = xs[0].iter().map(|x| a * x + alpha * a * p).collect();
    let (mut means, mut squares) = (vec![], vec![]);
    for sample in samples.chunks(2 * d) {
        let row = &sample[..d];
        for (y, k) in row.iter().zip(&kept) {
            assert!(
                (y - k).abs() < 1e-5 || (y - dropped).abs() < 1e-5,
                "{y} is neither kept ({k}) nor dropped ({dropped})"
            );
        }
        means.push(row.iter().sum::<f64>() / d as f64);
        squares.push(row.iter().map(|y| y * y).sum::<f64>() / d as f64);
    }
    // The exact variances of a sample's row mean and row mean square (independent units).
    let var_mean: f64 = xs[0].iter().map(|x| p * q * (a * (x + alpha)).powi(2)).sum::<f64>() / (d * d) as f64;
    let var_square: f64 = kept
        .iter()
        .map(|k| p * q * (k * k - dropped * dropped).powi(2))
        .sum::<f64>()
        / (d * d) as f64;
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (m, v) = (avg(&means), avg(&squares));
    assert!(
        m.abs() <= 5.0 * (var_mean / s as f64).sqrt(),
        "row mean {m}, expected 0"
    );
    assert!(
        (v - 1.0).abs() <= 5.0 * (var_square / s as f64).sqrt(),
        "row mean square {v}, expected 1"
    );
}

/// y = x + 0.1·RandomNormalLike(x) is no dropout. tract alone builds and runs it, and its
/// answers change from run to run; the server's graph surgery refuses it, naming the node,
/// so it is served in neither mode, while the rest of its folder serves.
#[test]
fn an_unrecognised_random_op_is_refused_at_load_and_never_served() {
    use tract_onnx::prelude::*;
    let path = fixture("random_normal_like.onnx");
    let plain = tract_onnx::onnx()
        .model_for_path(&path)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("tract 0.23.9 builds this RandomNormalLike (it picks the op by the node's name)");
    let x = Tensor::from_shape(&[2, 4], &[1f32; 8]).unwrap();
    let run = || to_f64(&plain.run(tvec![x.clone().into()]).unwrap()[0]).unwrap();
    assert_ne!(run(), run(), "tract runs the random op");
    let proto = tract_onnx::onnx().proto_model_for_path(&path).unwrap();
    match mcd_serve::engine::onnx_graph::analyse(&proto, &HashMap::new()) {
        Ok(_) => panic!("graph surgery accepted a random op"),
        Err(e) => assert!(
            format!("{e:#}").contains("RandomNormalLike node 'noise_RandomNormalLike'"),
            "{e:#}"
        ),
    }
    let err = load_model("noise", &path).err().expect("refused at load");
    assert!(err.contains("RandomNormalLike node 'noise_RandomNormalLike'"), "{err}");
    let dir = model_folder(&[path, fixture("linear_dropout.onnx")]);
    let repo = load_dir(dir.path(), None).unwrap();
    assert!(!repo.models.contains_key("random_normal_like"));
    assert!(repo.models.contains_key("linear_dropout"));
    assert_eq!(repo.failures.len(), 1);
    assert!(repo.failures[0].reason.contains("noise_RandomNormalLike"));
}

/// Passes sized by the memory budget change nothing in an answer: MC samples split into
/// passes give the bits of one pass on every bundled model (sample s reads its own stretch
/// of the seed's stream, and the trunk runs on the same rows), and so do eval rows split
/// into passes on the MLPs. digits_cnn's eval rows move by a few float32 ulps.
#[test]
fn passes_sized_by_the_memory_budget_give_the_bits_of_one_pass() {
    let refs = read_json(&fixture("reference_outputs.json"));
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let model = load(&models_dir().join(format!("{name}.onnx")));
        let rows: Vec<Value> = (0..40).map(|i| refs[name]["inputs"][i % 8].clone()).collect();
        let b = batch(&model, json!(rows));
        let one_eval = eval(&model, &b);
        let one_mc = mc_in_passes(&model, &b, 30, 5, 30);
        // A budget that holds 7 rows of eval, then one that holds 4 samples of MC.
        model.set_pass_budget(model.eval_pass_bytes(7));
        assert_eq!(model.eval_split(40, model.row_granularity(&b)), 7, "{name}");
        let split_eval = eval(&model, &b);
        let bits = |v: &Vec<Vec<f64>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&split_eval), bits(&one_eval), "{name}: eval in passes of 7");
        model.set_pass_budget(model.mc_pass_bytes(40, 4));
        let per_pass = model.mc_split(40, b.tensors().iter().map(|t| t.len()).sum(), model.row_granularity(&b));
        assert_eq!(per_pass, 4, "{name}");
        let split = model
            .mc_session()
            .unwrap()
            .run(&b, McSamples::new(30).unwrap(), 5, true)
            .unwrap();
        for (x, y) in one_mc.iter().zip(&split) {
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(x.stats.samples.as_ref().unwrap()),
                bits(y.stats.samples.as_ref().unwrap()),
                "{name}: MC in passes of {per_pass}"
            );
            assert_eq!(bits(&x.stats.mean), bits(&y.stats.mean), "{name}");
        }
    }
}

/// A build without the `onnxruntime` feature refuses the backend wherever it is asked for,
/// with the reason: `--backend onnxruntime` stops the server at startup (settings check), and
/// a model whose `model.json` names it is refused at load, never served on tract instead.
#[cfg(not(feature = "onnxruntime"))]
#[test]
fn onnxruntime_is_refused_in_a_build_without_the_feature() {
    let mut args = mcd_serve::config::ServeArgs::for_models(models_dir());
    args.backend = mcd_serve::engine::backend::Backend::Onnxruntime;
    let e = args.check().unwrap_err();
    assert!(
        e.contains("--backend is onnxruntime") && e.contains("without the `onnxruntime` cargo feature"),
        "{e}"
    );
    let dir = model_folder(&[models_dir().join("breast_cancer.onnx")]);
    std::fs::write(
        dir.path().join("breast_cancer.model.json"),
        r#"{"backend": "onnxruntime"}"#,
    )
    .unwrap();
    let e = mcd_serve::engine::repo::load_model("breast_cancer", &dir.path().join("breast_cancer.onnx"))
        .err()
        .expect("refused at load");
    assert!(
        e.contains("backend 'onnxruntime' is not available") && e.contains("cargo feature"),
        "{e}"
    );
}
