//! Idle cores for a pass that runs alone.
//!
//! The server runs one pass per inference worker, one worker per core: under load every
//! core is busy with passes of its own, and that is the most throughput the machine has.
//! But a single large request (a DenseNet121 MC-20, a BERT-base eval) then runs on one core
//! while the others idle. So a tract pass that starts while no other pass is running runs
//! on a pool of `threads` threads: tract splits each large matrix product's output tiles,
//! and each large element-wise, softmax or reduction op's rows, between them (tract-linalg
//! `multithread-mm`; products under 64 panels, and ops under its element threshold, still
//! run inline). A pass that starts while another runs keeps its own thread.
//!
//! The bits do not move: no split cuts a sum. A product's tile is computed by one thread
//! over all of k, a reduction's partial blocks are fixed by the shape and not by the
//! thread count, and a row of a softmax is one thread's (tract-core 0.23.9 `reduce.rs`,
//! `softmax/mod.rs`). `tests/pass_threads.rs` checks it answer by answer.
//!
//! onnxruntime's thread count is fixed when a session is created, so this rule is tract's.
//! With `--pass-threads` above 1, onnxruntime's sessions share one global intra-op pool of
//! that many threads instead (`engine::backend::onnxruntime`): a lone pass has every core,
//! and passes running together share the pool's threads rather than each bringing its own.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tract_onnx::tract_core::tract_linalg::multithread::{Executor, multithread_tract_scope};

/// The process's: tract's executor is per thread, and the server's workers are one pool.
static CORES: OnceLock<Cores> = OnceLock::new();

/// Sets how many threads a pass that runs alone may use (1: none beyond its own). The
/// first call decides; later calls (a second server in the same process, as tests start)
/// keep it and return false.
pub fn set_pass_threads(threads: usize) -> bool {
    let mut first = false;
    CORES.get_or_init(|| {
        first = true;
        Cores::new(threads)
    });
    first
}

fn cores() -> &'static Cores {
    CORES.get_or_init(|| Cores::new(1))
}

/// Threads a lone pass runs on: the pool's size, or 1.
pub fn pass_threads() -> usize {
    cores().threads()
}

/// (passes that ran on the pool, passes that ran on their worker's thread) since start.
pub fn passes() -> (u64, u64) {
    let c = cores();
    (c.wide.load(Ordering::Relaxed), c.narrow.load(Ordering::Relaxed))
}

/// Runs one pass: a tract pass (`widens`) on the pool when no other pass is running, else
/// on this thread. An onnxruntime pass never widens, but counts as running.
pub fn run_pass<R>(widens: bool, pass: impl FnOnce() -> R) -> R {
    cores().run(widens, pass)
}

struct Cores {
    /// None when passes get one thread each.
    pool: Option<Executor>,
    /// Passes running now, on either path.
    running: AtomicUsize,
    /// Passes that ran on the pool, and on their own thread: `mcd_passes_total{threads}`.
    wide: AtomicU64,
    narrow: AtomicU64,
}

impl Cores {
    fn new(threads: usize) -> Cores {
        Cores {
            pool: (threads > 1).then(|| Executor::multithread_with_name(threads, "mcd-pass")),
            running: AtomicUsize::new(0),
            wide: AtomicU64::new(0),
            narrow: AtomicU64::new(0),
        }
    }

    fn threads(&self) -> usize {
        match &self.pool {
            Some(Executor::MultiThread(pool)) => pool.current_num_threads(),
            _ => 1,
        }
    }

    fn run<R>(&self, widens: bool, pass: impl FnOnce() -> R) -> R {
        struct Running<'a>(&'a AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let others = self.running.fetch_add(1, Ordering::AcqRel);
        let _running = Running(&self.running);
        match &self.pool {
            Some(pool) if widens && others == 0 => {
                self.wide.fetch_add(1, Ordering::Relaxed);
                multithread_tract_scope(pool.clone(), pass)
            }
            _ => {
                self.narrow.fetch_add(1, Ordering::Relaxed);
                pass()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use tract_onnx::tract_core::tract_linalg::multithread::current_tract_executor;

    use super::*;

    fn on_pool() -> bool {
        matches!(current_tract_executor(), Executor::MultiThread(_))
    }

    #[test]
    fn only_a_lone_tract_pass_runs_on_the_pool() {
        let cores = Cores::new(2);
        assert_eq!(cores.threads(), 2);
        assert!(cores.run(true, on_pool), "a lone tract pass");
        assert!(!cores.run(false, on_pool), "an onnxruntime pass");
        let (started, wait_started) = mpsc::channel();
        let (finish, wait_finish) = mpsc::channel::<()>();
        let shared = &cores;
        std::thread::scope(|s| {
            s.spawn(move || {
                let cores = shared;
                cores.run(false, || {
                    started.send(()).unwrap();
                    wait_finish.recv().unwrap();
                })
            });
            wait_started.recv().unwrap();
            let beside = cores.run(true, on_pool);
            // Released before asserting, so that a failure fails and does not hang.
            finish.send(()).unwrap();
            assert!(!beside, "a pass beside a running one");
        });
        assert!(cores.run(true, on_pool), "alone again once the other has ended");
        assert_eq!(cores.wide.load(Ordering::Relaxed), 2);
        assert_eq!(cores.narrow.load(Ordering::Relaxed), 3);
        // One thread: never a pool.
        assert!(!Cores::new(1).run(true, on_pool));
    }
}
