//! Estimates of the memory a pass and an answer take, computed once at model load.
//!
//! A pass's peak is the peak of the tensors tract holds while it runs the optimised plan.
//! tract runs the plan's nodes in its `order`; a node's outputs are kept until the last
//! node in that order that reads them has run, and the graph's outputs until the pass ends
//! (`SimplePlan`'s flush lists, tract-core 0.23.9 `plan.rs`). While a node runs, its inputs
//! are still held (it was handed clones of them) and its outputs are being written, so
//! the bytes of step `i` are everything live before it plus its outputs. The peak is the
//! largest step. Constants (the weights) are not counted: a plan holds them once, and a
//! run hands out references to them. Nor are the graph's inputs: they are the server's
//! own copies, counted below. To the graph's peak come what the server itself allocates
//! around the graph: the input copies (and the tiled inputs of the full MC graph), the
//! masks and their random words, and the f64 copies of the outputs. An answer holds the
//! per-element accumulators, the statistics, the samples when asked for, and the encoded
//! body.
//!
//! Every tensor's size is affine in the batch dim (the batch is one factor of each
//! shape), and in a shared-trunk graph bilinear in (rows, samples): the trunk's tensors
//! scale with the rows, the head's with rows × samples. The bytes of each step are a sum of
//! them, so evaluating each step at four points fixes it exactly, and the peak is the
//! largest of these bilinear functions at the request's (rows, samples). Steps that another
//! step bounds in every coefficient are dropped; what is left is a few functions. Symbols
//! other than the batch and the samples (a sequence length, say) are taken at 1: such a
//! model's estimate is a lower figure than its real peak, a known gap (none of the bundled
//! models has one).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::{AxisOp, IntoShape};
use tract_onnx::tract_core::ops::source::TypedSource;

/// What one row of an MC answer returns: the values of its statistics (per element and
/// per position), and the output elements whose samples come back (times the samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnedPerRow {
    pub values: u64,
    pub sample_elements: u64,
}

/// Bytes as `fixed + per_row·R + per_sample·S + per_row_sample·R·S`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bilinear {
    pub fixed: u64,
    pub per_row: u64,
    pub per_sample: u64,
    pub per_row_sample: u64,
}

impl Bilinear {
    pub fn at(&self, rows: usize, samples: usize) -> u64 {
        let (r, s) = (rows as u64, samples as u64);
        self.fixed
            .saturating_add(self.per_row.saturating_mul(r))
            .saturating_add(self.per_sample.saturating_mul(s))
            .saturating_add(self.per_row_sample.saturating_mul(r).saturating_mul(s))
    }

    /// The function through its values at (1, 1), (2, 1), (1, 2) and (2, 2). A coefficient
    /// that comes out negative (a value that is not bilinear) is taken at 0, which can only
    /// raise the function for rows and samples of at least 1.
    fn through(f11: i128, f21: i128, f12: i128, f22: i128) -> Bilinear {
        let rs = f22 - f21 - f12 + f11;
        let r = f21 - f11 - rs;
        let s = f12 - f11 - rs;
        let fixed = f11 - r - s - rs;
        let clamp = |v: i128| v.clamp(0, u64::MAX as i128) as u64;
        Bilinear {
            fixed: clamp(fixed),
            per_row: clamp(r),
            per_sample: clamp(s),
            per_row_sample: clamp(rs),
        }
    }

    /// Whether `self` is at most `other` wherever rows and samples are non-negative.
    fn below(&self, other: &Bilinear) -> bool {
        self.fixed <= other.fixed
            && self.per_row <= other.per_row
            && self.per_sample <= other.per_sample
            && self.per_row_sample <= other.per_row_sample
    }
}

/// The peak bytes of a pass: the largest of a few bilinear functions of (rows, samples),
/// one per step of the plan that no other step bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peak {
    steps: Vec<Bilinear>,
}

impl Peak {
    pub fn at(&self, rows: usize, samples: usize) -> u64 {
        self.steps.iter().map(|b| b.at(rows, samples)).max().unwrap_or(0)
    }

    /// The functions left once every step another bounds is dropped.
    pub fn steps(&self) -> &[Bilinear] {
        &self.steps
    }

    /// A graph that runs a pass of R rows as R passes of one row
    /// ([`crate::engine::row_passes`]): the one-row pass's peak with its copy of one row of
    /// the inputs, plus every row's outputs twice (as each pass gives them, and stacked
    /// into the pass's outputs).
    pub fn row_by_row(&self, RowBytes { inputs, outputs }: RowBytes) -> Peak {
        Peak {
            steps: vec![Bilinear {
                fixed: self.at(1, 1).saturating_add(inputs),
                per_row: outputs.saturating_mul(2),
                per_sample: 0,
                per_row_sample: 0,
            }],
        }
    }

    fn of(steps: impl IntoIterator<Item = Bilinear>) -> Peak {
        let mut kept: Vec<Bilinear> = vec![];
        for b in steps {
            if kept.iter().any(|k| b.below(k)) {
                continue;
            }
            kept.retain(|k| !k.below(&b));
            kept.push(b);
        }
        Peak { steps: kept }
    }
}

/// What ops allocate beyond their outputs, which no fact shows: the product kernels'
/// scratch panels, the temporaries of a layer norm or a softmax. Measured with a counting
/// allocator (tests/memory_estimate.rs), the tensors alone fell short by up to 9% (BERT-tiny,
/// MC-8 of 16 rows) and by up to 11 KB on passes of tens of KB; an eighth more and 64 KiB
/// cover both.
const UNSEEN_SHARE: i128 = 8;
const UNSEEN_FIXED_BYTES: i128 = 64 << 10;

/// The bytes a value of this fact takes. A packed operand (an im2col buffer, a matrix
/// packed for the product kernels) is a tensor of packed blocks, one per element of its
/// shape, each of the size its exotic fact states.
fn fact_bytes(fact: &TypedFact, values: &SymbolValues, packed: bool) -> TractResult<i128> {
    let elements = fact.shape.volume().eval_to_i64(values)? as i128;
    let mut per_element = fact.datum_type.size_of() as i128;
    if let Some(exotic) = fact.exotic_fact().filter(|_| packed) {
        for b in exotic.buffer_sizes() {
            per_element += b.eval_to_i64(values)? as i128;
        }
    }
    Ok(elements * per_element)
}

/// tract's lazy im2col (`ops::cnn::conv::lazy_im2col`, not exported, so known by its
/// name): its value refers to its input instead of copying it out.
fn is_lazy_view(node: &TypedNode) -> bool {
    node.op().name() == "LazyIm2col"
}

/// Ops whose eval takes its first input's tensor (`into_tensor`, which copies only when
/// the value is shared) and writes its output there, when the shapes and types allow:
/// reshapes and axis moves, unary element-wise ops, and binary ops whose output has their
/// first operand's shape (tract-core 0.23.9 `ops/change_axes.rs`, `element_wise.rs`,
/// `binary.rs`).
fn in_place(node: &TypedNode) -> bool {
    node.op_is::<AxisOp>() || node.op_is::<IntoShape>()
}

/// The peak of the tensors `plan` holds while it runs, as a function of the batch symbol's
/// value (rows) and the samples symbol's (samples; 1 when the graph has none).
pub fn plan_peak(plan: &TypedSimplePlan, batch: Option<&Symbol>, samples: Option<&Symbol>) -> TractResult<Peak> {
    let model = plan.model();
    let order = plan.order_without_consts();
    // The step after which each node's outputs are dropped: that of its last reader; the
    // graph's outputs are held to the end.
    let mut last_use: Vec<Option<usize>> = vec![None; model.nodes.len()];
    for (step, &n) in order.iter().enumerate() {
        for i in &model.node(n).inputs {
            last_use[i.node] = Some(step);
        }
    }
    for o in &model.outputs {
        last_use[o.node] = Some(usize::MAX);
    }
    // A lazy im2col value is a view of its input: it keeps its input alive as long as it
    // lives itself, and allocates nothing of its own size (the product kernel packs one
    // panel at a time from it).
    for &n in order.iter().rev() {
        let node = model.node(n);
        if is_lazy_view(node) {
            for i in &node.inputs {
                last_use[i.node] = last_use[i.node].max(last_use[n]);
            }
        }
    }
    let mut freed_at: Vec<Vec<usize>> = vec![vec![]; order.len()];
    for &n in order {
        // tract never drops a value whose last reader is the first step (its flush lists
        // skip step 0), nor one nobody reads.
        if let Some(step) = last_use[n].filter(|&s| s > 0 && s < order.len()) {
            freed_at[step].push(n);
        }
    }
    let steps_at = |r: i64, s: i64| -> TractResult<Vec<i128>> {
        let values = symbol_values(model, batch, samples, r, s);
        let mut bytes = vec![0i128; model.nodes.len()];
        let mut live = 0i128;
        let mut steps = Vec::with_capacity(order.len());
        for (step, &n) in order.iter().enumerate() {
            let node = model.node(n);
            // The graph's inputs are the server's tensors, counted by the caller.
            if !node.op_is::<TypedSource>() {
                for output in &node.outputs {
                    bytes[n] += fact_bytes(&output.fact, &values, !is_lazy_view(node))?;
                }
            }
            // An op that can write into its first input does so when it holds the only
            // reference to it: when this node is its last reader (tract dropped it from
            // its table before the run) and it is no graph input or constant (those the
            // caller and the plan still hold). Its output then takes the input's place.
            if let Some(input) = node.inputs.first()
                && in_place(node)
                && last_use[input.node] == Some(step)
                && !model.node(input.node).op_is::<TypedSource>()
                && model.node(input.node).outputs.len() == 1
                && node.outputs.len() == 1
                && model.outlet_fact(*input)?.datum_type == node.outputs[0].fact.datum_type
                && bytes[input.node] == bytes[n]
            {
                live -= bytes[input.node];
                bytes[input.node] = 0;
            }
            live += bytes[n];
            // An unoptimised convolution (the graph onnxruntime runs, sized by tract's
            // typed graph) builds its im2col buffer while it runs.
            steps.push(live + im2col_bytes(node, &values)?);
            for &f in &freed_at[step] {
                live -= bytes[f];
            }
        }
        Ok(steps)
    };
    let (f11, f21, f12, f22) = (steps_at(1, 1)?, steps_at(2, 1)?, steps_at(1, 2)?, steps_at(2, 2)?);
    let unseen = |v: i128| v + v / UNSEEN_SHARE + UNSEEN_FIXED_BYTES;
    Ok(Peak::of((0..order.len()).map(|i| {
        Bilinear::through(unseen(f11[i]), unseen(f21[i]), unseen(f12[i]), unseen(f22[i]))
    })))
}

/// Encoded bytes per answer value, beyond the f64 itself. The native JSON answer builds a
/// `serde_json::Value` per number (80 bytes with `preserve_order`, measured by
/// `size_of`) and then the text (up to 24 bytes a number, in a buffer that grows by
/// doubling, so up to 48): 128 in all. OIP and gRPC encode into less.
pub const ENCODED_BYTES_PER_VALUE: u64 = 128;

/// What a model's memory estimates are built from, per unit of its batch.
#[derive(Debug, Clone, Default)]
pub struct ModelMemory {
    /// The eval graph, in rows.
    pub eval_graph: Peak,
    /// The MC graph: a shared-trunk graph in (rows, samples); the full graph in rows
    /// (rows × samples tiled rows, samples 1).
    pub mc_graph: Option<Peak>,
    pub mc_shared: bool,
    /// Input bytes per request row.
    pub input_bytes_per_row: u64,
    /// Mask bytes per (sample, row) of a pass, and the sampler's random words (4 bytes per
    /// element of each site's first mask).
    pub mask_bytes_per_row: u64,
    /// Output elements per request row, over all outputs.
    pub output_elements_per_row: u64,
    /// Entropy positions per request row, over all outputs: one per row of a last-axis
    /// classifier, one per pixel of a segmentation map (each has three entropies).
    pub entropy_positions_per_row: u64,
}

impl ModelMemory {
    /// One eval pass of `rows`: the graph (its outputs are the answer's tensors) and the
    /// copies of the inputs it is given.
    pub fn eval_pass(&self, rows: usize) -> u64 {
        self.eval_graph
            .at(rows, 1)
            .saturating_add(self.input_bytes_per_row.saturating_mul(rows as u64))
    }

    /// One MC pass of `samples` samples of `rows` rows.
    pub fn mc_pass(&self, rows: usize, samples: usize) -> u64 {
        let Some(graph) = &self.mc_graph else { return 0 };
        let tiled_rows = (rows as u64).saturating_mul(samples as u64);
        let (graph, inputs) = if self.mc_shared {
            (
                graph.at(rows, samples),
                self.input_bytes_per_row.saturating_mul(rows as u64),
            )
        } else {
            // The full graph takes the inputs tiled once per sample.
            (
                graph.at(rows.saturating_mul(samples), 1),
                self.input_bytes_per_row.saturating_mul(tiled_rows),
            )
        };
        // Each output is cast to f64 and copied out of the cast (16 bytes an element).
        let outputs = self
            .output_elements_per_row
            .saturating_mul(tiled_rows)
            .saturating_mul(16);
        graph
            .saturating_add(inputs)
            .saturating_add(self.mask_bytes_per_row.saturating_mul(tiled_rows))
            .saturating_add(outputs)
    }

    /// The accumulators and statistics of an MC answer of `rows` rows: mean, m2, variance
    /// and std per element; three entropies and a running sum per entropy position.
    pub fn mc_statistics(&self, rows: usize) -> u64 {
        let rows = rows as u64;
        let elements = self.output_elements_per_row.saturating_mul(rows);
        let entropy_rows = self.entropy_positions_per_row.saturating_mul(rows);
        elements
            .saturating_mul(4 * 8)
            .saturating_add(entropy_rows.saturating_mul(4 * 8))
    }

    /// An MC answer of `rows` rows: accumulators and statistics (`mc_statistics`), every
    /// output's samples when some are returned (`keep_samples`), and the encoding of what
    /// `returned` says comes back.
    pub fn mc_answer(&self, rows: usize, samples: usize, keep_samples: bool, returned: ReturnedPerRow) -> u64 {
        let stats = self.mc_statistics(rows);
        let rows = rows as u64;
        let elements = self.output_elements_per_row.saturating_mul(rows);
        let mut values = returned.values.saturating_mul(rows);
        let mut kept = 0;
        if keep_samples {
            kept = elements.saturating_mul(samples as u64).saturating_mul(8);
            values = values.saturating_add(
                returned
                    .sample_elements
                    .saturating_mul(rows)
                    .saturating_mul(samples as u64),
            );
        }
        stats
            .saturating_add(kept)
            .saturating_add(values.saturating_mul(ENCODED_BYTES_PER_VALUE))
    }

    /// An eval answer's encoding (its tensors are counted in the pass).
    pub fn eval_answer(&self, rows: usize) -> u64 {
        self.output_elements_per_row
            .saturating_mul(rows as u64)
            .saturating_mul(ENCODED_BYTES_PER_VALUE)
    }
}

/// Bytes of one row of a graph's inputs and of its outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowBytes {
    pub inputs: u64,
    pub outputs: u64,
}

impl RowBytes {
    /// The graph's inputs and outputs at one row (every other symbol at 1).
    pub fn of(model: &TypedModel, batch: &Symbol) -> TractResult<RowBytes> {
        let values = symbol_values(model, Some(batch), None, 1, 1);
        let bytes = |outlets: &[OutletId]| -> TractResult<u64> {
            let mut total = 0i128;
            for o in outlets {
                total += fact_bytes(model.outlet_fact(*o)?, &values, false)?;
            }
            Ok(total.max(0) as u64)
        };
        Ok(RowBytes {
            inputs: bytes(&model.inputs)?,
            outputs: bytes(&model.outputs)?,
        })
    }
}

/// The im2col buffer of a convolution that is still one `Conv` op (an unoptimised graph):
/// every output position's receptive field, `C_in · prod(kernel)` values, which no node
/// output shows (measured on digits_cnn: a third of the eval pass). 0 for any other node.
fn im2col_bytes(node: &TypedNode, values: &SymbolValues) -> TractResult<i128> {
    let Some(conv) = node.op_as::<tract_onnx::tract_core::ops::cnn::Conv>() else {
        return Ok(0);
    };
    let fact = &node.outputs[0].fact;
    let elements = fact.shape.volume().eval_to_i64(values)? as i128;
    let spec = &conv.pool_spec;
    let positions = elements / spec.output_channels.max(1) as i128;
    let field = spec.input_channels as i128 * spec.kernel_shape.iter().product::<usize>() as i128;
    Ok(positions * field * fact.datum_type.size_of() as i128)
}

/// The batch symbol at `rows`, the samples symbol at `samples`, every other symbol at 1 (a
/// known gap: see the module's comment).
fn symbol_values(
    model: &TypedModel,
    batch: Option<&Symbol>,
    samples: Option<&Symbol>,
    rows: i64,
    sample_count: i64,
) -> SymbolValues {
    let mut values = SymbolValues::default();
    for o in model.symbols.all_symbols() {
        if Some(&o) != batch && Some(&o) != samples {
            values.set(&o, 1);
        }
    }
    if let Some(b) = batch {
        values.set(b, rows);
    }
    if let Some(k) = samples {
        values.set(k, sample_count);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::Bilinear;

    #[test]
    fn bilinear_evaluates_each_term() {
        let b = Bilinear {
            fixed: 1,
            per_row: 10,
            per_sample: 100,
            per_row_sample: 1000,
        };
        assert_eq!(b.at(0, 0), 1);
        assert_eq!(b.at(2, 3), 1 + 20 + 300 + 6000);
        assert_eq!(b.at(usize::MAX, 2), u64::MAX);
    }
}
