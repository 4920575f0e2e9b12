//! Admission control (docs/contract.md, "Under load, slow clients, shutdown"): how many
//! predict requests the service holds at once, how many more may wait for a place, and how
//! many bytes the bodies still arriving may take.
//!
//! A request takes a place at its headers, before its body is read. One that finds every
//! place taken waits there, its body unread, in arrival order, until a place frees or its
//! deadline passes: the HTTP layer then stops reading its connection, so TCP holds the
//! client back instead of the service refusing it over and over. A place that would come
//! too late to answer a request in time is passed on to the next (see [`Admission::admit`]).
//! At most `max_waiting` wait; one more is refused at once. A [`Permit`] gives back what it
//! took when dropped, so a request that ends any way (answered, failed, or its client gone
//! and its handler dropped) releases its place; a waiting request whose handler is dropped
//! leaves the line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The service's budgets. Cheap to share: hold it in an `Arc`.
#[derive(Debug)]
pub struct Admission {
    /// Predict requests held at once: body arriving, waiting for a worker, or running.
    capacity: usize,
    /// One permit per place. tokio's semaphore hands freed permits to its waiters in the
    /// order they came, and works across the HTTP threads' runtimes.
    places: Arc<Semaphore>,
    /// Requests waiting for a place, at most `max_waiting`.
    max_waiting: usize,
    waiting: AtomicUsize,
    /// Requests admitted since start.
    admitted: AtomicU64,
    /// Bytes reserved by bodies still arriving.
    max_pending_bytes: usize,
    pending_bytes: AtomicUsize,
    /// How long the recent requests that were answered held their place.
    held_for: Mutex<TimeInPlace>,
}

/// Why a request got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every place is taken and `max_waiting` requests already wait.
    Full,
    /// No place freed before the request's deadline.
    TimedOut,
}

impl Admission {
    pub fn new(capacity: usize, max_waiting: usize, max_pending_bytes: usize) -> Arc<Self> {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            capacity,
            places: Arc::new(Semaphore::new(capacity)),
            max_waiting,
            waiting: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            max_pending_bytes,
            pending_bytes: AtomicUsize::new(0),
            held_for: Mutex::new(TimeInPlace::default()),
        })
    }

    /// A place for one more request now, or None when all are taken (or promised to
    /// requests already waiting).
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        let place = Arc::clone(&self.places).try_acquire_owned().ok()?;
        Some(self.permit(place))
    }

    /// A place for one more request: at once if one is free, else after the requests
    /// already waiting, as soon as one frees. [`Refused::Full`] at once when `max_waiting`
    /// requests already wait, [`Refused::TimedOut`] when no place has freed by `until`.
    /// A place that frees for a waiting request is passed on to the next in line if the
    /// request could not be answered in time behind the others placed (`in_time`, given
    /// the moment): it waits on without one, still counted as waiting, so that a client
    /// retrying at once is held back as long as its deadline allows, and is refused at
    /// `until` like one no place freed for. Under overload a request given a place is then
    /// served, instead of refused once its body has been read.
    /// Must run on a Tokio runtime with a timer (any actix-web worker thread).
    pub async fn admit(
        self: &Arc<Self>,
        until: Instant,
        in_time: impl Fn(Instant) -> bool,
    ) -> Result<Permit, Refused> {
        if let Some(permit) = self.try_admit() {
            return Ok(permit);
        }
        let _in_line = InLine::join(self).ok_or(Refused::Full)?;
        let place = Arc::clone(&self.places).acquire_owned();
        match tokio::time::timeout_at(until.into(), place).await {
            Ok(Ok(place)) if in_time(Instant::now()) => Ok(self.permit(place)),
            Ok(Ok(place)) => {
                drop(place); // to the next in line
                tokio::time::sleep_until(until.into()).await;
                Err(Refused::TimedOut)
            }
            // The semaphore is never closed; were it, there would be no place to wait for.
            Ok(Err(_)) => Err(Refused::Full),
            Err(_) => Err(Refused::TimedOut),
        }
    }

    /// Predict requests held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn permit(self: &Arc<Self>, place: OwnedSemaphorePermit) -> Permit {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Permit {
            admission: Arc::clone(self),
            reserved: 0,
            placed_at: Instant::now(),
            _place: place,
        }
    }

    /// How long a request given a place now should expect to hold it until it is answered,
    /// judging by the recent requests that were: their smoothed time in place plus four
    /// times its mean deviation, as TCP bounds a round trip (RFC 6298). Zero before the
    /// first answer. It covers what a count of the runs ahead leaves out (reading the body,
    /// the HTTP work of the other requests on the same cores, a run slower than the mean),
    /// and its margin keeps nearly all, not half, of the requests placed at the last moment
    /// within their deadline.
    pub fn time_to_answer(&self) -> Duration {
        self.held_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bound()
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        self.capacity - self.places.available_permits()
    }

    /// Requests waiting for a place now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
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

/// One request counted among those waiting, until it is dropped: when it got its place,
/// timed out, or its handler was dropped mid-wait because its client left.
struct InLine<'a>(&'a AtomicUsize);

impl<'a> InLine<'a> {
    /// None when `max_waiting` requests already wait.
    fn join(admission: &'a Admission) -> Option<Self> {
        admission
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < admission.max_waiting).then_some(waiting + 1)
            })
            .ok()?;
        Some(Self(&admission.waiting))
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted request's place, and the bytes its body has reserved while arriving.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    reserved: usize,
    placed_at: Instant,
    /// Given back to the semaphore, and so to the first request waiting, when dropped.
    _place: OwnedSemaphorePermit,
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

    /// The request has been answered: how long it held its place counts towards
    /// [`Admission::time_to_answer`]; the place is given back.
    pub fn answered(self) {
        let held = self.placed_at.elapsed();
        self.admission
            .held_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(held);
    }
}

/// Smoothed time in place and its mean deviation, with RFC 6298's weights (1/8 and 1/4).
#[derive(Debug, Default)]
struct TimeInPlace {
    /// None before the first sample.
    smoothed: Option<(f64, f64)>,
}

impl TimeInPlace {
    fn add(&mut self, sample: Duration) {
        let sample = sample.as_secs_f64();
        self.smoothed = Some(match self.smoothed {
            None => (sample, sample / 2.0),
            Some((mean, deviation)) => (
                mean + (sample - mean) / 8.0,
                deviation + ((sample - mean).abs() - deviation) / 4.0,
            ),
        });
    }

    fn bound(&self) -> Duration {
        self.smoothed.map_or(Duration::ZERO, |(mean, deviation)| {
            Duration::from_secs_f64(mean + 4.0 * deviation)
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // The place itself goes back when `_place` is dropped, right after.
        self.body_complete();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// Every place comes in time.
    const ANY_TIME: fn(Instant) -> bool = |_| true;

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(600)
    }

    #[test]
    fn admits_up_to_the_capacity_and_frees_places_on_drop() {
        let admission = Admission::new(2, 2, 100);
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
        let admission = Admission::new(10, 10, 100);
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
        let admission = Admission::new(8, 8, 0);
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

    // The futures below are polled by hand (`now_or_never`), so that each test decides
    // exactly when a request joins the line and when it looks again for its place.

    #[actix_web::test]
    async fn a_request_beyond_the_capacity_waits_for_a_freed_place_in_arrival_order() {
        let admission = Admission::new(2, 2, 100);
        let first = admission.try_admit().expect("room for 1");
        let second = admission
            .admit(far(), ANY_TIME)
            .now_or_never()
            .expect("a free place is taken at once")
            .expect("room for 2");
        let mut a = Box::pin(admission.admit(far(), ANY_TIME));
        let mut b = Box::pin(admission.admit(far(), ANY_TIME));
        assert!((&mut a).now_or_never().is_none(), "a waits");
        assert!((&mut b).now_or_never().is_none(), "b waits, behind a");
        assert_eq!(admission.waiting(), 2);
        assert_eq!(admission.held(), 2);

        drop(second);
        assert!(
            admission.try_admit().is_none(),
            "a newcomer does not jump the line"
        );
        assert!((&mut b).now_or_never().is_none(), "the freed place is a's");
        let a_permit = (&mut a)
            .now_or_never()
            .expect("a has its place")
            .expect("admitted");
        assert_eq!(admission.waiting(), 1);

        drop(first);
        let b_permit = (&mut b)
            .now_or_never()
            .expect("b has its place")
            .expect("admitted");
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.held(), 2);
        drop((a_permit, b_permit));
        assert_eq!(admission.held(), 0);
        assert_eq!(admission.admitted(), 4);
    }

    #[actix_web::test]
    async fn one_beyond_the_places_and_as_many_waiting_is_refused_at_once() {
        let admission = Admission::new(1, 1, 100);
        let _held = admission.try_admit().expect("the one place");
        let mut waiting = Box::pin(admission.admit(far(), ANY_TIME));
        assert!((&mut waiting).now_or_never().is_none(), "one may wait");
        let refused = admission.admit(far(), ANY_TIME).now_or_never();
        assert!(
            matches!(refused, Some(Err(Refused::Full))),
            "a second may not: {refused:?}"
        );
        assert_eq!(
            admission.waiting(),
            1,
            "the refused one never joined the line"
        );

        let none = Admission::new(0, 0, 100);
        let refused = none.admit(far(), ANY_TIME).now_or_never();
        assert!(matches!(refused, Some(Err(Refused::Full))), "{refused:?}");
    }

    #[actix_web::test]
    async fn a_waiting_request_times_out_at_its_deadline() {
        let admission = Admission::new(1, 1, 100);
        let _held = admission.try_admit().expect("the one place");
        let until = Instant::now() + Duration::from_millis(100);
        let waited = admission.admit(until, ANY_TIME).await;
        assert!(matches!(waited, Err(Refused::TimedOut)), "{waited:?}");
        assert!(Instant::now() >= until, "not before its deadline");
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.held(), 1);
    }

    #[actix_web::test]
    async fn a_place_that_comes_too_late_goes_to_the_next_in_line() {
        let admission = Admission::new(1, 2, 100);
        let held = admission.try_admit().expect("the one place");
        let until = Instant::now() + Duration::from_millis(100);
        let mut late = Box::pin(admission.admit(until, |_| false));
        let mut next = Box::pin(admission.admit(far(), ANY_TIME));
        assert!((&mut late).now_or_never().is_none());
        assert!((&mut next).now_or_never().is_none());
        drop(held);
        assert!(
            (&mut late).now_or_never().is_none(),
            "passed over, it waits on"
        );
        let next = next.await.expect("the place passed on");
        assert_eq!(
            admission.waiting(),
            1,
            "the one passed over still counts as waiting"
        );
        let refused = late.await;
        assert!(matches!(refused, Err(Refused::TimedOut)), "{refused:?}");
        assert!(
            Instant::now() >= until,
            "refused at its deadline, not before"
        );
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.held(), 1);
        drop(next);
    }

    #[actix_web::test]
    async fn a_dropped_waiter_leaves_the_line_and_any_place_it_was_given() {
        let admission = Admission::new(1, 1, 100);
        let held = admission.try_admit().expect("the one place");
        let mut gone = Box::pin(admission.admit(far(), ANY_TIME));
        assert!((&mut gone).now_or_never().is_none());
        assert_eq!(admission.waiting(), 1);
        drop(gone);
        assert_eq!(admission.waiting(), 0, "its client left");

        // Given the freed place, but dropped before it looked: the place is not lost.
        let mut gone = Box::pin(admission.admit(far(), ANY_TIME));
        assert!((&mut gone).now_or_never().is_none());
        drop(held);
        assert_eq!(admission.held(), 1, "promised to the one waiting");
        drop(gone);
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.held(), 0);
        assert!(admission.try_admit().is_some());
    }

    #[test]
    fn the_time_to_answer_is_the_smoothed_time_in_place_plus_four_deviations() {
        let ms = Duration::from_millis;
        let mut held = TimeInPlace::default();
        assert_eq!(held.bound(), Duration::ZERO, "nothing answered yet");
        held.add(ms(400));
        // RFC 6298's first sample: the mean is the sample, the deviation half of it.
        assert_eq!(held.bound(), ms(400 + 4 * 200));
        held.add(ms(400));
        // mean 400, deviation 200 + (0 - 200) / 4 = 150
        assert_eq!(held.bound(), ms(400 + 4 * 150));
        held.add(ms(480));
        // mean 400 + 80 / 8 = 410, deviation 150 + (80 - 150) / 4 = 132.5
        let expected = Duration::from_secs_f64(0.410 + 4.0 * 0.1325);
        assert!(held.bound().abs_diff(expected) < Duration::from_micros(1));
        for _ in 0..200 {
            held.add(ms(300));
        }
        assert!(
            held.bound().abs_diff(ms(300)) < ms(1),
            "a steady time has no margin left"
        );
    }

    #[test]
    fn an_answered_request_counts_its_time_in_place_a_refused_one_does_not() {
        let admission = Admission::new(2, 2, 100);
        let refused = admission.try_admit().expect("a place");
        std::thread::sleep(Duration::from_millis(20));
        drop(refused);
        assert_eq!(admission.time_to_answer(), Duration::ZERO);
        let answered = admission.try_admit().expect("a place");
        std::thread::sleep(Duration::from_millis(20));
        answered.answered();
        let bound = admission.time_to_answer();
        // 20 ms and more in place: the bound is at least three times that (mean + 4 × half).
        assert!(bound >= Duration::from_millis(60), "{bound:?}");
        assert_eq!(admission.held(), 0, "the place is given back");
    }
}
