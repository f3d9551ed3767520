//! Every ONNX file in ../shared/real-models: loaded or refused for a stated reason, and
//! compared with upstream's expected outputs.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use mcd_serve::engine::backend::Backend;
use mcd_serve::engine::model::{Dim, LoadedModel, McSamples, ModelConfig, Outcome, to_f64};
use mcd_serve::engine::onnx_graph::SiteKind;
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
        // PyTorch's own exports. nn.Dropout, from either exporter, serves as it is; spatial
        // and alpha dropout come as random ops (RandomUniformLike -> Less -> Cast ...),
        // recognised as dropout sites (see torch_exports_match_pytorch below).
        ("torch/mlp_bn_legacy_training.onnx", Ok(None)),
        ("torch/mlp_dynamo.onnx", Ok(None)),
        ("torch/cnn_dropout2d_dynamo.onnx", Ok(None)),
        ("torch/conv1d_dropout1d_dynamo.onnx", Ok(None)),
        ("torch/selu_alphadropout_dynamo.onnx", Ok(None)),
        // MONAI and Hugging Face architectures, exported as the README says: nn.Dropout in
        // every U-Net conv block and DenseNet layer, hidden and attention dropout in BERT.
        // Each loads with MC available.
        ("medical/monai_basicunet_seg.onnx", Ok(None)),
        ("medical/monai_basicunet_binary_seg.onnx", Ok(None)),
        ("medical/monai_densenet_multilabel.onnx", Ok(None)),
        ("medical/bert_tiny_cls.onnx", Ok(None)),
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
        // (The shared trunk is tract's: on onnxruntime MC runs the full graph.)
        if file.ends_with("self_attention_megatron_basic_test.onnx") && test_backend() == Backend::Tract {
            let model = model.unwrap();
            let c = model
                .checks
                .iter()
                .find(|c| c.check.as_str() == "mc_shared_trunk")
                .unwrap();
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
    let got = m.eval_session().run(&m.input_rows(vec![input]).unwrap()).unwrap();
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
        let got = m.eval_session().run(&m.input_rows(vec![x]).unwrap()).unwrap();
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
        let m = load_with(case, &base.join("model.onnx"), config).unwrap();
        let x_t = read_pb(&base.join("test_data_set_0/input_0.pb"));
        let x = to_f64(&x_t).unwrap();
        let b = m.input_rows(vec![x_t]).unwrap();
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
            .run(&b, McSamples::new(s).unwrap(), 11, true)
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

/// PyTorch's exports, with what their sites must be: kinds, and the first mask's shape.
const TORCH: [(&str, &[SiteKind]); 5] = [
    ("mlp_bn_legacy_training", &[SiteKind::Element]),
    ("mlp_dynamo", &[SiteKind::Element, SiteKind::Element]),
    ("cnn_dropout2d_dynamo", &[SiteKind::Channel, SiteKind::Element]),
    ("conv1d_dropout1d_dynamo", &[SiteKind::Channel]),
    ("selu_alphadropout_dynamo", &[SiteKind::Alpha]),
];

/// A nested JSON array as a float32 tensor.
fn json_tensor(v: &serde_json::Value) -> Tensor {
    let mut shape = vec![];
    let mut at = v;
    while let Some(a) = at.as_array() {
        shape.push(a.len());
        at = &a[0];
    }
    let values: Vec<f32> = f64s(v).iter().map(|&x| x as f32).collect();
    Tensor::from_shape(&shape, &values).unwrap()
}

/// Every file in torch/ against PyTorch's own answers (`<name>.json`):
/// - eval equals PyTorch's eval to float32 rounding;
/// - MC with 1000 samples: each output's mean within 5 standard errors of PyTorch's 4000-sample
///   mean, the error combining both counts (Welch: sqrt(s1²/n1 + s2²/n2));
/// - each output's variance ratio s1²/s2² within its sampling bounds. For normal outputs the
///   ratio is F(n1-1, n2-1), and ln F is close to normal with variance 2/(n1-1) + 2/(n2-1).
///   Dropout outputs are not normal (two-point laws, mixtures), so the general large-sample
///   form is used: Var(ln s²) = (κ - (n-3)/(n-1))/n with κ = μ4/σ⁴ the kurtosis (3 gives the
///   F case back), κ estimated from our samples. Many outputs are tested at once, so the
///   quantile is Bonferroni-corrected: a false failure anywhere in this test has probability
///   at most 1e-4.
///
/// Channel dropout must give PyTorch's variance: element-wise masks on Dropout2d fail this.
#[test]
fn torch_exports_match_pytorch_in_eval_and_mc() {
    let Some(dir) = shared_models() else { return };
    let n1 = 1000usize;
    let specs: Vec<serde_json::Value> = TORCH
        .iter()
        .map(|(name, _)| read_json(&dir.join(format!("torch/{name}.json"))))
        .collect();
    let elements: usize = specs.iter().map(|s| f64s(&s["mc_mean"]).len()).sum();
    let z_var = two_sided_z(1e-4 / elements as f64);
    // Every file is measured before failing, so that a failure shows the whole picture.
    let mut problems = vec![];
    for ((name, kinds), spec) in TORCH.iter().zip(&specs) {
        let m = load_model(name, &dir.join(format!("torch/{name}.onnx"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            m.sites.iter().map(|s| s.kind).collect::<Vec<_>>(),
            *kinds,
            "{name}: {:?}",
            m.sites
        );
        for c in &m.checks {
            // On onnxruntime MC runs the full graph: the shared-trunk check says so.
            let full_graph = m.backend != Backend::Tract && c.check.as_str() == "mc_shared_trunk";
            let want = if full_graph { Outcome::Skipped } else { Outcome::Pass };
            assert_eq!(c.result, want, "{name}: {} {}", c.check.as_str(), c.detail);
        }
        let n2 = spec["mc_samples"].as_u64().unwrap() as f64;
        let b = m.input_rows(vec![json_tensor(&spec["input"])]).unwrap();

        let got = to_f64(&m.eval_session().run(&b).unwrap()[0].tensor).unwrap();
        let want = f64s(&spec["eval"]);
        assert_eq!(got.len(), want.len());
        let mut eval_err = 0.0f64;
        for (g, w) in got.iter().zip(&want) {
            eval_err = eval_err.max((g - w).abs());
            // Float32 rounding, summed over a few hundred terms: far below 1e-5 here.
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{name}: eval {g} vs PyTorch {w}"
            );
        }

        let out = &m
            .mc_session()
            .unwrap()
            .run(&b, McSamples::new(n1).unwrap(), 20_261_127, true)
            .unwrap()[0];
        let samples = out.stats.samples.as_ref().unwrap();
        let per_sample = samples.len() / n1;
        let (means, vars) = (f64s(&spec["mc_mean"]), f64s(&spec["mc_variance"]));
        assert_eq!(per_sample, means.len());
        let (mut max_z, mut ratios, mut bounds) = (0.0f64, vec![], vec![]);
        for j in 0..per_sample {
            let (m1, v1, m2, v2) = (out.stats.mean[j], out.stats.variance[j], means[j], vars[j]);
            let z = (m1 - m2) / (v1 / n1 as f64 + v2 / n2).sqrt();
            max_z = max_z.max(z.abs());
            if z.abs() > 5.0 {
                problems.push(format!("{name} output {j}: mean {m1} vs PyTorch {m2}, z = {z:.2}"));
            }
            let mu4 = samples
                .iter()
                .skip(j)
                .step_by(per_sample)
                .map(|y| (y - m1).powi(4))
                .sum::<f64>()
                / n1 as f64;
            let kurtosis = mu4 / (v1 * v1);
            let term = |n: f64| (kurtosis - (n - 3.0) / (n - 1.0)) / n;
            let bound = z_var * (term(n1 as f64) + term(n2)).sqrt();
            let ratio = v1 / v2;
            if ratio.ln().abs() > bound {
                problems.push(format!(
                    "{name} output {j}: variance {v1} vs PyTorch {v2}: ratio {ratio:.3} outside [{:.3}, {:.3}] \
                     (kurtosis {kurtosis:.2})",
                    (-bound).exp(),
                    bound.exp()
                ));
            }
            ratios.push(ratio);
            bounds.push(bound);
        }
        let fold = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().copied().fold(init, f);
        println!(
            "{name}: eval max |error| {eval_err:.2e}; MC mean max |z| {max_z:.2}; variance ratio {:.3}..{:.3} \
             (bounds from e^-{:.3}..e^{:.3} per output, z {z_var:.2})",
            fold(&ratios, f64::min, f64::INFINITY),
            fold(&ratios, f64::max, 0.0),
            fold(&bounds, f64::min, f64::INFINITY),
            fold(&bounds, f64::max, 0.0),
        );
        if *name == "cnn_dropout2d_dynamo" {
            // The Dropout2d sits after the first convolution: the trunk is Conv and Relu.
            let trunk = m.checks.iter().find(|c| c.check.as_str() == "mc_shared_trunk").unwrap();
            if m.backend == Backend::Tract {
                assert!(trunk.detail.starts_with("2 trunk nodes"), "{}", trunk.detail);
            }
            assert_eq!(
                m.sites[0].mask_shape,
                Some(vec![
                    Dim::Symbol("batch".into()),
                    Dim::Fixed(6),
                    Dim::Fixed(1),
                    Dim::Fixed(1)
                ])
            );
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// cnn_dropout2d_dynamo keeps its weights in `cnn_dropout2d_dynamo.onnx.data`. From a model
/// folder it loads, and a reload (what SIGHUP runs) reads it afresh; without the file, or
/// with a truncated one, the model fails to load with a reason that names the file, and a
/// reload keeps the last good version serving.
#[test]
fn external_weights_load_from_the_model_folder_and_fail_clearly_when_missing_or_truncated() {
    let Some(dir) = shared_models() else { return };
    let name = "cnn_dropout2d_dynamo";
    let folder = tempdir::TempDir::new();
    let (onnx, data) = (format!("{name}.onnx"), format!("{name}.onnx.data"));
    std::fs::copy(dir.join("torch").join(&onnx), folder.path().join(&onnx)).unwrap();
    let data_path = folder.path().join(&data);
    std::fs::copy(dir.join("torch").join(&data), &data_path).unwrap();
    let spec = read_json(&dir.join(format!("torch/{name}.json")));
    let eval_of = |m: &LoadedModel| {
        let b = m.input_rows(vec![json_tensor(&spec["input"])]).unwrap();
        to_f64(&m.eval_session().run(&b).unwrap()[0].tensor).unwrap()
    };

    let first = load_dir(folder.path(), None).unwrap();
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    for (g, w) in eval_of(&first.models[name]).iter().zip(f64s(&spec["eval"])) {
        assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
    }
    let second = load_dir(folder.path(), Some(&first)).unwrap();
    assert!(second.failures.is_empty(), "{:?}", second.failures);
    assert!(!std::sync::Arc::ptr_eq(&first.models[name], &second.models[name]));

    std::fs::remove_file(&data_path).unwrap();
    let missing = load_dir(folder.path(), Some(&second)).unwrap();
    let reason = &missing.failures[0].reason;
    assert!(reason.contains(&data) && reason.contains("cannot be read"), "{reason}");
    assert!(missing.failures[0].kept_previous);
    assert!(load_dir(folder.path(), None).unwrap().models.is_empty());

    let bytes = std::fs::read(dir.join("torch").join(&data)).unwrap();
    std::fs::write(&data_path, &bytes[..bytes.len() / 2]).unwrap();
    let truncated = load_dir(folder.path(), None).unwrap();
    assert!(truncated.models.is_empty());
    let reason = &truncated.failures[0].reason;
    assert!(reason.contains(&data) && reason.contains("truncated"), "{reason}");
    println!("missing: {}\ntruncated: {reason}", missing.failures[0].reason);
}
