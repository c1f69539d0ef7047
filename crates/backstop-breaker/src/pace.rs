//! Pacing: how many calls per second a key admits after the upstream said "slow down"
//! (a 429 or a 503), and when each refused call may come back. Pure: the time is
//! passed in.
//!
//! The rate is learned the way TCP learns a congestion window, per key:
//!
//! - **Engage** on the first slow-down signal: the rate becomes `backoff` times the
//!   successes the key recorded over the last second (what the upstream actually
//!   served just before it pushed back).
//! - **Decrease** on a later signal to `backoff` times the successes of the last
//!   second (what the upstream proved it takes; the rate itself when nothing was
//!   served), at most once per pace generation: a signal from a call admitted before
//!   the last decrease says nothing about the new rate (it was sent at the old one).
//!   Measuring each time keeps repeated signals from compounding far below the
//!   upstream's capacity.
//! - **Grow** while the pace is binding (it refused a call within the last second),
//!   for every success, by the larger of two steps. Below the **ceiling** (what the
//!   upstream proved it takes: what it served over the second before the last
//!   signal, even when that was more than the rate; for a key closing after an
//!   outage, what it served before it opened) the rate closes `recovery` of the gap
//!   to it per second, fast while far below and slowly near it, as TCP CUBIC regains
//!   its window: a decrease costs a second or two of goodput, not the tens of seconds
//!   a constant slow growth takes. From the ceiling on it probes by `growth`
//!   of itself per second and so finds a raised quota again. A pace that refuses
//!   nobody does not grow, so a quiet hour cannot build up a rate the upstream never
//!   proved it takes.
//! - **Lift** after a whole `window` with no signal and no call waiting for a slot.
//!
//! Admission hands out evenly spaced slots. A call arriving when the next slot is
//! due takes it; otherwise it is refused and **books** the next unbooked slot, and
//! the refusal says exactly when that slot is due. Callers that come back when told
//! find their slots one by one, so a crowd that waited for the same reopening reaches
//! the upstream at the paced rate instead of all at once. A slot nobody takes within
//! one interval is dropped, so idle time never builds up a burst.

use std::time::Duration;

use backstop_classify::{MAX_INSTANT_DELAY, instant_after};
use tokio::time::Instant;

/// How a key learns and applies its pace. See [`BreakerConfig::pacing`](crate::BreakerConfig::pacing).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// What a slow-down signal multiplies the rate by, in (0, 1). Default 0.95.
    pub backoff: f64,
    /// How much of itself the rate may grow per second while the pace is binding and
    /// at or above its ceiling (probing for more), in (0, 1]. Default 0.03 (3 % a
    /// second).
    pub growth: f64,
    /// The slowest pace, in calls per second (> 0). Default 0.5. Slots are never
    /// more than a century apart ([`MAX_INSTANT_DELAY`]), however low it is.
    pub min_rate: f64,
    /// How fast the rate regains its ceiling (what the upstream last proved it takes)
    /// while binding below it: per second it grows by `recovery` times the gap, in
    /// [0, 1]. Default 1.0: the gap shrinks like e^(−t), to a third in a second and
    /// to 5 % in three. 0 grows by `growth` alone.
    pub recovery: f64,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            backoff: 0.95,
            growth: 0.03,
            min_rate: 0.5,
            recovery: 1.0,
        }
    }
}

/// The pace of one key.
#[derive(Clone, Debug)]
pub(crate) struct Pace {
    /// Calls per second.
    rate: f64,
    /// The next slot an arriving call may take.
    cursor: Instant,
    /// The next slot a refused call books (`tail >= cursor`; the slots in between are
    /// booked by callers told to come back then).
    tail: Instant,
    /// Bumped at every decrease; a ticket carries the generation it was admitted in.
    generation: u32,
    /// The last slow-down signal.
    last_signal: Instant,
    /// The last refusal (the pace grows only while binding).
    last_refusal: Option<Instant>,
    /// What the upstream last proved it takes: below it the rate regains ground fast
    /// (`recovery`), from it on it probes slowly (`growth`).
    ceiling: f64,
}

/// Why a paced call must wait: the slot it booked (or would book) is due in `retry_in`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wait {
    pub(crate) retry_in: Duration,
}

impl Pace {
    /// A pace of `rate` calls per second from `now`, regaining ground fast up to
    /// `ceiling` calls per second.
    pub(crate) fn new(
        rate: f64,
        ceiling: f64,
        now: Instant,
        generation: u32,
        pacing: &Pacing,
    ) -> Self {
        Pace {
            rate: sane_rate(rate, pacing),
            ceiling: sane_rate(ceiling, pacing),
            cursor: now,
            tail: now,
            generation,
            last_signal: now,
            last_refusal: None,
        }
    }

    pub(crate) fn rate(&self) -> f64 {
        self.rate
    }

    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// The time between slots: `1 / rate`, at most a century ([`MAX_INSTANT_DELAY`]).
    /// A floor as low as validation allows (any positive `min_rate`) makes intervals
    /// no `Duration` holds (one call in 10^25 s); past a century every such pace
    /// means "no more calls this lifetime" alike.
    fn interval(&self) -> Duration {
        Duration::try_from_secs_f64(1.0 / self.rate)
            .unwrap_or(MAX_INSTANT_DELAY)
            .min(MAX_INSTANT_DELAY)
    }

    /// Takes a slot at `now`, or books the next one. A call that could not come back
    /// before `deadline` books nothing (its slot would only delay the callers after it).
    pub(crate) fn admit(&mut self, now: Instant, deadline: Option<Instant>) -> Result<(), Wait> {
        let interval = self.interval();
        self.cursor = self.live_cursor(now, interval);
        if self.tail < self.cursor {
            self.tail = self.cursor;
        }
        if self.cursor <= now {
            // Never overflowing: a slot past the clock's end is a slot never due.
            self.cursor = instant_after(self.cursor, interval);
            if self.tail < self.cursor {
                self.tail = self.cursor;
            }
            return Ok(());
        }
        self.last_refusal = Some(now);
        let slot = self.tail;
        if deadline.is_none_or(|d| slot < d) {
            // Each refusal books a whole interval further: many of them at a
            // century each would run past the clock's end.
            self.tail = instant_after(self.tail, interval);
        }
        Err(Wait {
            retry_in: slot.saturating_duration_since(now),
        })
    }

    /// The next slot as of `now`: a slot left untaken for more than one interval is
    /// gone (idle time is not saved up for a burst).
    fn live_cursor(&self, now: Instant, interval: Duration) -> Instant {
        match now.checked_sub(interval) {
            Some(earliest) if self.cursor < earliest => earliest,
            _ => self.cursor,
        }
    }

    /// How long from `now` until the slot [`Pace::admit`] would give or book (zero:
    /// one is due), without taking it.
    pub(crate) fn next_free(&self, now: Instant) -> Duration {
        let cursor = self.live_cursor(now, self.interval());
        if cursor <= now {
            return Duration::ZERO;
        }
        self.tail.max(cursor).saturating_duration_since(now)
    }

    /// A slow-down signal from a call admitted in `generation`, when the key served
    /// `served` calls per second over the last second. Returns `true` when it
    /// decreased the rate: to `backoff` times what was served (the upstream's proven
    /// capacity, so repeated signals do not compound below it), or times the rate
    /// itself when nothing was served (nothing to measure).
    pub(crate) fn slow_down(
        &mut self,
        generation: u32,
        served: f64,
        now: Instant,
        pacing: &Pacing,
    ) -> bool {
        self.last_signal = now;
        if generation != self.generation {
            return false;
        }
        // From what was served when that is below the rate (the rate overshot the
        // upstream's capacity), but never more than one extra backoff below the rate:
        // a key failing most of its calls is going down, not saturated, and that is
        // the counting rules' business, not a reason to pace it to a crawl.
        // (`clamp` panics on a NaN or inverted bound: an unvalidated backoff gives
        // neither.)
        let lowest = self.rate * pacing.backoff;
        let lowest = if lowest <= self.rate {
            lowest
        } else {
            self.rate
        };
        let base = served.clamp(lowest, self.rate);
        // What the upstream proved it takes (what it served, even above the rate:
        // calls admitted before the pace, retries) is the level to regain fast; beyond
        // it, only the slow probe. (`max` ignores a NaN measurement.)
        self.ceiling = sane_rate(served.max(base), pacing);
        self.rate = sane_rate(base * pacing.backoff, pacing);
        self.generation = self.generation.wrapping_add(1);
        // Slots already booked keep their times; new ones follow at the new rate.
        true
    }

    /// A success at `now`.
    pub(crate) fn served(&mut self, now: Instant, pacing: &Pacing) {
        let binding = self
            .last_refusal
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1));
        if binding {
            // Per success; at `rate` successes a second these add up to `growth` of
            // the rate, or `recovery` of the gap, per second. (An unvalidated
            // `recovery` cannot overshoot the ceiling, and a NaN step loses to the
            // other one in `max`.)
            let gap = self.ceiling - self.rate;
            let regain = (pacing.recovery * gap / self.rate).min(gap);
            self.rate = sane_rate(self.rate + pacing.growth.max(regain), pacing);
        }
    }

    /// Whether the pace may be lifted at `now`: no signal for `quiet`, nobody waiting.
    pub(crate) fn may_lift(&self, now: Instant, quiet: Duration) -> bool {
        now.saturating_duration_since(self.last_signal) >= quiet && self.tail <= now
    }
}

fn sane_rate(rate: f64, pacing: &Pacing) -> f64 {
    // Between the floor and a million calls a second: a slot interval stays a
    // representable, non-zero duration whatever was measured. The floor is checked
    // too: `KeyState` is public and may be handed a configuration that never went
    // through `BreakerConfig::validate` (a zero or NaN floor would make the interval
    // infinite, and `clamp` panics on a NaN bound).
    let floor = if pacing.min_rate > 0.0 && pacing.min_rate <= 1e6 {
        pacing.min_rate
    } else {
        Pacing::default().min_rate
    };
    if rate.is_finite() {
        rate.clamp(floor, 1e6)
    } else {
        floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn an_unvalidated_floor_or_a_wild_measurement_never_makes_an_unusable_pace() {
        let t0 = Instant::now();
        let wild = [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9];
        for (min_rate, backoff) in wild.into_iter().zip(wild.into_iter().rev()) {
            let pacing = Pacing {
                min_rate,
                backoff,
                ..Pacing::default()
            };
            for rate in [0.0, f64::NAN, f64::INFINITY, -5.0, 1e12] {
                let mut pace = Pace::new(rate, rate, t0, 1, &pacing);
                assert!(
                    pace.rate() > 0.0 && pace.rate() <= 1e6,
                    "{min_rate} {backoff} {rate}"
                );
                assert_eq!(pace.admit(t0, None), Ok(()));
                assert!(pace.admit(t0, None).is_err());
                pace.slow_down(1, f64::NAN, t0, &pacing);
                assert!(pace.rate() > 0.0 && pace.rate() <= 1e6);
            }
        }
    }

    #[test]
    fn slots_are_evenly_spaced_and_refusals_book_them_in_order() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10.0, 10.0, t0, 1, &Pacing::default());
        assert_eq!(pace.admit(t0, None), Ok(()));
        // Three more callers at the same instant book 100, 200 and 300 ms.
        for expected in [100, 200, 300] {
            assert_eq!(
                pace.admit(t0, None),
                Err(Wait {
                    retry_in: ms(expected)
                })
            );
        }
        // Each comes back when told and finds its slot.
        for at in [100, 200, 300] {
            assert_eq!(pace.admit(t0 + ms(at), None), Ok(()));
        }
        // The next fresh caller gets the slot after them.
        assert_eq!(
            pace.admit(t0 + ms(300), None),
            Err(Wait { retry_in: ms(100) })
        );
    }

    #[test]
    fn idle_time_is_not_saved_up_for_a_burst() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10.0, 10.0, t0, 1, &Pacing::default());
        let later = t0 + Duration::from_secs(60);
        // After a quiet minute: one slot due now and one left from the last
        // interval, then the pace again.
        assert_eq!(pace.admit(later, None), Ok(()));
        assert_eq!(pace.admit(later, None), Ok(()));
        assert_eq!(pace.admit(later, None), Err(Wait { retry_in: ms(100) }));
    }

    #[test]
    fn a_caller_that_cannot_wait_until_its_slot_books_nothing() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10.0, 10.0, t0, 1, &Pacing::default());
        assert_eq!(pace.admit(t0, None), Ok(()));
        assert_eq!(
            pace.admit(t0, Some(t0 + ms(50))),
            Err(Wait { retry_in: ms(100) })
        );
        // The slot at 100 ms is still free for the next caller.
        assert_eq!(pace.admit(t0, None), Err(Wait { retry_in: ms(100) }));
    }

    #[test]
    fn one_decrease_per_generation_from_what_was_served_within_one_extra_backoff() {
        let t0 = Instant::now();
        let pacing = Pacing {
            backoff: 0.9,
            ..Pacing::default()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let mut pace = Pace::new(40.0, 40.0, t0, 1, &pacing);
        // 38 served against a rate of 40: from the 38 the upstream took.
        assert!(pace.slow_down(1, 38.0, t0, &pacing));
        assert!(close(pace.rate(), 34.2));
        // Another signal from a call sent at the old rate changes nothing.
        assert!(!pace.slow_down(1, 38.0, t0, &pacing));
        assert!(close(pace.rate(), 34.2));
        // Nothing served: at most one extra backoff below the rate (34.2 × 0.9 × 0.9).
        assert!(pace.slow_down(2, 0.0, t0, &pacing));
        assert!(close(pace.rate(), 27.702));
        // More served than the rate (retries below the breaker): from the rate.
        assert!(pace.slow_down(3, 50.0, t0, &pacing));
        assert!(close(pace.rate(), 24.9318));
    }

    #[test]
    fn growth_happens_only_while_the_pace_refuses_calls() {
        let t0 = Instant::now();
        let pacing = Pacing::default();
        let mut pace = Pace::new(10.0, 10.0, t0, 1, &pacing);
        pace.served(t0, &pacing);
        assert!((pace.rate() - 10.0).abs() < 1e-9);
        assert_eq!(pace.admit(t0, None), Ok(()));
        assert!(pace.admit(t0, None).is_err());
        // At its ceiling: the probing step, `growth` (0.03) per success.
        pace.served(t0 + ms(500), &pacing);
        assert!((pace.rate() - 10.03).abs() < 1e-9);
        // More than a second after the last refusal: not binding any more.
        pace.served(t0 + ms(1500), &pacing);
        assert!((pace.rate() - 10.03).abs() < 1e-9);
    }

    /// Binds the pace at `at` (one slot taken, the next refused) so it may grow.
    fn bind(pace: &mut Pace, at: Instant) {
        let _ = pace.admit(at, None);
        let _ = pace.admit(at, None);
    }

    #[test]
    fn below_its_ceiling_the_rate_closes_recovery_of_the_gap_per_second() {
        let t0 = Instant::now();
        let pacing = Pacing {
            recovery: 0.5,
            ..Pacing::default()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // 20 calls a second, 40 proven: each success closes 0.5 × gap / rate.
        let mut pace = Pace::new(20.0, 40.0, t0, 1, &pacing);
        bind(&mut pace, t0);
        pace.served(t0, &pacing);
        assert!(close(pace.rate(), 20.0 + 0.5 * 20.0 / 20.0));
        // A second of successes at the rate: the gap shrinks by about 0.5 per second
        // (continuously: e^(-0.5), 61 % of it left), far faster than 3 % growth.
        for i in 0..20 {
            bind(&mut pace, t0 + ms(50 * i));
            pace.served(t0 + ms(50 * i), &pacing);
        }
        let gap = 40.0 - pace.rate();
        assert!(gap > 0.0 && gap < 0.65 * 20.0, "gap {gap}");
        // It never overshoots the ceiling by regaining, however large `recovery` is
        // (an unvalidated one included): from there on only `growth` adds.
        let wild = Pacing {
            recovery: 1e9,
            ..Pacing::default()
        };
        let mut pace = Pace::new(20.0, 40.0, t0, 1, &wild);
        bind(&mut pace, t0);
        pace.served(t0, &wild);
        assert!(close(pace.rate(), 40.0));
        pace.served(t0, &wild);
        assert!(close(pace.rate(), 40.03));
    }

    #[test]
    fn what_was_served_above_the_rate_is_the_ceiling_to_regain() {
        let t0 = Instant::now();
        let pacing = Pacing::default();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // 36 served against a pace of 27.4 (calls admitted before the pace engaged,
        // still finishing): down from the rate, but back up to the 36 it proved.
        let mut pace = Pace::new(27.4, 27.4, t0, 1, &pacing);
        assert!(pace.slow_down(1, 36.0, t0, &pacing));
        assert!(close(pace.rate(), 27.4 * 0.95));
        bind(&mut pace, t0);
        let before = pace.rate();
        pace.served(t0, &pacing);
        assert!(close(pace.rate(), before + (36.0 - before) / before));
        // A NaN measurement (never produced by the key, which counts) makes neither
        // the rate nor the ceiling unusable.
        let mut pace = Pace::new(20.0, 20.0, t0, 1, &pacing);
        assert!(pace.slow_down(1, f64::NAN, t0, &pacing));
        bind(&mut pace, t0);
        pace.served(t0, &pacing);
        assert!(pace.rate().is_finite() && pace.rate() <= 20.0);
    }

    #[test]
    fn a_decrease_sets_the_ceiling_to_the_level_it_was_measured_from() {
        let t0 = Instant::now();
        let pacing = Pacing::default();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let mut pace = Pace::new(42.0, 42.0, t0, 1, &pacing);
        // 40 served against 42: down to 0.95 × 40, the ceiling 40 (not the 42 that
        // overshot).
        assert!(pace.slow_down(1, 40.0, t0, &pacing));
        assert!(close(pace.rate(), 38.0));
        bind(&mut pace, t0);
        pace.served(t0, &pacing);
        // recovery 1.0: one success closes gap / rate = 2 / 38.
        assert!(close(pace.rate(), 38.0 + 2.0 / 38.0));
        for _ in 0..1000 {
            pace.served(t0, &pacing);
        }
        // Past the ceiling only the probe's 0.03 per success remains.
        let before = pace.rate();
        assert!(before > 40.0);
        pace.served(t0, &pacing);
        assert!(close(pace.rate(), before + 0.03));
    }

    #[test]
    fn the_rate_stays_within_bounds_whatever_is_measured() {
        let t0 = Instant::now();
        let pacing = Pacing::default();
        assert_eq!(Pace::new(0.0, 0.0, t0, 1, &pacing).rate(), 0.5);
        assert_eq!(Pace::new(f64::NAN, f64::NAN, t0, 1, &pacing).rate(), 0.5);
        assert_eq!(Pace::new(1e12, 1e12, t0, 1, &pacing).rate(), 1e6);
    }

    /// The last instant the clock can count to from `now` (to the nanosecond).
    fn end_of_clock(now: Instant) -> Instant {
        let (mut fits, mut overflows) = (0u128, Duration::MAX.as_nanos() + 1);
        while overflows - fits > 1 {
            let mid = fits + (overflows - fits) / 2;
            let d = Duration::new((mid / 1_000_000_000) as u64, (mid % 1_000_000_000) as u32);
            if now.checked_add(d).is_some() {
                fits = mid;
            } else {
                overflows = mid;
            }
        }
        let d = Duration::new((fits / 1_000_000_000) as u64, (fits % 1_000_000_000) as u32);
        now + d
    }

    #[test]
    fn slots_booked_up_to_the_end_of_the_clock_stay_there_instead_of_overflowing() {
        let t0 = Instant::now();
        let pacing = Pacing {
            min_rate: 1e-15,
            ..Pacing::default()
        };
        let mut pace = Pace::new(1e-15, 1e-15, t0, 1, &pacing);
        assert_eq!(pace.interval(), MAX_INSTANT_DELAY);
        // Slots booked so far ahead that the next is less than an interval from the
        // clock's end (as billions of refusals would book them).
        let end = end_of_clock(t0);
        pace.cursor = end - Duration::from_secs(1);
        pace.tail = pace.cursor;
        let now = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(
                pace.admit(now, None),
                Err(Wait {
                    retry_in: pace.tail - now,
                })
            );
            assert!(pace.tail >= pace.cursor && pace.tail <= end);
        }
        // Due at last (at the clock's end): taken, and the next one cannot be later.
        let last = pace.cursor;
        assert_eq!(pace.admit(last, None), Ok(()));
        assert!(pace.cursor >= last);
    }
}
