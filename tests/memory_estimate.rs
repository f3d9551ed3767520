//! The load-time memory estimates against what a pass really allocates, counted by a
//! global allocator. One test in its own binary: the counter is process-wide.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use mcd_serve::engine::footprint::ENCODED_BYTES_PER_VALUE;
use mcd_serve::engine::model::{InputRows, LoadedModel, McSamples};
use mcd_serve::engine::repo::load_model;
use mcd_serve::engine::statistics::Requested;
use mcd_serve::front::native::decode::parse_request;
use mcd_serve::front::values::Nested;
use serde_json::{Value, json};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            // Counted as the new block on top of the old: a copying realloc holds both.
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was live when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let out = f();
    (out, (PEAK.load(Ordering::Relaxed) - start) as u64)
}

fn batch(model: &LoadedModel, rows: usize) -> InputRows {
    let refs = read_json(&fixture("reference_outputs.json"));
    let inputs: Vec<Value> = (0..rows).map(|i| refs[&model.name]["inputs"][i % 8].clone()).collect();
    let body = serde_json::to_vec(&json!({ "inputs": inputs })).unwrap();
    model.input_rows(parse_request(model, &body).unwrap()).unwrap()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Every estimate bounds what the pass allocates, and is within a small factor of it (an
/// estimate ten times too high would refuse requests that fit).
#[test]
fn pass_and_answer_estimates_bound_what_passes_allocate() {
    let rows = 4096;
    for name in ["breast_cancer", "diabetes", "digits_cnn"] {
        let path = models_dir().join(format!("{name}.onnx"));
        let model = load_model(name, &path).unwrap();
        let b = batch(&model, rows);
        // A first run of each size builds and caches its plan: measure the second.
        model.eval_session().run(&b).unwrap();
        let (_, measured) = peak_of(|| model.eval_session().run(&b).unwrap());
        let estimate = model.eval_pass_bytes(rows);
        println!(
            "{name}: eval pass of {rows} rows: estimate {:.2} MiB, measured {:.2} MiB ({:.2}x)",
            mib(estimate),
            mib(measured),
            estimate as f64 / measured as f64
        );
        assert!(measured <= estimate, "{name} eval: {measured} > {estimate}");
        assert!(
            estimate <= 4 * measured,
            "{name} eval: {estimate} is over 4x {measured}"
        );

        let session = model.mc_session().unwrap();
        let elements = b.tensors().iter().map(|t| t.len()).sum();
        for k in [1, 8, model.mc_split(b.rows(), elements, model.row_granularity(&b))] {
            let n = McSamples::new(k.max(2)).unwrap();
            let before = LIVE.load(Ordering::Relaxed);
            session.run_in_passes(&b, n, 1, false, k).unwrap();
            let kept = LIVE.load(Ordering::Relaxed).saturating_sub(before);
            println!("{name}: the first MC pass of {k} samples x {rows} rows kept {kept} bytes (its plan, cached)");
            let (_, measured) = peak_of(|| session.run_in_passes(&b, n, 1, false, k).unwrap());
            let estimate =
                model.mc_pass_bytes(rows, k) + model.mc_answer_bytes(rows, n.get(), Requested::Defaults, false);
            let pass = model.mc_pass_bytes(rows, k);
            println!(
                "{name}: MC pass of {k} samples x {rows} rows: pass estimate {:.2} MiB, measured (pass and \
                 statistics) {:.2} MiB ({:.2}x)",
                mib(pass),
                mib(measured),
                pass as f64 / measured as f64
            );
            assert!(measured <= estimate, "{name} MC-{k}: {measured} > {estimate}");
            assert!(pass <= 4 * measured, "{name} MC-{k}: {pass} is over 4x {measured}");
        }
    }
    // The encoding of answer values: their text, written straight from the buffer.
    let values: Vec<f64> = (0..1_000_000).map(|i| (i as f64).sqrt() / 7.0).collect();
    let (_, measured) = peak_of(|| serde_json::to_vec(&Nested::floats(&[1000, 1000], &values)).unwrap());
    println!(
        "encoding 1e6 values: {:.1} bytes per value (the estimate counts {ENCODED_BYTES_PER_VALUE})",
        measured as f64 / 1e6
    );
    assert!(measured <= 1_000_000 * ENCODED_BYTES_PER_VALUE);
}
