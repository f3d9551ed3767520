//! Loading: an ONNX file becomes the eval plan and, where dropout is live, the MC plan.
//! The graph surgery itself is `engine::onnx_graph`'s; here the plans are built from it.

use std::path::Path;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use super::*;
use crate::engine::backend::{Backend, OrtGraph};
use crate::engine::footprint::ModelMemory;
use crate::engine::onnx_graph::{self, FactAt, MASK_INPUT_PREFIX, MaskInput, ProbeLookup};
use crate::engine::plans::{PlanOptions, Plans};
use crate::engine::trunk;
use session::Trunk;

impl LoadedModel {
    /// Loads on tract, unless the model's config names another backend.
    pub fn load(name: &str, path: &Path, config: ModelConfig) -> anyhow::Result<LoadedModel> {
        Self::load_on(name, path, config, Backend::Tract)
    }

    /// Loads on the backend the model's config names, else on `default` (the server's
    /// `--backend`). A backend that this build lacks, or that cannot run the graph, refuses
    /// the model with the reason.
    pub fn load_on(name: &str, path: &Path, config: ModelConfig, default: Backend) -> anyhow::Result<LoadedModel> {
        let backend = config.backend.unwrap_or(default);
        backend
            .compiled()
            .map_err(|e| anyhow::anyhow!("backend '{backend}' is not available: {e}"))?;
        crate::engine::kernels::pin();
        let started = std::time::Instant::now();
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_path(path).context("reading the ONNX protobuf")?;
        // External weights are read relative to the model's folder ("." for a bare file name).
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        onnx_graph::check_external_data(&proto, folder)?;
        let mut surgery = onnx_graph::analyse(&proto, &config.dropout_ratios)?;
        // The surgery holds its own copies (the base graph and the eval graph); a file with
        // its weights inside would otherwise stay in memory three times through the load.
        drop(proto);
        let dir = folder.to_str();
        let eval_typed = typed(&onnx, &surgery.eval_proto, dir).context("building the eval graph")?;
        let index_limits = onnx_graph::index_limits(surgery.eval_proto.graph.as_ref().expect("has graph"));
        let inputs = (0..eval_typed.inputs.len())
            .map(|i| {
                let outlet = eval_typed.inputs[i];
                let mut spec = tensor_spec(&eval_typed.node(outlet.node).name, eval_typed.input_fact(i)?)?;
                if !spec.datum.is_float() {
                    spec.index_limit = index_limits.get(&spec.name).copied();
                }
                Ok(spec)
            })
            .collect::<TractResult<Vec<_>>>()?;
        let output_names: Vec<String> = surgery
            .eval_proto
            .graph
            .as_ref()
            .expect("has graph")
            .output
            .iter()
            .map(|o| o.name.clone())
            .collect();
        let outputs = output_names
            .iter()
            .enumerate()
            .map(|(i, n)| tensor_spec(n, eval_typed.output_fact(i)?))
            .collect::<TractResult<Vec<_>>>()?;
        let batch_symbol = batch_symbol(&inputs, &outputs);
        let found = kinds::output_kinds(&surgery.eval_proto, &config, &outputs)?;
        let probability_classes = probability_outputs(&outputs, &found);
        let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let options = PlanOptions {
            file_bytes,
            passes: config.passes,
        };

        // Both graphs stop at the logits of a Softmax or Sigmoid output, and the server
        // applies the activation itself, in f64. For MC, tract's Softmax has a cost per row
        // (breast_cancer's MC-50, 2 classes: 57-76 µs with it, 33-43 µs without). For both,
        // tract's row sum splits a row at a 64-byte boundary, so a row's last bits would
        // follow its place in the pass (`engine::kernels`); the server's sum does not.
        // Logits that are an output themselves stay as they are: one name, one output.
        let server_activation: Vec<Option<(kinds::Activation, String)>> = outputs
            .iter()
            .zip(&found)
            .map(|(o, f)| {
                f.activation.clone().filter(|(_, l)| {
                    matches!(o.datum, DatumType::F32 | DatumType::F64 | DatumType::F16)
                        && !outputs.iter().any(|other| other.name == *l)
                })
            })
            .collect();
        let output_kinds = found.into_iter().map(|f| f.kind).collect();
        let (eval_typed, eval_activation) =
            cut_activations(eval_typed, &server_activation).context("cutting the eval graph at its logits")?;
        let eval_plans = match backend {
            Backend::Tract => {
                Plans::new(eval_typed, batch_symbol.as_deref(), None, options).context("optimizing the eval graph")?
            }
            Backend::Onnxruntime => {
                // The same graph tract runs: the eval graph, cut at the logits where the
                // server applies the activation.
                let mut proto = std::mem::take(&mut surgery.eval_proto);
                let graph = proto.graph.as_mut().expect("has graph");
                for (ix, cut) in eval_activation.iter().enumerate() {
                    if let (Some(_), Some((_, logits))) = (cut, &server_activation[ix]) {
                        graph.output[ix].name = logits.clone();
                    }
                }
                let ort = OrtGraph::new(&proto, folder)
                    .map_err(|e| anyhow::anyhow!("onnxruntime cannot run the eval graph: {e}"))?;
                Plans::on_onnxruntime(eval_typed, batch_symbol.as_deref(), ort).context("sizing the eval graph")?
            }
        };
        // The eval graph's protobuf has served (its plans exist): freed before the MC graph
        // is built, which is when the load holds the most.
        surgery.eval_proto = Default::default();
        tracing::debug!(
            model = name,
            seconds = started.elapsed().as_secs_f64(),
            "load: eval plan built"
        );
        let probed = probe_sites(&onnx, &mut surgery, dir)?;
        let mc = build_mc(
            &onnx,
            &surgery,
            &probed,
            dir,
            &inputs,
            &server_activation,
            batch_symbol.as_deref(),
            options,
            (backend, folder),
        );
        tracing::debug!(
            model = name,
            seconds = started.elapsed().as_secs_f64(),
            "load: MC plans built"
        );
        let mut model = LoadedModel {
            name: name.to_string(),
            path: path.to_path_buf(),
            config,
            inputs,
            outputs,
            probability_classes,
            output_kinds,
            batch_symbol,
            backend,
            sites: surgery.sites,
            fixes: surgery.fixes,
            checks: vec![],
            calibration: None,
            drift_reference: None,
            load_seconds: 0.0,
            eval: EvalPlan {
                plans: eval_plans,
                activation: eval_activation,
            },
            mc,
            memory: ModelMemory::default(),
            pass_budget: AtomicU64::new(DEFAULT_PASS_BUDGET_BYTES),
            layout: Layout {
                merge: true,
                pad_single_eval: false,
            },
        };
        model.self_check();
        tracing::debug!(
            model = name,
            seconds = started.elapsed().as_secs_f64(),
            "load: self-checks done"
        );
        // After the self-check: it may replace the shared-trunk MC graph by the full one.
        model.memory = model.memory_model();
        model.load_seconds = started.elapsed().as_secs_f64();
        Ok(model)
    }
}

fn typed(onnx: &tract_onnx::Onnx, proto: &ModelProto, dir: Option<&str>) -> TractResult<TypedModel> {
    let parsed = onnx.parse(proto, dir)?;
    if !parsed.unresolved_inputs.is_empty() {
        anyhow::bail!("unresolved inputs: {:?}", parsed.unresolved_inputs);
    }
    parsed.model.into_typed()
}

/// The batch axis: a symbol that is the first dim of every input and every output.
pub(super) fn batch_symbol(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Option<String> {
    let first = match inputs.first()?.shape.first()? {
        Dim::Symbol(s) => s.clone(),
        Dim::Fixed(_) => return None,
    };
    let is_batch = |s: &TensorSpec| matches!(s.shape.first(), Some(Dim::Symbol(x)) if *x == first);
    (inputs.iter().all(is_batch) && outputs.iter().all(is_batch)).then_some(first)
}

/// Per output: the classes along the last axis, when the output is one distribution
/// along it (what calibration, prediction sets and referral work on).
pub(super) fn probability_outputs(outputs: &[TensorSpec], found: &[kinds::FromGraph]) -> Vec<Option<usize>> {
    outputs
        .iter()
        .zip(found)
        .map(|(o, f)| match &f.kind {
            OutputKind::Categorical {
                class_axes,
                classes: Some(k),
            } if *class_axes == [o.shape.len() - 1] => Some(*k),
            _ => None,
        })
        .collect()
}

/// The typed graph with each output that `server_activation` names given by the input of
/// the Softmax or Sigmoid that produced it (its logits); per output, the activation the
/// server then applies. An output whose final node tract has changed (a Softmax before
/// opset 13 becomes a reshaped one) stays as the graph gives it.
pub(super) fn cut_activations(
    mut model: TypedModel,
    server_activation: &[Option<(kinds::Activation, String)>],
) -> TractResult<(TypedModel, Vec<Option<kinds::Activation>>)> {
    use tract_onnx::tract_core::ops::nn::Softmax;
    let mut outlets = model.outputs.clone();
    let mut cut = vec![None; outlets.len()];
    for (ix, found) in server_activation.iter().enumerate() {
        let Some((activation, _)) = found else {
            continue;
        };
        let node = model.node(outlets[ix].node);
        let matches = match activation {
            kinds::Activation::Softmax { .. } => node.op_as::<Softmax>().is_some(),
            kinds::Activation::Sigmoid => node.op().name() == "Sigmoid",
        };
        if matches && node.inputs.len() == 1 {
            outlets[ix] = node.inputs[0];
            cut[ix] = Some(activation.clone());
        }
    }
    if cut.iter().any(Option::is_some) {
        model.select_output_outlets(&outlets)?;
        model = model.into_decluttered()?;
    }
    Ok((model, cut))
}

/// The activation's data type and the mask's shape, per site (in site order).
pub(super) type Probed = Vec<(DatumType, Vec<Dim>)>;

/// Types the graph once more, exposing every site's activation and the tensor that shapes
/// a file's own draw, to learn each mask's shape (and so each site's kind). A failure only
/// refuses MC, unless the file has dropout written as random ops: their replacement by the
/// identity is then unproven, and the model is refused.
pub(super) fn probe_sites(
    onnx: &tract_onnx::Onnx,
    surgery: &mut onnx_graph::Surgery,
    dir: Option<&str>,
) -> anyhow::Result<Result<Probed, String>> {
    let (probe, lookups) = surgery.shape_probe_proto();
    let fact_shape = |model: &TypedModel, at: FactAt| -> TractResult<(DatumType, Vec<Dim>)> {
        let fact = match at {
            FactAt::Input(i) => model.input_fact(i),
            FactAt::Output(o) => model.output_fact(o),
        }?;
        // Symbols print by name only while their model lives: convert them now.
        Ok((fact.datum_type, tensor_spec("", fact)?.shape))
    };
    let probed = typed(onnx, &probe, dir).and_then(|model| {
        lookups
            .iter()
            .map(|l: &ProbeLookup| {
                let (datum, activation) = fact_shape(&model, l.activation)?;
                let mask = match l.template {
                    Some(at) => fact_shape(&model, at)?.1,
                    None => surgery.sites[l.site]
                        .static_mask_shape()
                        .unwrap_or_else(|| activation.clone()),
                };
                Ok((datum, activation, mask))
            })
            .collect::<TractResult<Vec<_>>>()
    });
    let probed = match probed {
        Ok(p) => p,
        Err(e) => {
            if let Some(site) = surgery.sites.iter().find(|s| s.pattern.is_some()) {
                anyhow::bail!(
                    "typing the graph to size the mask of dropout site '{}' failed: {e:#}",
                    site.node
                );
            }
            return Ok(Err(format!("typing the dropout inputs failed: {e:#}")));
        }
    };
    let mut out = vec![];
    for (site, (datum, activation, mask)) in surgery.sites.iter_mut().zip(probed) {
        site.set_mask_shape(&activation, mask.clone())?;
        out.push((datum, mask));
    }
    Ok(Ok(out))
}

/// The batch symbol when it leads every mask (see [`McPlan::batch`]).
fn batch_led(batch_symbol: Option<&str>, masks: &[MaskInput]) -> Option<String> {
    batch_symbol
        .filter(|b| {
            masks
                .iter()
                .all(|m| matches!(m.shape.first(), Some(Dim::Symbol(s)) if s == b))
        })
        .map(str::to_string)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn build_mc(
    onnx: &tract_onnx::Onnx,
    surgery: &onnx_graph::Surgery,
    probed: &Result<Probed, String>,
    dir: Option<&str>,
    inputs: &[TensorSpec],
    server_activation: &[Option<(kinds::Activation, String)>],
    batch_symbol: Option<&str>,
    options: PlanOptions,
    (backend, folder): (Backend, &Path),
) -> Result<McPlan, String> {
    if surgery.sites.is_empty() {
        return Err("the model has no Dropout nodes".into());
    }
    if let Some(b) = &surgery.mc_blocker {
        return Err(b.clone());
    }
    if !surgery.sites.iter().any(|s| s.samples()) {
        return Err("every Dropout node of the model has ratio 0".into());
    }
    let probed = probed.as_ref().map_err(Clone::clone)?;
    let input_symbols: Vec<String> = inputs
        .iter()
        .flat_map(|i| i.shape.iter())
        .filter_map(|d| match d {
            Dim::Symbol(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let mut masks = vec![];
    for (site, (datum, shape)) in probed.iter().enumerate() {
        let s = &surgery.sites[site];
        if !s.samples() {
            continue;
        }
        for d in shape {
            match d {
                Dim::Fixed(_) => {}
                Dim::Symbol(sym) if input_symbols.contains(sym) => {}
                other => {
                    return Err(format!(
                        "the mask of dropout site '{}' has dimension '{other}', which is not a dimension \
                         of any model input, so the server cannot size it",
                        s.node
                    ));
                }
            }
        }
        for values in s.mask_values() {
            masks.push(MaskInput {
                site,
                name: format!("{MASK_INPUT_PREFIX}{}", masks.len()),
                ratio: s.ratio.expect("sampling sites have a ratio"),
                values,
                datum: *datum,
                shape: shape.clone(),
            });
        }
    }
    let logits_outputs: Vec<(usize, String)> = server_activation
        .iter()
        .enumerate()
        .filter_map(|(ix, found)| found.as_ref().map(|(_, l)| (ix, l.clone())))
        .collect();
    let activation: Vec<Option<kinds::Activation>> = server_activation
        .iter()
        .map(|f| f.as_ref().map(|(a, _)| a.clone()))
        .collect();
    let proto = surgery
        .mc_proto(&masks, &logits_outputs)
        .map_err(|e| format!("{e:#}"))?;
    let full = typed(onnx, &proto, dir).map_err(|e| format!("building the MC graph failed: {e:#}"))?;
    if backend == Backend::Onnxruntime {
        // The full graph, fed the rows tiled once per sample: the same masks give the same
        // samples as tract's shared trunk (which the load-time check proves equal to the full
        // graph), only each sample recomputes the trunk.
        let ort = OrtGraph::new(&proto, folder).map_err(|e| format!("onnxruntime cannot run the MC graph: {e}"))?;
        let plans =
            Plans::on_onnxruntime(full, batch_symbol, ort).map_err(|e| format!("sizing the MC graph failed: {e:#}"))?;
        return Ok(McPlan {
            plans,
            batch: batch_led(batch_symbol, &masks),
            masks,
            activation,
            trunk: Trunk::Full(
                "the onnxruntime backend runs the full graph (the shared trunk is tract's only, for now)".into(),
            ),
        });
    }
    let shared = match batch_symbol {
        None => Err("the file fixes the batch size (or an output has no batch axis)".to_string()),
        Some(b) => {
            let mask_inputs: Vec<usize> = (full.inputs.len() - masks.len()..full.inputs.len()).collect();
            match trunk::share(&full, b, &mask_inputs) {
                Ok(Some(t)) => Plans::new(t.model, batch_symbol, Some(trunk::SAMPLES_SYMBOL), options)
                    .map(|p| (p, t.trunk_nodes, t.tiled))
                    .map_err(|e| format!("optimizing the shared-trunk graph failed: {e:#}")),
                Ok(None) => {
                    Err("no node upstream of the dropout masks reads an input: there is no trunk to share".to_string())
                }
                Err(e) => Err(format!("the trunk cannot be shared: {e:#}")),
            }
        }
    };
    let full =
        Plans::new(full, batch_symbol, None, options).map_err(|e| format!("building the MC graph failed: {e:#}"))?;
    // Samples share a pass only when the batch leads every mask, so that each sample owns
    // a block of every mask. A mask without the batch in front (or without it at all) would
    // otherwise be drawn across samples, or even shared by them.
    let batch = batch_led(batch_symbol, &masks);
    // A shared trunk runs every sample of a row in one batched pass of the stochastic part.
    // When the full graph runs row by row and that part is at least half of a row's work,
    // sharing saves less than batching costs (engine::row_passes: DenseNet121's trunk is its
    // stem, and its dense blocks ran 2.9x slower per row batched), so samples run one row
    // per pass through the full graph.
    let shared = match shared {
        Ok((plans, ..))
            if full.row_by_row()
                && let (Some(row), Ok(Some(sample))) = (full.row_fma(), plans.sample_fma())
                && 2 * sample >= row =>
        {
            Err(format!(
                "each sample's stochastic part is {:.0}% of a row's {:.1} M multiply-adds, so samples run one \
                 row per pass through the full graph (row by row), not in one batched pass after a shared trunk",
                100.0 * sample as f64 / row.max(1) as f64,
                row as f64 / 1e6
            ))
        }
        other => other,
    };
    let (plans, trunk) = match shared {
        Ok((plans, trunk_nodes, tiled)) => (
            plans,
            Trunk::Shared {
                detail: format!("{trunk_nodes} trunk nodes run once per row; {tiled} tensors tiled"),
                full: Some(Box::new(full)),
            },
        ),
        Err(reason) => (full, Trunk::Full(reason)),
    };
    Ok(McPlan {
        plans,
        masks,
        batch,
        activation,
        trunk,
    })
}
