//! The request queue and its long-lived inference threads.
//!
//! An admitted request becomes a [`Job`] on one queue; a fixed set of worker threads (one
//! per core by default) takes jobs off it. A worker that takes a job also takes every other
//! waiting job that can share its pass (same model, same mode class: eval, or MC with the
//! same sample count), up to the row cap, and the core runs them as one pass. Nothing waits
//! for company unless `--max-batch-delay-us` says so: an idle server runs a request at
//! once, and under load the requests that arrived during a pass are merged into the next.
//!
//! Compared with a `spawn_blocking` hand-off per request, a busy worker goes straight from
//! one group to the next without sleeping, and a request costs a queue push and, only when
//! a worker is asleep, one wake-up.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use tract_onnx::prelude::Tensor;

use crate::core::mode::Mode;
use crate::core::{Answer, Core};
use crate::engine::model::LoadedModel;
use crate::error::Error;

/// A request's side of a job: decoding its body, and answering it. Typed by its front
/// end's answer; the queue only sees this.
pub trait Pending: Send {
    /// The caller gave up (timed out): skip the work.
    fn abandoned(&self) -> bool;
    /// The body as the model's input tensors (once).
    fn decode(&mut self, model: &LoadedModel) -> Result<Vec<Tensor>, Error>;
    /// Once decoded: gives back the memory reserved beyond the request's estimate.
    fn shrink_reservation(&mut self, bytes: u64);
    /// Encodes the answer, gives back the request's admission, then sends the answer.
    /// Returns the message of a panic of the encoder (answered as a 500).
    fn respond(self: Box<Self>, model: &LoadedModel, answer: Result<Answer, Error>) -> Option<String>;
}

/// Which requests may share a pass, beyond being for the same loaded model: decided from
/// the mode alone, before any body is decoded (by `worker::pass_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassClass {
    Eval,
    /// MC with this fixed sample count. `mc_samples=auto` decides its count as it goes, so
    /// it runs alone.
    Mc(usize),
}

/// An admitted request waiting for a worker.
pub struct Job {
    pub model: Arc<LoadedModel>,
    pub mode: Mode,
    /// Which jobs may share its pass (`worker::pass_class`); None: it runs alone.
    pub class: Option<PassClass>,
    pub enqueued: Instant,
    pub request: Box<dyn Pending>,
}

impl Job {
    fn joins(&self, first: &Job, class: PassClass) -> bool {
        Arc::ptr_eq(&self.model, &first.model) && self.class == Some(class)
    }
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers asleep waiting for a job.
    idle: usize,
    /// Workers holding a job while they wait for company (`--max-batch-delay-us`).
    gathering: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    delay: Duration,
    workers: usize,
    /// Most jobs taken into one group; the core splits a group into passes by rows.
    max_jobs: usize,
}

pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// Starts `workers` inference threads serving `core`'s groups. They hold the core
    /// weakly and stop when the queue is dropped.
    pub fn start(core: Weak<Core>, workers: usize, delay: Duration, max_jobs: usize) -> Queue {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            delay,
            workers: workers.max(1),
            max_jobs: max_jobs.max(1),
        });
        for i in 0..workers.max(1) {
            let (shared, core) = (shared.clone(), core.clone());
            std::thread::Builder::new()
                .name(format!("mcd-infer-{i}"))
                .spawn(move || work(&shared, &core))
                .expect("spawning an inference thread");
        }
        Queue { shared }
    }

    /// Queues an admitted job.
    pub fn submit(&self, job: Job) {
        let mut state = self.shared.lock();
        state.jobs.push_back(job);
        // A wake-up is a syscall and a context switch. While a worker is busy, one job
        // waits for it (it will run in that worker's next pass, merged with whatever else
        // arrives); a second waiting job, or no busy worker, wakes a sleeping one.
        let busy = self.shared.workers - state.idle - state.gathering;
        if state.gathering > 0 {
            self.shared.wake.notify_all();
        } else if state.idle > 0 && (busy == 0 || state.jobs.len() > 1) {
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker never panics while holding the lock (inference runs outside it).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next group: the oldest job, and every waiting job that can share its pass.
    /// None once the queue is gone.
    fn next_group(&self) -> Option<Vec<Job>> {
        let mut state = self.lock();
        let first = loop {
            if let Some(job) = state.jobs.pop_front() {
                break job;
            }
            if state.closed {
                return None;
            }
            state.idle += 1;
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle -= 1;
        };
        let Some(class) = first.class else {
            return Some(vec![first]);
        };
        let deadline = first.enqueued + self.delay;
        let mut group = vec![first];
        loop {
            let mut i = 0;
            while i < state.jobs.len() && group.len() < self.max_jobs {
                if state.jobs[i].joins(&group[0], class) {
                    group.extend(state.jobs.remove(i));
                } else {
                    i += 1;
                }
            }
            let now = Instant::now();
            if group.len() >= self.max_jobs || now >= deadline || state.closed {
                return Some(group);
            }
            state.gathering += 1;
            state = self
                .wake
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            state.gathering -= 1;
        }
    }
}

fn work(shared: &Shared, core: &Weak<Core>) {
    while let Some(group) = shared.next_group() {
        match core.upgrade() {
            Some(core) => core.serve_group(group),
            // The core is gone: dropping the jobs tells their callers.
            None => return,
        }
    }
}
