//! Dropout written as random ops, as PyTorch's default exporter writes `Dropout1d/2d/3d`
//! and `AlphaDropout`: no `Dropout` node, but a draw, a comparison and some arithmetic.
//!
//! ```text
//! RandomUniformLike(shape of the mask) -> Less(·, keep) -> Cast -> Div(·, keep) -> Mul(x, ·)
//! ```
//!
//! This module finds such patterns on the protobuf, whatever the node names, and refuses
//! every random op that is not part of one. A random op the server does not control must
//! never run: in an eval plan it would make answers silently stochastic, the mode error
//! this project exists to prevent, and in an MC plan its draws would not follow the seed.
//!
//! A pattern is read in three steps:
//! 1. an *indicator* k in {0, 1} with a known probability of 1: a uniform draw compared
//!    with a constant (`Less`, `Greater`, `LessOrEqual`, `GreaterOrEqual`, either operand
//!    order), or a `Bernoulli` of a constant probability; then any chain of `Not` and
//!    `Cast`;
//! 2. the arithmetic downstream of k (`Add`, `Sub`, `Mul`, `Div` with scalar constants and
//!    one activation x), evaluated symbolically as c + c_k·k + c_x·x + c_xk·x·k, which is
//!    exact because k·k = k;
//! 3. the first tensor whose expression is a dropout form, read off its two branches
//!    (k = 1, k = 0), each a multiplier of x and an offset:
//!    - inverted dropout: kept x·s, dropped 0, with s = 1/keep;
//!    - alpha dropout (PyTorch's `AlphaDropout`/`FeatureAlphaDropout`): kept a·x + α·a·p,
//!      dropped -α·a·(1-p), with a = (keep·(1 + p·α²))^(-1/2), which keeps a SELU
//!      activation's mean 0 and variance 1.
//!
//! Every tensor of the pattern other than its output must be read only inside it: then
//! the pattern can be replaced as a whole (eval: the identity, as PyTorch's eval is; MC: a
//! mask the server samples), and nothing else in the graph ever sees a draw.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

use super::proto::{attr_f, is_default_domain, node_name, tensor_f64};

/// Operators that draw random numbers.
pub const RANDOM_OPS: [&str; 6] = [
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Bernoulli",
    "Multinomial",
];

/// Whether the node draws random numbers (in any domain: a custom-domain op of the same
/// name is no less random).
pub fn is_random(node: &NodeProto) -> bool {
    RANDOM_OPS.contains(&node.op_type.as_str())
}

/// Where the mask's shape comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskTemplate {
    /// The shape of this tensor (the input of `RandomUniformLike` or `Bernoulli`).
    Like(String),
    /// A shape fixed in the file (`RandomUniform`'s attribute, a constant's dims).
    Static(Vec<usize>),
}

/// What the pattern computes from x and the keep indicator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Form {
    /// Inverted dropout: kept values are x·scale (scale = 1/keep), dropped ones 0.
    Scale { scale: f64 },
    /// Alpha dropout: kept values are scale·x + kept_offset, dropped ones dropped_offset.
    /// `saturation` is α, the value -α that a dropped unit takes before the affine map.
    Alpha {
        scale: f64,
        kept_offset: f64,
        dropped_offset: f64,
        saturation: f64,
    },
}

/// One recognised pattern.
#[derive(Debug, Clone)]
pub struct Decomposed {
    /// The node whose output is the dropped activation.
    pub node: String,
    /// The matched chain, for the model's report.
    pub pattern: String,
    /// Every node of the pattern, by index: all are removed from the graph.
    pub nodes: Vec<usize>,
    /// The index of the node that produces `out`: the replacement goes there.
    pub anchor: usize,
    /// The activation the pattern drops.
    pub x: String,
    /// The pattern's output.
    pub out: String,
    /// The probability that a unit is kept.
    pub keep: f64,
    /// Where the keep probability came from: constant, initializer.
    pub keep_source: &'static str,
    pub template: MaskTemplate,
    pub form: Form,
}

/// value = one + k·k + x·x + xk·x·k, for k in {0, 1} (so k² = k).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Affine {
    one: f64,
    k: f64,
    x: f64,
    xk: f64,
}

impl Affine {
    fn konst(c: f64) -> Self {
        Affine {
            one: c,
            k: 0.0,
            x: 0.0,
            xk: 0.0,
        }
    }
    fn indicator() -> Self {
        Affine {
            k: 1.0,
            ..Affine::konst(0.0)
        }
    }
    fn activation() -> Self {
        Affine {
            x: 1.0,
            ..Affine::konst(0.0)
        }
    }
    fn has_x(&self) -> bool {
        self.x != 0.0 || self.xk != 0.0
    }
    fn is_constant(&self) -> bool {
        self.k == 0.0 && !self.has_x()
    }
    fn add(self, o: Affine, sign: f64) -> Affine {
        Affine {
            one: self.one + sign * o.one,
            k: self.k + sign * o.k,
            x: self.x + sign * o.x,
            xk: self.xk + sign * o.xk,
        }
    }
    fn scale(self, c: f64) -> Affine {
        Affine {
            one: self.one * c,
            k: self.k * c,
            x: self.x * c,
            xk: self.xk * c,
        }
    }
    /// The product, when it stays affine in x (no x² term).
    fn mul(self, o: Affine) -> Option<Affine> {
        if self.has_x() && o.has_x() {
            return None;
        }
        let (a, b) = (self, o);
        Some(Affine {
            one: a.one * b.one,
            k: a.one * b.k + a.k * b.one + a.k * b.k,
            x: a.one * b.x + a.x * b.one,
            xk: a.one * b.xk + a.xk * b.one + a.k * b.x + a.x * b.k + a.k * b.xk + a.xk * b.k,
        })
    }
    /// (multiplier of x, offset) when the indicator is `k`.
    fn branch(&self, k: bool) -> (f64, f64) {
        if k {
            (self.x + self.xk, self.one + self.k)
        } else {
            (self.x, self.one)
        }
    }
}

impl std::fmt::Display for Affine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ((m1, o1), (m0, o0)) = (self.branch(true), self.branch(false));
        write!(f, "{m1}·x + {o1} when the draw gives 1, {m0}·x + {o0} when it gives 0")
    }
}

/// What a graph's tensors are read by.
struct Index<'g> {
    graph: &'g GraphProto,
    consumers: HashMap<&'g str, Vec<usize>>,
    /// Graph outputs and names read inside subgraphs: never internal to a pattern.
    escapes: HashSet<String>,
    constants: &'g HashMap<&'g str, (TensorProto, &'static str)>,
}

impl<'g> Index<'g> {
    fn new(graph: &'g GraphProto, constants: &'g HashMap<&'g str, (TensorProto, &'static str)>) -> Self {
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (ix, n) in graph.node.iter().enumerate() {
            for i in n.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(i.as_str()).or_default().push(ix);
            }
        }
        let mut escapes: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        fn captured(g: &GraphProto, acc: &mut HashSet<String>) {
            for n in &g.node {
                acc.extend(n.input.iter().cloned());
                for sub in n.attribute.iter().flat_map(|a| a.g.iter().chain(a.graphs.iter())) {
                    captured(sub, acc);
                }
            }
        }
        for n in &graph.node {
            for sub in n.attribute.iter().flat_map(|a| a.g.iter().chain(a.graphs.iter())) {
                captured(sub, &mut escapes);
            }
        }
        Index {
            graph,
            consumers,
            escapes,
            constants,
        }
    }

    fn consumers(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The one node reading `name`, when exactly one does and nothing else sees it.
    fn single_consumer(&self, name: &str) -> Option<usize> {
        match self.consumers(name) {
            [one] if !self.escapes.contains(name) => Some(*one),
            _ => None,
        }
    }

    fn producer(&self, name: &str) -> Option<usize> {
        self.graph.node.iter().position(|n| n.output.iter().any(|o| o == name))
    }

    /// A constant holding one value (any shape whose size is 1).
    fn scalar(&self, name: &str) -> Option<(f64, &'static str)> {
        let (t, kind) = self.constants.get(name)?;
        let values = tensor_f64(t).ok()?;
        (values.len() == 1).then(|| (values[0], *kind))
    }

    /// Every tensor computed from `name`, through any node.
    fn descendants(&self, name: &str) -> HashSet<&'g str> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(t) = todo.pop() {
            for &c in self.consumers(&t) {
                for o in &self.graph.node[c].output {
                    if seen.insert(o.as_str()) {
                        todo.push(o.clone());
                    }
                }
            }
        }
        seen
    }
}

/// Finds every decomposed dropout of the graph's top level, and refuses any random op that
/// is not part of one (subgraphs included), naming the node.
pub fn find(
    graph: &GraphProto,
    constants: &HashMap<&str, (TensorProto, &'static str)>,
) -> anyhow::Result<Vec<Decomposed>> {
    refuse_random_in_subgraphs(graph)?;
    let index = Index::new(graph, constants);
    let mut found: Vec<Decomposed> = vec![];
    for (ix, node) in graph.node.iter().enumerate() {
        if !is_random(node) {
            continue;
        }
        let d = match_pattern(&index, ix).map_err(|why| {
            anyhow::anyhow!(
                "{} node '{}' draws random numbers, and {why}. The server runs no random op it does \
                 not control (in eval it would make answers silently stochastic, in MC its draws \
                 would ignore the seed), so the model is refused",
                node.op_type,
                node_name(node)
            )
        })?;
        if let Some(other) = found.iter().find(|o| o.nodes.iter().any(|n| d.nodes.contains(n))) {
            anyhow::bail!(
                "{} node '{}' and the draw of dropout site '{}' feed the same arithmetic; the server \
                 recognises one draw per dropout, so the model is refused",
                node.op_type,
                node_name(node),
                other.node
            );
        }
        found.push(d);
    }
    Ok(found)
}

fn refuse_random_in_subgraphs(graph: &GraphProto) -> anyhow::Result<()> {
    fn scan(owner: &NodeProto, g: &GraphProto) -> anyhow::Result<()> {
        for n in &g.node {
            if is_random(n) {
                anyhow::bail!(
                    "{} node '{}' draws random numbers inside the subgraph of {} node '{}'; the server \
                     cannot control draws inside Loop/If/Scan bodies, so the model is refused rather \
                     than served with randomness it does not control",
                    n.op_type,
                    node_name(n),
                    owner.op_type,
                    node_name(owner)
                );
            }
            for sub in n.attribute.iter().flat_map(|a| a.g.iter().chain(a.graphs.iter())) {
                scan(n, sub)?;
            }
        }
        Ok(())
    }
    for n in &graph.node {
        for sub in n.attribute.iter().flat_map(|a| a.g.iter().chain(a.graphs.iter())) {
            scan(n, sub)?;
        }
    }
    Ok(())
}

/// The pattern starting at random node `ix`, or why there is none.
fn match_pattern(index: &Index, ix: usize) -> Result<Decomposed, String> {
    let g = index.graph;
    let node = &g.node[ix];
    if !is_default_domain(node) {
        return Err(format!("it is in domain '{}', which no dropout form uses", node.domain));
    }
    let draw = node
        .output
        .first()
        .filter(|o| !o.is_empty())
        .ok_or("it has no output")?;
    let mut chain = vec![ix];
    // Step 1: the indicator k and the probability that it is 1.
    let (template, mut q, keep_source, mut k) = match node.op_type.as_str() {
        "RandomUniform" | "RandomUniformLike" => {
            let low = attr_f(node, "low").unwrap_or(0.0);
            let high = attr_f(node, "high").unwrap_or(1.0);
            if high <= low {
                return Err(format!("its range [{low}, {high}) is empty"));
            }
            let template = if node.op_type == "RandomUniform" {
                let shape = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "shape")
                    .ok_or("it has no shape attribute")?;
                MaskTemplate::Static(
                    shape
                        .ints
                        .iter()
                        .map(|&d| usize::try_from(d).map_err(|_| format!("its shape has dimension {d}")))
                        .collect::<Result<_, _>>()?,
                )
            } else {
                like(index, node.input.first().ok_or("it has no input")?)?
            };
            let c = index
                .single_consumer(draw)
                .ok_or("its draw is not read by exactly one comparison")?;
            let cmp = &g.node[c];
            let below = match cmp.op_type.as_str() {
                "Less" | "LessOrEqual" => true,
                "Greater" | "GreaterOrEqual" => false,
                other => {
                    return Err(format!(
                        "its draw is read by {other} node '{}', not a comparison",
                        node_name(cmp)
                    ));
                }
            };
            if !is_default_domain(cmp) || cmp.input.len() != 2 {
                return Err(format!(
                    "comparison node '{}' is not a standard binary one",
                    node_name(cmp)
                ));
            }
            // Less(u, t) and Greater(t, u) both mean u < t.
            let (threshold, below) = if cmp.input[0] == *draw {
                (&cmp.input[1], below)
            } else {
                (&cmp.input[0], !below)
            };
            let (t, source) = index.scalar(threshold).ok_or_else(|| {
                format!(
                    "comparison node '{}' compares the draw with '{threshold}', which is not a scalar \
                     constant, so the keep probability is unknown",
                    node_name(cmp)
                )
            })?;
            // Continuous draws: < and <= have the same probability.
            let share = ((t - low) / (high - low)).clamp(0.0, 1.0);
            chain.push(c);
            let k = cmp.output.first().ok_or("the comparison has no output")?;
            (template, if below { share } else { 1.0 - share }, source, k)
        }
        "Bernoulli" => {
            let p = node.input.first().filter(|s| !s.is_empty()).ok_or("it has no input")?;
            let (q, source, template) = bernoulli_probability(index, p)?;
            (template, q, source, draw)
        }
        other => {
            return Err(format!(
                "{other} draws are not part of any dropout form the server recognises"
            ));
        }
    };
    while let Some(c) = index.single_consumer(k) {
        let n = &g.node[c];
        if !is_default_domain(n) || !matches!(n.op_type.as_str(), "Not" | "Cast") {
            break;
        }
        if n.op_type == "Not" {
            q = 1.0 - q;
        }
        chain.push(c);
        k = n.output.first().ok_or("a Not/Cast node has no output")?;
    }

    // Step 2: the arithmetic downstream of k.
    let random_tensors = index.descendants(draw);
    let mut exprs: HashMap<&str, Affine> = HashMap::from([(k.as_str(), Affine::indicator())]);
    let mut absorbed: Vec<usize> = vec![];
    let mut x: Option<&str> = None;
    for (i, n) in g.node.iter().enumerate() {
        if chain.contains(&i) || !n.input.iter().any(|s| exprs.contains_key(s.as_str())) {
            continue;
        }
        if !is_default_domain(n)
            || !matches!(n.op_type.as_str(), "Add" | "Sub" | "Mul" | "Div")
            || n.input.len() != 2
            || n.output.len() != 1
        {
            continue;
        }
        let mut operands = vec![];
        let mut outside = None;
        for name in &n.input {
            if let Some(e) = exprs.get(name.as_str()) {
                operands.push(*e);
            } else if let Some((c, _)) = index.scalar(name) {
                operands.push(Affine::konst(c));
            } else {
                operands.push(Affine::activation());
                outside = Some(name.as_str());
            }
        }
        let pattern_has_x = n.input.iter().filter_map(|s| exprs.get(s.as_str())).any(Affine::has_x);
        if let Some(o) = outside {
            // The activation enters once, into an x-free part of the pattern, and must not
            // itself be computed from the draw.
            if pattern_has_x || random_tensors.contains(o) || x.is_some_and(|x| x != o) {
                continue;
            }
        }
        let (a, b) = (operands[0], operands[1]);
        let value = match n.op_type.as_str() {
            "Add" => Some(a.add(b, 1.0)),
            "Sub" => Some(a.add(b, -1.0)),
            "Mul" => a.mul(b),
            _ => (b.is_constant() && b.one != 0.0).then(|| a.scale(1.0 / b.one)),
        };
        let Some(value) = value else { continue };
        if outside.is_some() {
            x = outside;
        }
        exprs.insert(n.output[0].as_str(), value);
        absorbed.push(i);
    }

    // Step 3: the first tensor that is a complete dropout form.
    let found = absorbed.iter().find_map(|&i| {
        let out = g.node[i].output[0].as_str();
        classify(&exprs[out], q).map(|(form, keep)| (i, out, form, keep))
    });
    let Some((anchor, out, form, keep)) = found else {
        let last = absorbed.last().map(|&i| {
            format!(
                " (its last step, node '{}', computes {})",
                node_name(&g.node[i]),
                exprs[g.node[i].output[0].as_str()]
            )
        });
        return Err(format!(
            "its draw (1 with probability {q}) does not feed a dropout form the server recognises{}",
            last.unwrap_or_default()
        ));
    };
    let x = x.expect("a complete form involves the activation").to_string();

    // The pattern's arithmetic: the absorbed nodes that `out` depends on.
    let mut nodes: Vec<usize> = vec![anchor];
    let mut todo = vec![anchor];
    while let Some(n) = todo.pop() {
        for input in &g.node[n].input {
            if let Some(&p) = absorbed
                .iter()
                .find(|&&a| g.node[a].output[0] == *input && !nodes.contains(&a))
            {
                nodes.push(p);
                todo.push(p);
            }
        }
    }
    nodes.extend(&chain);
    nodes.sort_unstable();
    // Nothing outside the pattern may see any of its tensors but the output.
    for &n in &nodes {
        for o in g.node[n].output.iter().filter(|o| !o.is_empty() && o.as_str() != out) {
            if index.escapes.contains(o) {
                return Err(format!(
                    "its intermediate '{o}' is a graph output or read in a subgraph"
                ));
            }
            if let Some(&reader) = index.consumers(o).iter().find(|c| !nodes.contains(c)) {
                return Err(format!(
                    "its intermediate '{o}' is also read by {} node '{}', outside the dropout pattern",
                    g.node[reader].op_type,
                    node_name(&g.node[reader])
                ));
            }
        }
    }
    let pattern = nodes
        .iter()
        .map(|&n| format!("{} '{}'", g.node[n].op_type, node_name(&g.node[n])))
        .collect::<Vec<_>>()
        .join(" -> ");
    Ok(Decomposed {
        node: node_name(&g.node[anchor]),
        pattern,
        nodes,
        anchor,
        x,
        out: out.to_string(),
        keep,
        keep_source,
        template,
        form,
    })
}

/// The mask shape of a `...Like` op: a constant's dims, or the named tensor's shape.
fn like(index: &Index, name: &str) -> Result<MaskTemplate, String> {
    if name.is_empty() {
        return Err("it has no input".into());
    }
    Ok(match index.constants.get(name) {
        Some((t, _)) => MaskTemplate::Static(t.dims.iter().map(|&d| d.max(0) as usize).collect()),
        None => MaskTemplate::Like(name.to_string()),
    })
}

/// The probability of a `Bernoulli` whose input holds one value everywhere: a
/// `ConstantOfShape`, an `Expand` of a scalar constant, or a constant tensor.
fn bernoulli_probability(index: &Index, p: &str) -> Result<(f64, &'static str, MaskTemplate), String> {
    let unknown = || format!("its probability '{p}' is not one constant value, so the keep probability is unknown");
    if let Some((t, source)) = index.constants.get(p) {
        let values = tensor_f64(t).map_err(|_| unknown())?;
        let first = *values.first().ok_or_else(unknown)?;
        if values.iter().any(|v| *v != first) {
            return Err(unknown());
        }
        let dims = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        return Ok((first, source, MaskTemplate::Static(dims)));
    }
    let producer = index.producer(p).map(|i| &index.graph.node[i]).ok_or_else(unknown)?;
    let q = match producer.op_type.as_str() {
        "ConstantOfShape" => match producer.attribute.iter().find(|a| a.name == "value") {
            None => 0.0,
            Some(a) => {
                let values =
                    a.t.as_ref()
                        .map(tensor_f64)
                        .ok_or_else(unknown)?
                        .map_err(|_| unknown())?;
                *values.first().ok_or_else(unknown)?
            }
        },
        "Expand" => {
            index
                .scalar(producer.input.first().ok_or_else(unknown)?)
                .ok_or_else(unknown)?
                .0
        }
        _ => return Err(unknown()),
    };
    Ok((q, "constant", MaskTemplate::Like(p.to_string())))
}

/// Reads a dropout form off an expression, given the probability `q` that k = 1; with the
/// probability that a unit is kept.
fn classify(e: &Affine, q: f64) -> Option<(Form, f64)> {
    let (one, zero) = (e.branch(true), e.branch(false));
    // The kept branch is the one where x survives; the dropped one loses it.
    let ((scale, kept_offset), (_, dropped_offset), keep) = if one.0 != 0.0 && zero.0 == 0.0 {
        (one, zero, q)
    } else if zero.0 != 0.0 && one.0 == 0.0 {
        (zero, one, 1.0 - q)
    } else {
        return None;
    };
    // Constants come from float32 tensors: 1e-6 is ten float32 ulps.
    const TOL: f64 = 1e-6;
    if kept_offset.abs() <= TOL * scale.abs() && dropped_offset.abs() <= TOL * scale.abs() {
        return ((scale * keep - 1.0).abs() <= TOL).then_some((Form::Scale { scale }, keep));
    }
    // PyTorch's alpha dropout: kept a·x + α·a·p, dropped -α·a·(1-p).
    let p = 1.0 - keep;
    let saturation = (kept_offset - dropped_offset) / scale;
    if scale <= 0.0 || saturation <= 0.0 || keep <= 0.0 {
        return None;
    }
    let a = 1.0 / (keep * (1.0 + p * saturation * saturation)).sqrt();
    // The alpha constants pass through a few float32 roundings in the exporter.
    const ALPHA_TOL: f64 = 1e-5;
    let fits =
        (scale - a).abs() <= ALPHA_TOL * a && (kept_offset - saturation * a * p).abs() <= ALPHA_TOL * saturation * a;
    fits.then_some((
        Form::Alpha {
            scale,
            kept_offset,
            dropped_offset,
            saturation,
        },
        keep,
    ))
}

#[cfg(test)]
#[path = "decomposed_tests.rs"]
mod tests;
