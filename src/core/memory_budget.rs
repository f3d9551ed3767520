//! The memory budget (`--max-memory-bytes`) that admission and pass sizing share.
//!
//! A request reserves its estimated peak before it runs: its input, its largest pass and
//! its answer ([`crate::engine::footprint`]). The reservation moves into the work and is given
//! back when the work ends. A request that does not fit in what is left is refused with
//! 429 (retry later); one that could never fit, even alone, with 413 and what would fit.
//!
//! The rule for a pass: each pass may take `budget / max(workers, 2)`. With as many passes
//! as workers running at once they share the budget; the floor of 2 keeps at least half of
//! it for the answer even on one worker, since a request holds its answer and its pass
//! together.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::adaptive;
use crate::core::mode::{McCount, Mode};
use crate::engine::model::{InputRows, LoadedModel, pass_sizes, sample_step};
use crate::engine::statistics::Requested;
use crate::error::Error;

/// Reservations count in KiB, so a u32 permit count covers 4 TiB.
const UNIT: u64 = 1024;

pub struct MemoryBudget {
    units: Arc<Semaphore>,
    bytes: u64,
    /// Most values `return_samples` may give back (samples × rows × output elements).
    max_returned_samples: u64,
}

/// Memory held by a request; given back when dropped.
pub struct MemoryPermit {
    permit: Option<OwnedSemaphorePermit>,
    /// The request's estimate, once its body is decoded ([`MemoryPermit::shrink_to`]);
    /// until then 0: a request refused before it ran has nothing to trim.
    bytes: u64,
}

/// A request that reserved at least this much hands its freed heap back to the system
/// when it ends: glibc keeps freed pages of its arenas (measured: 130-180 MiB of RSS stayed
/// after one MC-1000 request of 4096 rows), and a pod's RSS is what its limit counts. The
/// trim walks the heap (milliseconds), so small requests skip it.
const TRIM_BYTES: u64 = 32 << 20;

impl Drop for MemoryPermit {
    fn drop(&mut self) {
        // The request's work has ended and freed what it held: the permit is its last local.
        drop(self.permit.take());
        if self.bytes >= TRIM_BYTES {
            trim();
        }
    }
}

impl MemoryPermit {
    /// A permit that holds nothing yet (a body that reserves as it arrives).
    pub fn none() -> MemoryPermit {
        MemoryPermit { permit: None, bytes: 0 }
    }

    /// Gives back what was reserved beyond `bytes`: a reservation made on an upper bound of
    /// the rows shrinks to the request's estimate once its body is decoded.
    pub fn shrink_to(&mut self, bytes: u64) {
        self.bytes = bytes;
        if let Some(permit) = &mut self.permit {
            let keep = bytes.div_ceil(UNIT).max(1) as usize;
            if let Some(excess) = permit.num_permits().checked_sub(keep).filter(|&n| n > 0) {
                drop(permit.split(excess));
            }
        }
    }
}

/// Allocations of at least this size get their own mapping, returned to the system when
/// freed. glibc's default threshold starts at 128 KiB but rises (up to 32 MiB) each time
/// such a block is freed, after which large tensors and answer bodies live in the heap and
/// stay resident after the request (an answer body is freed once it is sent, and trims
/// then: [`trim_when_freed`]).
/// Measured on digits_cnn, 104 rows × MC-1000 with return_samples: 104.5 MiB resident
/// after the request with the default, back to idle with a fixed threshold. 4 MiB keeps
/// the tensors of ordinary requests (64 rows × MC-50 of a 128-wide layer is 1.6 MiB) in
/// the heap, where they cost no page faults.
const MMAP_THRESHOLD: i32 = 4 << 20;

/// Fixes glibc's allocator settings for a server whose requests come and go: called once,
/// at startup, before any thread exists.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's tunables; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// An answer buffer at least this large is followed by a trim when it is freed.
pub const LARGE_ANSWER_BYTES: usize = MMAP_THRESHOLD as usize;

/// `data`, which is part of an answer being written; when it is large, freeing it is
/// followed by a trim. A request's reservation trims when it ends, but its answer is freed
/// later, once written. A large answer buffer is not always a mapping of its own: glibc
/// places an allocation over the mmap threshold in a free chunk of a thread's arena when
/// one fits (the threshold only applies when the arena must grow), and that chunk stays
/// resident when freed. Measured on digits_cnn, 4096 rows × MC-25 with return_samples
/// (a 24 MiB answer): 1 run in 3 kept 33 MiB resident in an arena after the request.
pub fn trim_when_freed(data: bytes::Bytes) -> bytes::Bytes {
    if data.len() < LARGE_ANSWER_BYTES {
        return data;
    }
    bytes::Bytes::from_owner(TrimOnDrop(data))
}

/// A buffer whose release is followed by a trim: its owner is this, so the trim runs when
/// the last reference to it is gone (hyper drops it once it is written).
struct TrimOnDrop(bytes::Bytes);

impl AsRef<[u8]> for TrimOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        // Free the buffer first (when this held its last reference), then give it back.
        self.0 = bytes::Bytes::new();
        trim();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own heap and takes its locks.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Memory a JSON request body makes the server hold while it is read and decoded, per
/// byte of body: the body itself and its parse (the OIP tree parse costs most). The issue's
/// probe (issue 25, F1) saw a 62 MB OIP body of zeros peak at 441 MiB with VmHWM, 7.1
/// bytes per body byte with the idle process, and a native one at 356 MiB; here
/// (tests/memory.rs, AMD EPYC Zen 4 with AVX-512) the OIP one peaks at 417 MiB. A body
/// reserves this much of the budget before it is read, so concurrent bodies are admitted
/// against the same budget as passes.
pub const JSON_BODY_FACTOR: u64 = 8;

tokio::task_local! {
    /// The reservation of the request body this task is handling (`front::body_budget`).
    /// The request's own reservation takes it over ([`MemoryBudget::reserve_request`]), so
    /// a body and the work it becomes are not counted twice: the body is parsed before the
    /// pass runs, and the larger of the two is what the request holds.
    pub static BODY_RESERVATION: std::cell::RefCell<Option<MemoryPermit>>;
}

fn take_body_reservation() -> Option<MemoryPermit> {
    BODY_RESERVATION.try_with(|c| c.borrow_mut().take()).ok().flatten()
}

/// A body without a declared length reserves as it arrives, in steps of this much body
/// at least.
pub const BODY_STEP_BYTES: u64 = 64 << 10;

impl MemoryBudget {
    /// Reserves what reading and decoding `body_bytes` of JSON may hold: 413 when it
    /// exceeds the whole budget, 429 when it exceeds what is left now. Nothing for an empty
    /// body.
    pub fn reserve_body(&self, body_bytes: u64) -> Result<MemoryPermit, Error> {
        if body_bytes == 0 {
            return Ok(MemoryPermit { permit: None, bytes: 0 });
        }
        let bytes = body_bytes.saturating_mul(JSON_BODY_FACTOR);
        let mut permit = self.reserve(bytes).map_err(|e| self.body_refusal(e, body_bytes))?;
        permit.bytes = bytes;
        Ok(permit)
    }

    /// Grows a body's reservation to cover the `read` bytes that have arrived: 413 when
    /// they could never fit, 429 when the rest of the budget is held now. It grows by an
    /// eighth at a time (at least [`BODY_STEP_BYTES`]), so a large body takes few steps and
    /// a small one holds little, and never asks beyond the whole budget.
    pub fn grow_body(&self, permit: &mut MemoryPermit, read: u64) -> Result<(), Error> {
        let covered = permit.bytes / JSON_BODY_FACTOR;
        if read <= covered {
            return Ok(());
        }
        if read.saturating_mul(JSON_BODY_FACTOR) > self.bytes {
            return Err(self.body_refusal(Error::PayloadTooLarge(String::new()), read));
        }
        let wanted = read.max(covered + covered / 8).next_multiple_of(BODY_STEP_BYTES);
        let target = wanted.min(self.bytes / JSON_BODY_FACTOR);
        let mut more = self.reserve_body(target - covered)?;
        // What `more` holds moves into `permit`, whose drop gives it back (and trims).
        permit.bytes += std::mem::take(&mut more.bytes);
        if let Some(more) = more.permit.take() {
            match &mut permit.permit {
                Some(held) => held.merge(more),
                None => permit.permit = Some(more),
            }
        }
        Ok(())
    }

    fn body_refusal(&self, e: Error, body_bytes: u64) -> Error {
        match e {
            Error::PayloadTooLarge(_) => Error::PayloadTooLarge(format!(
                "a request body of {} needs about {} of memory to read and decode, more than the \
                 server's whole budget of {} (--max-memory-bytes, MCD_MAX_MEMORY_BYTES)",
                mib(body_bytes),
                mib(body_bytes.saturating_mul(JSON_BODY_FACTOR)),
                mib(self.bytes)
            )),
            e => e,
        }
    }

    pub fn new(bytes: u64, max_returned_samples: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64 / 2);
        MemoryBudget {
            units: Arc::new(Semaphore::new(units as usize)),
            bytes,
            max_returned_samples,
        }
    }

    /// Bytes one pass may take: see the module's rule.
    pub fn pass_bytes(total: u64, workers: usize) -> u64 {
        total / workers.max(2) as u64
    }

    /// Reserves `bytes`: 413 when they exceed the whole budget, 429 when they exceed what
    /// is left now.
    pub fn reserve(&self, bytes: u64) -> Result<MemoryPermit, Error> {
        if bytes > self.bytes {
            return Err(Error::PayloadTooLarge(format!(
                "the request needs about {} of memory, more than the server's whole budget of {} \
                 (--max-memory-bytes, MCD_MAX_MEMORY_BYTES)",
                mib(bytes),
                mib(self.bytes)
            )));
        }
        let units = bytes.div_ceil(UNIT).max(1).min(u32::MAX as u64) as u32;
        let permit = self
            .units
            .clone()
            .try_acquire_many_owned(units)
            .map_err(|_| Error::Overloaded)?;
        Ok(MemoryPermit {
            permit: Some(permit),
            bytes: 0,
        })
    }

    /// Bytes not reserved now.
    pub fn available_bytes(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }

    /// Reserves what a request of at most `rows_bound` rows in `mode` needs, before its body
    /// is decoded. A bound may overstate the rows (the native body's is its count of `[`),
    /// so a bound that does not fit reserves the whole budget instead of refusing: the
    /// exact check, [`request_bytes`](Self::request_bytes) on the decoded rows, gives the
    /// 413 of a request that really could never fit.
    pub fn reserve_request(&self, model: &LoadedModel, rows_bound: usize, mode: &Mode) -> Result<MemoryPermit, Error> {
        let bytes = self.request_bytes(model, rows_bound, 1, mode).unwrap_or(self.bytes);
        let bytes = bytes.min(self.bytes);
        let Some(mut body) = take_body_reservation() else {
            return self.reserve(bytes);
        };
        let held = body.permit.as_ref().map_or(0, |p| p.num_permits() as u64 * UNIT);
        if bytes > held {
            let mut more = self.reserve(bytes - held)?;
            if let Some(more) = more.permit.take() {
                match &mut body.permit {
                    Some(p) => p.merge(more),
                    None => body.permit = Some(more),
                }
            }
        }
        // `bytes` stays the body's: a large body read and refused still trims on release.
        Ok(body)
    }

    /// The estimated peak of a request of `rows` rows in `mode`, or 413 with what would fit;
    /// `granularity` is the rows' ([`LoadedModel::row_granularity`]: 1 before decoding).
    pub fn request_bytes(
        &self,
        model: &LoadedModel,
        rows: usize,
        granularity: usize,
        mode: &Mode,
    ) -> Result<u64, Error> {
        let rows = rows.max(1);
        let (samples, return_samples) = match mode {
            Mode::Eval => {
                // Rows split into passes, so only the answer grows with them.
                let bytes = eval_bytes(model, rows, granularity);
                return if bytes <= self.bytes {
                    Ok(bytes)
                } else {
                    let max_rows = largest(rows, |r| eval_bytes(model, r, granularity) <= self.bytes);
                    Err(Error::PayloadTooLarge(format!(
                        "an eval request of {rows} rows on model '{}' would need about {}, more than the server's \
                         budget of {} (--max-memory-bytes, MCD_MAX_MEMORY_BYTES): at most {max_rows} rows fit",
                        model.name,
                        mib(bytes),
                        mib(self.bytes)
                    )))
                };
            }
            Mode::McDropout(mc) => (mc.samples.bound(), mc.return_samples),
        };
        let requested = match mode {
            Mode::McDropout(mc) => mc.requested,
            Mode::Eval => Requested::Defaults,
        };
        if return_samples {
            let values = model.returned_values(rows, samples, requested);
            if values > self.max_returned_samples {
                let per_sample = model.returned_values(rows, 1, requested).max(1);
                let per_row = model.returned_values(1, samples, requested).max(1);
                return Err(Error::PayloadTooLarge(format!(
                    "return_samples would return {values} values ({samples} samples × {rows} rows × {} output \
                     elements), above the cap of {} (--max-returned-samples, MCD_MAX_RETURNED_SAMPLES); at most \
                     {} samples for these {rows} rows, or at most {} rows at mc_samples={samples}, fit",
                    per_sample / rows as u64,
                    self.max_returned_samples,
                    self.max_returned_samples / per_sample,
                    self.max_returned_samples / per_row,
                )));
            }
        }
        // `auto` draws chunks: its passes are never larger than a chunk.
        let chunk = match mc_count(mode) {
            Some(McCount::Auto { .. }) => adaptive::chunk(sample_step(granularity, rows)),
            _ => samples,
        };
        let fits = |rows: usize, samples: usize| {
            mc_bytes(model, rows, granularity, samples, chunk, requested, return_samples)
                .is_some_and(|b| b <= self.bytes)
        };
        if let Some(bytes) =
            mc_bytes(model, rows, granularity, samples, chunk, requested, return_samples).filter(|&b| b <= self.bytes)
        {
            return Ok(bytes);
        }
        // What would fit: the most rows at this sample count, and (where the answer grows
        // with the samples) the most samples for these rows.
        let max_rows = largest(rows, |r| fits(r, samples));
        let mut what = match max_rows {
            0 => format!("not even one row fits at mc_samples={samples}"),
            n => format!("at most {n} rows fit at mc_samples={samples}"),
        };
        if return_samples
            && let s = largest(samples, |s| fits(rows, s))
            && s >= 2
        {
            what.push_str(&format!(", or at most {s} samples for these {rows} rows"));
        }
        Err(Error::PayloadTooLarge(format!(
            "an MC request of {rows} rows × {samples} samples{} on model '{}' would need more memory than the \
             server's budget of {} (--max-memory-bytes, MCD_MAX_MEMORY_BYTES): {what}",
            if return_samples { " with return_samples" } else { "" },
            model.name,
            mib(self.bytes)
        )))
    }
}

fn mc_count(mode: &Mode) -> Option<McCount> {
    match mode {
        Mode::McDropout(mc) => Some(mc.samples),
        Mode::Eval => None,
    }
}

/// The estimated peak of each pass a request ran, in order: eval splits its rows, MC its
/// samples (`auto` first into chunks), by the engine's own sizing.
pub fn pass_bytes(model: &LoadedModel, batch: &InputRows, mode: &Mode, samples_drawn: usize) -> Vec<u64> {
    let rows = batch.rows();
    let granularity = model.row_granularity(batch);
    match mode {
        Mode::Eval => pass_sizes(rows, model.eval_split(rows, granularity))
            .map(|r| model.eval_pass_bytes(r))
            .collect(),
        Mode::McDropout(mc) => {
            let per_pass = model.mc_split(rows, LoadedModel::row_elements(batch) * rows, granularity);
            let chunk = match mc.samples {
                McCount::Auto { .. } => adaptive::chunk(sample_step(granularity, rows)),
                McCount::Fixed(_) => samples_drawn,
            };
            pass_sizes(samples_drawn, chunk)
                .flat_map(|step| pass_sizes(step, per_pass))
                .map(|k| model.mc_pass_bytes(rows, k))
                .collect()
        }
    }
}

/// An eval request: its input, its largest pass and its encoded answer.
pub fn eval_bytes(model: &LoadedModel, rows: usize, granularity: usize) -> u64 {
    model
        .input_bytes(rows)
        .saturating_add(model.eval_pass_bytes(model.eval_split(rows, granularity)))
        .saturating_add(model.eval_answer_bytes(rows))
}

/// An MC request, as the passes will be sized; None when not even one sample of these rows
/// fits a pass.
pub fn mc_bytes(
    model: &LoadedModel,
    rows: usize,
    granularity: usize,
    samples: usize,
    chunk: usize,
    requested: Requested,
    return_samples: bool,
) -> Option<u64> {
    let largest = model
        .mc_split(rows, model.input_elements(rows), granularity)
        .min(samples)
        .min(chunk);
    (model.mc_pass_bytes(rows, 1) <= model.pass_budget()).then(|| {
        model
            .input_bytes(rows)
            .saturating_add(model.mc_pass_bytes(rows, largest))
            .saturating_add(model.mc_answer_bytes(rows, samples, requested, return_samples))
    })
}

/// The largest n in 1..=max with `fits(n)` (monotone), or 0.
fn largest(max: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) { lo = mid } else { hi = mid - 1 }
    }
    lo
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_over_the_whole_budget_is_413_and_over_what_is_left_is_429() {
        let budget = MemoryBudget::new(10 << 20, 1);
        assert!(matches!(budget.reserve(11 << 20), Err(Error::PayloadTooLarge(_))));
        let held = budget.reserve(8 << 20).unwrap();
        assert!(matches!(budget.reserve(4 << 20), Err(Error::Overloaded)));
        drop(held);
        assert_eq!(budget.available_bytes(), 10 << 20);
        assert!(budget.reserve(10 << 20).is_ok());
    }

    /// A body reserves JSON_BODY_FACTOR bytes per byte; a growing body's reservation adds
    /// up and is given back whole; the body so far over the whole budget is 413, over what
    /// is left 429.
    #[test]
    fn bodies_reserve_their_decode_and_grow_within_the_budget() {
        let budget = MemoryBudget::new(64 << 20, 1);
        let empty = budget.reserve_body(0).unwrap();
        assert_eq!(budget.available_bytes(), 64 << 20, "an empty body holds nothing");
        drop(empty);
        let mut body = budget.reserve_body(2 << 20).unwrap();
        assert_eq!(budget.available_bytes(), (64 - 16) << 20);
        budget.grow_body(&mut body, 1 << 20).unwrap();
        assert_eq!(
            budget.available_bytes(),
            (64 - 16) << 20,
            "what is covered needs nothing"
        );
        budget.grow_body(&mut body, 5 << 20).unwrap();
        assert_eq!(budget.available_bytes(), (64 - 40) << 20);
        let other = budget.reserve_body(3 << 20).unwrap();
        assert!(matches!(budget.grow_body(&mut body, 6 << 20), Err(Error::Overloaded)));
        drop(other);
        // Growth stops at the whole budget: 7.9 MiB of body still fits.
        budget.grow_body(&mut body, (7 << 20) + (900 << 10)).unwrap();
        assert!(budget.available_bytes() < 1 << 20, "{}", budget.available_bytes());
        assert!(matches!(
            budget.grow_body(&mut body, (8 << 20) + 1),
            Err(Error::PayloadTooLarge(_))
        ));
        drop(body);
        let mut small = MemoryPermit::none();
        budget.grow_body(&mut small, 700).unwrap();
        assert_eq!(
            budget.available_bytes(),
            (64 << 20) - 8 * BODY_STEP_BYTES,
            "a small body holds one step"
        );
        drop(small);
        assert_eq!(
            budget.available_bytes(),
            64 << 20,
            "the grown reservation is given back whole"
        );
        assert!(
            matches!(budget.reserve_body(9 << 20), Err(Error::PayloadTooLarge(m)) if m.contains("to read and decode"))
        );
    }

    #[test]
    fn largest_finds_the_boundary() {
        assert_eq!(largest(100, |n| n <= 37), 37);
        assert_eq!(largest(100, |_| false), 0);
        assert_eq!(largest(100, |_| true), 100);
    }

    /// An eval request that could never fit says so in one readable sentence, with the
    /// rows that would fit (and those rows do fit).
    #[test]
    fn an_eval_request_over_the_budget_says_how_many_rows_fit() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let model = LoadedModel::load("digits_cnn", &dir.join("digits_cnn.onnx"), Default::default()).unwrap();
        let budget = MemoryBudget::new(8 << 20, 1);
        let Err(Error::PayloadTooLarge(message)) = budget.request_bytes(&model, 4096, 1, &Mode::Eval) else {
            panic!("4096 digits_cnn rows fit in 8 MiB");
        };
        assert!(!message.contains("  "), "{message}");
        let fit: usize = message
            .rsplit("at most ")
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            message.contains("more than the server's budget of 8.0 MiB"),
            "{message}"
        );
        assert!(budget.request_bytes(&model, fit, 1, &Mode::Eval).is_ok());
        assert!(budget.request_bytes(&model, fit + 1, 1, &Mode::Eval).is_err());
    }

    #[test]
    fn a_pass_gets_a_share_of_at_most_half() {
        assert_eq!(MemoryBudget::pass_bytes(1000, 1), 500);
        assert_eq!(MemoryBudget::pass_bytes(1000, 4), 250);
    }
}
