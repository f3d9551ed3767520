//! Runnable tract plans, one per batch size.
//!
//! tract runs a plan whose batch dimension is a known number markedly faster than the
//! plan with a symbolic batch (measured: the mask `Mul` of a 50x128 MC batch takes 1.5 µs
//! pinned against 25 µs symbolic). So each batch size runs a plan specialised to it, built on
//! first use (milliseconds for small models) and kept for the most recently used sizes.
//! Every size always runs its own specialised plan, so an answer never depends on what the
//! cache happens to hold: the same seed and input give bit-identical results.
//!
//! A plan specialised for a large batch keeps no memory sized by that batch: measured with a
//! counting allocator (tests/memory_estimate.rs), a cached plan for 28 samples × 4096 rows
//! of breast_cancer holds 62 KB, as for one sample, and 164 KB for digits_cnn; the
//! activations live in the run's state, freed when the run ends. So plans of every size are
//! cached alike; what stayed resident after a large request was the allocator's free
//! memory, which `core::memory_budget` gives back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use crate::engine::backend::{Backend, OrtGraph};
use crate::engine::cores;
use crate::engine::footprint::{self, Peak};
use crate::engine::kernels::Reductions;
use crate::engine::row_passes::{self, ROW_BY_ROW_FMA};
use crate::engine::spec::PassMode;

pub type Plan = Arc<TypedRunnableModel>;

/// What sizes a model's plans besides its graph: its file and its config's `passes`.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    pub file_bytes: u64,
    /// None: row by row from [`ROW_BY_ROW_FMA`] multiply-adds a row.
    pub passes: Option<PassMode>,
}

/// Keep specialised plans for at most this many batch sizes...
const MAX_SIZES: usize = 16;
/// ...and within this much memory, counting each plan at twice its graph's weights (an
/// optimised plan holds its own packed copy of them).
const MEMORY_BUDGET_BYTES: u64 = 256 << 20;

pub struct Plans {
    /// The typed, unoptimised graph with its symbolic batch (and, for a shared-trunk MC
    /// graph, its samples symbol), to specialise from.
    typed: Option<(TypedModel, Symbol, Option<Symbol>)>,
    /// The optimised plan with a symbolic batch, for graphs that keep no per-size plans (no
    /// batch symbol, or weights too large to cache plans of). None otherwise: it was built
    /// to size passes and analyse reductions, and its packed copy of the weights is not kept
    /// (ResNet-50: 94 MB per graph).
    symbolic: Option<Plan>,
    /// The graph's symbols, to read a pass's symbol values by name.
    symbols: SymbolScope,
    capacity: usize,
    /// Keyed by (rows, samples); samples is 1 for graphs without a samples symbol.
    pinned: Mutex<HashMap<(usize, usize), (Plan, u64)>>,
    clock: AtomicU64,
    /// The peak of the tensors the plan holds, by (rows, samples): the graph's share of a
    /// pass's peak.
    bytes: Peak,
    /// The sums whose bits a row's place in the pass can move; None without a batch symbol
    /// (every pass of such a model has the same shape).
    reductions: Option<Reductions>,
    /// Set when onnxruntime runs this graph's passes; tract's graph then only sizes them.
    ort: Option<OrtGraph>,
    /// A pass of several rows runs as one pass per row of the one-row plan
    /// ([`crate::engine::row_passes`]).
    row_by_row: bool,
    /// Multiply-adds of one row of a pass; None for a shared-trunk graph, or when tract's
    /// cost model cannot say.
    row_fma: Option<u64>,
}

impl Plans {
    /// `batch_symbol` is the name of the batch dimension, if the model has one;
    /// `samples_symbol` the number of MC samples in a pass of a shared-trunk graph
    /// ([`crate::engine::trunk`]); `options.file_bytes` sizes the cache, and
    /// `options.passes` can ask for row by row or batched passes.
    pub fn new(
        typed: TypedModel,
        batch_symbol: Option<&str>,
        samples_symbol: Option<&str>,
        PlanOptions { file_bytes, passes }: PlanOptions,
    ) -> TractResult<Plans> {
        let symbol = batch_symbol.and_then(|s| typed.symbols.get(s));
        let samples = samples_symbol.and_then(|s| typed.symbols.get(s));
        // The weights in memory, not the file: a file with external data (`.onnx.data`) is a
        // few hundred KB, and a graph may compute its weights from a tiny file (VGG19's
        // 548 MB from 9 KB). Sized by the file, DenseNet121 kept 16 plans of its 32 MB.
        let weights = weight_bytes(&typed).max(file_bytes);
        let capacity = (MEMORY_BUDGET_BYTES / (2 * weights.max(1))).min(MAX_SIZES as u64) as usize;
        let row_fma = match (&symbol, &samples) {
            (Some(b), None) => row_passes::fma(&typed, &HashMap::from([(b.clone(), TDim::Val(1))]))?,
            _ => None,
        };
        // Row by row needs the one-row plan, hence the per-size plans (a capacity).
        let row_by_row = match &symbol {
            Some(b) if samples.is_none() && capacity > 0 => {
                let large = row_fma.is_some_and(|f| f >= ROW_BY_ROW_FMA);
                passes.map_or(large, |p| p == PassMode::RowByRow) && row_passes::batch_leads_everything(&typed, b)?
            }
            _ => false,
        };
        let symbols = typed.symbols.clone();
        let row_bytes = match &symbol {
            Some(b) if row_by_row => footprint::RowBytes::of(&typed, b)?,
            _ => Default::default(),
        };
        // The typed graph stays only to specialise per-size plans from. When it does not
        // stay, it is optimised in place rather than cloned: the optimiser's packed weights
        // and the typed graph's own are then not both held (BERT-base: 438 MB each).
        let (typed, symbolic) = match symbol.clone().filter(|_| capacity > 0) {
            Some(s) => {
                let symbolic = typed.clone().into_optimized()?.into_runnable()?;
                (Some((typed, s, samples.clone())), symbolic)
            }
            None => (None, typed.into_optimized()?.into_runnable()?),
        };
        let bytes = footprint::plan_peak(&symbolic, symbol.as_ref(), samples.as_ref())?;
        let bytes = if row_by_row { bytes.row_by_row(row_bytes) } else { bytes };
        // A row that always runs alone keeps its bits wherever it sits in a pass.
        let reductions = symbol
            .as_ref()
            .filter(|_| !row_by_row)
            .map(|b| Reductions::of(symbolic.model(), b, samples.as_ref()))
            .transpose()?;
        let symbolic = typed.is_none().then_some(symbolic);
        Ok(Plans {
            typed,
            symbolic,
            symbols,
            capacity,
            pinned: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            bytes,
            reductions,
            ort: None,
            row_by_row,
            row_fma,
        })
    }

    /// The same graph run by onnxruntime (`graph`, built from the same rewritten ONNX):
    /// tract's typed graph only sizes its passes (the memory estimate stays tract's), and
    /// is never optimised, so loading costs no tract plan.
    pub fn on_onnxruntime(typed: TypedModel, batch_symbol: Option<&str>, graph: OrtGraph) -> TractResult<Plans> {
        let symbol = batch_symbol.and_then(|s| typed.symbols.get(s));
        // onnxruntime plans its memory by tensor lifetimes too; tract's unoptimised graph,
        // in its order, has at least the tensors onnxruntime's optimised one keeps
        // (measured on DenseNet121 and ResNet-50: peak resident memory grew by at most
        // 45 MiB over an MC-20 or an 8-row eval, under this estimate; README, Memory).
        let symbols = typed.symbols.clone();
        let bytes = footprint::plan_peak(&*typed.into_runnable()?, symbol.as_ref(), None)?;
        Ok(Plans {
            typed: None,
            // tract's graph only sized the passes: nothing of it needs to stay.
            symbolic: None,
            symbols,
            capacity: 0,
            pinned: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            bytes,
            // tract's reduction analysis describes tract's kernels: onnxruntime's are
            // others. Its rows' independence is what the load-time `batch_invariant`
            // check measures on the probe.
            reductions: None,
            ort: Some(graph),
            row_by_row: false,
            row_fma: None,
        })
    }

    pub fn backend(&self) -> Backend {
        if self.ort.is_some() {
            Backend::Onnxruntime
        } else {
            Backend::Tract
        }
    }

    /// One pass of `rows` (times `samples`, for a shared-trunk graph; pass 1 otherwise) on
    /// this graph's backend: row by row when the graph is large ([`row_passes`]).
    pub fn run(&self, rows: usize, samples: usize, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if self.row_by_row && rows > 1 {
            let plan = self.get(1, 1)?;
            return cores::run_pass(true, || row_passes::run(rows, inputs, |row| run(&plan, row)));
        }
        self.run_batched(rows, samples, inputs)
    }

    /// One pass of all `rows` at once, even for a graph that serves row by row: what the
    /// load-time `eval_row_independent` check compares single rows with (a BatchNorm on batch
    /// statistics only shows in a batch).
    pub fn run_batched(&self, rows: usize, samples: usize, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if let Some(graph) = &self.ort {
            return cores::run_pass(false, || graph.run(inputs));
        }
        let plan = self.get(rows, samples)?;
        cores::run_pass(true, || run(&plan, inputs))
    }

    /// Whether passes of several rows run one row at a time ([`row_passes`]).
    pub fn row_by_row(&self) -> bool {
        self.row_by_row
    }

    /// Multiply-adds of one row (None for a shared-trunk graph).
    pub fn row_fma(&self) -> Option<u64> {
        self.row_fma
    }

    /// For a shared-trunk graph kept for per-size plans: the multiply-adds each further
    /// sample of a row adds (its stochastic part), from tract's cost model at one row and
    /// one and two samples. None otherwise, or when the cost model cannot say. Asked only
    /// when the choice between this graph and the full one depends on it.
    pub fn sample_fma(&self) -> TractResult<Option<u64>> {
        let Some((typed, batch, Some(samples))) = &self.typed else {
            return Ok(None);
        };
        let at = |n: i64| {
            let values = HashMap::from([(batch.clone(), TDim::Val(1)), (samples.clone(), TDim::Val(n))]);
            row_passes::fma(typed, &values)
        };
        Ok(at(2)?.zip(at(1)?).map(|(two, one)| two.saturating_sub(one)))
    }

    /// The tract plan a pass of this size runs, for the kernel audit; None on onnxruntime,
    /// whose kernels tract does not choose.
    pub fn audited(&self, rows: usize, samples: usize) -> TractResult<Option<Plan>> {
        if self.ort.is_some() {
            return Ok(None);
        }
        if self.row_by_row {
            return self.get(1, 1).map(Some);
        }
        self.get(rows, samples).map(Some)
    }

    /// How many rows apart two places of a row must be for its answer to keep its bits, in
    /// a pass whose other symbols (not the batch, not the samples) take `symbols`' values
    /// ([`Reductions::granularity`]); 1 for a graph without a batch symbol.
    pub fn granularity(&self, symbols: &HashMap<String, usize>) -> usize {
        let Some(r) = self.reductions.as_ref().filter(|r| !r.is_empty()) else {
            return 1;
        };
        let values: HashMap<Symbol, i64> = symbols
            .iter()
            .filter_map(|(name, v)| self.symbols.get(name).map(|s| (s, *v as i64)))
            .collect();
        r.granularity(&values)
    }

    /// The reductions that a row's place can move, by node name (for the load report).
    pub fn sensitive_nodes(&self) -> Vec<String> {
        self.reductions
            .as_ref()
            .map(|r| r.names().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The peak of the tensors a pass holds, by (rows, samples).
    pub fn bytes(&self) -> Peak {
        self.bytes.clone()
    }

    /// The plan for a batch of `rows` (times `samples`, for a shared-trunk graph; pass 1
    /// otherwise).
    pub fn get(&self, rows: usize, samples: usize) -> TractResult<Plan> {
        let Some((typed, symbol, samples_symbol)) = &self.typed else {
            return self
                .symbolic
                .clone()
                .ok_or_else(|| anyhow::anyhow!("this graph runs on onnxruntime, not tract"));
        };
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some((plan, used)) = self
            .pinned
            .lock()
            .expect("plan cache poisoned: this is a bug")
            .get_mut(&(rows, samples))
        {
            *used = now;
            return Ok(plan.clone());
        }
        // Build outside the lock: other sizes keep running meanwhile.
        let mut values = HashMap::from([(symbol.clone(), TDim::Val(rows as i64))]);
        if let Some(s) = samples_symbol {
            values.insert(s.clone(), TDim::Val(samples as i64));
        }
        let plan = typed.set_symbols(&values)?.into_optimized()?.into_runnable()?;
        let mut pinned = self.pinned.lock().expect("plan cache poisoned: this is a bug");
        if pinned.len() >= self.capacity
            && !pinned.contains_key(&(rows, samples))
            && let Some(oldest) = pinned.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k)
        {
            pinned.remove(&oldest);
        }
        pinned.insert((rows, samples), (plan.clone(), now));
        Ok(plan)
    }
}

/// Bytes of the constants (weights) a typed graph holds.
fn weight_bytes(typed: &TypedModel) -> u64 {
    typed
        .nodes
        .iter()
        .filter_map(|n| n.op_as::<tract_onnx::tract_core::ops::konst::Const>())
        .map(|c| (c.val().len() * c.val().datum_type().size_of()) as u64)
        .sum()
}

/// Runs a plan, then clears the upper halves of the vector registers.
///
/// tract's AVX-512 kernels return without `vzeroupper`. Until something clears that state,
/// every legacy-SSE instruction on the thread pays for it: measured on this project's
/// Xeon, the f64 statistics of an MC-50 answer took 20 µs after a tract pass and 1.1 µs
/// after a `vzeroupper`. Everything the server does after inference (statistics, JSON,
/// allocation) runs on the same thread, so each run ends by clearing the state.
pub fn run(plan: &Plan, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
    let out = plan.run(inputs);
    clear_upper_vector_state();
    out
}

#[cfg(target_arch = "x86_64")]
fn clear_upper_vector_state() {
    #[target_feature(enable = "avx")]
    fn zeroupper() {
        std::arch::x86_64::_mm256_zeroupper();
    }
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked just above.
        unsafe { zeroupper() }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn clear_upper_vector_state() {}
