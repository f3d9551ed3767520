//! Large tract graphs run a pass of many rows as one pass per row.
//!
//! tract optimises a graph specialised to one row differently from the same graph at two
//! rows or more: at one row a 1x1 convolution is a plain matrix product whose output feeds
//! the next BatchNorm and ReLU fused into it, and a 3x3 convolution reads its input through
//! a lazy im2col; at more rows tract folds the batch into the product's rows, which costs
//! two transposes per convolution, materialises every im2col, and leaves the BatchNorm and
//! ReLU unfused (tract 0.23.9, DenseNet121 at 224x224: 761 plan nodes at one row, 1,066 at
//! two, with 122 `MoveAxis`). Measured on one core (AMD EPYC Zen 4, AVX-512): DenseNet121 eval takes
//! 87 ms at one row and 252 ms per row at two (280 ms per row at 20), so an MC-20 of one
//! image took 6.8 s as one pass of 20 rows and takes 20 passes of one row in about 1.9 s.
//!
//! A graph whose one row costs at least [`ROW_BY_ROW_FMA`] multiply-adds (tract's own cost
//! model) has nothing to gain from batching on a CPU: its products are already large at one
//! row, and a pass's fixed cost (microseconds) is nothing beside its milliseconds of
//! arithmetic. Such a graph, when every input and output has the batch in front, runs a pass
//! of B rows as B passes of its one-row plan, their outputs stacked. The answers do not
//! move with it: rows are independent (the load-time `eval_row_independent` check runs the
//! batched plan to prove it), and a row always runs the same one-row plan, whatever shares
//! its pass.
//!
//! Small graphs (the bundled models) stay batched: there batching is what amortises each
//! op's fixed cost, MC-50 as one pass of 50 rows runs several times faster than 50 passes.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::Cost;

/// One row's multiply-adds from which a graph runs row by row: 20 million, under a
/// millisecond of one core at DenseNet121's pace (2.8 G in 87 ms). The bundled models are
/// far below (digits_cnn: 0.1 M); the real-size image models far above (ResNet-50 4.1 G,
/// DenseNet121 2.8 G). BERT-base's cost stays symbolic in its sequence length, so it is
/// never counted and stays batched.
pub const ROW_BY_ROW_FMA: u64 = 20_000_000;

/// Multiply-adds of one pass of `typed` with its symbols at `values`, by tract's cost
/// model; None when a cost stays symbolic (a dimension the values do not fix).
pub fn fma(typed: &TypedModel, values: &HashMap<Symbol, TDim>) -> TractResult<Option<u64>> {
    let model = typed.set_symbols(values)?;
    let mut total = 0u64;
    for node in &model.nodes {
        let facts = model.node_input_facts(node.id)?;
        for (cost, count) in node.op.cost(&facts)? {
            if matches!(cost, Cost::FMA(_)) {
                match count.to_i64() {
                    Ok(n) => total = total.saturating_add(n.max(0) as u64),
                    Err(_) => return Ok(None),
                }
            }
        }
    }
    Ok(Some(total))
}

/// Whether every input and output of `typed` has the batch symbol `batch` as its first
/// dimension, so that row `r` of a pass is row `r` of every tensor.
pub fn batch_leads_everything(typed: &TypedModel, batch: &Symbol) -> TractResult<bool> {
    let leads = |o: &OutletId| -> TractResult<bool> {
        let fact = typed.outlet_fact(*o)?;
        Ok(fact.shape.iter().next() == Some(&TDim::Sym(batch.clone())))
    };
    for o in typed.inputs.iter().chain(&typed.outputs) {
        if !leads(o)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs a pass of `rows` rows as one pass per row through `one_row`, and stacks each
/// output's rows back in order.
pub fn run(
    rows: usize,
    inputs: TVec<TValue>,
    mut one_row: impl FnMut(TVec<TValue>) -> TractResult<TVec<TValue>>,
) -> TractResult<TVec<TValue>> {
    let mut outputs: Vec<Vec<TValue>> = vec![];
    for r in 0..rows {
        let row = inputs
            .iter()
            .map(|t| Ok(t.slice(0, r, r + 1)?.into_tvalue()))
            .collect::<TractResult<TVec<TValue>>>()?;
        let outs = one_row(row)?;
        outputs.resize_with(outs.len(), Vec::new);
        for (all, t) in outputs.iter_mut().zip(outs) {
            all.push(t);
        }
    }
    outputs
        .iter()
        .map(|rows| {
            let tensors: Vec<&Tensor> = rows.iter().map(|t| &**t).collect();
            Ok(Tensor::stack_tensors(0, &tensors)?.into_tvalue())
        })
        .collect()
}
