//! Finding a file's dropout sites (real `Dropout` nodes and dropout written as random ops),
//! refusing what cannot be served, and the graph fixes that let tract run the file.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, bail};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto, tensor_proto::DataType};

use super::decomposed::{self, Form};
use super::proto::{
    constant_tensors, consumed_names, is_default_domain, node_name, opset, scalar_f32, subgraphs, tensor_attribute,
};
use super::sites::*;

/// `ratio_inputs` gives values for ratios that the file leaves to a graph input (from the
/// model's config file): the operator fixes them per model, as they belong to how the model
/// was trained, and a client must not dial its own uncertainty.
pub fn analyse(proto: &ModelProto, ratio_inputs: &HashMap<String, f32>) -> anyhow::Result<Surgery> {
    let graph = proto.graph.as_ref().context("the file holds no graph")?;
    refuse_dropout_in_subgraphs(graph)?;
    // Before anything else: a random op outside a recognised pattern refuses the file.
    let decomposed = decomposed::find(graph, &constant_tensors(graph))?;
    let opset = opset(proto);
    let constants = constant_tensors(graph);
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let graph_inputs: HashSet<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !initializers.contains(n))
        .collect();
    let consumed = consumed_names(graph);

    let mut sites = vec![];
    let mut mc_blockers = vec![];
    // The graph inputs that give a Dropout node its ratio: what `ratio_inputs` may name.
    let mut ratio_graph_inputs: HashSet<String> = HashSet::new();
    for (ix, node) in graph.node.iter().enumerate() {
        if node.op_type != "Dropout" || !is_default_domain(node) {
            continue;
        }
        let name = node_name(node);
        let input = node.input.first().filter(|s| !s.is_empty()).cloned();
        let Some(input) = input else {
            bail!("Dropout node '{name}' has no data input")
        };
        let output = node.output.first().cloned().unwrap_or_default();
        let mut control_inputs = vec![];

        let (ratio, ratio_source) = if opset < 12 {
            match node.attribute.iter().find(|a| a.name == "ratio") {
                Some(a) => (Some(a.f), "attribute".to_string()),
                None => (Some(0.5), "default".to_string()),
            }
        } else {
            match node.input.get(1).filter(|s| !s.is_empty()) {
                None => (Some(0.5), "default".to_string()),
                Some(r) => {
                    if let Some((t, kind)) = constants.get(r.as_str()) {
                        let v = scalar_f32(t).with_context(|| format!("ratio of Dropout node '{name}'"))?;
                        (Some(v), (*kind).to_string())
                    } else if graph_inputs.contains(r.as_str()) {
                        control_inputs.push(r.clone());
                        ratio_graph_inputs.insert(r.clone());
                        match ratio_inputs.get(r) {
                            Some(v) => (Some(*v), format!("graph input '{r}', value from the model config")),
                            None => (None, format!("graph input '{r}'")),
                        }
                    } else {
                        (None, format!("computed at run time ('{r}')"))
                    }
                }
            }
        };
        let exported_training_mode = match node.input.get(2).filter(|s| !s.is_empty()) {
            None => "absent".to_string(),
            Some(t) => match constants.get(t.as_str()) {
                Some((tensor, _)) => match scalar_f32(tensor) {
                    Ok(v) if v != 0.0 => "constant true".to_string(),
                    Ok(_) => "constant false".to_string(),
                    Err(_) => "constant (unreadable)".to_string(),
                },
                None if graph_inputs.contains(t.as_str()) => {
                    control_inputs.push(t.clone());
                    format!("graph input '{t}'")
                }
                None => format!("computed at run time ('{t}')"),
            },
        };
        if let Some(r) = ratio
            && !(0.0..1.0).contains(&r)
        {
            bail!("Dropout node '{name}' has ratio {r}; ONNX requires 0 <= ratio < 1");
        }
        if ratio.is_none() {
            mc_blockers.push(format!(
                "the ratio of Dropout node '{name}' is {ratio_source}, so the server cannot know \
                 how much to drop; MC dropout is refused for this model (eval works). To enable \
                 it, set \"dropout_ratios\" in the model's .model.json config"
            ));
        }
        let mask_output = node
            .output
            .get(1)
            .filter(|m| !m.is_empty() && consumed.contains(m.as_str()))
            .cloned();
        sites.push(DropoutSite {
            node: name,
            kind: SiteKind::Element,
            keep_probability: ratio.map(|r| 1.0 - r),
            ratio,
            ratio_source,
            exported_training_mode,
            mask_output_used: mask_output.is_some(),
            mask_shape: None,
            pattern: None,
            alpha_correction: None,
            input,
            output,
            mask_output,
            nodes: vec![ix],
            anchor: ix,
            control_inputs,
            template: None,
            form: None,
        });
    }
    let mut named: Vec<&String> = ratio_inputs.keys().collect();
    named.sort();
    if let Some(r) = named.into_iter().find(|r| !ratio_graph_inputs.contains(*r)) {
        let mut known: Vec<&String> = ratio_graph_inputs.iter().collect();
        known.sort();
        bail!(
            "the model config's dropout_ratios names '{r}', which is no graph input that gives a \
             Dropout node its ratio (those are: {known:?})"
        );
    }
    for d in decomposed {
        let alpha_correction = match d.form {
            Form::Alpha {
                scale,
                kept_offset,
                dropped_offset,
                saturation,
            } => Some(AlphaCorrection {
                scale,
                kept_offset,
                dropped_offset,
                saturation,
            }),
            Form::Scale { .. } => None,
        };
        sites.push(DropoutSite {
            node: d.node,
            // Element or channel is known once typing gives the mask's shape.
            kind: if alpha_correction.is_some() {
                SiteKind::Alpha
            } else {
                SiteKind::Element
            },
            keep_probability: Some(d.keep as f32),
            ratio: Some((1.0 - d.keep) as f32),
            ratio_source: format!("{} (the keep probability the draw is compared with)", d.keep_source),
            exported_training_mode: "random ops (a train-mode export)".into(),
            mask_output_used: false,
            mask_shape: None,
            pattern: Some(d.pattern),
            alpha_correction,
            input: d.x,
            output: d.out,
            mask_output: None,
            nodes: d.nodes,
            anchor: d.anchor,
            control_inputs: vec![],
            template: Some(d.template),
            form: Some(d.form),
        });
    }
    // In graph order, so that masks are numbered as the sites appear.
    sites.sort_by_key(|s| s.anchor);

    let mut base = proto.clone();
    let fixes = fix_batch_norms(base.graph.as_mut().expect("checked above"), &consumed)?;
    spell_out_constant_of_shape_default(base.graph.as_mut().expect("checked above"));
    let mut surgery = Surgery {
        sites,
        fixes,
        mc_blocker: if mc_blockers.is_empty() {
            None
        } else {
            Some(mc_blockers.join("; "))
        },
        eval_proto: ModelProto::default(),
        base,
    };
    surgery.eval_proto = surgery.rewrite(None, &[]);
    no_random_ops(&surgery.eval_proto)?;
    Ok(surgery)
}

/// The invariant behind serving: no graph handed to tract draws random numbers. `analyse`
/// refuses every random op outside a recognised pattern and the rewrite removes each
/// pattern whole, so this never fails; it is checked anyway, as a mistake here would make
/// answers silently stochastic.
pub(super) fn no_random_ops(proto: &ModelProto) -> anyhow::Result<()> {
    let graph = proto.graph.as_ref().context("the rewritten file holds no graph")?;
    if let Some(n) = graph.node.iter().find(|n| decomposed::is_random(n)) {
        bail!(
            "{} node '{}' survived graph surgery; the model is refused (this is a bug)",
            n.op_type,
            node_name(n)
        );
    }
    Ok(())
}

fn refuse_dropout_in_subgraphs(graph: &GraphProto) -> anyhow::Result<()> {
    fn scan(owner: &NodeProto, g: &GraphProto) -> anyhow::Result<()> {
        for n in &g.node {
            if n.op_type == "Dropout" {
                bail!(
                    "Dropout node '{}' sits inside the subgraph of {} node '{}'; the server cannot \
                     sample masks inside Loop/If/Scan bodies, so the model is refused rather than \
                     served with a dropout it does not control",
                    node_name(n),
                    owner.op_type,
                    node_name(owner)
                );
            }
            for sub in subgraphs(n) {
                scan(n, sub)?;
            }
        }
        Ok(())
    }
    for n in &graph.node {
        for sub in subgraphs(n) {
            scan(n, sub)?;
        }
    }
    Ok(())
}

/// ONNX's `ConstantOfShape` without a `value` fills float32 zeros; tract 0.23.9 fills f64
/// zeros instead, and then fails to type what follows (PyTorch's exporter writes it so to
/// shape the draw of `Dropout2d`). Writing the default out changes nothing else.
fn spell_out_constant_of_shape_default(graph: &mut GraphProto) {
    for n in graph.node.iter_mut().filter(|n| n.op_type == "ConstantOfShape") {
        if !n.attribute.iter().any(|a| a.name == "value") {
            n.attribute.push(tensor_attribute(
                "value",
                TensorProto {
                    dims: vec![1],
                    data_type: DataType::Float as i32,
                    float_data: vec![0.0],
                    ..Default::default()
                },
            ));
        }
    }
}

/// PyTorch exports BatchNormalization in training mode with `training_mode=1` and three
/// outputs (Y, running_mean, running_var): served that way it would normalise by batch
/// statistics, so a row's answer would depend on its neighbours. We serve it on its
/// running statistics, and refuse the file if anything reads the extra outputs.
fn fix_batch_norms(graph: &mut GraphProto, consumed: &HashSet<String>) -> anyhow::Result<Vec<String>> {
    let mut fixes = vec![];
    for n in graph.node.iter_mut().filter(|n| n.op_type == "BatchNormalization") {
        let training = n.attribute.iter().any(|a| a.name == "training_mode" && a.i != 0);
        let extra: Vec<String> = n.output.iter().skip(1).filter(|o| !o.is_empty()).cloned().collect();
        if !training && extra.is_empty() {
            continue;
        }
        let name = node_name(n);
        if let Some(used) = extra.iter().find(|o| consumed.contains(o.as_str())) {
            bail!(
                "BatchNormalization node '{name}' was exported in training mode and its batch \
                 statistic output '{used}' is used by the graph; serving it would make each answer \
                 depend on the rest of the batch, so the model is refused"
            );
        }
        n.attribute.retain(|a| a.name != "training_mode");
        n.output.truncate(1);
        fixes.push(format!(
            "BatchNormalization node '{name}' was exported in training mode; it is served with its \
             running statistics"
        ));
    }
    Ok(fixes)
}
