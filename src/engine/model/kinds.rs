//! Output kinds, decided once at load: from the Softmax or Sigmoid node that produces an
//! output, overridden by `<stem>.model.json`; and the activation the server applies
//! itself, in f64, to the logits of such an output.

use anyhow::bail;
use tract_onnx::pb::ModelProto;

use super::*;
use crate::engine::onnx_graph;

/// A final activation the server applies itself, in f64, to a graph's logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Activation {
    /// Softmax over the axes `first..=last` jointly, at every position of the others.
    Softmax {
        first: usize,
        last: usize,
    },
    Sigmoid,
}

impl Activation {
    /// Applies the activation in place to row-major `values` of `shape`.
    pub(super) fn apply(&self, values: &mut [f64], shape: &[usize]) {
        match self {
            Activation::Softmax { first, last } => {
                let (classes, inner) = class_block(shape, *first, *last);
                for_each_distribution(values, classes, inner, softmax_strided);
            }
            Activation::Sigmoid => values.iter_mut().for_each(|v| *v = sigmoid(*v)),
        }
    }

    /// Subtracts each distribution's mean logit (softmax ignores a shift they share, so only
    /// what is left can move a probability); a sigmoid's logits stay as they are.
    pub(super) fn center(&self, values: &mut [f64], shape: &[usize]) {
        if let Activation::Softmax { first, last } = self {
            let (classes, inner) = class_block(shape, *first, *last);
            for_each_distribution(values, classes, inner, |v, stride| {
                let n = v.len().div_ceil(stride);
                let mean = v.iter().step_by(stride).sum::<f64>() / n as f64;
                v.iter_mut().step_by(stride).for_each(|x| *x -= mean);
            });
        }
    }
}

/// The number of classes (the product of the dims `first..=last`) and of positions after
/// them per block.
fn class_block(shape: &[usize], first: usize, last: usize) -> (usize, usize) {
    let last = last.min(shape.len().saturating_sub(1));
    let classes = shape.get(first..=last).map_or(1, |d| d.iter().product());
    let inner = shape.get(last + 1..).map_or(1, |d| d.iter().product());
    (classes.max(1), inner.max(1))
}

/// Calls `f` on each distribution: a slice starting at its first class, whose classes are
/// `stride` apart.
fn for_each_distribution(values: &mut [f64], classes: usize, inner: usize, mut f: impl FnMut(&mut [f64], usize)) {
    for block in values.chunks_exact_mut(classes * inner) {
        for i in 0..inner {
            f(&mut block[i..], inner);
        }
    }
}

fn softmax_strided(v: &mut [f64], stride: usize) {
    let max = v.iter().step_by(stride).cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in v.iter_mut().step_by(stride) {
        *x = (*x - max).exp();
        sum += *x;
    }
    v.iter_mut().step_by(stride).for_each(|x| *x /= sum);
}

/// The logistic function, without overflow for large |x|.
pub(super) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// What the graph says of one output: its kind, and the activation that produces it with
/// that activation's input (the logits).
pub(super) struct FromGraph {
    pub(super) kind: OutputKind,
    pub(super) activation: Option<(Activation, String)>,
}

/// Per output: its kind as the graph shows it, then as the config declares it.
pub(super) fn output_kinds(
    proto: &ModelProto,
    config: &ModelConfig,
    outputs: &[TensorSpec],
) -> anyhow::Result<Vec<FromGraph>> {
    for name in config.output_kinds.keys() {
        if !outputs.iter().any(|o| o.name == *name) {
            bail!(
                "the model config declares a kind for output '{name}', which the model does not have; its outputs are {}",
                outputs
                    .iter()
                    .map(|o| format!("'{}'", o.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    outputs
        .iter()
        .map(|o| {
            let mut found = from_graph(proto, o);
            // The older setting: these outputs, and no others, are distributions along the
            // last axis (an output it leaves out that a Softmax produces counts as other).
            if let Some(list) = &config.probability_outputs {
                let last = o.shape.len().saturating_sub(1);
                if list.contains(&o.name) {
                    found.kind = categorical(o, last, last);
                } else if matches!(found.kind, OutputKind::Categorical { .. }) {
                    found.kind = OutputKind::Other;
                }
            }
            if let Some(declared) = config.output_kinds.get(&o.name) {
                found.kind = declared_kind(o, declared)?;
            }
            Ok(found)
        })
        .collect()
}

fn declared_kind(o: &TensorSpec, declared: &DeclaredKind) -> anyhow::Result<OutputKind> {
    Ok(match declared {
        DeclaredKind::Categorical { class_axis } => {
            let rank = o.shape.len() as i64;
            let axis = if *class_axis < 0 {
                class_axis + rank
            } else {
                *class_axis
            };
            if axis < 1 || axis >= rank {
                bail!(
                    "the model config declares class_axis {class_axis} for output '{}' of shape {}: \
                     the class axis must be one of its axes other than the first (the rows)",
                    o.name,
                    shape_string(&o.shape)
                );
            }
            categorical(o, axis as usize, axis as usize)
        }
        DeclaredKind::Bernoulli => OutputKind::Bernoulli,
        DeclaredKind::Other => OutputKind::Other,
    })
}

/// Categorical over the axes `first..=last`, with the class count when the file fixes it;
/// a fixed count below two is no distribution to measure, so the output counts as other.
fn categorical(o: &TensorSpec, first: usize, last: usize) -> OutputKind {
    let classes = o.shape.get(first..=last).and_then(|dims| {
        dims.iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                Dim::Symbol(_) => None,
            })
            .product::<Option<usize>>()
    });
    if o.shape.is_empty() || classes.is_some_and(|k| k < 2) {
        return OutputKind::Other;
    }
    OutputKind::Categorical {
        class_axes: (first..=last).collect(),
        classes,
    }
}

fn from_graph(proto: &ModelProto, o: &TensorSpec) -> FromGraph {
    let other = FromGraph {
        kind: OutputKind::Other,
        activation: None,
    };
    let graph = proto.graph.as_ref().expect("has graph");
    let Some(node) = graph.node.iter().find(|n| {
        (n.domain.is_empty() || n.domain == "ai.onnx")
            && (n.op_type == "Softmax" || n.op_type == "Sigmoid")
            && n.output.first() == Some(&o.name)
    }) else {
        return other;
    };
    let Some(input) = node.input.first().cloned() else {
        return other;
    };
    if node.op_type == "Sigmoid" {
        return FromGraph {
            kind: OutputKind::Bernoulli,
            activation: Some((Activation::Sigmoid, input)),
        };
    }
    let rank = o.shape.len() as i64;
    let opset = onnx_graph::opset(proto);
    let default_axis = if opset >= 13 { -1 } else { 1 };
    let axis = node
        .attribute
        .iter()
        .find(|a| a.name == "axis")
        .map(|a| a.i)
        .unwrap_or(default_axis);
    let axis = if axis < 0 { axis + rank } else { axis };
    if axis < 0 || axis >= rank {
        return other;
    }
    let first = axis as usize;
    // Before opset 13, Softmax normalises over all axes from `axis` on, jointly: one
    // distribution over that whole block, never one per position of its trailing axes.
    let last = if opset >= 13 { first } else { rank as usize - 1 };
    FromGraph {
        kind: categorical(o, first, last),
        activation: Some((Activation::Softmax { first, last }, input)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_over_a_middle_axis_normalises_each_position() {
        // [1, 2, 3]: two classes along axis 1, three positions after them.
        let mut v = vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0 + 3f64.ln()];
        Activation::Softmax { first: 1, last: 1 }.apply(&mut v, &[1, 2, 3]);
        let want = [0.5, 0.5, 0.25, 0.5, 0.5, 0.75];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{v:?}");
        }
    }

    #[test]
    fn softmax_over_a_block_of_axes_normalises_it_jointly() {
        let mut v = vec![0.0; 6];
        Activation::Softmax { first: 1, last: 2 }.apply(&mut v, &[1, 2, 3]);
        assert!(v.iter().all(|p| (p - 1.0 / 6.0).abs() < 1e-15), "{v:?}");
    }

    #[test]
    fn sigmoid_closed_forms_and_extremes() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(3f64.ln()) - 0.75).abs() < 1e-15);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
    }

    #[test]
    fn centering_is_per_distribution() {
        let mut v = vec![1.0, 5.0, 3.0, 7.0];
        Activation::Softmax { first: 1, last: 1 }.center(&mut v, &[1, 2, 2]);
        assert_eq!(v, vec![-1.0, -1.0, 1.0, 1.0]);
    }
}
