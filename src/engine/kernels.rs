//! Which arithmetic a pass may run, so that a row's answer does not depend on its batch.
//!
//! tract picks a matrix-multiply kernel per product, from its shape (m, k, n) and the CPU
//! (vendor and instruction set). A batch's rows change m or n, so two passes holding the
//! same row may multiply it with different kernels. That is harmless only if every kernel
//! forms each output element the same way. tract-linalg 0.23.9's 256-bit FMA kernels all do:
//! each element is one chain of fused multiply-adds in k order, whatever the tile shape.
//! Among its AVX-512 kernels, the matrix-vector `avx512_mmm_f32_16x1` splits k over four
//! accumulators and adds them at the end, and tract chooses it or not by m and n (and
//! by vendor: on AMD and unknown vendors below m = 31, by a cost model on Intel). Measured
//! on the bundled MLPs: a row alone and the same row in a batch differed by up to 308
//! float32 ulps.
//!
//! So the engine takes the AVX-512 f32 kernels out of tract's pool ([`pin`]), before the
//! first plan is built. Every kernel left is a sequential FMA chain, and any kernel tract
//! picks for any batch gives each element the same bits. On the machines measured this
//! cost nothing (AMD EPYC, Zen 4: the 256-bit kernels were as fast or faster; see
//! docs/performance.md); [`audit`] proves at load that a plan holds no other kernel.
//!
//! A second effect is not a kernel's: tract's sum reductions (Softmax, `Reduce<Sum>`, norms)
//! split a row at the 64-byte alignment boundary, so a row's last bits follow its address.
//! [`row_granularity`] tells, per model and shape, how many batch rows apart two places
//! must be to share their alignment; the pass planner keeps each row where it would be
//! alone.

use std::collections::HashMap;
use std::sync::Once;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;
use tract_onnx::tract_core::tract_linalg;

/// Bytes of the widest alignment a tract kernel splits a slice at (AVX-512's 64).
const ALIGNMENT_BYTES: usize = 64;

/// Takes the AVX-512 f32 matrix kernels out of tract's pool, once per process and before
/// tract first reads the CPU's features. A later call is a no-op. Edits a user made with
/// `TRACT_CPU_ISA` are kept.
pub fn pin() {
    static PIN: Once = Once::new();
    PIN.call_once(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let user = std::env::var("TRACT_CPU_ISA").unwrap_or_default();
            let spec = if user.trim().is_empty() {
                "-avx512f".to_string()
            } else {
                format!("{user},-avx512f")
            };
            tract_linalg::knobs::TRACT_CPU_ISA.set(Some(spec));
        }
    });
}

/// Whether tract's instruction set is the pinned one: false if something used tract before
/// [`pin`] (the set is read once per process).
pub fn pinned() -> bool {
    !tract_linalg::isa::native().has(tract_linalg::isa::Isa::X86_64Avx512f)
}

/// The matrix kernels of `plan` that are not known to form each element as one FMA chain
/// in k order (by name; empty when every product is batch-invariant).
pub fn audit(plan: &TypedRunnableModel) -> Vec<String> {
    let mut odd = vec![];
    for node in &plan.model().nodes {
        if let Some(op) = node.op_as::<OptMatMul>() {
            for k in &op.mmm {
                let name = k.name();
                if !sequential(name) && !odd.iter().any(|o: &String| o.ends_with(name)) {
                    odd.push(format!("{}: {name}", node.name));
                }
            }
        }
    }
    odd
}

/// Kernels read and measured to accumulate each output element in one chain in k order.
fn sequential(kernel: &str) -> bool {
    kernel.starts_with("fma_mmm_f32_") || kernel.starts_with("avx_mmm_f32_") || kernel.starts_with("generic_")
}

/// Ops whose result for a row depends on where the row starts relative to a 64-byte
/// boundary: tract 0.23.9 sums a contiguous slice in an aligned body plus an unaligned
/// head and tail, so the order of the additions follows the address. Max and min are
/// exact in any order.
fn position_sensitive(op: &str) -> bool {
    let reduce = op.starts_with("Reduce<") && !["Max", "Min", "ArgMax", "ArgMin"].iter().any(|r| op.contains(r));
    reduce || op.contains("Softmax") || op.contains("Norm")
}

/// The reductions of a graph that a row's place can move, as (node, input elements per
/// batch row), with `samples_symbol` counted as part of the rows (a shared-trunk MC graph
/// runs samples × rows).
pub struct Reductions {
    nodes: Vec<(String, TDim, usize)>,
    batch: Symbol,
    samples: Option<Symbol>,
}

impl Reductions {
    /// The position-sensitive nodes of `model` (typically the optimised plan with symbolic
    /// dims), with the bytes their input holds per batch row.
    pub fn of(model: &TypedModel, batch: &Symbol, samples: Option<&Symbol>) -> TractResult<Reductions> {
        let mut nodes = vec![];
        for node in &model.nodes {
            if !position_sensitive(&node.op().name()) {
                continue;
            }
            for input in &node.inputs {
                let fact = model.outlet_fact(*input)?;
                nodes.push((node.name.clone(), fact.shape.volume(), fact.datum_type.size_of()));
            }
        }
        Ok(Reductions {
            nodes,
            batch: batch.clone(),
            samples: samples.cloned(),
        })
    }

    /// How many rows apart two places of a row must be to share their alignment, for a
    /// pass with the given values of the other symbols: 1 when every reduced tensor holds a
    /// multiple of 64 bytes per row (a row may go anywhere), up to 64 otherwise. Where a
    /// tensor's size is not proportional to the rows, the widest answer.
    pub fn granularity(&self, symbols: &HashMap<Symbol, i64>) -> usize {
        let mut g = 1;
        for (_, volume, size) in &self.nodes {
            let at = |rows: i64, samples: i64| -> Option<i64> {
                let mut values = SymbolValues::default();
                for (s, v) in symbols {
                    values = values.with(s, *v);
                }
                values = values.with(&self.batch, rows);
                if let Some(s) = &self.samples {
                    values = values.with(s, samples);
                }
                volume.eval(&values).to_i64().ok()
            };
            let per_row = match (at(1, 1), at(2, 1), at(1, 2)) {
                (Some(one), Some(two), Some(two_samples))
                    if two == 2 * one && (two_samples == one || two_samples == two) && one > 0 =>
                {
                    one as usize * size
                }
                _ => 0,
            };
            g = g.max(row_granularity(per_row));
        }
        g
    }

    /// Whether the graph has no such node (a row may go anywhere in a pass).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The sensitive nodes, for the load report.
    pub fn names(&self) -> Vec<&str> {
        self.nodes.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

/// Rows apart that keep a tensor of `row_bytes` per row at the same 64-byte alignment
/// (64 when unknown: 0).
pub fn row_granularity(row_bytes: usize) -> usize {
    if row_bytes == 0 {
        return ALIGNMENT_BYTES;
    }
    ALIGNMENT_BYTES / gcd(row_bytes, ALIGNMENT_BYTES)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_of_row_sizes() {
        assert_eq!(row_granularity(64), 1);
        assert_eq!(row_granularity(128 * 4), 1);
        assert_eq!(row_granularity(10 * 4), 8);
        assert_eq!(row_granularity(5 * 4), 16);
        assert_eq!(row_granularity(2 * 49 * 4), 8);
        assert_eq!(row_granularity(0), 64);
    }

    #[test]
    fn sensitive_ops() {
        for op in [
            "Softmax",
            "Reduce<Sum>",
            "Reduce<MeanOfSquares>",
            "RmsNorm",
            "Reduce<Mean>",
        ] {
            assert!(position_sensitive(op), "{op}");
        }
        for op in [
            "Reduce<Max>",
            "Reduce<Min>",
            "OptMatMul",
            "Add",
            "OptMaxPool",
            "Sigmoid",
        ] {
            assert!(!position_sensitive(op), "{op}");
        }
    }
}
