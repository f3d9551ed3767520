//! Weighted admission, the bounded worker pool and the request timeout.
//!
//! Admission fails fast (429) when the cost budget is spent. The permits move into the
//! work itself, so a request that timed out still holds its capacity until its
//! computation really ends; work whose caller has gone before it starts is skipped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

use crate::error::Error;

/// Why a request was shed before inference: the `reason` of `mcd_rejected_requests_total`.
pub const REJECT_REASONS: [&str; 4] = ["overloaded", "timeout", "not_ready", "payload_too_large"];

pub struct Admission {
    cost: Arc<Semaphore>,
    capacity: u32,
    workers: Arc<Semaphore>,
    timeout: Duration,
}

/// How work that was admitted ended, when it did not give its own result.
pub enum PoolError {
    Rejected(Error),
    Panicked(String),
}

impl Admission {
    pub fn new(capacity: u32, workers: usize, timeout: Duration) -> Self {
        Admission {
            cost: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            timeout,
        }
    }

    /// Capacity not held by admitted work.
    pub fn available(&self) -> usize {
        self.cost.available_permits()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Runs CPU-bound `work` on the blocking pool once `cost` units are admitted.
    pub async fn run<T: Send + 'static>(
        &self,
        cost: u64,
        work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<Result<T, Error>, PoolError> {
        let cost = cost.clamp(1, self.capacity as u64) as u32;
        let admitted = self
            .cost
            .clone()
            .try_acquire_many_owned(cost)
            .map_err(|_| PoolError::Rejected(Error::Overloaded))?;
        let workers = self.workers.clone();
        let run = async move {
            let worker = workers
                .acquire_owned()
                .await
                .expect("worker semaphore is never closed: this is a bug");
            let (tx, rx) = oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let permits = (admitted, worker);
                if tx.is_closed() {
                    return;
                }
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(work));
                // Capacity comes back before the answer leaves: a client that sends its next
                // request as soon as it reads this one must find the budget free.
                drop(permits);
                let _ = tx.send(outcome);
            });
            rx.await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Err(_) => Err(PoolError::Rejected(Error::Timeout(self.timeout))),
            Ok(Err(_)) => Err(PoolError::Panicked("the inference worker stopped".into())),
            Ok(Ok(Err(panic))) => Err(PoolError::Panicked(panic_message(&*panic))),
            Ok(Ok(Ok(result))) => Ok(result),
        }
    }
}

pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_the_work_is_reported_and_the_pool_keeps_serving() {
        let a = Admission::new(100, 1, Duration::from_secs(5));
        let r = a.run(1, || -> Result<(), Error> { panic!("injected panic") }).await;
        assert!(matches!(r, Err(PoolError::Panicked(m)) if m == "injected panic"));
        assert_eq!(a.run(1, || Ok(7)).await.ok().unwrap().unwrap(), 7);
        assert_eq!(a.available(), 100);
    }

    /// Probe finding c: a request that took the whole budget and was refused (413, 400)
    /// must give the budget back before its answer is sent, or the client's next request,
    /// sent as soon as it reads that answer, is refused 429.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_budget_is_back_before_the_answer_is() {
        let a = Admission::new(1000, 2, Duration::from_secs(5));
        let mut early = 0;
        for _ in 0..2000 {
            let r = a.run(1000, || -> Result<(), Error> {
                Err(Error::PayloadTooLarge("too many rows".into()))
            });
            assert!(matches!(r.await, Ok(Err(Error::PayloadTooLarge(_)))));
            early += (a.available() != 1000) as usize;
        }
        assert_eq!(early, 0, "answers that arrived before their capacity was returned");
    }

    #[tokio::test]
    async fn over_budget_is_refused_at_once() {
        let a = Arc::new(Admission::new(10, 1, Duration::from_secs(5)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let held = {
            let a = a.clone();
            tokio::spawn(async move { a.run(10, move || Ok(rx.recv().is_ok())).await })
        };
        while a.available() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let r = a.run(1, || Ok(())).await;
        assert!(matches!(r, Err(PoolError::Rejected(Error::Overloaded))));
        tx.send(()).unwrap();
        assert!(held.await.unwrap().ok().unwrap().unwrap());
    }
}
