//! Weighted admission: a request reserves its cost (rows × samples) before it is queued,
//! and is refused at once (429) when the budget is spent. The permit travels with the job
//! (`core::queue`), so a request that timed out still holds its capacity until a worker
//! has finished or skipped its work.

use std::sync::Arc;

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
}

impl Admission {
    pub fn new(capacity: u32) -> Self {
        Admission {
            cost: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
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
    pub fn admit(&self, cost: u64) -> Result<OwnedSemaphorePermit, Error> {
        let cost = cost.clamp(1, self.capacity as u64) as u32;
        self.cost
            .clone()
            .try_acquire_many_owned(cost)
            .map_err(|_| Error::Overloaded)
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
        let a = Admission::new(10);
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
}
