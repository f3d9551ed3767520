//! Tests of the recogniser of dropout written as random ops.

use super::*;

use crate::engine::onnx_graph::proto::node;
use tract_onnx::pb::{AttributeProto, ValueInfoProto};

fn scalar(name: &str, v: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: 1, // FLOAT
        float_data: vec![v],
        ..Default::default()
    }
}

/// A graph reading `x` and writing `y`, with scalar initializers.
fn graph(nodes: Vec<NodeProto>, scalars: &[(&str, f32)]) -> GraphProto {
    let vi = |n: &str| ValueInfoProto {
        name: n.into(),
        ..Default::default()
    };
    GraphProto {
        node: nodes,
        initializer: scalars.iter().map(|(n, v)| scalar(n, *v)).collect(),
        input: vec![vi("x")],
        output: vec![vi("y")],
        ..Default::default()
    }
}

fn find_in(g: &GraphProto) -> anyhow::Result<Vec<Decomposed>> {
    find(g, &crate::engine::onnx_graph::proto::constant_tensors(g))
}

fn one(g: &GraphProto) -> Decomposed {
    let mut found = find_in(g).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(found.len(), 1);
    found.remove(0)
}

fn refused(g: &GraphProto, want: &[&str]) {
    let e = format!("{:#}", find_in(g).expect_err("refused"));
    for w in want {
        assert!(e.contains(w), "{e:?} lacks {w:?}");
    }
}

fn draw(name: &str, out: &str) -> NodeProto {
    node("RandomUniformLike", name, &["x"], &[out])
}

fn assert_inverted(d: &Decomposed, keep: f64, out: &str) {
    assert!((d.keep - keep).abs() < 1e-6, "keep {}", d.keep);
    let Form::Scale { scale } = d.form else {
        panic!("{:?}", d.form)
    };
    assert!((scale * keep - 1.0).abs() < 1e-6);
    assert_eq!((d.x.as_str(), d.out.as_str()), ("x", out));
    assert_eq!(d.template, MaskTemplate::Like("x".into()));
}

#[test]
fn comparison_variants_give_the_keep_probability() {
    // u > ratio keeps: keep = 1 - ratio.
    let g = graph(
        vec![
            draw("u", "u"),
            node("Greater", "gt", &["u", "ratio"], &["b"]),
            node("Cast", "cast", &["b"], &["k"]),
            node("Div", "div", &["k", "keep"], &["noise"]),
            node("Mul", "mul", &["x", "noise"], &["y"]),
        ],
        &[("ratio", 0.3), ("keep", 0.7)],
    );
    let d = one(&g);
    assert_inverted(&d, 0.7, "y");
    assert_eq!(d.node, "mul");
    assert_eq!(d.nodes, vec![0, 1, 2, 3, 4]);
    // u < ratio drops; Not turns it into a keep indicator; the scale is a Mul by 1/keep
    // and the activation comes second.
    let g = graph(
        vec![
            draw("u", "u"),
            node("Less", "lt", &["u", "ratio"], &["d"]),
            node("Not", "not", &["d"], &["b"]),
            node("Cast", "cast", &["b"], &["k"]),
            node("Mul", "scale", &["k", "inv_keep"], &["noise"]),
            node("Mul", "mul", &["noise", "x"], &["y"]),
        ],
        &[("ratio", 0.3), ("inv_keep", 1.0 / 0.7)],
    );
    assert_inverted(&one(&g), 0.7, "y");
    // keep > u, operands reversed; x·k first, then the scale.
    let g = graph(
        vec![
            draw("u", "u"),
            node("Greater", "gt", &["keep", "u"], &["b"]),
            node("Cast", "cast", &["b"], &["k"]),
            node("Mul", "mul", &["x", "k"], &["xk"]),
            node("Div", "div", &["xk", "keep"], &["y"]),
        ],
        &[("keep", 0.7)],
    );
    assert_inverted(&one(&g), 0.7, "y");
}

#[test]
fn bernoulli_of_a_constant_probability_is_a_draw() {
    let mut fill = node("ConstantOfShape", "fill", &["shape"], &["probs"]);
    fill.attribute.push(crate::engine::onnx_graph::proto::tensor_attribute(
        "value",
        scalar("", 0.8),
    ));
    let mut g = graph(
        vec![
            node("Shape", "shape", &["x"], &["shape"]),
            fill,
            node("Bernoulli", "bernoulli", &["probs"], &["k"]),
            node("Div", "div", &["k", "keep"], &["noise"]),
            node("Mul", "mul", &["x", "noise"], &["y"]),
        ],
        &[("keep", 0.8)],
    );
    let d = one(&g);
    assert!((d.keep - 0.8).abs() < 1e-6);
    assert_eq!(d.template, MaskTemplate::Like("probs".into()));
    assert_eq!(
        d.nodes,
        vec![2, 3, 4],
        "Shape and ConstantOfShape stay (pruned once dead)"
    );
    // A probability that is not one known value is refused.
    g.node[1].attribute.clear();
    g.node[1].op_type = "Relu".into();
    refused(&g, &["Bernoulli node 'bernoulli'", "keep probability is unknown"]);
}

#[test]
fn the_pattern_ends_at_the_dropout() {
    // A scale after the dropout is the model's own: not part of the site.
    let g = graph(
        vec![
            draw("u", "u"),
            node("Less", "lt", &["u", "keep"], &["b"]),
            node("Cast", "cast", &["b"], &["k"]),
            node("Div", "div", &["k", "keep"], &["noise"]),
            node("Mul", "mul", &["x", "noise"], &["dropped"]),
            node("Mul", "double", &["dropped", "two"], &["y"]),
        ],
        &[("keep", 0.5), ("two", 2.0)],
    );
    let d = one(&g);
    assert_inverted(&d, 0.5, "dropped");
    assert_eq!(d.nodes, vec![0, 1, 2, 3, 4]);
}

#[test]
fn alpha_dropout_as_pytorch_writes_it() {
    let (p, alpha) = (0.1f64, 1.758_099_340_847_376_6f64);
    let a = 1.0 / ((1.0 - p) * (1.0 + p * alpha * alpha)).sqrt();
    let g = graph(
        vec![
            draw("u", "u"),
            node("Less", "lt", &["u", "keep"], &["b"]),
            node("Cast", "cast", &["b"], &["k"]),
            node("Add", "add_3", &["k", "minus_one"], &["km1"]),
            node("Mul", "mul_5", &["km1", "alpha_a"], &["t"]),
            node("Add", "add_10", &["t", "alpha_a_p"], &["offset"]),
            node("Mul", "mul_10", &["k", "a"], &["ka"]),
            node("Mul", "mul_11", &["x", "ka"], &["xka"]),
            node("Add", "add_20", &["xka", "offset"], &["y"]),
        ],
        &[
            ("keep", (1.0 - p) as f32),
            ("minus_one", -1.0),
            ("alpha_a", (alpha * a) as f32),
            ("alpha_a_p", (alpha * a * p) as f32),
            ("a", a as f32),
        ],
    );
    let d = one(&g);
    let Form::Alpha { saturation, scale, .. } = d.form else {
        panic!("{:?}", d.form)
    };
    assert!((saturation - alpha).abs() < 1e-6 && (scale - a).abs() < 1e-6);
    assert_eq!(d.nodes.len(), 9);
    assert_eq!(d.node, "add_20");
}

#[test]
fn anything_else_random_is_refused_with_the_node_name() {
    let base = || {
        vec![
            draw("u", "u"),
            node("Less", "lt", &["u", "keep"], &["b"]),
            node("Cast", "cast", &["b"], &["k"]),
        ]
    };
    // Not scaled by 1/keep: eval would not be the identity.
    let mut nodes = base();
    nodes.push(node("Mul", "mul", &["x", "k"], &["y"]));
    refused(
        &graph(nodes, &[("keep", 0.7)]),
        &["RandomUniformLike node 'u'", "does not feed a dropout form"],
    );
    // The keep indicator is also read outside the pattern.
    let mut nodes = base();
    nodes.push(node("Div", "div", &["k", "keep"], &["noise"]));
    nodes.push(node("Mul", "mul", &["x", "noise"], &["dropped"]));
    nodes.push(node("Add", "add", &["dropped", "k"], &["y"]));
    refused(&graph(nodes, &[("keep", 0.7)]), &["'u'", "also read by Add node 'add'"]);
    // The activation must not be computed from the draw itself.
    let mut nodes = base();
    nodes.push(node("Div", "div", &["k", "keep"], &["noise"]));
    nodes.push(node("Relu", "relu", &["noise"], &["r"]));
    nodes.push(node("Mul", "mul", &["r", "noise"], &["y"]));
    refused(
        &graph(nodes, &[("keep", 0.7)]),
        &["'u'", "does not feed a dropout form"],
    );
    // Threshold not a constant.
    let mut nodes = base();
    nodes[1].input[1] = "x".into();
    refused(&graph(nodes, &[]), &["'u'", "not a scalar"]);
    // Normal draws, multinomial sampling: never a dropout.
    for op in ["RandomNormalLike", "RandomNormal", "Multinomial"] {
        let g = graph(
            vec![
                node(op, "noise", &["x"], &["n"]),
                node("Add", "add", &["x", "n"], &["y"]),
            ],
            &[],
        );
        refused(&g, &[&format!("{op} node 'noise'"), "refused"]);
    }
    // A draw nothing reads is still a random op in the file.
    let g = graph(vec![draw("unused", "u"), node("Identity", "id", &["x"], &["y"])], &[]);
    refused(&g, &["RandomUniformLike node 'unused'"]);
}

#[test]
fn a_random_op_inside_a_subgraph_is_refused() {
    let body = GraphProto {
        node: vec![node("RandomUniformLike", "hidden_draw", &["x"], &["r"])],
        output: vec![ValueInfoProto {
            name: "r".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut if_node = node("If", "branch", &["cond"], &["y"]);
    for name in ["then_branch", "else_branch"] {
        if_node.attribute.push(AttributeProto {
            name: name.into(),
            r#type: 5, // GRAPH
            g: Some(body.clone()),
            ..Default::default()
        });
    }
    refused(&graph(vec![if_node], &[]), &["hidden_draw", "If node 'branch'"]);
}

#[test]
fn products_use_k_squared_equals_k_and_refuse_x_squared() {
    let k = Affine::indicator();
    let x = Affine::activation();
    let km1 = k.add(Affine::konst(1.0), -1.0);
    // (k - 1)·k = 0 for k in {0, 1}.
    assert_eq!(km1.mul(k).unwrap(), Affine::konst(0.0));
    let xk = x.mul(k.scale(2.0)).unwrap();
    assert_eq!(xk.branch(true), (2.0, 0.0));
    assert_eq!(xk.branch(false), (0.0, 0.0));
    assert!(xk.mul(x).is_none());
}

#[test]
fn inverted_and_alpha_forms_are_read_and_others_are_not() {
    let k = Affine::indicator();
    let x = Affine::activation();
    let keep = 0.75;
    let inverted = x.mul(k.scale(1.0 / keep)).unwrap();
    assert_eq!(
        classify(&inverted, keep),
        Some((Form::Scale { scale: 1.0 / keep }, keep))
    );
    // The same with the indicator meaning "drop": keep = 1 - q.
    let dropped = x.mul(Affine::konst(1.0).add(k, -1.0).scale(1.0 / keep)).unwrap();
    assert_eq!(classify(&dropped, 1.0 - keep).unwrap().1, keep);
    // Not scaled by 1/keep: eval would not be the identity.
    assert_eq!(classify(&x.mul(k).unwrap(), keep), None);

    // PyTorch's AlphaDropout(p) as its exporter writes it.
    let (p, alpha) = (0.1f64, 1.758_099_340_847_376_6f64);
    let a = 1.0 / ((1.0 - p) * (1.0 + p * alpha * alpha)).sqrt();
    let b = k
        .add(Affine::konst(1.0), -1.0)
        .scale(alpha * a)
        .add(Affine::konst(alpha * a * p), 1.0);
    let out = x.mul(k.scale(a)).unwrap().add(b, 1.0);
    let Some((Form::Alpha { saturation, .. }, kept)) = classify(&out, 1.0 - p) else {
        panic!("alpha dropout not recognised");
    };
    assert!((saturation - alpha).abs() < 1e-12 && (kept - 0.9).abs() < 1e-12);
    // A different affine map is not alpha dropout.
    assert_eq!(
        classify(&x.mul(k.scale(a)).unwrap().add(b.scale(2.0), 1.0), 1.0 - p),
        None
    );
}
