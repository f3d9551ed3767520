//! Weighted admission: a request reserves its cost (rows × samples) before it is queued,
//! and is refused at once (429) when the budget is spent. The permit travels with the job
//! (`core::queue`), so a request that timed out still holds its capacity until a worker
//! has finished or skipped its work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// Why a request was shed before inference, or refused before it was a request (a gRPC
/// message that did not decode): the `reason` of `mcd_rejected_requests_total`.
pub const REJECT_REASONS: [&str; 5] = [
    "overloaded",
    "timeout",
    "not_ready",
    "payload_too_large",
    "malformed_protobuf",
];

pub struct Admission {
    cost: Arc<Semaphore>,
    capacity: u32,
    /// `mcd_held_cost`: cost held by work whose request has timed out.
    held: IntGauge,
}

impl Admission {
    pub fn new(capacity: u32, held: IntGauge) -> Self {
        Admission {
            cost: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            held,
        }
    }

    /// Capacity not held by admitted work.
    pub fn available(&self) -> usize {
        self.cost.available_permits()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Reserves `cost` units (at most the whole budget), or refuses with 429.
    pub fn admit(&self, cost: u64) -> Result<Admitted, Error> {
        let cost = cost.clamp(1, self.capacity as u64) as u32;
        let permit = self
            .cost
            .clone()
            .try_acquire_many_owned(cost)
            .map_err(|_| Error::Overloaded)?;
        Ok(Admitted {
            _permit: permit,
            held: Arc::new(Held {
                state: AtomicU8::new(RUNNING),
                cost,
                gauge: self.held.clone(),
            }),
        })
    }
}

/// Admitted cost, given back when dropped (when the work ends).
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    held: Arc<Held>,
}

/// Whether admitted work's request has timed out: between its 504 and the end of its work,
/// its cost shows in `mcd_held_cost`, or a 429 with no request in flight cannot be told
/// apart from a leak.
pub struct Held {
    state: AtomicU8,
    cost: u32,
    gauge: IntGauge,
}

const RUNNING: u8 = 0;
const TIMED_OUT: u8 = 1;
const ENDED: u8 = 2;

impl Admitted {
    /// The handle the request keeps while its work travels to a worker.
    pub fn held(&self) -> Arc<Held> {
        self.held.clone()
    }
}

impl Held {
    /// The request was answered 504; its work still holds the cost unless it has ended.
    pub fn timed_out(&self) {
        if self
            .state
            .compare_exchange(RUNNING, TIMED_OUT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.gauge.add(self.cost.into());
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.held.state.swap(ENDED, Ordering::AcqRel) == TIMED_OUT {
            self.held.gauge.sub(self.held.cost.into());
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

    #[test]
    fn over_budget_is_refused_at_once_and_a_dropped_permit_gives_it_back() {
        let a = Admission::new(10, IntGauge::new("held", "held").unwrap());
        let held = a.admit(7).unwrap();
        assert!(matches!(a.admit(4), Err(Error::Overloaded)));
        let small = a.admit(3).unwrap();
        assert_eq!(a.available(), 0);
        drop((held, small));
        assert_eq!(a.available(), 10);
        // A request dearer than the whole budget takes all of it rather than never fitting.
        let all = a.admit(1_000_000).unwrap();
        assert_eq!(a.available(), 0);
        drop(all);
    }

    #[test]
    fn timed_out_work_shows_its_cost_until_it_ends() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let a = Admission::new(10, gauge.clone());
        let work = a.admit(4).unwrap();
        let request = work.held();
        request.timed_out();
        assert_eq!(gauge.get(), 4);
        drop(work);
        assert_eq!(gauge.get(), 0);
        // Work that ends first never shows, even if the timeout fires after.
        let work = a.admit(3).unwrap();
        let request = work.held();
        drop(work);
        request.timed_out();
        assert_eq!(gauge.get(), 0);
    }
}
