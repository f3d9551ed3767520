//! Protobuf helpers the surgery shares: names, domains, constants, value infos.

use std::collections::{HashMap, HashSet};

use anyhow::bail;
use tract_onnx::data_resolver::MmapDataResolver;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};
use tract_onnx::prelude::*;

use crate::engine::spec::Dim;

pub fn opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

pub fn is_default_domain(node: &NodeProto) -> bool {
    node.domain.is_empty() || node.domain == "ai.onnx"
}

pub fn node_name(node: &NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.output.first().cloned().unwrap_or_else(|| node.op_type.clone())
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn subgraphs(node: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    node.attribute.iter().flat_map(|a| a.g.iter().chain(a.graphs.iter()))
}

/// Every name that some node reads (subgraphs included, as they may capture outer names),
/// plus the graph outputs.
pub fn consumed_names(graph: &GraphProto) -> HashSet<String> {
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

/// Drops the nodes whose outputs nothing reads, until none is left. ONNX ops have no side
/// effects, so this never changes what the graph computes.
pub fn prune(graph: &mut GraphProto) {
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

pub fn constant_tensors(graph: &GraphProto) -> HashMap<&str, (TensorProto, &'static str)> {
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
pub fn tensor_attribute(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 4, // TENSOR
        t: Some(t),
        ..Default::default()
    }
}

pub fn scalar_f32(t: &TensorProto) -> anyhow::Result<f32> {
    let tensor = tract_onnx::tensor::load_tensor(&MmapDataResolver, t, None)?;
    if tensor.len() != 1 {
        bail!("expected a scalar, found shape {:?}", tensor.shape());
    }
    let v = tensor.cast_to::<f32>()?;
    Ok(v.try_as_plain_ram()?.as_slice::<f32>()?[0])
}

pub fn value_info(name: &str, datum: DatumType, shape: &[Dim]) -> anyhow::Result<ValueInfoProto> {
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

pub fn tensor_f64(t: &TensorProto) -> anyhow::Result<Vec<f64>> {
    let tensor = tract_onnx::tensor::load_tensor(&MmapDataResolver, t, None)?;
    let v = tensor.cast_to::<f64>()?;
    Ok(v.try_as_plain_ram()?.as_slice::<f64>()?.to_vec())
}

pub fn attr_f(node: &NodeProto, name: &str) -> Option<f64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f as f64)
}
