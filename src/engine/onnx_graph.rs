//! ONNX graph surgery, done on the protobuf before tract sees a model.
//!
//! tract runs `Dropout` as the identity, or refuses it outright when it is exported in
//! training mode, and it cannot run BatchNormalization exported with `training_mode=1`.
//! So we build two graphs from every file:
//! - the *eval* graph, where each Dropout is an `Identity` (its mask output, if used, is all
//!   true) and every BatchNormalization runs on its running statistics;
//! - the *MC* graph, where each Dropout with a ratio > 0 becomes `Mul(x, mask)` and `mask`
//!   is a new graph input that the server samples (inverted dropout: 0 or 1/(1-p)).
//!
//! Dropout written as random ops (PyTorch's `Dropout1d/2d/3d` and `AlphaDropout`, see
//! [`crate::engine::decomposed`]) becomes a site too: the identity in eval, and in MC a mask
//! input shaped like the file's own draw (e.g. [batch, C, 1, 1] for channel dropout), which
//! the `Mul` broadcasts. Any other random op is refused at load.
//!
//! Masks must stay graph inputs: tract folds any stateless node whose value is known, so a
//! mask stored as an initializer would be constant-folded away.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use tract_onnx::data_resolver::MmapDataResolver;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};
use tract_onnx::prelude::*;

use crate::engine::decomposed::{self, Form, MaskTemplate};
use crate::engine::model::Dim;

/// Names of the mask inputs added to the MC graph.
pub const MASK_INPUT_PREFIX: &str = "mcd_dropout_mask_";

/// How a site drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// One draw per element of the activation (`Dropout`, `nn.Dropout`).
    Element,
    /// One draw per (row, channel), broadcast over the rest (`Dropout1d/2d/3d`).
    Channel,
    /// A draw of some other shape that broadcasts into the activation.
    Broadcast,
    /// Alpha dropout: a dropped unit takes SELU's saturation value and an affine map keeps
    /// the mean and variance (`AlphaDropout`, `FeatureAlphaDropout`).
    Alpha,
}

/// Alpha dropout's two branches, as read from the file's constants.
#[derive(Debug, Clone, Serialize)]
pub struct AlphaCorrection {
    /// A kept unit becomes `scale`·x + `kept_offset`...
    pub scale: f64,
    pub kept_offset: f64,
    /// ...and a dropped one `dropped_offset`.
    pub dropped_offset: f64,
    /// α: the saturation value -α of SELU that the correction assumes.
    pub saturation: f64,
}

/// One dropout site of the file, as found at load: a Dropout node, or a dropout written as
/// random ops.
#[derive(Debug, Clone, Serialize)]
pub struct DropoutSite {
    /// The node's name (or its first output's name when the node has none); for a dropout
    /// written as random ops, the node whose output is the dropped activation.
    pub node: String,
    pub kind: SiteKind,
    /// 1 - ratio, when the file fixes it.
    pub keep_probability: Option<f32>,
    /// The ratio, when the file fixes it.
    pub ratio: Option<f32>,
    /// Where the ratio came from: attribute, constant, initializer, default, graph input.
    pub ratio_source: String,
    /// How the file exported `training_mode`. It is informative only: eval never drops,
    /// MC always drops at sites with ratio > 0.
    pub exported_training_mode: String,
    pub mask_output_used: bool,
    /// The shape of the mask the server samples (it broadcasts into the activation), once
    /// typing has told it.
    pub mask_shape: Option<Vec<Dim>>,
    /// For a dropout written as random ops: the nodes it was recognised from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha_correction: Option<AlphaCorrection>,
    #[serde(skip)]
    pub(crate) input: String,
    #[serde(skip)]
    pub(crate) output: String,
    #[serde(skip)]
    pub(crate) mask_output: Option<String>,
    /// Every node the site replaces; the replacement goes where `anchor` was.
    #[serde(skip)]
    pub(crate) nodes: Vec<usize>,
    #[serde(skip)]
    pub(crate) anchor: usize,
    /// Graph inputs that fed only this node's ratio or training_mode.
    #[serde(skip)]
    pub(crate) control_inputs: Vec<String>,
    /// For a dropout written as random ops: where its mask's shape comes from, and what it
    /// computes. None for a Dropout node (its mask has the input's shape; it scales by
    /// 1/(1-ratio)).
    #[serde(skip)]
    pub(crate) template: Option<MaskTemplate>,
    #[serde(skip)]
    pub(crate) form: Option<Form>,
}

/// The values of one mask input: what a kept and a dropped unit get, and the value that
/// keeps everything as eval does (the p -> 0 limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskValues {
    pub kept: f64,
    pub dropped: f64,
    pub unit: f64,
}

impl DropoutSite {
    /// A site the MC graph samples at.
    pub fn samples(&self) -> bool {
        self.ratio.is_some_and(|r| r > 0.0)
    }

    /// The mask inputs of this site, all drawn from the same keep/drop draws: one that
    /// multiplies the activation, and for alpha dropout a second one that is added.
    pub fn mask_values(&self) -> Vec<MaskValues> {
        match self.form {
            Some(Form::Scale { scale }) => vec![MaskValues {
                kept: scale,
                dropped: 0.0,
                unit: 1.0,
            }],
            Some(Form::Alpha {
                scale,
                kept_offset,
                dropped_offset,
                ..
            }) => vec![
                MaskValues {
                    kept: scale,
                    dropped: 0.0,
                    unit: 1.0,
                },
                MaskValues {
                    kept: kept_offset,
                    dropped: dropped_offset,
                    unit: 0.0,
                },
            ],
            None => vec![MaskValues {
                kept: 1.0 / (1.0 - self.ratio.unwrap_or(0.0) as f64),
                dropped: 0.0,
                unit: 1.0,
            }],
        }
    }

    /// Where the typed shape probe must also read the mask's own shape.
    pub(crate) fn template_tensor(&self) -> Option<&str> {
        match &self.template {
            Some(MaskTemplate::Like(t)) => Some(t),
            _ => None,
        }
    }

    /// The mask's shape when the file fixes it.
    pub(crate) fn static_mask_shape(&self) -> Option<Vec<Dim>> {
        match &self.template {
            Some(MaskTemplate::Static(dims)) => Some(dims.iter().map(|&d| Dim::Fixed(d)).collect()),
            _ => None,
        }
    }

    /// Sets the mask's shape, and with it the kind, once typing has told the activation's
    /// shape. Refuses a mask that does not broadcast into the activation: replacing the
    /// site by the identity in eval would then change the output's shape.
    pub(crate) fn set_mask_shape(&mut self, activation: &[Dim], mask: Vec<Dim>) -> anyhow::Result<()> {
        let fits = mask.len() <= activation.len()
            && mask
                .iter()
                .rev()
                .zip(activation.iter().rev())
                .all(|(m, a)| m == a || *m == Dim::Fixed(1));
        if !fits {
            bail!(
                "the random draw of dropout site '{}' has shape {}, which does not broadcast into \
                 the activation it drops, of shape {}; the model is refused",
                self.node,
                crate::engine::model::shape_string(&mask),
                crate::engine::model::shape_string(activation)
            );
        }
        if self.kind != SiteKind::Alpha {
            let channel = mask.len() == activation.len()
                && mask.len() >= 3
                && mask[..2] == activation[..2]
                && mask[2..].iter().all(|d| *d == Dim::Fixed(1))
                && activation[2..].iter().any(|d| *d != Dim::Fixed(1));
            self.kind = if mask == activation {
                SiteKind::Element
            } else if channel {
                SiteKind::Channel
            } else {
                SiteKind::Broadcast
            };
        }
        self.mask_shape = Some(mask);
        Ok(())
    }
}

/// What graph surgery learned about a file, and the eval graph it built.
pub struct Surgery {
    pub sites: Vec<DropoutSite>,
    /// Changes made so the file is served correctly, for the model's report.
    pub fixes: Vec<String>,
    /// Why MC cannot be offered, when the file alone decides it.
    pub mc_blocker: Option<String>,
    pub eval_proto: ModelProto,
    base: ModelProto,
}

/// Where the typed shape probe holds a tensor's fact.
#[derive(Debug, Clone, Copy)]
pub enum FactAt {
    Input(usize),
    Output(usize),
}

/// A mask input of the MC graph. Its shape is the site's mask shape: the Dropout's input
/// shape, or the shape of the file's own draw. The masks of one site are consecutive and
/// drawn from the same keep/drop draws.
#[derive(Debug, Clone)]
pub struct MaskInput {
    pub site: usize,
    pub name: String,
    pub ratio: f32,
    pub values: MaskValues,
    pub datum: DatumType,
    pub shape: Vec<Dim>,
}

/// What the typed shape probe tells about a site: its activation's fact, and where the
/// mask's own shape is when the file's draw has a shape of its own.
#[derive(Debug, Clone, Copy)]
pub struct ProbeLookup {
    pub site: usize,
    pub activation: FactAt,
    pub template: Option<FactAt>,
}

pub fn opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

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

impl Surgery {
    /// A copy of the eval graph that also exposes every site's input and, where the file
    /// draws a mask of its own shape, the tensor that shapes it, so that tract's type
    /// analysis tells us each mask's shape.
    pub fn shape_probe_proto(&self) -> (ModelProto, Vec<ProbeLookup>) {
        let wanted: Vec<String> = self
            .sites
            .iter()
            .flat_map(|s| std::iter::once(s.input.clone()).chain(s.template_tensor().map(str::to_string)))
            .collect();
        let mut proto = self.rewrite(None, &wanted);
        let graph = proto.graph.as_mut().expect("eval proto has a graph");
        let fact_at = |name: &str| {
            if let Some(p) = graph.input.iter().position(|i| i.name == name) {
                // Re-declaring a graph input as an untyped output would erase its type.
                FactAt::Input(
                    graph.input[..p]
                        .iter()
                        .filter(|i| !self.is_initializer(&i.name))
                        .count(),
                )
            } else {
                FactAt::Output(
                    graph
                        .output
                        .iter()
                        .position(|o| o.name == name)
                        .expect("rewrite declared it as an output"),
                )
            }
        };
        let lookups = self
            .sites
            .iter()
            .enumerate()
            .map(|(ix, site)| ProbeLookup {
                site: ix,
                activation: fact_at(&site.input),
                template: site.template_tensor().map(fact_at),
            })
            .collect();
        (proto, lookups)
    }

    fn is_initializer(&self, name: &str) -> bool {
        self.base
            .graph
            .as_ref()
            .is_some_and(|g| g.initializer.iter().any(|t| t.name == name))
    }

    /// The MC graph: every sampling site multiplies by its mask input. `logits_outputs`
    /// lists graph outputs (by index) to replace by the named tensor: the server applies
    /// those outputs' final Softmax itself.
    pub fn mc_proto(&self, masks: &[MaskInput], logits_outputs: &[(usize, String)]) -> anyhow::Result<ModelProto> {
        let mut proto = self.rewrite(Some(masks), &[]);
        let graph = proto.graph.as_mut().expect("rewritten proto has a graph");
        for m in masks {
            graph.input.push(value_info(&m.name, m.datum, &m.shape)?);
        }
        for (ix, logits) in logits_outputs {
            graph.output[*ix].name = logits.clone();
        }
        no_random_ops(&proto)?;
        Ok(proto)
    }

    /// The graph with every site replaced: by its mask multiply where `masks` has one, else
    /// by the identity. `extra_outputs` are declared as outputs (if not already inputs or
    /// outputs) before nodes that nothing reads any more are dropped.
    fn rewrite(&self, masks: Option<&[MaskInput]>, extra_outputs: &[String]) -> ModelProto {
        let mut proto = self.base.clone();
        let graph = proto.graph.as_mut().expect("base proto has a graph");
        let mut replacements: HashMap<usize, Vec<NodeProto>> = HashMap::new();
        let mut removed: HashSet<usize> = HashSet::new();
        for (ix, site) in self.sites.iter().enumerate() {
            let site_masks: Vec<&MaskInput> = masks.into_iter().flatten().filter(|m| m.site == ix).collect();
            let nodes = match site_masks.as_slice() {
                [scale, offset] => {
                    // Alpha dropout: x·scale + offset, both drawn from the same keep/drop draws.
                    let scaled = format!("{}__mcd_scaled", site.output);
                    vec![
                        node("Mul", &site.node, &[&site.input, &scale.name], &[&scaled]),
                        node(
                            "Add",
                            &format!("{}__mcd_offset", site.node),
                            &[&scaled, &offset.name],
                            &[&site.output],
                        ),
                    ]
                }
                [m, ..] => {
                    let mut nodes = vec![node("Mul", &site.node, &[&site.input, &m.name], &[&site.output])];
                    if let Some(mask_out) = &site.mask_output {
                        let mut cast = node("Cast", &format!("{}__mcd_mask", site.node), &[&m.name], &[mask_out]);
                        cast.attribute.push(AttributeProto {
                            name: "to".into(),
                            r#type: 2, // INT
                            i: DataType::Bool as i64,
                            ..Default::default()
                        });
                        nodes.push(cast);
                    }
                    nodes
                }
                [] => {
                    let mut nodes = vec![node("Identity", &site.node, &[&site.input], &[&site.output])];
                    if let Some(mask_out) = &site.mask_output {
                        // An eval mask keeps everything: all true, shaped as the input.
                        let shape_name = format!("{mask_out}__mcd_shape");
                        nodes.push(node(
                            "Shape",
                            &format!("{}__mcd_shape", site.node),
                            &[&site.input],
                            &[&shape_name],
                        ));
                        let mut fill = node(
                            "ConstantOfShape",
                            &format!("{}__mcd_mask", site.node),
                            &[&shape_name],
                            &[mask_out],
                        );
                        fill.attribute.push(tensor_attribute(
                            "value",
                            TensorProto {
                                dims: vec![1],
                                data_type: DataType::Bool as i32,
                                int32_data: vec![1],
                                ..Default::default()
                            },
                        ));
                        nodes.push(fill);
                    }
                    nodes
                }
            };
            replacements.insert(site.anchor, nodes);
            removed.extend(site.nodes.iter().copied());
        }
        let old = std::mem::take(&mut graph.node);
        for (ix, n) in old.into_iter().enumerate() {
            match replacements.remove(&ix) {
                Some(nodes) => graph.node.extend(nodes),
                None if removed.contains(&ix) => {}
                None => graph.node.push(n),
            }
        }
        for name in extra_outputs {
            if !graph.input.iter().any(|i| i.name == *name) && !graph.output.iter().any(|o| o.name == *name) {
                graph.output.push(ValueInfoProto {
                    name: name.clone(),
                    ..Default::default()
                });
            }
        }
        // What fed only a replaced draw (Shape -> Concat -> ConstantOfShape) is now dead.
        prune(graph);
        // Graph inputs that only fed a Dropout's ratio or training_mode are now dangling.
        // Drop them, or every client would have to send a value that changes nothing.
        let orphaned: HashSet<&str> = self
            .sites
            .iter()
            .flat_map(|s| s.control_inputs.iter().map(String::as_str))
            .collect();
        let still_used = consumed_names(graph);
        graph
            .input
            .retain(|i| !orphaned.contains(i.name.as_str()) || still_used.contains(i.name.as_str()));
        proto
    }
}

/// The invariant behind serving: no graph handed to tract draws random numbers. `analyse`
/// refuses every random op outside a recognised pattern and the rewrite removes each
/// pattern whole, so this never fails; it is checked anyway, as a mistake here would make
/// answers silently stochastic.
fn no_random_ops(proto: &ModelProto) -> anyhow::Result<()> {
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

fn is_default_domain(node: &NodeProto) -> bool {
    node.domain.is_empty() || node.domain == "ai.onnx"
}

pub fn node_name(node: &NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.output.first().cloned().unwrap_or_else(|| node.op_type.clone())
    }
}

pub(crate) fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn subgraphs(node: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    node.attribute.iter().flat_map(|a| a.g.iter().chain(a.graphs.iter()))
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

/// Every name that some node reads (subgraphs included, as they may capture outer names),
/// plus the graph outputs.
fn consumed_names(graph: &GraphProto) -> HashSet<String> {
    fn walk(g: &GraphProto, acc: &mut HashSet<String>) {
        for n in &g.node {
            acc.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
            for sub in subgraphs(n) {
                walk(sub, acc);
            }
        }
    }
    let mut acc: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    walk(graph, &mut acc);
    acc
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

/// Drops the nodes whose outputs nothing reads, until none is left. ONNX ops have no side
/// effects, so this never changes what the graph computes.
fn prune(graph: &mut GraphProto) {
    loop {
        let used = consumed_names(graph);
        let before = graph.node.len();
        graph
            .node
            .retain(|n| n.output.is_empty() || n.output.iter().any(|o| !o.is_empty() && used.contains(o)));
        if graph.node.len() == before {
            return;
        }
    }
}

/// Weights stored outside the .onnx file (`<file>.onnx.data`, as PyTorch's exporter writes
/// for larger models) must sit in the model's folder, whole. Checked here so that a missing
/// or truncated file is refused with a reason that names it, before tract reads a byte.
pub fn check_external_data(proto: &ModelProto, dir: &Path) -> anyhow::Result<()> {
    fn tensors(g: &GraphProto) -> Vec<&TensorProto> {
        let mut out: Vec<&TensorProto> = g.initializer.iter().collect();
        for n in &g.node {
            for a in &n.attribute {
                out.extend(a.t.iter());
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    out.extend(tensors(sub));
                }
            }
        }
        out
    }
    let Some(graph) = &proto.graph else { return Ok(()) };
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for t in tensors(graph) {
        if t.data_location != Some(1) {
            continue; // EXTERNAL is 1; the data is in the file itself
        }
        let entry = |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str());
        let Some(location) = entry("location") else {
            bail!("tensor '{}' is stored outside the model file but names no file", t.name)
        };
        let number = |key: &str| -> anyhow::Result<Option<u64>> {
            entry(key)
                .map(|v| v.parse::<u64>())
                .transpose()
                .with_context(|| format!("tensor '{}': external data {key} is not a number", t.name))
        };
        // The data belongs to the model's folder: never read a file elsewhere.
        let relative = Path::new(location);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            bail!(
                "tensor '{}' is stored in '{location}', outside the model's folder; the server reads \
                 external data only from beside the model file",
                t.name
            );
        }
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let file = dir.join(location);
        let size = match sizes.get(location) {
            Some(s) => *s,
            None => {
                let s = std::fs::metadata(&file)
                    .with_context(|| {
                        format!(
                            "the weights of tensor '{}' are stored in '{location}', which must sit beside \
                             the model file in {}; it cannot be read",
                            t.name,
                            dir.display()
                        )
                    })?
                    .len();
                sizes.insert(location.to_string(), s);
                s
            }
        };
        let element_bytes = match DataType::try_from(t.data_type) {
            Ok(DataType::Float | DataType::Int32 | DataType::Uint32) => Some(4),
            Ok(DataType::Double | DataType::Int64 | DataType::Uint64) => Some(8),
            Ok(DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16) => Some(2),
            Ok(DataType::Int8 | DataType::Uint8 | DataType::Bool) => Some(1),
            _ => None,
        };
        // Checked: a hostile file may declare dims whose byte size overflows.
        let needed = match element_bytes {
            None => None,
            Some(b) => Some(
                t.dims
                    .iter()
                    .try_fold(b, |acc: u64, &d| acc.checked_mul(u64::try_from(d).unwrap_or(0)))
                    .with_context(|| format!("tensor '{}' has shape {:?}, too large to hold", t.name, t.dims))?,
            ),
        };
        if let (Some(length), Some(needed)) = (length, needed)
            && length != needed
        {
            bail!(
                "tensor '{}' declares {length} bytes in '{location}', but its shape {:?} needs {needed}",
                t.name,
                t.dims
            );
        }
        let Some(length) = length.or(needed) else { continue };
        let end = offset.saturating_add(length);
        if end > size {
            bail!(
                "'{location}' (beside the model file) is truncated: it holds {size} bytes, and tensor \
                 '{}' needs bytes {offset}..{end}",
                t.name
            );
        }
    }
    Ok(())
}

pub(crate) fn constant_tensors(graph: &GraphProto) -> HashMap<&str, (TensorProto, &'static str)> {
    let mut map: HashMap<&str, (TensorProto, &'static str)> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), (t.clone(), "initializer")))
        .collect();
    for n in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let Some(out) = n.output.first() else { continue };
        for a in &n.attribute {
            let t = match a.name.as_str() {
                "value" => a.t.clone(),
                "value_float" => Some(TensorProto {
                    data_type: DataType::Float as i32,
                    float_data: vec![a.f],
                    ..Default::default()
                }),
                _ => None,
            };
            if let Some(t) = t {
                map.insert(out.as_str(), (t, "constant"));
            }
        }
    }
    map
}

/// A node attribute holding a tensor (ONNX `AttributeType::TENSOR`).
pub(crate) fn tensor_attribute(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 4, // TENSOR
        t: Some(t),
        ..Default::default()
    }
}

fn scalar_f32(t: &TensorProto) -> anyhow::Result<f32> {
    let tensor = tract_onnx::tensor::load_tensor(&MmapDataResolver, t, None)?;
    if tensor.len() != 1 {
        bail!("expected a scalar, found shape {:?}", tensor.shape());
    }
    let v = tensor.cast_to::<f32>()?;
    Ok(v.try_as_plain_ram()?.as_slice::<f32>()?[0])
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

fn value_info(name: &str, datum: DatumType, shape: &[Dim]) -> anyhow::Result<ValueInfoProto> {
    let elem_type = match datum {
        DatumType::F32 => DataType::Float,
        DatumType::F64 => DataType::Double,
        DatumType::F16 => DataType::Float16,
        other => bail!("dropout on {other:?} tensors is not supported"),
    } as i32;
    let dim = shape
        .iter()
        .map(|d| {
            let value = match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                Dim::Symbol(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            };
            tensor_shape_proto::Dimension {
                value: Some(value),
                ..Default::default()
            }
        })
        .collect();
    Ok(ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::StringStringEntryProto;

    /// A model whose one initializer, FLOAT[dims], is stored in `w.bin` with these entries.
    fn external(dims: Vec<i64>, entries: &[(&str, &str)]) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                initializer: vec![TensorProto {
                    name: "w".into(),
                    dims,
                    data_type: DataType::Float as i32,
                    data_location: Some(1),
                    external_data: entries
                        .iter()
                        .map(|(k, v)| StringStringEntryProto {
                            key: k.to_string(),
                            value: v.to_string(),
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn external_data_is_checked_for_presence_size_and_declared_length() {
        let dir = std::env::temp_dir().join(format!("mcd-external-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.bin"), [0u8; 64]).unwrap();
        let check = |dims: Vec<i64>, entries: &[(&str, &str)]| {
            check_external_data(&external(dims, entries), &dir).map_err(|e| format!("{e:#}"))
        };
        assert!(check(vec![4, 4], &[("location", "w.bin")]).is_ok());
        assert!(check(vec![2, 4], &[("location", "w.bin"), ("offset", "32"), ("length", "32")]).is_ok());
        let err = check(vec![4, 4], &[("location", "w.bin"), ("offset", "4")]).unwrap_err();
        assert!(err.contains("truncated") && err.contains("4..68"), "{err}");
        let err = check(vec![4, 4], &[("location", "w.bin"), ("length", "60")]).unwrap_err();
        assert!(err.contains("declares 60 bytes"), "{err}");
        let err = check(vec![4, 4], &[("location", "other.bin")]).unwrap_err();
        assert!(err.contains("'other.bin'") && err.contains("cannot be read"), "{err}");
        let err = check(vec![4], &[("location", "w.bin"), ("offset", "-1")]).unwrap_err();
        assert!(err.contains("offset is not a number"), "{err}");
        assert!(check(vec![4], &[]).unwrap_err().contains("names no file"));
        for outside in ["/etc/hostname", "../w.bin"] {
            let err = check(vec![4], &[("location", outside)]).unwrap_err();
            assert!(err.contains("outside the model's folder"), "{err}");
        }
        // Dims whose byte size overflows: refused, never a panic.
        let huge = vec![i64::MAX, i64::MAX];
        let err = check(huge, &[("location", "w.bin"), ("length", "64")]).unwrap_err();
        assert!(err.contains("too large"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod site_tests {
    //! The dropout-site analysis on hand-built graphs: where each ratio and training mode
    //! comes from, which sites sample, and what is refused.
    use super::*;
    use tract_onnx::pb::OperatorSetIdProto;

    fn scalar(v: f32) -> TensorProto {
        TensorProto {
            data_type: DataType::Float as i32,
            float_data: vec![v],
            ..Default::default()
        }
    }

    fn boolean(v: bool) -> TensorProto {
        TensorProto {
            data_type: DataType::Bool as i32,
            int32_data: vec![v as i32],
            ..Default::default()
        }
    }

    fn constant(out: &str, t: TensorProto) -> NodeProto {
        let mut n = node("Constant", &format!("{out}_const"), &[], &[out]);
        n.attribute.push(AttributeProto {
            name: "value".into(),
            t: Some(t),
            ..Default::default()
        });
        n
    }

    fn input(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            ..Default::default()
        }
    }

    /// A model of `nodes` whose graph inputs are `x` and `inputs`, output `y`.
    fn model(opset: i64, nodes: Vec<NodeProto>, inputs: &[&str], initializers: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            opset_import: vec![
                OperatorSetIdProto {
                    domain: "com.example".into(),
                    version: 99,
                },
                OperatorSetIdProto {
                    domain: "".into(),
                    version: opset,
                },
            ],
            graph: Some(GraphProto {
                node: nodes,
                input: std::iter::once("x").chain(inputs.iter().copied()).map(input).collect(),
                output: vec![input("y")],
                initializer: initializers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sites(m: &ModelProto) -> Vec<DropoutSite> {
        analyse(m, &HashMap::new()).unwrap().sites
    }

    fn one_site(m: &ModelProto) -> DropoutSite {
        let s = sites(m);
        assert_eq!(s.len(), 1, "{s:?}");
        s.into_iter().next().unwrap()
    }

    #[test]
    fn opset_reads_the_default_domain() {
        let m = model(13, vec![], &[], vec![]);
        assert_eq!(opset(&m), 13);
        let mut m = m;
        m.opset_import[1].domain = "ai.onnx".into();
        assert_eq!(opset(&m), 13);
        m.opset_import.remove(1);
        assert_eq!(opset(&m), 0);
    }

    #[test]
    fn before_opset_12_the_ratio_is_an_attribute_or_the_default() {
        let mut d = node("Dropout", "d", &["x"], &["y"]);
        d.attribute.push(AttributeProto {
            name: "ratio".into(),
            f: 0.2,
            ..Default::default()
        });
        for opset in [7, 10, 11] {
            let s = one_site(&model(opset, vec![d.clone()], &[], vec![]));
            assert_eq!(
                (s.ratio, s.ratio_source.as_str()),
                (Some(0.2), "attribute"),
                "opset {opset}"
            );
            assert!(s.samples());
        }
        let s = one_site(&model(11, vec![node("Dropout", "d", &["x"], &["y"])], &[], vec![]));
        assert_eq!((s.ratio, s.ratio_source.as_str()), (Some(0.5), "default"));
        assert_eq!(s.exported_training_mode, "absent");
        // From opset 12 on, the attribute is gone: an input or the default.
        let s = one_site(&model(12, vec![d], &[], vec![]));
        assert_eq!((s.ratio, s.ratio_source.as_str()), (Some(0.5), "default"));
    }

    #[test]
    fn from_opset_12_the_ratio_is_a_constant_an_initializer_or_the_default() {
        let nodes = vec![constant("r", scalar(0.1)), node("Dropout", "d", &["x", "r"], &["y"])];
        let s = one_site(&model(13, nodes, &[], vec![]));
        assert_eq!((s.ratio, s.ratio_source.as_str()), (Some(0.1), "constant"));

        let mut c = node("Constant", "c", &[], &["r"]);
        c.attribute.push(AttributeProto {
            name: "value_float".into(),
            f: 0.35,
            ..Default::default()
        });
        let s = one_site(&model(
            13,
            vec![c, node("Dropout", "d", &["x", "r"], &["y"])],
            &[],
            vec![],
        ));
        assert_eq!((s.ratio, s.ratio_source.as_str()), (Some(0.35), "constant"));

        let mut init = scalar(0.4);
        init.name = "r".into();
        let s = one_site(&model(
            13,
            vec![node("Dropout", "d", &["x", "r"], &["y"])],
            &[],
            vec![init],
        ));
        assert_eq!((s.ratio, s.ratio_source.as_str()), (Some(0.4), "initializer"));

        for inputs in [&["x"][..], &["x", ""]] {
            let s = one_site(&model(13, vec![node("Dropout", "d", inputs, &["y"])], &[], vec![]));
            assert_eq!((s.ratio, s.ratio_source.as_str()), (Some(0.5), "default"));
        }
    }

    #[test]
    fn a_ratio_from_a_graph_input_needs_the_config_and_a_computed_one_blocks_mc() {
        let m = model(13, vec![node("Dropout", "d", &["x", "r"], &["y"])], &["r"], vec![]);
        let a = analyse(&m, &HashMap::new()).unwrap();
        let s = &a.sites[0];
        assert_eq!((s.ratio, s.ratio_source.as_str()), (None, "graph input 'r'"));
        assert!(!s.samples());
        assert_eq!(s.control_inputs, vec!["r".to_string()]);
        let blocker = a.mc_blocker.unwrap();
        assert!(
            blocker.contains("'d'") && blocker.contains("dropout_ratios"),
            "{blocker}"
        );

        let a = analyse(&m, &HashMap::from([("r".to_string(), 0.25f32)])).unwrap();
        assert_eq!(a.sites[0].ratio, Some(0.25));
        assert!(a.sites[0].ratio_source.contains("model config"));
        assert!(a.mc_blocker.is_none());

        let nodes = vec![
            node("ReduceMean", "mean", &["x"], &["r"]),
            node("Dropout", "d", &["x", "r"], &["y"]),
        ];
        let a = analyse(&model(13, nodes, &[], vec![]), &HashMap::new()).unwrap();
        assert_eq!(a.sites[0].ratio, None);
        assert_eq!(a.sites[0].ratio_source, "computed at run time ('r')");
        assert!(a.sites[0].control_inputs.is_empty());
        assert!(a.mc_blocker.is_some());
    }

    #[test]
    fn the_exported_training_mode_is_recorded() {
        let cases: Vec<(Vec<NodeProto>, &[&str], &str)> = vec![
            (vec![constant("t", boolean(true))], &[], "constant true"),
            (vec![constant("t", boolean(false))], &[], "constant false"),
            (vec![], &["t"], "graph input 't'"),
            (
                vec![node("Not", "not", &["b"], &["t"])],
                &["b"],
                "computed at run time ('t')",
            ),
        ];
        for (mut nodes, inputs, want) in cases {
            nodes.push(constant("r", scalar(0.3)));
            nodes.push(node("Dropout", "d", &["x", "r", "t"], &["y"]));
            let s = one_site(&model(13, nodes, inputs, vec![]));
            assert_eq!(s.exported_training_mode, want);
            assert_eq!(s.ratio, Some(0.3));
            let controls: Vec<String> = if want.starts_with("graph input") {
                vec!["t".into()]
            } else {
                vec![]
            };
            assert_eq!(s.control_inputs, controls);
        }
        let s = one_site(&model(
            13,
            vec![node("Dropout", "d", &["x", "", ""], &["y"])],
            &[],
            vec![],
        ));
        assert_eq!(s.exported_training_mode, "absent");
    }

    #[test]
    fn ratios_outside_0_1_are_refused_and_0_does_not_sample() {
        for bad in [1.0f32, 1.5, -0.1] {
            let nodes = vec![constant("r", scalar(bad)), node("Dropout", "d", &["x", "r"], &["y"])];
            let err = analyse(&model(13, nodes, &[], vec![]), &HashMap::new()).err().unwrap();
            assert!(err.to_string().contains("ratio"), "{err}");
        }
        let nodes = vec![constant("r", scalar(0.0)), node("Dropout", "d", &["x", "r"], &["y"])];
        let s = one_site(&model(13, nodes, &[], vec![]));
        assert_eq!(s.ratio, Some(0.0));
        assert!(!s.samples());
        let nodes = vec![
            constant(
                "r",
                TensorProto {
                    data_type: DataType::Float as i32,
                    dims: vec![2],
                    float_data: vec![0.1, 0.2],
                    ..Default::default()
                },
            ),
            node("Dropout", "d", &["x", "r"], &["y"]),
        ];
        let err = analyse(&model(13, nodes, &[], vec![]), &HashMap::new()).err().unwrap();
        assert!(format!("{err:#}").contains("ratio of Dropout node 'd'"), "{err:#}");
    }

    #[test]
    fn sites_keep_their_order_names_inputs_and_mask_use() {
        let nodes = vec![
            node("Dropout", "first", &["x"], &["a", "unused_mask"]),
            node("Dropout", "", &["a"], &["b", "mask"]),
            node("Cast", "cast", &["mask"], &["mask_f"]),
            node("Dropout", "elsewhere", &["b"], &["y"]),
            node("Mul", "mul", &["b", "mask_f"], &["z"]),
        ];
        let mut foreign = nodes[3].clone();
        foreign.domain = "com.example".into();
        let mut nodes = nodes;
        nodes[3] = foreign;
        let mut default_domain = node("Dropout", "explicit", &["z"], &["w"]);
        default_domain.domain = "ai.onnx".into();
        nodes.push(default_domain);
        let s = sites(&model(13, nodes, &[], vec![]));
        let names: Vec<&str> = s.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(names, ["first", "b", "explicit"]);
        assert_eq!(s.iter().map(|s| s.anchor).collect::<Vec<_>>(), [0, 1, 5]);
        assert_eq!((s[1].input.as_str(), s[1].output.as_str()), ("a", "b"));
        assert!(!s[0].mask_output_used);
        assert_eq!(s[0].mask_output, None);
        assert!(s[1].mask_output_used);
        assert_eq!(s[1].mask_output.as_deref(), Some("mask"));
        assert!(!s[2].mask_output_used);
    }

    #[test]
    fn a_mask_that_is_a_graph_output_or_read_in_a_subgraph_is_used() {
        let mut m = model(13, vec![node("Dropout", "d", &["x"], &["y", "mask"])], &[], vec![]);
        m.graph.as_mut().unwrap().output.push(input("mask"));
        assert!(one_site(&m).mask_output_used);

        let body = GraphProto {
            node: vec![node("Identity", "inner", &["mask"], &["out"])],
            ..Default::default()
        };
        let mut iff = node("If", "if", &["cond"], &["z"]);
        iff.attribute.push(AttributeProto {
            name: "then_branch".into(),
            g: Some(body),
            ..Default::default()
        });
        let m = model(
            13,
            vec![node("Dropout", "d", &["x"], &["y", "mask"]), iff],
            &["cond"],
            vec![],
        );
        assert!(one_site(&m).mask_output_used);
    }

    #[test]
    fn a_dropout_without_a_data_input_is_refused() {
        for inputs in [&[][..], &[""]] {
            let err = analyse(
                &model(13, vec![node("Dropout", "d", inputs, &["y"])], &[], vec![]),
                &HashMap::new(),
            )
            .err()
            .unwrap();
            assert!(err.to_string().contains("no data input"), "{err}");
        }
    }

    #[test]
    fn a_dropout_in_a_subgraph_at_any_depth_is_refused_with_its_names() {
        let dropout_body = GraphProto {
            node: vec![node("Dropout", "", &["x"], &["inner_out"])],
            ..Default::default()
        };
        let mut loop_node = node("Loop", "loop", &[], &["l"]);
        loop_node.attribute.push(AttributeProto {
            name: "body".into(),
            g: Some(dropout_body.clone()),
            ..Default::default()
        });
        let outer_body = GraphProto {
            node: vec![loop_node],
            ..Default::default()
        };
        let mut iff = node("If", "if", &["cond"], &["y"]);
        iff.attribute.push(AttributeProto {
            name: "branches".into(),
            graphs: vec![GraphProto::default(), outer_body],
            ..Default::default()
        });
        let err = analyse(&model(13, vec![iff], &["cond"], vec![]), &HashMap::new())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("'inner_out'") && err.contains("Loop node 'loop'"), "{err}");
        // A subgraph without Dropout is fine.
        let mut iff = node("If", "if", &["cond"], &["y"]);
        iff.attribute.push(AttributeProto {
            name: "then_branch".into(),
            g: Some(GraphProto {
                node: vec![node("Identity", "i", &["x"], &["o"])],
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(sites(&model(13, vec![iff], &["cond"], vec![])).is_empty());
    }

    #[test]
    fn node_names_fall_back_to_the_first_output_then_the_op() {
        assert_eq!(node_name(&node("Dropout", "named", &["x"], &["y"])), "named");
        assert_eq!(node_name(&node("Dropout", "", &["x"], &["y"])), "y");
        assert_eq!(node_name(&node("Dropout", "", &["x"], &[])), "Dropout");
    }
}
