//! Sizing: how much memory a pass and an answer take, and so how many rows or samples one
//! pass may hold; and where a pass may start so that a row keeps its bits.

use std::sync::atomic::Ordering;

use super::*;
use crate::engine::footprint::{ModelMemory, ReturnedPerRow};
use crate::engine::statistics::Requested;
use session::Trunk;

/// Upper bound on input elements fed to one MC pass; more samples than fit run in chunks.
const MAX_PASS_INPUT_ELEMENTS: usize = 1 << 24;
/// The byte budget of one pass until the server sets its own
/// ([`LoadedModel::set_pass_budget`]): half the default `--max-memory-bytes`.
pub const DEFAULT_PASS_BUDGET_BYTES: u64 = 256 << 20;

/// Elements of one batch row: every dim but the batch (other symbols count 1; see
/// `engine::footprint`). A model without a batch symbol counts its whole input as a row.
fn per_row(shape: &[Dim]) -> u64 {
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as u64,
            Dim::Symbol(_) => 1,
        })
        .product()
}

impl LoadedModel {
    pub(super) fn memory_model(&self) -> ModelMemory {
        let input_bytes_per_row = self
            .inputs
            .iter()
            .map(|i| per_row(&i.shape) * i.datum.size_of() as u64)
            .sum();
        let output_elements_per_row = self.outputs.iter().map(|o| per_row(&o.shape)).sum();
        // Per-position entropies: a row of a classifier, every pixel of a map.
        let entropy_positions_per_row = self
            .outputs
            .iter()
            .zip(&self.output_kinds)
            .filter_map(|(o, k)| k.positions(&o.shape).map(|p| per_row(&p)))
            .sum();
        let (mc_graph, mc_shared, mask_bytes_per_row) = match &self.mc {
            Err(_) => (None, false, 0),
            Ok(plan) => (
                Some(plan.plans.bytes()),
                matches!(plan.trunk, Trunk::Shared { .. }),
                // The mask itself, and the sampler's u32 random word per element.
                plan.masks
                    .iter()
                    .map(|m| per_row(&m.shape) * (m.datum.size_of() as u64 + 4))
                    .sum(),
            ),
        };
        ModelMemory {
            eval_graph: self.eval.plans.bytes(),
            mc_graph,
            mc_shared,
            input_bytes_per_row,
            mask_bytes_per_row,
            output_elements_per_row,
            entropy_positions_per_row,
        }
    }

    /// The estimated peak bytes of one eval pass of `rows` rows.
    pub fn eval_pass_bytes(&self, rows: usize) -> u64 {
        self.memory.eval_pass(rows)
    }

    /// The estimated peak bytes of one MC pass of `samples` samples of `rows` rows.
    pub fn mc_pass_bytes(&self, rows: usize, samples: usize) -> u64 {
        self.memory.mc_pass(rows, samples)
    }

    /// The estimated bytes of an MC answer: its statistics, its samples when returned, and
    /// the encoding of what it returns.
    pub fn mc_answer_bytes(&self, rows: usize, samples: usize, requested: Requested, return_samples: bool) -> u64 {
        let returned = self.returned_per_row(requested, return_samples);
        self.memory.mc_answer(rows, samples, return_samples, returned)
    }

    /// What a row of an MC answer returns, by the request's choice.
    fn returned_per_row(&self, requested: Requested, return_samples: bool) -> ReturnedPerRow {
        use crate::engine::statistics::Statistic as S;
        let mut returned = ReturnedPerRow::default();
        for (i, (o, kind)) in self.outputs.iter().zip(&self.output_kinds).enumerate() {
            let set = self.returned(i, requested, return_samples);
            let elements = per_row(&o.shape);
            let positions = kind.positions(&o.shape).map_or(0, |p| per_row(&p));
            let count = |stats: &[S]| stats.iter().filter(|s| set.has(**s)).count() as u64;
            returned.values = returned
                .values
                .saturating_add(elements.saturating_mul(count(&[S::Mean, S::Variance, S::Std])))
                .saturating_add(positions.saturating_mul(count(&[
                    S::PredictiveEntropy,
                    S::ExpectedEntropy,
                    S::MutualInformation,
                ])));
            if set.has(S::Samples) {
                returned.sample_elements = returned.sample_elements.saturating_add(elements);
            }
        }
        returned
    }

    /// The estimated bytes of an MC answer's accumulators and statistics, before encoding.
    pub fn mc_statistics_bytes(&self, rows: usize) -> u64 {
        self.memory.mc_statistics(rows)
    }

    /// The estimated bytes of an eval answer's encoding.
    pub fn eval_answer_bytes(&self, rows: usize) -> u64 {
        self.memory.eval_answer(rows)
    }

    /// The input elements of `rows` rows (symbolic dims other than the batch counted as 1).
    pub fn input_elements(&self, rows: usize) -> usize {
        let per_row: usize = self
            .inputs
            .iter()
            .map(|i| {
                i.shape
                    .iter()
                    .skip(1)
                    .map(|d| if let Dim::Fixed(n) = d { *n } else { 1 })
                    .product::<usize>()
            })
            .sum();
        per_row.saturating_mul(rows)
    }

    /// The bytes of `rows` rows of input, as the request holds them.
    pub fn input_bytes(&self, rows: usize) -> u64 {
        self.memory.input_bytes_per_row.saturating_mul(rows as u64)
    }

    /// Values `return_samples` gives back for `samples` samples of `rows` rows: the
    /// elements of the outputs whose samples the request returns.
    pub fn returned_values(&self, rows: usize, samples: usize, requested: Requested) -> u64 {
        self.returned_per_row(requested, true)
            .sample_elements
            .saturating_mul(rows as u64)
            .saturating_mul(samples as u64)
    }

    /// Sets the bytes one pass may take (the server's share of `--max-memory-bytes`).
    pub fn set_pass_budget(&self, bytes: u64) {
        self.pass_budget.store(bytes, Ordering::Relaxed);
    }

    pub fn pass_budget(&self) -> u64 {
        self.pass_budget.load(Ordering::Relaxed)
    }

    /// The most samples of `rows` rows that one MC pass may hold within the pass budget;
    /// 0 when not even one fits.
    fn samples_in_budget(&self, rows: usize) -> usize {
        let budget = self.pass_budget();
        // The pass's bytes grow with the samples, but not on one line: the peak is the
        // largest of several linear functions (see `engine::footprint`), so search.
        most(MAX_PASS_INPUT_ELEMENTS, |k| self.mc_pass_bytes(rows, k) <= budget)
    }

    /// Samples per MC pass of a request of `rows` rows holding `input_elements` input
    /// elements, for rows of granularity `granularity` ([`row_granularity`](Self::row_granularity)):
    /// the one rule the MC draw, the memory estimate and the pass planner read. Within the
    /// pass budget and within the input elements that keep a pass's tiling cheap, at a
    /// multiple of the alignment step; one when the masks are not batch-led (each sample
    /// is then a pass of its own).
    pub fn mc_split(&self, rows: usize, input_elements: usize, granularity: usize) -> usize {
        if !self.mc.as_ref().is_ok_and(|p| p.batch.is_some()) {
            return 1;
        }
        let per_pass = (MAX_PASS_INPUT_ELEMENTS / input_elements.max(1))
            .min(self.samples_in_budget(rows))
            .max(1);
        aligned(per_pass, sample_step(granularity, rows))
    }

    /// Rows per eval pass of a request of `rows` rows, for rows of granularity
    /// `granularity`: within the pass budget (at least one row, the least a pass can run),
    /// at a multiple of the granularity. Only a model with a batch axis splits its rows.
    pub fn eval_split(&self, rows: usize, granularity: usize) -> usize {
        if self.batch_symbol.is_none() {
            return rows;
        }
        let budget = self.pass_budget();
        let per_pass = most(rows, |r| self.eval_pass_bytes(r) <= budget).clamp(1, rows.max(1));
        aligned(per_pass, granularity).min(rows.max(1))
    }

    /// How many rows apart two places of a row of `batch` must be for its answer (eval and
    /// MC) to keep its bits: 1 when a row may go anywhere in a pass. A model with sums over
    /// rows of a size that a 64-byte boundary can split differently ([`kernels`]) answers
    /// more, and its passes then keep each row where it is when the request runs alone.
    pub fn row_granularity(&self, batch: &InputRows) -> usize {
        let mc = self
            .mc
            .as_ref()
            .map(|p| p.plans.granularity(&batch.symbols))
            .unwrap_or(1);
        self.eval.plans.granularity(&batch.symbols).max(mc)
    }
}

/// The largest n in 0..=max with `fits(n)`, for `fits` true up to some n and false above
/// it; 0 when `fits(1)` is false. A binary search: about 25 steps at most.
pub(super) fn most(max: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) { lo = mid } else { hi = mid - 1 }
    }
    lo
}

/// Samples apart that keep a row's alignment, for a model of row granularity `granularity`
/// and a batch of `rows` rows: sample `s` of row `r` sits at row `s·rows + r` of a pass.
pub fn sample_step(granularity: usize, rows: usize) -> usize {
    granularity / gcd(granularity, rows.max(1))
}

pub(super) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `per_pass` rounded down to a multiple of `step`, so that every pass after the first
/// starts where a row keeps its alignment; at least one step, even where the pass budget
/// holds less (a model whose sums a row's place can move, with a row that nearly fills a
/// pass by itself): the answer's bits come before the budget's last fraction.
pub(super) fn aligned(per_pass: usize, step: usize) -> usize {
    (per_pass / step * step).max(step)
}

/// The sizes of the passes that take `total` rows or samples `per_pass` at a time.
pub fn pass_sizes(total: usize, per_pass: usize) -> impl Iterator<Item = usize> {
    let per_pass = per_pass.max(1);
    (0..total.div_ceil(per_pass)).map(move |i| per_pass.min(total - i * per_pass))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_take_everything_in_order_and_start_at_multiples_of_the_step() {
        assert_eq!(pass_sizes(10, 4).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert_eq!(pass_sizes(8, 4).collect::<Vec<_>>(), vec![4, 4]);
        assert_eq!(pass_sizes(3, 10).collect::<Vec<_>>(), vec![3]);
        assert_eq!(pass_sizes(0, 4).count(), 0);
        // Granularity 8 with 2-row requests: samples 4 apart keep a row's alignment.
        assert_eq!(sample_step(8, 2), 4);
        assert_eq!(sample_step(8, 3), 8);
        assert_eq!(sample_step(1, 5), 1);
        assert_eq!(aligned(13, 4), 12);
        // Below one step the pass still holds a step: the bits come first.
        assert_eq!(aligned(3, 4), 4);
        assert_eq!(aligned(7, 1), 7);
    }

    #[test]
    fn most_finds_the_last_that_fits() {
        assert_eq!(most(100, |n| n <= 37), 37);
        assert_eq!(most(100, |n| n <= 500), 100);
        assert_eq!(most(100, |_| false), 0);
        assert_eq!(most(0, |_| true), 0);
    }
}
