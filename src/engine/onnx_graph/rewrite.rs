//! The graphs built from the sites: the eval graph (every site the identity), the MC graph
//! (every live site a multiply by a mask input), and the shape probe that sizes the masks.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, tensor_proto::DataType};

use super::analyse::no_random_ops;
use super::proto::{consumed_names, node, prune, tensor_attribute, value_info};
use super::sites::*;

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
    pub(super) fn rewrite(&self, masks: Option<&[MaskInput]>, extra_outputs: &[String]) -> ModelProto {
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
