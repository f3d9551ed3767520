//! A request's answer does not depend on what else runs with it: bit for bit, whether it
//! runs alone, merged into a pass with other requests, split into passes by the memory
//! budget, or drawn by `mc_samples=auto` in chunks. Checked in the engine on the bundled
//! models and on every real architecture of ../shared/real-models that has a batch axis
//! (PyTorch exports, MONAI U-Nets and DenseNet, BERT, a Megatron attention block).
//!
//! tract picks matrix kernels by shape and CPU vendor, so CI runs this file once per
//! `TRACT_X86_KIND` cohort (intel, amd, other); `same_answers_in_every_cohort` compares
//! the cohorts with each other.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use mcd_serve::engine::model::{InputRows, LoadedModel, McOutput, McPart, McSamples, ModelConfig, to_f64};
use tract_onnx::prelude::*;

/// The models: (name, file, values of symbolic non-batch dims).
fn models() -> Vec<(String, PathBuf, HashMap<&'static str, usize>)> {
    let mut out: Vec<(String, PathBuf, HashMap<&'static str, usize>)> = ["breast_cancer", "diabetes", "digits_cnn"]
        .iter()
        .map(|m| (m.to_string(), models_dir().join(format!("{m}.onnx")), HashMap::new()))
        .collect();
    if let Some(shared) = shared_models() {
        for f in [
            "torch/mlp_bn_legacy_training.onnx",
            "torch/mlp_dynamo.onnx",
            "torch/cnn_dropout2d_dynamo.onnx",
            "torch/conv1d_dropout1d_dynamo.onnx",
            "torch/selu_alphadropout_dynamo.onnx",
            "medical/monai_basicunet_seg.onnx",
            "medical/monai_basicunet_binary_seg.onnx",
            "medical/monai_densenet_multilabel.onnx",
            "medical/bert_tiny_cls.onnx",
            "ort-testdata/self_attention_megatron_basic_test.onnx",
        ] {
            // A sequence length whose attention rows a 64-byte boundary splits: the case where
            // a row's place in the pass matters.
            let dims = HashMap::from([("seq", 7), ("seqlen", 5)]);
            out.push((f.to_string(), shared.join(f), dims));
        }
    }
    out
}

fn load(path: &std::path::Path) -> LoadedModel {
    let model = load_with("m", path, ModelConfig::default()).unwrap();
    let check = model
        .checks
        .iter()
        .find(|c| c.check.as_str() == "batch_invariant")
        .unwrap();
    assert_eq!(
        check.result,
        mcd_serve::engine::model::Outcome::Pass,
        "{}: {}",
        path.display(),
        check.detail
    );
    model
}

/// `rows` rows of made-up but valid inputs; `salt` makes each request's rows its own.
fn batch(m: &LoadedModel, rows: usize, salt: u64, dims: &HashMap<&str, usize>) -> InputRows {
    let mut next = uniform(salt);
    let tensors = m
        .inputs
        .iter()
        .map(|spec| {
            let shape = m.input_shape(spec, rows, |s| dims.get(s).copied().unwrap_or(3));
            let n: usize = shape.iter().product();
            if spec.datum.is_float() {
                let v: Vec<f32> = (0..n).map(|_| (next() * 2.0 - 1.0) as f32).collect();
                Tensor::from_shape(&shape, &v)
                    .unwrap()
                    .cast_to_dt(spec.datum)
                    .unwrap()
                    .into_owned()
            } else if spec.name.contains("mask") {
                Tensor::from_shape(&shape, &vec![1i64; n])
                    .unwrap()
                    .cast_to_dt(spec.datum)
                    .unwrap()
                    .into_owned()
            } else {
                let v: Vec<i64> = (0..n).map(|_| (next() * 400.0) as i64).collect();
                Tensor::from_shape(&shape, &v)
                    .unwrap()
                    .cast_to_dt(spec.datum)
                    .unwrap()
                    .into_owned()
            }
        })
        .collect();
    m.input_rows(tensors).unwrap()
}

fn eval_bits(m: &LoadedModel, b: &InputRows) -> Vec<Vec<u64>> {
    m.eval_session()
        .run(b)
        .unwrap()
        .iter()
        .map(|o| to_f64(&o.tensor).unwrap().iter().map(|v| v.to_bits()).collect())
        .collect()
}

fn mc_bits(outs: &[McOutput]) -> Vec<Vec<u64>> {
    outs.iter()
        .flat_map(|o| {
            let mut all = vec![&o.stats.mean, &o.stats.variance];
            all.extend(o.stats.samples.as_ref());
            all
        })
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Rows `from..to` of each output of an eval answer.
fn rows(outs: &[Vec<u64>], total: usize, from: usize, to: usize) -> Vec<Vec<u64>> {
    outs.iter()
        .map(|o| {
            let per = o.len() / total;
            o[from * per..to * per].to_vec()
        })
        .collect()
}

#[test]
fn every_arrangement_of_a_request_gives_its_answer_alone() {
    for (name, path, dims) in models() {
        let m = load(&path);
        let big = m.name_is_big();
        let sizes: &[usize] = if big { &[1, 2, 1] } else { &[1, 2, 3, 1, 2, 3, 1] };
        let requests: Vec<InputRows> = sizes
            .iter()
            .enumerate()
            .map(|(i, &r)| batch(&m, r, i as u64, &dims))
            .collect();
        let g = m.row_granularity(&requests[0]);
        let mergeable = m.merges() && g == 1;

        // Eval: alone, merged, and one batch of every request's rows split into passes.
        let alone: Vec<Vec<Vec<u64>>> = requests.iter().map(|b| eval_bits(&m, b)).collect();
        if mergeable {
            for n in [2, 3, requests.len()] {
                let parts: Vec<&InputRows> = requests[..n].iter().collect();
                for (i, out) in m.eval_session().run_merged(&parts).unwrap().iter().enumerate() {
                    let got: Vec<Vec<u64>> = out
                        .iter()
                        .map(|o| to_f64(&o.tensor).unwrap().iter().map(|v| v.to_bits()).collect())
                        .collect();
                    assert_eq!(got, alone[i], "{name}: eval of request {i} merged with {n}");
                }
            }
        }
        let total: usize = sizes.iter().sum();
        let all = batch(&m, total, 99, &dims);
        let one_pass = eval_bits(&m, &all);
        // The memory budget splits a batch into passes: a budget for `per` rows per pass.
        let budget = m.pass_budget();
        for per in [1, 2, 3, 5] {
            m.set_pass_budget(m.eval_pass_bytes(per));
            let got = eval_bits(&m, &all);
            m.set_pass_budget(budget);
            assert_eq!(
                got, one_pass,
                "{name}: eval of {total} rows with a budget for {per} per pass"
            );
        }
        if g == 1 {
            for r in 0..total {
                let single = batch_rows(&m, &all, r);
                assert_eq!(
                    eval_bits(&m, &single),
                    rows(&one_pass, total, r, r + 1),
                    "{name}: eval row {r} alone and in a pass of {total}"
                );
            }
        }

        // MC: alone, merged, split into passes, and drawn in chunks as `auto` does.
        let Ok(session) = m.mc_session() else {
            eprintln!("{name}: no MC");
            continue;
        };
        let k = if big { 8 } else { 20 };
        let samples = McSamples::new(k).unwrap();
        let alone: Vec<Vec<Vec<u64>>> = requests
            .iter()
            .enumerate()
            .map(|(i, b)| mc_bits(&session.run(b, samples, i as u64, i % 2 == 0).unwrap()))
            .collect();
        // Masks without the batch in front run one sample per pass: such a model never merges MC.
        let batch_led = m.mc_split(1, 1, 1) > 1;
        if mergeable && batch_led {
            for n in [2, 3, requests.len()] {
                let parts: Vec<McPart> = requests[..n]
                    .iter()
                    .enumerate()
                    .map(|(i, batch)| McPart {
                        batch,
                        seed: i as u64,
                        keep_samples: i % 2 == 0,
                    })
                    .collect();
                for (i, out) in session.run_merged(&parts, samples).unwrap().iter().enumerate() {
                    assert_eq!(mc_bits(out), alone[i], "{name}: MC of request {i} merged with {n}");
                }
            }
        }
        for (i, b) in requests.iter().enumerate() {
            let step = session.start(b, 0, false).step();
            for per in [1, 2, 3, 5] {
                m.set_pass_budget(m.mc_pass_bytes(b.rows(), per));
                let got = session.run(b, samples, i as u64, i % 2 == 0).unwrap();
                m.set_pass_budget(budget);
                assert_eq!(
                    mc_bits(&got),
                    alone[i],
                    "{name}: MC of request {i} with a budget for {per} samples per pass"
                );
            }
            // `auto` draws chunks of 16 (or of a multiple of the step) and checks its
            // criterion between them; its samples are those of a fixed count.
            let chunk = 16usize.div_ceil(step) * step;
            let mut draw = session.start(b, i as u64, false);
            draw.draw(chunk).unwrap();
            draw.draw(chunk).unwrap();
            let fixed = session
                .run(b, McSamples::new(2 * chunk).unwrap(), i as u64, false)
                .unwrap();
            assert_eq!(
                mc_bits(&draw.finish()),
                mc_bits(&fixed),
                "{name}: MC of request {i} drawn in chunks"
            );
        }
        eprintln!("{name}: granularity {g}, merging {mergeable}: every arrangement bit-identical");
    }
}

/// Row `r` of `b`, as a batch of its own.
fn batch_rows(m: &LoadedModel, b: &InputRows, r: usize) -> InputRows {
    let tensors: Vec<Tensor> = b.tensors().iter().map(|t| t.slice(0, r, r + 1).unwrap()).collect();
    m.input_rows(tensors).unwrap()
}

trait Big {
    fn name_is_big(&self) -> bool;
}
impl Big for LoadedModel {
    /// The U-Nets, the DenseNet and BERT: fewer rows and samples keep the test quick.
    fn name_is_big(&self) -> bool {
        std::fs::metadata(&self.path)
            .map(|m| m.len() > 150_000)
            .unwrap_or(false)
    }
}

/// Every model's eval and MC answer on fixed inputs, as bits, one line per model.
fn answers() -> String {
    let mut out = String::new();
    for (name, path, dims) in models() {
        let m = load(&path);
        let b = batch(&m, 3, 5, &dims);
        let mut bits = eval_bits(&m, &b);
        if let Ok(s) = m.mc_session() {
            bits.extend(mc_bits(&s.run(&b, McSamples::new(8).unwrap(), 11, true).unwrap()));
        }
        let hash = bits
            .iter()
            .flatten()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b).wrapping_mul(0x0100_0000_01b3));
        out.push_str(&format!("{name} {hash:016x}\n"));
    }
    out
}

/// Not a test of its own: prints [`answers`] for `same_answers_in_every_cohort`, which runs
/// this binary once per cohort.
#[test]
#[ignore]
fn print_answers() {
    if std::env::var("MCD_PRINT_ANSWERS").is_ok() {
        println!("ANSWERS\n{}END", answers());
    }
}

/// The same seed gives the same answer whatever tract takes the CPU for: each cohort picks
/// its own kernels, and the pinned kernels give every element the same bits.
#[test]
fn same_answers_in_every_cohort() {
    let exe = std::env::current_exe().unwrap();
    let mut seen: Vec<(String, String)> = vec![];
    for cohort in ["intel", "amd", "other"] {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "print_answers",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("TRACT_X86_KIND", cohort)
            .env("MCD_PRINT_ANSWERS", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{cohort}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = text
            .split("ANSWERS\n")
            .nth(1)
            .and_then(|t| t.split("END").next())
            .unwrap_or_default()
            .to_string();
        assert!(body.lines().count() >= 3, "{cohort}: {text}");
        seen.push((cohort.to_string(), body));
    }
    for (cohort, body) in &seen[1..] {
        assert_eq!(body, &seen[0].1, "answers under {cohort} differ from {}", seen[0].0);
    }
}
