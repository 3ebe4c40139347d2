//! Admission control: how many requests the server works on at once, and when to refuse.
//!
//! A fixed limit on requests in flight cannot tell a burst from an overload. Sized for bursts (64),
//! an overload fills it and every admitted request waits behind 63 others; sized for short waits (8
//! on one core), it refuses the bursts of normal traffic (`docs/benchmarks.md`). So the limit
//! moves, as CoDel decides when to drop packets: what matters is whether the queue ever drains.
//! Over each interval the shortest time an admitted request spent in the server is taken. A queue
//! that drains lets some request through quickly; a standing queue makes even the fastest one wait.
//! The limit only moves down in an interval in which it refused a request: a burst that fits under
//! the limit is not an overload, even one that arrives at once and makes its own quickest request
//! wait behind a batch, and a closed loop of callers would only be refused and retry. While that
//! minimum stays above the target, the limit shrinks in proportion (a minimum of 10x the target
//! cuts it to a tenth, down to one request per user-tower worker) at once. An interval also ends
//! early once the first few requests to finish after its first refusal all took longer than the
//! target ([`EARLY_SAMPLES`]): an overload's first queue, the whole `max_in_flight`, is cut
//! within milliseconds, and through the overload the limit is cut whenever a few requests in a
//! row waited, not only when every request of an interval did. Only requests that arrived within
//! the interval count, so the queue left from before a cut, or built during a pause of the whole
//! server, does not cut again. Under 3x on one core, admitted p99 was 4.8–8.9 ms against
//! 7.8–16.9 ms without, admitting 43–49% of capacity instead of 49–57% (`docs/benchmarks.md`,
//! session 23). Once the minimum is back under, the limit grows again by one per interval up to
//! `max_in_flight`, but while it still refuses only if the median request is within the target
//! too (on the quickest request alone it climbed back until every request waited). Normal traffic
//! keeps the whole `max_in_flight` for its bursts, and an overload is held to a queue whose
//! typical request waits about the target.
//!
//! The target is the operator's (`admission_target_ms`) or, with `"auto"`, measured: twice the time
//! a request takes when it is admitted into an empty server ([`AUTO_FACTOR`]), a moving average of
//! the quickest such request of each interval that refused nobody (under overload even a lone
//! request waits for the CPU, and learning from it would let the target climb). What one request
//! costs depends on the model, the index and the machine, so a fixed target would either never act
//! (a slow model) or hold the limit at its floor (a fast one). `"auto"` is the default since
//! session 23. It can also refuse normal traffic around a pause of the whole server: in soaks at
//! 1,000/s on two shared cores it refused 512 and 603 requests in one stall each in sessions 17
//! and 18, and none in session 22's or 23's (`docs/benchmarks.md`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the limit is reconsidered: a few dozen requests at normal load, and short enough
/// that the first moments of an overload, spent behind the whole `max_in_flight`, are a small
/// share of its requests (CoDel's 100 ms is sized for Internet round trips).
pub const INTERVAL: Duration = Duration::from_millis(50);
/// Requests that must finish after an interval's first refusal, each one having arrived in the
/// interval and waited over the target, before the interval ends early: few enough that an
/// overload's first queue is cut within milliseconds, not at the interval's end. (One forward pass
/// can answer up to `max_encoder_batch` requests at once, so a slow batch can count as a queue.)
pub const EARLY_SAMPLES: usize = 8;
/// The measured target: this many times a request's time in an empty server.
pub const AUTO_FACTOR: u32 = 2;
/// Weight of each interval's quickest lone request in the measured baseline.
const BASELINE_WEIGHT: f64 = 0.1;
/// Times kept per interval for the median (an interval at 20,000 requests/s).
const MAX_SAMPLES: usize = 1024;

/// When a standing queue is declared (`admission_target_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The limit stays at `max_in_flight`.
    Off,
    /// A fixed time in the server.
    Fixed(Duration),
    /// [`AUTO_FACTOR`] times the measured time of a request alone in the server.
    Auto,
}

/// The moving limit and the requests in flight under it.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    /// The limit never shrinks below this (one request per user-tower worker, so that no worker
    /// idles while requests are refused).
    floor: usize,
    target: Target,
    /// The current target in nanoseconds (0: none), published at the end of each interval so
    /// that reading it (for the metrics of every request, refused ones included) takes no lock.
    target_ns: AtomicU64,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    /// Whether a request was refused in the current interval.
    refused: AtomicBool,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// The shortest time in the server of a request that finished in this window.
    shortest: Option<Duration>,
    /// The same among requests admitted into an empty server.
    shortest_alone: Option<Duration>,
    /// Times in the server of the requests that finished in this window (the first
    /// [`MAX_SAMPLES`]), for their median.
    times: Vec<Duration>,
    /// Moving average of the intervals' `shortest_alone`: what a request costs without a queue.
    baseline: Option<Duration>,
    /// Since this interval's first refusal: how many requests finished, and the quickest.
    since_refusal: Option<(usize, Duration)>,
}

/// One admitted request; dropping it without [`Permit::finish`] (a cancelled request) only
/// frees its place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    /// Whether no other request was in flight when this one was admitted.
    alone: bool,
}

impl Permit {
    /// Frees the place and reports how long the request spent in the server, from its arrival.
    pub fn finish(self, in_server: Duration) {
        self.admission
            .observe(Instant::now(), in_server, self.alone);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// At most `max` requests at once, fewer (down to `floor`) while requests wait longer than
    /// `target`.
    pub fn new(max: usize, floor: usize, target: Target) -> Arc<Admission> {
        let fixed = match target {
            Target::Fixed(t) => nanos(Some(t)),
            _ => 0,
        };
        Arc::new(Admission {
            max,
            floor: floor.clamp(1, max.max(1)),
            target,
            target_ns: AtomicU64::new(fixed),
            limit: AtomicUsize::new(max),
            in_flight: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            window: Mutex::new(Window {
                started: Instant::now(),
                shortest: None,
                shortest_alone: None,
                times: Vec::new(),
                baseline: None,
                since_refusal: None,
            }),
        })
    }

    /// A place for one more request, or `None` when the current limit is reached.
    pub fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Acquire);
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        match admitted {
            Ok(before) => Some(Permit {
                admission: Arc::clone(self),
                alone: before == 0,
            }),
            Err(_) => {
                self.refused.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether [`Admission::try_admit`] would admit one more request now; a `false` counts as a
    /// refusal. For the check made from a request's headers, which takes no place: a request
    /// takes its place once its body has come (a stream that never sends one holds nothing).
    pub fn has_room(&self) -> bool {
        let room = self.in_flight.load(Ordering::Acquire) < self.limit.load(Ordering::Acquire);
        if !room {
            self.refused.store(true, Ordering::Relaxed);
        }
        room
    }

    /// The current limit on requests in flight.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// The configured ceiling (`max_in_flight`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// The time in the server above which an interval counts as a standing queue: the fixed
    /// target, or the measured one (`None` while off, or before any request ran alone).
    pub fn target(&self) -> Option<Duration> {
        match self.target_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// The target, given the measured baseline (read only by [`Target::Auto`]).
    fn target_given(&self, baseline: Option<Duration>) -> Option<Duration> {
        match self.target {
            Target::Off => None,
            Target::Fixed(t) => Some(t),
            Target::Auto => baseline.map(|b| b * AUTO_FACTOR),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a finished request at `now` that spent `in_server` in the server (`alone`: it was
    /// admitted into an empty server), and at the end of an interval moves the limit.
    pub fn observe(&self, now: Instant, in_server: Duration, alone: bool) {
        if self.target == Target::Off {
            return;
        }
        let mut w = self.lock();
        let min = |m: Option<Duration>| Some(m.map_or(in_server, |s| s.min(in_server)));
        w.shortest = min(w.shortest);
        if alone {
            w.shortest_alone = min(w.shortest_alone);
        }
        if w.times.len() < MAX_SAMPLES {
            w.times.push(in_server);
        }
        // A standing queue shows from the first requests to finish after a refusal: when none
        // of them was quick, the interval ends now, so that an overload's first queue (the whole
        // `max_in_flight`) is cut within milliseconds instead of waiting out the interval.
        // Only requests that arrived in this interval count: after a cut, the queue admitted under
        // the old limit is still finishing (and would cut again and again down to the floor), and
        // after a pause of the whole server, the queue built during it is not an overload.
        let age = now.saturating_duration_since(w.started);
        if in_server <= age && self.refused.load(Ordering::Relaxed) {
            let (n, quickest) = w.since_refusal.unwrap_or((0, in_server));
            w.since_refusal = Some((n + 1, quickest.min(in_server)));
        }
        let early = w.since_refusal.is_some_and(|(n, quickest)| {
            n >= EARLY_SAMPLES && self.target().is_some_and(|t| quickest > t)
        });
        if !early && age < INTERVAL {
            return;
        }
        let refused = self.refused.swap(false, Ordering::Relaxed);
        // Only an interval that refused nobody says what a request costs: under overload even a
        // lone request shares the CPU with taking in and refusing the excess, and learning from
        // it would raise the target as the overload goes on, and the limit with it.
        if let Some(a) = w.shortest_alone.take().filter(|_| !refused) {
            w.baseline = Some(w.baseline.map_or(a, |b| {
                b.mul_f64(1.0 - BASELINE_WEIGHT) + a.mul_f64(BASELINE_WEIGHT)
            }));
        }
        let target = self.target_given(w.baseline);
        self.target_ns.store(nanos(target), Ordering::Release);
        // Ended early, the requests since the refusal are the ones that say how long the queue is.
        let since_refusal = w.since_refusal.take().map(|(_, quickest)| quickest);
        let shortest = w.shortest.take();
        let shortest = if early { since_refusal } else { shortest };
        let median = median(&mut w.times);
        w.times.clear();
        w.started = now;
        let limit = self.limit.load(Ordering::Acquire);
        let next = match (target, shortest) {
            (Some(t), Some(s)) if refused && s > t => {
                let cut = (limit as f64 * t.as_secs_f64() / s.as_secs_f64()) as usize;
                cut.min(limit.saturating_sub(1)).max(self.floor)
            }
            // Refusing, with the queue draining but the typical request waiting over the
            // target: the limit holds. Growing on the quickest request alone let it climb in a
            // sawtooth to 4–6 under a 3x overload (`docs/benchmarks.md`, session 19).
            (Some(t), _) if refused && median.is_some_and(|m| m > t) => limit,
            _ => (limit + 1).min(self.max),
        };
        self.limit.store(next, Ordering::Release);
    }
}

/// `t` in nanoseconds for [`Admission::target_ns`], at least 1 so that 0 stays "none".
fn nanos(t: Option<Duration>) -> u64 {
    t.map_or(0, |t| {
        u64::try_from(t.as_nanos()).unwrap_or(u64::MAX).max(1)
    })
}

/// The median of `times` (the upper one of an even count); reorders them.
fn median(times: &mut [Duration]) -> Option<Duration> {
    if times.is_empty() {
        return None;
    }
    let mid = times.len() / 2;
    Some(*times.select_nth_unstable(mid).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const FLOOR: usize = 4;

    /// Feeds one interval of finished requests, each `in_server` long, ending at `*now`, in
    /// which the limit refused a request (as it does under overload).
    fn interval(a: &Admission, now: &mut Instant, in_server: &[Duration]) {
        a.refused.store(true, Ordering::Relaxed);
        for &d in in_server {
            a.observe(*now, d, false);
        }
        *now += INTERVAL;
        a.observe(*now, in_server.iter().copied().max().unwrap_or(MS), false);
    }

    #[test]
    fn the_limit_refuses_once_reached_and_a_dropped_permit_frees_its_place() {
        let a = Admission::new(2, FLOOR, Target::Off);
        let first = a.try_admit().unwrap();
        let _second = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(first);
        assert!(a.try_admit().is_some());
    }

    #[test]
    fn bursts_that_drain_keep_the_whole_limit() {
        let a = Admission::new(64, FLOOR, Target::Fixed(5 * MS));
        let mut now = Instant::now();
        for _ in 0..50 {
            // Some requests waited 40 ms behind a burst, but the queue drained: one took 1 ms.
            interval(&a, &mut now, &[40 * MS, 30 * MS, MS]);
        }
        assert_eq!(a.limit(), 64);
    }

    #[test]
    fn a_standing_queue_shrinks_the_limit_to_the_floor_and_it_recovers_after() {
        let a = Admission::new(64, FLOOR, Target::Fixed(5 * MS));
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
    fn an_overload_cuts_the_limit_in_proportion_within_one_interval() {
        let a = Admission::new(64, FLOOR, Target::Fixed(MS));
        let mut now = Instant::now();
        // The quickest request took 16x the target: the limit goes from 64 to 64 / 16.
        interval(&a, &mut now, &[16 * MS, 30 * MS]);
        assert_eq!(a.limit(), 4);
        // Just over the target still takes at least one place away.
        let b = Admission::new(10, FLOOR, Target::Fixed(10 * MS));
        let mut now = Instant::now();
        interval(&b, &mut now, &[10 * MS + Duration::from_micros(1)]);
        assert_eq!(b.limit(), 9);
    }

    #[test]
    fn the_limit_does_not_climb_in_a_sawtooth_while_most_requests_wait_over_the_target() {
        let a = Admission::new(64, FLOOR, Target::Fixed(5 * MS));
        let mut now = Instant::now();
        interval(&a, &mut now, &[50 * MS, 60 * MS]);
        let cut = a.limit();
        assert!(cut < 64, "{cut}");
        // Still refusing: one request in each interval is quick, most wait 4x the target.
        for _ in 0..100 {
            interval(&a, &mut now, &[MS, 20 * MS, 20 * MS]);
        }
        assert_eq!(a.limit(), cut);
        // The typical request is quick again: the limit grows back.
        for _ in 0..10 {
            interval(&a, &mut now, &[MS, 2 * MS, 2 * MS, 20 * MS]);
        }
        assert_eq!(a.limit(), cut + 10);
    }

    #[test]
    fn an_overloads_first_queue_is_cut_within_a_few_requests_not_at_the_end_of_the_interval() {
        let a = Admission::new(64, FLOOR, Target::Fixed(2 * MS));
        let mut now = a.lock().started;
        // Normal traffic early in the interval, then the limit fills and refuses.
        a.observe(now, MS / 2, false);
        now += 20 * MS;
        a.refused.store(true, Ordering::Relaxed);
        for _ in 0..EARLY_SAMPLES - 1 {
            now += MS;
            a.observe(now, 16 * MS, false);
        }
        assert_eq!(a.limit(), 64, "seven slow requests are not yet a queue");
        now += MS;
        a.observe(now, 20 * MS, false);
        // 28 ms into a 50 ms interval, cut in proportion to the quickest since the refusal.
        assert_eq!(a.limit(), 8);
        // The queue admitted before the cut is still finishing, and still refused around: those
        // requests arrived in the last interval, so they do not cut the limit again.
        for _ in 0..40 {
            now += MS / 2;
            a.refused.store(true, Ordering::Relaxed);
            a.observe(now, 25 * MS, false);
        }
        assert_eq!(a.limit(), 8);
    }

    #[test]
    fn the_queue_built_during_a_pause_of_the_whole_server_does_not_cut_the_limit_early() {
        let a = Admission::new(64, FLOOR, Target::Fixed(2 * MS));
        let mut now = a.lock().started;
        a.observe(now, MS, false);
        // A 100 ms pause: 64 requests fill the limit, more are refused, none finishes. The first
        // to finish after it ends the interval; the rest of the queue finishes in the next one.
        a.refused.store(true, Ordering::Relaxed);
        now += 100 * MS;
        a.observe(now, 90 * MS, false);
        for i in 0..60u32 {
            now += MS / 2;
            a.refused.store(true, Ordering::Relaxed);
            a.observe(now, 90 * MS - i * MS, false);
        }
        assert_eq!(a.limit(), 64);
    }

    #[test]
    fn a_burst_over_the_limit_whose_first_request_is_quick_is_not_cut_early() {
        let a = Admission::new(64, FLOOR, Target::Fixed(5 * MS));
        let now = Instant::now();
        a.refused.store(true, Ordering::Relaxed);
        a.observe(now, MS, false);
        for _ in 0..50 {
            a.observe(now, 30 * MS, false);
        }
        assert_eq!(a.limit(), 64);
    }

    #[test]
    fn a_slow_burst_that_fits_under_the_limit_keeps_it() {
        let a = Admission::new(64, FLOOR, Target::Fixed(MS));
        let mut now = Instant::now();
        // 40 requests at once, the quickest 5x the target, but nobody was refused.
        let held: Vec<_> = (0..40).map(|_| a.try_admit().unwrap()).collect();
        for p in held {
            p.finish(5 * MS);
        }
        now += INTERVAL;
        a.observe(now, 5 * MS, false);
        assert_eq!(a.limit(), 64);
    }

    #[test]
    fn a_fixed_target_is_reported_before_any_request_finishes() {
        let a = Admission::new(64, FLOOR, Target::Fixed(3 * MS));
        assert_eq!(a.target(), Some(3 * MS));
        assert_eq!(Admission::new(64, FLOOR, Target::Off).target(), None);
    }

    #[test]
    fn the_measured_target_is_twice_a_lone_requests_time() {
        let a = Admission::new(64, FLOOR, Target::Auto);
        let mut now = Instant::now();
        // No request has run alone yet: nothing to compare with, so nothing shrinks.
        interval(&a, &mut now, &[50 * MS]);
        assert_eq!((a.target(), a.limit()), (None, 64));
        for _ in 0..30 {
            a.observe(now, MS, true);
            now += INTERVAL;
            a.observe(now, 3 * MS, false);
        }
        let target = a.target().unwrap();
        assert!(
            target.abs_diff(2 * MS) < Duration::from_micros(10),
            "{target:?}"
        );
        assert_eq!(
            a.limit(),
            64,
            "an interval whose quickest took 1 ms drained"
        );
        // A queue where even the quickest request takes 1.5x a lone one is within the target;
        // 4x is not.
        interval(&a, &mut now, &[MS + MS / 2]);
        assert_eq!(a.limit(), 64);
        interval(&a, &mut now, &[4 * MS]);
        assert_eq!(a.limit(), 32);
    }

    #[test]
    fn the_measured_target_does_not_climb_while_requests_are_refused() {
        let a = Admission::new(64, FLOOR, Target::Auto);
        let mut now = Instant::now();
        for _ in 0..30 {
            a.observe(now, MS, true);
            now += INTERVAL;
            a.observe(now, MS, false);
        }
        let before = a.target().unwrap();
        // Under overload a lone request waits for the CPU too: 10 ms instead of 1.
        for _ in 0..100 {
            a.refused.store(true, Ordering::Relaxed);
            a.observe(now, 10 * MS, true);
            now += INTERVAL;
            a.observe(now, 12 * MS, false);
        }
        assert_eq!(a.target().unwrap(), before);
        assert_eq!(a.limit(), FLOOR);
    }

    #[test]
    fn a_target_that_is_off_keeps_a_fixed_limit() {
        let a = Admission::new(8, FLOOR, Target::Off);
        let mut now = Instant::now();
        for _ in 0..20 {
            interval(&a, &mut now, &[500 * MS]);
        }
        assert_eq!(a.limit(), 8);
    }
}
