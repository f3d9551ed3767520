//! Every ONNX file in ../shared/real-models: loaded or refused for a stated reason, and
//! compared with upstream's expected outputs.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use mcd_serve::engine::model::{LoadedModel, McSamples, ModelConfig, to_f64};
use mcd_serve::engine::repo::load_model;
use tract_onnx::prelude::*;

fn read_pb(path: &Path) -> Tensor {
    let proto = tract_onnx::tensor::proto_from_reader(std::fs::File::open(path).unwrap()).unwrap();
    tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, &proto, None).unwrap()
}

/// What the server must make of each file: Ok(None) loads with MC available, Ok(Some(s))
/// loads with MC refused for a reason containing s, Err(s) is refused at load with s.
fn expectations() -> HashMap<&'static str, Result<Option<&'static str>, &'static str>> {
    let degenerate = Ok(Some("zero variance"));
    let ratio_input = Ok(Some("graph input"));
    HashMap::from([
        ("burn/dropout.onnx", Ok(None)),
        ("burn/dropout_opset7.onnx", Ok(None)),
        ("onnx-light-models/light_bvlc_alexnet.onnx", degenerate),
        ("onnx-light-models/light_vgg19.onnx", degenerate),
        ("onnx-light-models/light_inception_v1.onnx", degenerate),
        ("onnx-light-models/light_squeezenet.onnx", degenerate),
        ("onnx-node-tests/test_dropout_default/model.onnx", Ok(None)),
        ("onnx-node-tests/test_dropout_default_mask/model.onnx", Ok(None)),
        ("onnx-node-tests/test_dropout_default_old/model.onnx", Ok(None)),
        ("onnx-node-tests/test_dropout_random_old/model.onnx", Ok(None)),
        ("onnx-node-tests/test_dropout_default_ratio/model.onnx", ratio_input),
        (
            "onnx-node-tests/test_dropout_default_mask_ratio/model.onnx",
            ratio_input,
        ),
        ("onnx-node-tests/test_training_dropout/model.onnx", ratio_input),
        ("onnx-node-tests/test_training_dropout_default/model.onnx", ratio_input),
        (
            "onnx-node-tests/test_training_dropout_default_mask/model.onnx",
            ratio_input,
        ),
        ("onnx-node-tests/test_training_dropout_mask/model.onnx", ratio_input),
        (
            "onnx-node-tests/test_training_dropout_zero_ratio/model.onnx",
            ratio_input,
        ),
        (
            "onnx-node-tests/test_training_dropout_zero_ratio_mask/model.onnx",
            ratio_input,
        ),
        ("ort-testdata/bias_dropout_fusion1.onnx", Ok(None)),
        ("ort-testdata/bias_dropout_residual_fusion1.onnx", Ok(None)),
        ("ort-testdata/dropout_ratio.onnx", Ok(Some("graph input 'X2'"))),
        ("ort-testdata/self_attention_megatron_basic_test.onnx", Ok(None)),
        // PyTorch's own exports. nn.Dropout, from either exporter, serves as it is.
        ("torch/mlp_bn_legacy_training.onnx", Ok(None)),
        ("torch/mlp_dynamo.onnx", Ok(None)),
        // Spatial and alpha dropout come as decomposed random ops (RandomUniformLike ->
        // Less -> Cast ...), which tract cannot build: refused at load, never served.
        ("torch/cnn_dropout2d_dynamo.onnx", Err("RandomUniformLike")),
        ("torch/conv1d_dropout1d_dynamo.onnx", Err("RandomUniformLike")),
        ("torch/selu_alphadropout_dynamo.onnx", Err("RandomUniformLike")),
    ])
}

fn onnx_files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if p.extension().is_some_and(|x| x == "onnx") {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn every_real_model_loads_or_is_refused_for_its_reason() {
    let Some(dir) = shared_models() else { return };
    let expected = expectations();
    let files = onnx_files(&dir);
    assert!(files.len() >= expected.len());
    for file in files {
        if file.contains("onnx-light-models") {
            continue; // big: covered one by one below
        }
        let want = expected
            .get(file.as_str())
            .unwrap_or_else(|| panic!("{file}: no expectation recorded; classify it"));
        let model = check_expectation(&dir, &file, want);
        // A transformer block with a symbolic batch: its attention projections run once per
        // row (the shared trunk), verified at load against the full graph with equal masks.
        if file.ends_with("self_attention_megatron_basic_test.onnx") {
            let model = model.unwrap();
            let c = model.checks.iter().find(|c| c.check == "mc_shared_trunk").unwrap();
            assert_eq!(
                c.result,
                mcd_serve::engine::model::Outcome::Pass,
                "{file}: {}",
                c.detail
            );
        }
    }
}

fn check_expectation(dir: &Path, file: &str, want: &Result<Option<&str>, &str>) -> Option<LoadedModel> {
    let got = load_model("m", &dir.join(file));
    match (want, got) {
        (Err(reason), Err(e)) => {
            assert!(e.contains(reason), "{file}: refused, but for {e:?}");
            None
        }
        (Err(_), Ok(_)) => panic!("{file}: loaded but should have been refused"),
        (Ok(_), Err(e)) => panic!("{file}: refused: {e}"),
        (Ok(mc), Ok(m)) => {
            assert!(m.healthy(), "{file}: {:?}", m.checks);
            match (mc, m.mc_unavailable_reason()) {
                (None, None) => {}
                (Some(want), Some(got)) => {
                    assert!(got.contains(want), "{file}: MC refused for {got:?}, expected {want:?}")
                }
                (None, Some(got)) => panic!("{file}: MC refused: {got}"),
                (Some(want), None) => panic!("{file}: MC available, expected refusal ({want})"),
            }
            Some(m)
        }
    }
}

fn light_model(name: &str) {
    let Some(dir) = shared_models() else { return };
    let file = format!("onnx-light-models/light_{name}.onnx");
    let m = check_expectation(&dir, &file, &expectations()[file.as_str()]).unwrap();
    let n = 3 * 224 * 224;
    let x: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let input = Tensor::from_shape(&[1, 3, 224, 224], &x).unwrap();
    let got = m.eval_session().run(&m.batch(vec![input]).unwrap()).unwrap();
    let want = to_f64(&read_pb(
        &dir.join(format!("onnx-light-models/light_{name}_output_0.pb")),
    ))
    .unwrap();
    let got = to_f64(&got[0].tensor).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{name}: {g} vs upstream {w}");
    }
}

#[test]
fn light_alexnet_matches_upstream() {
    light_model("bvlc_alexnet");
}
#[test]
fn light_vgg19_matches_upstream() {
    light_model("vgg19");
}
#[test]
fn light_inception_v1_matches_upstream() {
    light_model("inception_v1");
}
#[test]
fn light_squeezenet_matches_upstream() {
    light_model("squeezenet");
}

#[test]
fn inference_mode_node_tests_equal_their_expected_outputs() {
    let Some(dir) = shared_models() else { return };
    for case in [
        "test_dropout_default",
        "test_dropout_default_mask",
        "test_dropout_default_mask_ratio",
        "test_dropout_default_old",
        "test_dropout_default_ratio",
        "test_dropout_random_old",
    ] {
        let base = dir.join("onnx-node-tests").join(case);
        let m = load_model(case, &base.join("model.onnx")).unwrap();
        let x = read_pb(&base.join("test_data_set_0/input_0.pb"));
        let got = m.eval_session().run(&m.batch(vec![x]).unwrap()).unwrap();
        for (i, out) in got.iter().enumerate() {
            let want = read_pb(&base.join(format!("test_data_set_0/output_{i}.pb")));
            assert_eq!(out.tensor.datum_type(), want.datum_type(), "{case} output {i}");
            assert_eq!(
                to_f64(&out.tensor).unwrap(),
                to_f64(&want).unwrap(),
                "{case} output {i}"
            );
        }
    }
}

/// The training-mode cases carry their ratio as a graph input; with the ratio fixed in the
/// model config (as an operator would), MC drops the right share and scales the rest.
#[test]
fn training_mode_node_tests_drop_the_right_share_under_mc() {
    let Some(dir) = shared_models() else { return };
    for case in [
        "test_training_dropout",
        "test_training_dropout_default",
        "test_training_dropout_default_mask",
        "test_training_dropout_mask",
        "test_training_dropout_zero_ratio",
        "test_training_dropout_zero_ratio_mask",
    ] {
        let base = dir.join("onnx-node-tests").join(case);
        let r = to_f64(&read_pb(&base.join("test_data_set_0/input_1.pb"))).unwrap()[0] as f32;
        let config = ModelConfig {
            dropout_ratios: HashMap::from([("r".to_string(), r)]),
            ..Default::default()
        };
        let m = LoadedModel::load(case, &base.join("model.onnx"), config).unwrap();
        let x_t = read_pb(&base.join("test_data_set_0/input_0.pb"));
        let x = to_f64(&x_t).unwrap();
        let b = m.batch(vec![x_t]).unwrap();
        assert_eq!(
            to_f64(&m.eval_session().run(&b).unwrap()[0].tensor).unwrap(),
            x,
            "{case}: eval is the identity"
        );
        if r == 0.0 {
            assert!(m.mc_unavailable_reason().unwrap().contains("ratio 0"), "{case}");
            continue;
        }
        let s = 100;
        let outs = m
            .mc_session()
            .unwrap()
            .run(&b, McSamples::new(s, 1000).unwrap(), 11, true)
            .unwrap();
        let ys = outs[0].stats.samples.as_ref().unwrap();
        let scale = 1.0 / (1.0 - r as f64);
        let mut dropped = 0usize;
        for (i, y) in ys.iter().enumerate() {
            let xi = x[i % x.len()];
            if *y == 0.0 && xi != 0.0 {
                dropped += 1;
            } else {
                assert!(
                    (y - xi * scale).abs() <= 1e-5 * (xi * scale).abs().max(1.0),
                    "{case}: kept {y} vs {xi}/(1-{r})"
                );
            }
            if let Some(mask) = outs.get(1).and_then(|o| o.stats.samples.as_ref()) {
                assert_eq!(
                    mask[i] == 1.0,
                    *y != 0.0 || xi == 0.0,
                    "{case}: mask disagrees with the output"
                );
            }
        }
        let n = ys.len() as f64;
        let (p, sd) = (r as f64, (n * r as f64 * (1.0 - r as f64)).sqrt());
        assert!(
            (dropped as f64 - n * p).abs() < 5.0 * sd,
            "{case}: dropped {dropped} of {n}, ratio {r}"
        );
    }
}
