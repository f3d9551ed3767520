//! The shared medical models (`../shared/real-models/medical`): MONAI's BasicUNet (a
//! 3-class softmax over axis 1 of [N, 3, 32, 32], and one sigmoid channel), a multi-label
//! MONAI DenseNet (5 sigmoids) and a BERT classifier. Each output's kind is decided at load
//! and shown in metadata; its per-position entropies and mutual information equal PyTorch's
//! own MC dropout (the files' JSON) within sampling tolerance, and the native, OIP REST and
//! OIP gRPC answers carry the same values, with a per-row summary for maps.

mod common;

use std::collections::HashMap;

use common::*;
use mcd_serve::config::ServeArgs;
use mcd_serve::engine::model::{LoadedModel, McSamples};
use mcd_serve::front::grpc::pb;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::infer_parameter::ParameterChoice;
use serde_json::{Value, json};
use tract_onnx::prelude::*;

const SEED: u64 = 20_261_207;
/// Our sample count; PyTorch's is each JSON's `mc_samples` (1000, or 2000 for DenseNet).
const N1: usize = 1000;

/// Each model, its output's kind as metadata shows it, and the shape of its per-position
/// statistics.
fn cases() -> Vec<(&'static str, Value, Vec<usize>)> {
    let three_classes = json!({"kind": "categorical", "class_axes": [1], "classes": 3});
    vec![
        ("monai_basicunet_seg", three_classes.clone(), vec![2, 32, 32]),
        (
            "monai_basicunet_binary_seg",
            json!({"kind": "bernoulli"}),
            vec![2, 1, 32, 32],
        ),
        ("monai_densenet_multilabel", json!({"kind": "bernoulli"}), vec![3, 5]),
        ("bert_tiny_cls", three_classes, vec![2]),
    ]
}

fn medical() -> Option<std::path::PathBuf> {
    shared_models().map(|d| d.join("medical"))
}

/// The reference's inputs, in the model's input order, as tensors.
fn inputs(m: &LoadedModel, spec: &Value) -> Vec<Tensor> {
    m.inputs
        .iter()
        .map(|i| {
            let v = &spec["inputs"][&i.name];
            let shape = nested_shape(v);
            match spec["input_dtypes"][&i.name].as_str().unwrap() {
                "int64" => Tensor::from_shape(&shape, &f64s(v).iter().map(|&x| x as i64).collect::<Vec<_>>()),
                _ => Tensor::from_shape(&shape, &f64s(v).iter().map(|&x| x as f32).collect::<Vec<_>>()),
            }
            .unwrap()
        })
        .collect()
}

/// Per position, the class probabilities of one sample of `len` values: along axis 1
/// (categorical, `classes` of them), or (p, 1 − p) per element (Bernoulli, `classes` 0).
fn distributions(sample: &[f64], rows: usize, classes: usize) -> Vec<Vec<f64>> {
    if classes == 0 {
        return sample.iter().map(|&p| vec![p, 1.0 - p]).collect();
    }
    let after = sample.len() / rows / classes;
    (0..rows * after)
        .map(|j| {
            let (n, at) = (j / after, j % after);
            (0..classes).map(|c| sample[(n * classes + c) * after + at]).collect()
        })
        .collect()
}

fn h(p: &[f64]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

/// Per position, from our own samples: the three statistics computed directly, and what
/// the tolerance against an independent estimate from `n2` samples is built from.
///
/// Derivation. With q_s the samples' distributions at a position and p̄ their mean:
/// - expected entropy is a plain mean of f_s = H(q_s): standard error sd(f)/√n, no bias;
/// - predictive entropy H(p̄) = H(p) + Σ_c ∂H/∂p_c (p̄_c − p_c) − ½ Σ_c (p̄_c − p_c)²/p_c + …
///   Its first-order part is the mean of g_s = −Σ_c q_{s,c} ln p̄_c (the +1 of ∂H/∂p_c
///   cancels on the simplex): standard error sd(g)/√n. Its second-order part is minus a
///   weighted sum of χ²₁ variables of total mean B/n, B = Σ_c Var(q_c) / (2 p̄_c); it
///   dominates where the first vanishes (a Bernoulli p near 0.5, where dH/dp = 0). By
///   Laurent and Massart's bound it exceeds (B/n)(1 + 2√x + 2x) with probability ≤ e^-x;
/// - mutual information = predictive − expected: the mean of g_s − f_s, same second order.
///
/// Two independent estimates (ours from n1 samples, PyTorch's from n2) thus differ by at
/// most z·σ·√(1/n1 + 1/n2) + (1 + 2√x + 2x)·B·(1/n1 + 1/n2), with z and x = ln(1/α) at the
/// Bonferroni level α over every value compared (1e-4 in all, so a false failure has
/// probability ≤ 2e-4). 1e-6 covers float32 rounding of PyTorch's probabilities (≤ 1e-7
/// relative per class, times |ln p| + 1 ≤ 10 here).
struct Position {
    direct: [f64; 3],
    sigma: [f64; 3],
    bias: f64,
}

fn positions(samples: &[f64], n: usize, rows: usize, classes: usize) -> Vec<Position> {
    let len = samples.len() / n;
    let per_sample: Vec<Vec<Vec<f64>>> = samples
        .chunks_exact(len)
        .map(|s| distributions(s, rows, classes))
        .collect();
    (0..per_sample[0].len())
        .map(|j| {
            let k = per_sample[0][j].len();
            let mean: Vec<f64> = (0..k)
                .map(|c| per_sample.iter().map(|s| s[j][c]).sum::<f64>() / n as f64)
                .collect();
            let f: Vec<f64> = per_sample.iter().map(|s| h(&s[j])).collect();
            let g: Vec<f64> = per_sample
                .iter()
                .map(|s| {
                    -(0..k)
                        .filter(|&c| mean[c] > 0.0)
                        .map(|c| s[j][c] * mean[c].ln())
                        .sum::<f64>()
                })
                .collect();
            let gf: Vec<f64> = g.iter().zip(&f).map(|(g, f)| g - f).collect();
            let sd = |v: &[f64]| {
                let m = v.iter().sum::<f64>() / v.len() as f64;
                (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
            };
            let var_c = |c: usize| per_sample.iter().map(|s| (s[j][c] - mean[c]).powi(2)).sum::<f64>() / (n - 1) as f64;
            let bias = (0..k)
                .filter(|&c| mean[c] > 0.0)
                .map(|c| var_c(c) / (2.0 * mean[c]))
                .sum();
            let predictive = h(&mean);
            let expected = f.iter().sum::<f64>() / n as f64;
            Position {
                direct: [predictive, expected, predictive - expected],
                sigma: [sd(&g), sd(&f), sd(&gf)],
                bias,
            }
        })
        .collect()
}

const STATS: [&str; 3] = ["predictive_entropy", "expected_entropy", "mutual_information"];

/// Compares `got` (per statistic, per position) with PyTorch's, and returns the largest
/// |difference| and the tolerance at that position, per statistic.
fn against_pytorch(
    name: &str,
    got: &[Vec<f64>; 3],
    spec: &Value,
    pos: &[Position],
    compared: usize,
    problems: &mut Vec<String>,
) -> [(f64, f64); 3] {
    let n2 = spec["mc_samples"].as_u64().unwrap() as f64;
    let z = two_sided_z(1e-4 / compared as f64);
    let both = 1.0 / N1 as f64 + 1.0 / n2;
    let mut worst = [(0.0f64, 0.0f64); 3];
    for (s, stat) in STATS.iter().enumerate() {
        let want = f64s(&spec[*stat]);
        assert_eq!(got[s].len(), want.len(), "{name} {stat}");
        for (j, (g, w)) in got[s].iter().zip(&want).enumerate() {
            let x = (compared as f64 / 1e-4).ln();
            let bias = if s == 1 {
                0.0
            } else {
                (1.0 + 2.0 * x.sqrt() + 2.0 * x) * pos[j].bias * both
            };
            let tol = z * pos[j].sigma[s] * both.sqrt() + bias + 1e-6;
            let diff = (g - w).abs();
            if diff > tol {
                problems.push(format!(
                    "{name} {stat}[{j}]: {g} vs PyTorch {w}, |diff| {diff:.2e} > {tol:.2e}"
                ));
            }
            if diff / tol > worst[s].0 / worst[s].1.max(f64::MIN_POSITIVE) {
                worst[s] = (diff, tol);
            }
        }
    }
    worst
}

#[test]
fn engine_entropies_equal_their_samples_and_pytorch() {
    let Some(dir) = medical() else { return };
    let cases = cases();
    let specs: Vec<Value> = cases
        .iter()
        .map(|(name, _, _)| read_json(&dir.join(format!("{name}.json"))))
        .collect();
    let compared: usize = specs.iter().map(|s| 3 * f64s(&s["predictive_entropy"]).len()).sum();
    let z = two_sided_z(1e-4 / compared as f64);
    let mut problems = vec![];
    for ((name, kind, shape), spec) in cases.iter().zip(&specs) {
        let m = load_model(name, &dir.join(format!("{name}.onnx"))).unwrap();
        assert_eq!(serde_json::to_value(&m.output_kinds[0]).unwrap(), *kind, "{name}");
        assert_eq!(spec["kind"], kind["kind"], "{name}: the reference's own kind");
        let b = m.input_rows(inputs(&m, spec)).unwrap();
        let out = &m
            .mc_session()
            .unwrap()
            .run(&b, McSamples::new(N1).unwrap(), SEED, true)
            .unwrap()[0];
        let e = out.stats.entropy.as_ref().unwrap();
        assert_eq!(e.shape, *shape, "{name}");
        let classes = kind["classes"].as_u64().unwrap_or(0) as usize;
        let pos = positions(out.stats.samples.as_ref().unwrap(), N1, shape[0], classes);
        // Against a direct computation from the very samples: only rounding may differ.
        let got = [
            e.predictive_entropy.clone(),
            e.expected_entropy.clone(),
            e.mutual_information.clone(),
        ];
        for (s, stat) in STATS.iter().enumerate() {
            for (j, (g, p)) in got[s].iter().zip(&pos).enumerate() {
                let want = if s == 2 { p.direct[2].max(0.0) } else { p.direct[s] };
                assert!((g - want).abs() < 1e-9, "{name} {stat}[{j}]: {g} vs direct {want}");
            }
        }
        let worst = against_pytorch(name, &got, spec, &pos, compared, &mut problems);
        println!(
            "{name}: max |ours - PyTorch| / tolerance: predictive {:.2e}/{:.2e}, expected {:.2e}/{:.2e}, \
             mutual information {:.2e}/{:.2e} (z {z:.2}, n {N1} vs {})",
            worst[0].0, worst[0].1, worst[1].0, worst[1].1, worst[2].0, worst[2].1, spec["mc_samples"]
        );
        // The summary: per row, the mean and the largest of the row's positions.
        let per_row = e.predictive_entropy.len() / shape[0];
        match &e.summary {
            None => assert_eq!(per_row, 1, "{name}: a map has a summary"),
            Some(sm) => {
                for r in 0..shape[0] {
                    let row = |v: &[f64]| v[r * per_row..(r + 1) * per_row].to_vec();
                    let (pe, mi) = (row(&e.predictive_entropy), row(&e.mutual_information));
                    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
                    let max = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max);
                    assert!((sm.mean_predictive_entropy[r] - mean(&pe)).abs() < 1e-12);
                    assert_eq!(sm.max_predictive_entropy[r], max(&pe));
                    assert!((sm.mean_mutual_information[r] - mean(&mi)).abs() < 1e-12);
                    assert_eq!(sm.max_mutual_information[r], max(&mi));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// One OIP input tensor of the reference, as JSON.
fn oip_inputs(m: &Value, spec: &Value) -> Vec<Value> {
    m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let name = i["name"].as_str().unwrap();
            let v = &spec["inputs"][name];
            let (datatype, data) = match spec["input_dtypes"][name].as_str().unwrap() {
                "int64" => ("INT64", json!(f64s(v).iter().map(|&x| x as i64).collect::<Vec<_>>())),
                _ => ("FP32", json!(f64s(v))),
            };
            json!({"name": name, "shape": nested_shape(v), "datatype": datatype, "data": data})
        })
        .collect()
}

fn grpc_input(m: &Value, spec: &Value) -> (Vec<pb::model_infer_request::InferInputTensor>, Vec<Vec<u8>>) {
    oip_inputs(m, spec)
        .iter()
        .map(|i| {
            let values = f64s(&i["data"]);
            let raw: Vec<u8> = match i["datatype"].as_str().unwrap() {
                "INT64" => values.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
            };
            let tensor = pb::model_infer_request::InferInputTensor {
                name: i["name"].as_str().unwrap().into(),
                datatype: i["datatype"].as_str().unwrap().into(),
                shape: i["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_i64().unwrap())
                    .collect(),
                ..Default::default()
            };
            (tensor, raw)
        })
        .unzip()
}

/// The native answer's output, its three maps, its summary; OIP REST and gRPC give the
/// same values under `y.<statistic>` and `y.summary.<statistic>`; metadata on all three
/// shows the kind; the entropy histogram counts one observation per row.
#[tokio::test]
async fn front_ends_carry_per_position_maps_and_summaries() {
    let Some(dir) = medical() else { return };
    let cases = cases();
    let folder = model_folder(
        &cases
            .iter()
            .map(|(n, _, _)| dir.join(format!("{n}.onnx")))
            .collect::<Vec<_>>(),
    );
    let args = ServeArgs::for_models(folder.path());
    let (s, url) = start_with_grpc(args).await;
    let mut grpc = GrpcInferenceServiceClient::connect(url).await.unwrap();
    let compared: usize = cases.iter().map(|(_, _, p)| 3 * p.iter().product::<usize>()).sum();
    let mut problems = vec![];
    for (name, kind, shape) in &cases {
        let spec = read_json(&dir.join(format!("{name}.json")));
        let (st, meta) = s.get(&format!("/models/{name}")).await;
        assert_eq!(st, 200, "{meta}");
        let out = meta["outputs"][0]["name"].as_str().unwrap().to_string();
        assert_eq!(meta["output_kinds"][&out], *kind, "{name}");
        let (_, oip_meta) = s.get(&format!("/v2/models/{name}")).await;
        assert_eq!(oip_meta["parameters"]["output_kinds"][&out], *kind, "{name}");
        let listed = oip_meta["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == format!("{out}.predictive_entropy"))
            .unwrap_or_else(|| panic!("{name}: {oip_meta}"));
        let mut want_dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        want_dims[0] = -1;
        assert_eq!(listed["shape"], json!(want_dims), "{name}");
        let gm = grpc
            .model_metadata(pb::ModelMetadataRequest {
                name: name.to_string(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let kinds: Value = serde_json::from_str(&gm.properties["output_kinds"]).unwrap();
        assert_eq!(kinds[&out], *kind, "{name}");

        let has_summary = shape[1..].iter().product::<usize>() > 1;
        // What a request chose, and what each output returns by default: everything for
        // one position a row, the mean, two entropies and the summary for more.
        let chosen: Vec<&str> = STATS.iter().copied().chain(has_summary.then_some("summary")).collect();
        let default: Vec<&str> = if has_summary {
            vec!["mean", "predictive_entropy", "mutual_information", "summary"]
        } else {
            vec![
                "mean",
                "variance",
                "std",
                "predictive_entropy",
                "expected_entropy",
                "mutual_information",
            ]
        };
        let keys = |o: &Value| -> Vec<String> {
            let mut k: Vec<String> = o.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let sorted = |v: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        };

        // Native: the statistics chosen, and only those.
        let body = json!({"inputs": spec["inputs"]});
        let (st, a, _) = s
            .post(
                &format!(
                    "/models/{name}/predict?mc_samples={N1}&seed={SEED}&statistics={}",
                    chosen.join(",")
                ),
                &body,
            )
            .await;
        assert_eq!(st, 200, "{a}");
        let o = &a["outputs"][&out];
        assert_eq!(keys(o), sorted(&chosen), "{name}: native with statistics");
        let (st, d, _) = s
            .post(&format!("/models/{name}/predict?mc_samples={N1}&seed={SEED}"), &body)
            .await;
        assert_eq!(st, 200, "{d}");
        assert_eq!(keys(&d["outputs"][&out]), sorted(&default), "{name}: native default");
        assert_eq!(
            d["outputs"][&out]["predictive_entropy"], o["predictive_entropy"],
            "{name}"
        );
        let native: [Vec<f64>; 3] = STATS.map(|stat| f64s(&o[stat]));
        for stat in STATS {
            assert_eq!(nested_shape(&o[stat]), *shape, "{name} {stat}");
        }
        // The tolerance's spreads come from a seeded engine run (the answer has no samples).
        let m = load_model(name, &dir.join(format!("{name}.onnx"))).unwrap();
        let b = m.input_rows(inputs(&m, &spec)).unwrap();
        let run = &m
            .mc_session()
            .unwrap()
            .run(&b, McSamples::new(N1).unwrap(), SEED, true)
            .unwrap()[0];
        let classes = kind["classes"].as_u64().unwrap_or(0) as usize;
        let pos = positions(run.stats.samples.as_ref().unwrap(), N1, shape[0], classes);
        against_pytorch(name, &native, &spec, &pos, compared, &mut problems);
        let summary_names = [
            "mean_predictive_entropy",
            "max_predictive_entropy",
            "mean_mutual_information",
            "max_mutual_information",
        ];
        assert_eq!(o["summary"].is_object(), has_summary, "{name}: {}", o["summary"]);
        let per_row = native[0].len() / shape[0];
        if has_summary {
            for r in 0..shape[0] {
                let row = |v: &[f64]| v[r * per_row..(r + 1) * per_row].to_vec();
                let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
                let max = |v: Vec<f64>| v.iter().cloned().fold(f64::MIN, f64::max);
                let want = [
                    mean(row(&native[0])),
                    max(row(&native[0])),
                    mean(row(&native[2])),
                    max(row(&native[2])),
                ];
                for (stat, w) in summary_names.iter().zip(want) {
                    let got = o["summary"][stat][r].as_f64().unwrap();
                    assert!((got - w).abs() < 1e-12, "{name} summary {stat}[{r}]: {got} vs {w}");
                }
            }
        }

        // OIP REST, JSON answer: the same values under the derived names; the outputs
        // named are what comes back.
        let mut named: Vec<String> = STATS.iter().map(|stat| format!("{out}.{stat}")).collect();
        if has_summary {
            named.extend(summary_names.iter().map(|stat| format!("{out}.summary.{stat}")));
        }
        let request = json!({
            "inputs": oip_inputs(&meta, &spec),
            "parameters": {"mc_samples": N1, "seed": SEED},
            "outputs": named.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
        });
        let (st, rest, _) = s.post(&format!("/v2/models/{name}/infer"), &request).await;
        assert_eq!(st, 200, "{rest}");
        let rest_out: HashMap<String, &Value> = rest["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["name"].as_str().unwrap().to_string(), o))
            .collect();
        let names_of = |outputs: &Value| -> Vec<String> {
            outputs
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names_of(&rest["outputs"]), named, "{name}: OIP REST with outputs");
        let mut request = request;
        request.as_object_mut().unwrap().remove("outputs");
        let (st, rest_default, _) = s.post(&format!("/v2/models/{name}/infer"), &request).await;
        assert_eq!(st, 200, "{rest_default}");
        let mut want_default: Vec<String> = vec![];
        for stat in &default {
            match *stat {
                "mean" => want_default.push(out.clone()),
                "summary" => want_default.extend(summary_names.iter().map(|x| format!("{out}.summary.{x}"))),
                other => want_default.push(format!("{out}.{other}")),
            }
        }
        let mut got_default = names_of(&rest_default["outputs"]);
        // A Bernoulli output's summary adds foreground means and volumes: kept to the four
        // scores compared here.
        got_default.retain(|n| {
            n.split_once(".summary.")
                .is_none_or(|(_, score)| summary_names.contains(&score))
        });
        got_default.sort();
        want_default.sort();
        assert_eq!(got_default, want_default, "{name}: OIP REST default");
        for (stat, values) in STATS.iter().zip(&native) {
            let t = rest_out[&format!("{out}.{stat}")];
            assert_eq!(t["shape"], json!(shape), "{name} {stat}");
            assert_eq!(f64s(&t["data"]), *values, "{name} {stat}: OIP REST vs native");
        }
        for stat in summary_names {
            let key = format!("{out}.summary.{stat}");
            assert_eq!(rest_out.contains_key(&key), has_summary, "{name} {key}");
            if has_summary {
                assert_eq!(rest_out[&key]["shape"], json!([shape[0]]));
                assert_eq!(f64s(&rest_out[&key]["data"]), f64s(&o["summary"][stat]), "{name} {key}");
            }
        }

        // OIP gRPC, raw FP64 contents.
        let (tensors, raw) = grpc_input(&meta, &spec);
        let request = pb::ModelInferRequest {
            model_name: name.to_string(),
            inputs: tensors,
            raw_input_contents: raw,
            parameters: HashMap::from([
                (
                    "mc_samples".to_string(),
                    pb::InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(N1 as i64)),
                    },
                ),
                (
                    "seed".to_string(),
                    pb::InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(SEED as i64)),
                    },
                ),
            ]),
            outputs: named
                .iter()
                .map(|n| pb::model_infer_request::InferRequestedOutputTensor {
                    name: n.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let g = grpc.model_infer(request).await.unwrap().into_inner();
        let grpc_names: Vec<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
        assert_eq!(grpc_names, named, "{name}: gRPC with outputs");
        let by_name = |n: &str| {
            let i = g.outputs.iter().position(|o| o.name == n);
            i.map(|i| (g.outputs[i].shape.clone(), le_f64(&g.raw_output_contents[i])))
        };
        for (stat, values) in STATS.iter().zip(&native) {
            let (dims, got) = by_name(&format!("{out}.{stat}")).unwrap();
            assert_eq!(
                dims,
                shape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
                "{name} {stat}"
            );
            assert_eq!(got, *values, "{name} {stat}: gRPC vs native");
        }
        for stat in summary_names {
            let got = by_name(&format!("{out}.summary.{stat}"));
            assert_eq!(got.is_some(), has_summary, "{name} {stat}");
            if let Some((_, v)) = got {
                assert_eq!(v, f64s(&o["summary"][stat]), "{name} {stat}");
            }
        }

        // Five answers of `rows` rows: one histogram observation per row, not per position.
        let scrape = s.metrics().await;
        let observed = metric_sum(
            &scrape,
            "mcd_predictive_entropy",
            &[("model", name), ("output", out.as_str())],
        );
        assert_eq!(observed, 5.0 * shape[0] as f64, "{name}");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    s.stop().await;
}
