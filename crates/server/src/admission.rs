//! Admission control: how many requests the server works on at once, and when to refuse.
//!
//! A fixed limit on requests in flight cannot tell a burst from an overload. Sized for bursts
//! (64), an overload fills it and every admitted request waits behind 63 others; sized for short
//! waits (8 on one core), it refuses the bursts of normal traffic (`docs/benchmarks.md`). So the
//! limit moves, as CoDel decides when to drop packets: what matters is whether the queue ever
//! drains. Over each interval the shortest time an admitted request spent in the server is
//! taken. A queue that drains lets some request through quickly; a standing queue makes even
//! the fastest one wait. While that minimum stays above the target, the limit shrinks (by a
//! tenth per interval, to a floor); once it is back under, the limit grows again (by one per
//! interval) up to `max_in_flight`. Normal traffic keeps the whole `max_in_flight` for its
//! bursts, and an overload is held to a queue that drains within about the target.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the limit is reconsidered: CoDel's interval, a few round trips of a busy request.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// The limit never shrinks below this: a server always works on a few requests at once.
pub const FLOOR: usize = 4;

/// The moving limit and the requests in flight under it.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    /// `None`: the limit stays at `max` (`admission_target_ms = 0`).
    target: Option<Duration>,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// The shortest time in the server of a request that finished in this window.
    shortest: Option<Duration>,
}

/// One admitted request; dropping it without [`Permit::finish`] (a cancelled request) only
/// frees its place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
}

impl Permit {
    /// Frees the place and reports how long the request spent in the server, from its arrival.
    pub fn finish(self, in_server: Duration) {
        self.admission.observe(Instant::now(), in_server);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// At most `max` requests at once, fewer while requests wait longer than `target`
    /// (`Duration::ZERO`: a fixed limit of `max`).
    pub fn new(max: usize, target: Duration) -> Arc<Admission> {
        Arc::new(Admission {
            max,
            target: (!target.is_zero()).then_some(target),
            limit: AtomicUsize::new(max),
            in_flight: AtomicUsize::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                shortest: None,
            }),
        })
    }

    /// A place for one more request, or `None` when the current limit is reached.
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Acquire);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit {
                admission: Arc::clone(self),
            })
    }

    /// The current limit on requests in flight.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// The configured ceiling (`max_in_flight`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Counts a finished request at `now` that spent `in_server` in the server, and at the end
    /// of an interval moves the limit.
    pub fn observe(&self, now: Instant, in_server: Duration) {
        let Some(target) = self.target else {
            return;
        };
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.shortest = Some(w.shortest.map_or(in_server, |s| s.min(in_server)));
        if now.saturating_duration_since(w.started) < INTERVAL {
            return;
        }
        let queue_stood = w.shortest.is_some_and(|s| s > target);
        w.started = now;
        w.shortest = None;
        let limit = self.limit.load(Ordering::Acquire);
        let next = if queue_stood {
            (limit - limit.div_ceil(10)).max(FLOOR.min(self.max))
        } else {
            (limit + 1).min(self.max)
        };
        self.limit.store(next, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds one interval of finished requests, each `in_server` long, ending at `*now`.
    fn interval(a: &Admission, now: &mut Instant, in_server: &[Duration]) {
        for &d in in_server {
            a.observe(*now, d);
        }
        *now += INTERVAL;
        a.observe(*now, in_server.iter().copied().max().unwrap_or(MS));
    }

    #[test]
    fn the_limit_refuses_once_reached_and_a_dropped_permit_frees_its_place() {
        let a = Admission::new(2, Duration::ZERO);
        let first = a.try_admit().unwrap();
        let _second = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(first);
        assert!(a.try_admit().is_some());
    }

    #[test]
    fn bursts_that_drain_keep_the_whole_limit() {
        let a = Admission::new(64, 5 * MS);
        let mut now = Instant::now();
        for _ in 0..50 {
            // Some requests waited 40 ms behind a burst, but the queue drained: one took 1 ms.
            interval(&a, &mut now, &[40 * MS, 30 * MS, MS]);
        }
        assert_eq!(a.limit(), 64);
    }

    #[test]
    fn a_standing_queue_shrinks_the_limit_to_the_floor_and_it_recovers_after() {
        let a = Admission::new(64, 5 * MS);
        let mut now = Instant::now();
        interval(&a, &mut now, &[20 * MS, 25 * MS]);
        assert!(a.limit() < 64, "{}", a.limit());
        for _ in 0..100 {
            interval(&a, &mut now, &[20 * MS]);
        }
        assert_eq!(a.limit(), FLOOR);
        let held: Vec<_> = (0..FLOOR).map(|_| a.try_admit().unwrap()).collect();
        assert!(
            a.try_admit().is_none(),
            "at the floor, the next request is refused"
        );
        drop(held);
        for _ in 0..100 {
            interval(&a, &mut now, &[MS, 2 * MS]);
        }
        assert_eq!(
            a.limit(),
            64,
            "the limit grows back once requests are quick again"
        );
    }

    #[test]
    fn a_target_of_zero_keeps_a_fixed_limit() {
        let a = Admission::new(8, Duration::ZERO);
        let mut now = Instant::now();
        for _ in 0..20 {
            interval(&a, &mut now, &[500 * MS]);
        }
        assert_eq!(a.limit(), 8);
    }
}
