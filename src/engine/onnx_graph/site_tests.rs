//! The dropout-site analysis on hand-built graphs: where each ratio and training mode
//! comes from, which sites sample, and what is refused.

use std::collections::HashMap;

use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, tensor_proto::DataType,
};

use super::proto::*;
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
