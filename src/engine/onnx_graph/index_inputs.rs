//! Graph inputs whose values are indices into a table: a token id looked up in an
//! embedding, say. tract's `Gather` panics on an index outside its table (which the server
//! would answer 500), so the load finds each such input and its table's size, and the
//! request's values are checked against it ([`LoadedModel::input_rows`]).
//!
//! [`LoadedModel::input_rows`]: crate::engine::model::LoadedModel::input_rows

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, NodeProto};

use super::proto::is_default_domain;

/// Ops that hand their first input's values on unchanged (only its shape or integer type
/// may change), so an index that passes through them is still the request's value.
const VALUE_PRESERVING: &[&str] = &["Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"];

/// For each graph input that reaches the indices of a `Gather` through value-preserving
/// ops only: the number of entries along the gathered axis of the smallest table it
/// indexes (ONNX allows an index `i` with `-n <= i < n`). Tables are initializers or
/// `Constant` nodes; an index computed from the input (`ids + 1`) is not followed.
pub fn index_limits(graph: &GraphProto) -> HashMap<String, usize> {
    let producer: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let inputs: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let mut limits: HashMap<String, usize> = HashMap::new();
    for gather in graph
        .node
        .iter()
        .filter(|n| is_default_domain(n) && n.op_type == "Gather" && n.input.len() == 2)
    {
        let Some(size) = table_size(graph, &producer, gather) else {
            continue;
        };
        let mut name = gather.input[1].as_str();
        while let Some(node) = producer.get(name) {
            if !(is_default_domain(node) && VALUE_PRESERVING.contains(&node.op_type.as_str())) {
                break;
            }
            let Some(first) = node.input.first() else { break };
            name = first;
        }
        if inputs.contains(&name) {
            let limit = limits.entry(name.to_string()).or_insert(size);
            *limit = (*limit).min(size);
        }
    }
    limits
}

/// The size of `gather`'s table along its axis, when the table is a constant.
fn table_size(graph: &GraphProto, producer: &HashMap<&str, &NodeProto>, gather: &NodeProto) -> Option<usize> {
    let data = gather.input[0].as_str();
    let dims: Vec<i64> = match graph.initializer.iter().find(|t| t.name == data) {
        Some(t) => t.dims.clone(),
        None => {
            let node = producer.get(data).filter(|n| n.op_type == "Constant")?;
            node.attribute
                .iter()
                .find(|a| a.name == "value")?
                .t
                .as_ref()?
                .dims
                .clone()
        }
    };
    let axis = gather.attribute.iter().find(|a| a.name == "axis").map_or(0, |a| a.i);
    let rank = dims.len() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    let size = *dims.get(usize::try_from(axis).ok()?)?;
    usize::try_from(size).ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::{AttributeProto, TensorProto, ValueInfoProto};

    use super::*;
    use crate::engine::onnx_graph::proto::node;

    fn graph(nodes: Vec<NodeProto>, tables: &[(&str, Vec<i64>)]) -> GraphProto {
        GraphProto {
            input: ["ids", "types", "mask"]
                .iter()
                .map(|n| ValueInfoProto {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            initializer: tables
                .iter()
                .map(|(n, dims)| TensorProto {
                    name: n.to_string(),
                    dims: dims.clone(),
                    ..Default::default()
                })
                .collect(),
            node: nodes,
            ..Default::default()
        }
    }

    #[test]
    fn inputs_that_index_a_table_get_its_size() {
        let mut by_axis = node("Gather", "g3", &["pos", "ids"], &["e3"]);
        by_axis.attribute.push(AttributeProto {
            name: "axis".into(),
            i: -1,
            ..Default::default()
        });
        let g = graph(
            vec![
                node("Gather", "g1", &["words", "ids"], &["e1"]),
                node("Cast", "c", &["types"], &["t64"]),
                node("Unsqueeze", "u", &["t64"], &["t2"]),
                node("Gather", "g2", &["type_table", "t2"], &["e2"]),
                by_axis,
                // `mask` is computed upon before any lookup: not followed.
                node("Add", "a", &["mask", "one"], &["m1"]),
                node("Gather", "g4", &["words", "m1"], &["e4"]),
                // A table that is itself computed: no limit known.
                node("Gather", "g5", &["e1", "types"], &["e5"]),
            ],
            &[
                ("words", vec![500, 16]),
                ("type_table", vec![2, 16]),
                ("pos", vec![16, 64]),
            ],
        );
        let limits = index_limits(&g);
        // `ids` indexes 500 words and, along the last axis, 64 positions: the smaller holds.
        assert_eq!(limits.get("ids"), Some(&64));
        assert_eq!(limits.get("types"), Some(&2));
        assert_eq!(limits.get("mask"), None);
        assert_eq!(limits.len(), 2);
    }
}
