//! Admission control (docs/contract.md, "Under load, slow clients, shutdown"): how many
//! predict requests the service holds at once, and how many bytes the bodies still arriving
//! may take.
//!
//! Both are decided at a request's headers, before its body is read, so that refusing one
//! costs next to nothing: a refused body is never buffered or parsed. The counters are plain
//! atomics shared by the HTTP threads; a [`Permit`] gives back what it took when dropped, so
//! a request that ends any way (answered, failed, or its client gone and its handler
//! dropped) releases its place.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The service's two budgets. Cheap to share: hold it in an `Arc`.
#[derive(Debug)]
pub struct Admission {
    /// Predict requests held at once: body arriving, waiting for a worker, or running.
    capacity: usize,
    held: AtomicUsize,
    /// Requests admitted since start.
    admitted: AtomicU64,
    /// Bytes reserved by bodies still arriving.
    max_pending_bytes: usize,
    pending_bytes: AtomicUsize,
}

impl Admission {
    pub fn new(capacity: usize, max_pending_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            held: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            max_pending_bytes,
            pending_bytes: AtomicUsize::new(0),
        })
    }

    /// A place for one more request, or None when all are taken.
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.capacity).then_some(held + 1)
            })
            .ok()?;
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Some(Permit {
            admission: Arc::clone(self),
            reserved: 0,
        })
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Requests admitted since start.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Bytes reserved now by bodies still arriving.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes.load(Ordering::Acquire)
    }
}

/// One admitted request's place, and the bytes its body has reserved while arriving.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    reserved: usize,
}

impl Permit {
    /// Reserves `bytes` more for this request's body; false, reserving nothing, when that
    /// would take the bodies still arriving over the budget.
    #[must_use]
    pub fn reserve(&mut self, bytes: usize) -> bool {
        let max = self.admission.max_pending_bytes;
        let reserved = self.admission.pending_bytes.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |pending| pending.checked_add(bytes).filter(|&total| total <= max),
        );
        if reserved.is_ok() {
            self.reserved += bytes;
        }
        reserved.is_ok()
    }

    /// The body is in: it no longer counts as arriving. The place is kept.
    pub fn body_complete(&mut self) {
        let reserved = std::mem::take(&mut self.reserved);
        self.admission
            .pending_bytes
            .fetch_sub(reserved, Ordering::AcqRel);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.body_complete();
        self.admission.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_capacity_and_frees_places_on_drop() {
        let admission = Admission::new(2, 100);
        let first = admission.try_admit().expect("room for 1");
        let second = admission.try_admit().expect("room for 2");
        assert!(admission.try_admit().is_none(), "a third is refused");
        assert_eq!(admission.held(), 2);
        drop(first);
        let third = admission.try_admit().expect("a place was freed");
        drop((second, third));
        assert_eq!(admission.held(), 0);
        assert_eq!(admission.admitted(), 3, "refusals are not counted");
    }

    #[test]
    fn bodies_arriving_share_one_byte_budget() {
        let admission = Admission::new(10, 100);
        let mut a = admission.try_admit().expect("admitted");
        let mut b = admission.try_admit().expect("admitted");
        assert!(a.reserve(60));
        assert!(!b.reserve(41), "60 + 41 is over 100");
        assert_eq!(
            admission.pending_bytes(),
            60,
            "a refused reservation takes nothing"
        );
        assert!(b.reserve(40));
        assert!(!a.reserve(1));
        // A body that is in gives its bytes back but keeps its place.
        a.body_complete();
        assert_eq!(admission.pending_bytes(), 40);
        assert_eq!(admission.held(), 2);
        assert!(b.reserve(60));
        // A request that ends mid-body (answered early, client gone) gives back both.
        drop(b);
        assert_eq!(admission.pending_bytes(), 0);
        assert_eq!(admission.held(), 1);
        assert!(!a.reserve(usize::MAX), "no overflow");
    }

    #[test]
    fn places_are_shared_across_threads() {
        let admission = Admission::new(8, 0);
        let admitted: usize = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let admission = &admission;
                    scope.spawn(move || {
                        (0..10)
                            .filter_map(|_| admission.try_admit())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let permits: Vec<Vec<Permit>> = threads
                .into_iter()
                .map(|t| t.join().expect("no panic"))
                .collect();
            permits.iter().map(Vec::len).sum()
        });
        assert_eq!(admitted, 8, "never more than the capacity");
        assert_eq!(admission.held(), 0);
    }
}
