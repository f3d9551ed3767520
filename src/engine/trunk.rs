//! The shared trunk of an MC graph.
//!
//! Everything upstream of the first dropout mask computes the same values in every MC
//! sample: in a CNN with dropout in its head that is all the convolutions, in an MLP the
//! input scaling and the first layer. Running it once per request row instead of once per
//! (sample, row), and tiling its results N times where they meet the stochastic part, makes
//! MC-N cost one eval of the trunk plus N passes of the head.
//!
//! The rewrite works on the typed MC graph, node by node:
//! - a node is *trunk* when it depends on a model input but on no mask, *stochastic* when
//!   it depends on a mask, *constant* otherwise (weights and shapes);
//! - every trunk tensor that a stochastic node or a graph output reads goes through a
//!   `Tile` by the samples symbol along its first axis, which must be the batch axis;
//! - mask inputs are sized `samples × batch` rows.
//!
//! Tiling repeats the whole B-row block N times, so row `s·B + b` is sample `s` of request
//! row `b`: the same layout as tiling the model inputs, and the masks are drawn the same way.
//! Anything the rewrite cannot prove safe (a trunk tensor whose first axis is not the batch,
//! an op whose shapes are baked for B rows) makes it fail, and the caller keeps the full
//! graph; the load-time self-check then compares the two graphs on the probe input.

use std::collections::{HashMap, HashSet};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::Tile;

/// Name of the symbol the rewritten graph uses for the number of samples in a pass.
pub const SAMPLES_SYMBOL: &str = "mcd_samples";

/// The rewritten graph and what the rewrite did.
pub struct SharedTrunk {
    pub model: TypedModel,
    /// Nodes that now run once per request row.
    pub trunk_nodes: usize,
    /// Trunk tensors tiled into the stochastic part.
    pub tiled: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Constant,
    Trunk,
    Stochastic,
}

/// Rewrites `mc` (the typed MC graph, whose inputs `mask_inputs` are the dropout masks) so
/// that its trunk runs on the request rows only. `Ok(None)` when the trunk is empty (no
/// node upstream of the masks reads an input): tiling the inputs is then the same thing.
pub fn share(mc: &TypedModel, batch: &str, mask_inputs: &[usize]) -> TractResult<Option<SharedTrunk>> {
    let Some(b) = mc.symbols.get(batch) else {
        anyhow::bail!("the graph has no symbol '{batch}'");
    };
    let order = mc.eval_order()?;
    let mask_nodes: HashSet<usize> = mask_inputs.iter().map(|&i| mc.inputs[i].node).collect();
    let input_nodes: HashSet<usize> = mc.inputs.iter().map(|o| o.node).collect();
    let mut class = vec![Class::Constant; mc.nodes.len()];
    for &n in &order {
        class[n] = if mask_nodes.contains(&n) {
            Class::Stochastic
        } else if input_nodes.contains(&n) {
            Class::Trunk
        } else {
            mc.nodes[n]
                .inputs
                .iter()
                .map(|i| class[i.node])
                .max()
                .unwrap_or(Class::Constant)
        };
    }
    let trunk_nodes = order
        .iter()
        .filter(|&&n| class[n] == Class::Trunk && !input_nodes.contains(&n))
        .count();
    if trunk_nodes == 0 {
        return Ok(None);
    }

    let samples = mc.symbols.sym(SAMPLES_SYMBOL);
    let mut out = TypedModel {
        symbols: mc.symbols.clone(),
        ..TypedModel::default()
    };
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    let mut tiles: HashMap<OutletId, OutletId> = HashMap::new();
    let mut tile = |out: &mut TypedModel, map: &HashMap<OutletId, OutletId>, o: OutletId| -> TractResult<OutletId> {
        if let Some(t) = tiles.get(&o) {
            return Ok(*t);
        }
        let fact = mc.outlet_fact(o)?;
        let name = &mc.nodes[o.node].name;
        let batch_led = fact.shape.first() == Some(&TDim::Sym(b.clone()))
            && fact.shape.iter().skip(1).all(|d| !d.symbols().contains(&b));
        if !batch_led {
            anyhow::bail!(
                "trunk tensor '{name}' (shape {:?}) does not have the batch as its first axis",
                fact.shape
            );
        }
        let mut multipliers: TVec<TDim> = tvec![TDim::from(1); fact.rank()];
        multipliers[0] = TDim::Sym(samples.clone());
        let t = out.wire_node(format!("{name}.{}.mcd_tile", o.slot), Tile { multipliers }, &[map[&o]])?[0];
        tiles.insert(o, t);
        Ok(t)
    };

    for &n in &order {
        let node = &mc.nodes[n];
        if input_nodes.contains(&n) {
            let mut fact = mc.outlet_fact(OutletId::new(n, 0))?.clone();
            if mask_nodes.contains(&n) {
                if fact.shape.first() != Some(&TDim::Sym(b.clone())) {
                    anyhow::bail!("mask input '{}' does not have the batch as its first axis", node.name);
                }
                fact.shape.set(0, TDim::Sym(samples.clone()) * TDim::Sym(b.clone()));
            }
            map.insert(OutletId::new(n, 0), out.add_source(&node.name, fact)?);
            continue;
        }
        let mut inputs = tvec![];
        for &i in &node.inputs {
            inputs.push(if class[n] == Class::Stochastic && class[i.node] == Class::Trunk {
                tile(&mut out, &map, i)?
            } else {
                map[&i]
            });
        }
        let wired = out.wire_node(&node.name, node.op.clone(), &inputs)?;
        for (slot, o) in wired.into_iter().enumerate() {
            map.insert(OutletId::new(n, slot), o);
        }
    }
    let mut outputs = vec![];
    for &o in &mc.outputs {
        outputs.push(match class[o.node] {
            Class::Stochastic => map[&o],
            Class::Trunk => tile(&mut out, &map, o)?,
            Class::Constant => anyhow::bail!("output '{}' does not depend on any input", mc.nodes[o.node].name),
        });
    }
    let inputs: Vec<OutletId> = mc.inputs.iter().map(|o| map[o]).collect();
    out.set_input_outlets(&inputs)?;
    out.select_output_outlets(&outputs)?;
    let tiled = tiles.len();
    Ok(Some(SharedTrunk {
        model: out,
        trunk_nodes,
        tiled,
    }))
}
