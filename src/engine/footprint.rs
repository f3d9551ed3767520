//! Estimates of the memory a pass and an answer take, computed once at model load.
//!
//! A pass's peak is bounded from the typed graph: the sum, over every node output, of its
//! elements times its datum size. tract frees an intermediate once its last reader has run,
//! so the real peak is lower; the sum is the bound that needs no knowledge of tract's
//! schedule. To it come what the server itself allocates around the graph: the input
//! copies (and the tiled inputs of the full MC graph), the masks and their random words,
//! and the f64 copies of the outputs. An answer holds the per-element accumulators, the
//! statistics, the samples when asked for, and the encoded body.
//!
//! Every node output's size is affine in the batch dim (the batch is one factor of each
//! shape), and in a shared-trunk graph bilinear in (rows, samples): the trunk's tensors
//! scale with the rows, the head's with rows × samples. So evaluating the sum at four
//! points fixes it exactly. Symbols other than the batch and the samples (a sequence
//! length, say) are taken at 1: such a model's estimate is a lower figure than its real
//! peak, a known gap (none of the bundled models has one).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::Conv;

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
}

/// The sum of every node output's bytes in `model`, as a function of the batch symbol's
/// value (rows) and the samples symbol's (samples; 1 when the graph has none).
pub fn graph_bytes(model: &TypedModel, batch: Option<&Symbol>, samples: Option<&Symbol>) -> TractResult<Bilinear> {
    let others: Vec<Symbol> = model
        .symbols
        .all_symbols()
        .into_iter()
        .filter(|s| Some(s) != batch && Some(s) != samples)
        .collect();
    let at = |r: i64, s: i64| -> TractResult<i128> {
        let mut values = SymbolValues::default();
        for o in &others {
            values.set(o, 1);
        }
        if let Some(b) = batch {
            values.set(b, r);
        }
        if let Some(k) = samples {
            values.set(k, s);
        }
        let mut total = 0i128;
        for node in &model.nodes {
            for output in &node.outputs {
                let fact = &output.fact;
                let elements = fact.shape.volume().eval_to_i64(&values)?;
                total += elements as i128 * fact.datum_type.size_of() as i128;
                // A convolution runs as a matrix product over its im2col buffer: every output
                // position's receptive field, `C_in · prod(kernel)` values, which no node
                // output shows (measured on digits_cnn: a third of the eval pass).
                if let Some(conv) = node.op_as::<Conv>() {
                    let spec = &conv.pool_spec;
                    let positions = elements as i128 / spec.output_channels.max(1) as i128;
                    let field = spec.input_channels as i128 * spec.kernel_shape.iter().product::<usize>() as i128;
                    total += positions * field * fact.datum_type.size_of() as i128;
                }
            }
        }
        Ok(total)
    };
    let (f11, f21, f12, f22) = (at(1, 1)?, at(2, 1)?, at(1, 2)?, at(2, 2)?);
    let rs = f22 - f21 - f12 + f11;
    let r = f21 - f11 - rs;
    let s = f12 - f11 - rs;
    let fixed = f11 - r - s - rs;
    let clamp = |v: i128| v.clamp(0, u64::MAX as i128) as u64;
    Ok(Bilinear {
        fixed: clamp(fixed),
        per_row: clamp(r),
        per_sample: clamp(s),
        per_row_sample: clamp(rs),
    })
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
    pub eval_graph: Bilinear,
    /// The MC graph: a shared-trunk graph in (rows, samples); the full graph in rows
    /// (rows × samples tiled rows, samples 1).
    pub mc_graph: Option<Bilinear>,
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
        let Some(graph) = self.mc_graph else { return 0 };
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

    /// An MC answer of `rows` rows: accumulators and statistics (mean, m2, variance, std
    /// per element; three entropies and a running sum per entropy position), every
    /// output's samples when some are returned (`keep_samples`), and the encoding of what
    /// `returned` says comes back.
    pub fn mc_answer(&self, rows: usize, samples: usize, keep_samples: bool, returned: ReturnedPerRow) -> u64 {
        let rows = rows as u64;
        let elements = self.output_elements_per_row.saturating_mul(rows);
        let entropy_rows = self.entropy_positions_per_row.saturating_mul(rows);
        let stats = elements
            .saturating_mul(4 * 8)
            .saturating_add(entropy_rows.saturating_mul(4 * 8));
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
