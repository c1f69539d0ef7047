//! Exponential backoff with the four jitter kinds of the AWS study
//! ("Exponential Backoff And Jitter", 2015). Pure: no clock, no runtime.

use std::time::Duration;

use rand::{Rng, RngCore};

use crate::ConfigError;

/// How a backoff delay is randomised, so clients that failed together do not come
/// back together.
///
/// With `t = min(cap, base · multiplier^(retry − 1))`:
///
/// | kind | delay |
/// |---|---|
/// | [`Jitter::None`] | `t` |
/// | [`Jitter::Full`] | uniform in `[0, t]` |
/// | [`Jitter::Equal`] | `t/2` + uniform in `[0, t/2]` |
/// | [`Jitter::Decorrelated`] | `min(cap, uniform in [base, 3 · previous])`, `previous` starting at `base` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Jitter {
    /// No randomness: exactly `t`.
    None,
    /// Uniform in `[0, t]` (the AWS study's best overall for contention).
    Full,
    /// Half fixed, half random: uniform in `[t/2, t]`; never retries almost at once.
    Equal,
    /// Each delay drawn from `[base, 3 × the previous delay]`, capped; needs the
    /// previous delay, which the retry layer passes in.
    Decorrelated,
}

/// Exponential backoff: `base`, times `multiplier` per retry, never above `cap`, then
/// jittered.
///
/// Every delay it returns is finite, non-negative and at most `cap`, for any retry
/// number up to `u32::MAX` (the exponent saturates instead of overflowing).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    multiplier: f64,
    cap: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff starting at `base`, multiplied by `multiplier` per retry, capped at
    /// `cap`, without jitter (add it with [`Backoff::with_jitter`]).
    ///
    /// Fails when `multiplier` is not a finite number `>= 1`, or `base > cap`.
    pub fn new(base: Duration, multiplier: f64, cap: Duration) -> Result<Self, ConfigError> {
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(ConfigError::InvalidMultiplier { multiplier });
        }
        if base > cap {
            return Err(ConfigError::BaseAboveCap { base, cap });
        }
        Ok(Backoff {
            base,
            multiplier,
            cap,
            jitter: Jitter::None,
        })
    }

    /// A preset's constants, valid by construction (a test checks them against
    /// [`Backoff::new`]).
    pub(crate) const fn preset(
        base: Duration,
        multiplier: f64,
        cap: Duration,
        jitter: Jitter,
    ) -> Self {
        Backoff {
            base,
            multiplier,
            cap,
            jitter,
        }
    }

    /// The same backoff with another jitter kind.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay before jitter.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The growth factor per retry.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The largest delay it ever returns.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter kind.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The delay before retry number `retry` (1 for the first retry) without jitter:
    /// `min(cap, base · multiplier^(retry − 1))`.
    pub fn nominal(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1);
        // powi takes an i32; past ~1100 doublings f64 is infinite anyway, so clamping
        // the exponent changes nothing but keeps the cast exact.
        let exponent = i32::try_from(exponent).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.multiplier.powi(exponent);
        clamp_to(secs, self.cap)
    }

    /// The jittered delay before retry number `retry` (1-based). `previous` is the
    /// delay actually waited before the previous retry (only [`Jitter::Decorrelated`]
    /// uses it; `None` on the first retry).
    pub fn delay(&self, retry: u32, previous: Option<Duration>, rng: &mut dyn RngCore) -> Duration {
        let cap = self.cap.as_secs_f64();
        match self.jitter {
            Jitter::None => self.nominal(retry),
            Jitter::Full => {
                let t = self.nominal(retry).as_secs_f64();
                clamp_to(t * unit(rng), self.cap)
            }
            Jitter::Equal => {
                let t = self.nominal(retry).as_secs_f64();
                clamp_to(t / 2.0 + t / 2.0 * unit(rng), self.cap)
            }
            Jitter::Decorrelated => {
                let base = self.base.as_secs_f64();
                let previous = previous.unwrap_or(self.base).as_secs_f64();
                let high = (previous * 3.0).min(cap).max(base);
                clamp_to(base + (high - base) * unit(rng), self.cap)
            }
        }
    }
}

/// A uniform draw in `[0, 1]`.
fn unit(rng: &mut dyn RngCore) -> f64 {
    rng.random::<f64>()
}

/// `secs` as a duration in `[0, cap]`; NaN and negative values become zero, infinite
/// ones the cap.
fn clamp_to(secs: f64, cap: Duration) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    if secs >= cap.as_secs_f64() {
        return cap;
    }
    Duration::try_from_secs_f64(secs).map_or(cap, |d| d.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn nominal_doubles_from_base_and_stops_at_cap() {
        let b = Backoff::new(secs(0.5), 2.0, secs(8.0)).unwrap();
        let waits: Vec<_> = (1..=7).map(|n| b.nominal(n)).collect();
        assert_eq!(
            waits,
            [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0].map(secs).to_vec()
        );
    }

    #[test]
    fn no_jitter_returns_the_nominal_delay_exactly() {
        let b = Backoff::new(secs(2.0), 2.0, secs(30.0)).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let waits: Vec<_> = (1..=6).map(|n| b.delay(n, None, &mut rng)).collect();
        assert_eq!(waits, [2.0, 4.0, 8.0, 16.0, 30.0, 30.0].map(secs).to_vec());
    }

    #[test]
    fn equal_jitter_stays_in_upper_half() {
        let b = Backoff::new(secs(1.0), 2.0, secs(8.0))
            .unwrap()
            .with_jitter(Jitter::Equal);
        let mut rng = SmallRng::seed_from_u64(7);
        for n in 1..=10 {
            let t = b.nominal(n);
            for _ in 0..200 {
                let d = b.delay(n, None, &mut rng);
                assert!(
                    d >= t / 2 && d <= t,
                    "retry {n}: {d:?} outside [{:?}, {t:?}]",
                    t / 2
                );
            }
        }
    }

    #[test]
    fn full_jitter_spreads_over_zero_to_nominal() {
        let b = Backoff::new(secs(4.0), 2.0, secs(4.0))
            .unwrap()
            .with_jitter(Jitter::Full);
        let mut rng = SmallRng::seed_from_u64(3);
        let draws: Vec<_> = (0..1000).map(|_| b.delay(1, None, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d <= secs(4.0)));
        // Both halves of the range are hit: it is really spread, not a constant.
        assert!(draws.iter().any(|d| *d < secs(1.0)));
        assert!(draws.iter().any(|d| *d > secs(3.0)));
    }

    #[test]
    fn decorrelated_jitter_draws_between_base_and_three_times_previous() {
        let b = Backoff::new(secs(1.0), 2.0, secs(100.0))
            .unwrap()
            .with_jitter(Jitter::Decorrelated);
        let mut rng = SmallRng::seed_from_u64(11);
        for _ in 0..500 {
            let d = b.delay(3, Some(secs(2.0)), &mut rng);
            assert!(d >= secs(1.0) && d <= secs(6.0), "{d:?}");
        }
        // First retry: previous defaults to base, so [base, 3·base].
        for _ in 0..500 {
            let d = b.delay(1, None, &mut rng);
            assert!(d >= secs(1.0) && d <= secs(3.0), "{d:?}");
        }
    }

    #[test]
    fn same_seed_gives_same_delays() {
        let b = Backoff::new(secs(0.5), 2.0, secs(8.0))
            .unwrap()
            .with_jitter(Jitter::Full);
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (1..=5)
                .map(|n| b.delay(n, None, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn invalid_multiplier_and_base_above_cap_are_rejected() {
        assert_eq!(
            Backoff::new(secs(1.0), 0.5, secs(2.0)),
            Err(ConfigError::InvalidMultiplier { multiplier: 0.5 })
        );
        assert!(matches!(
            Backoff::new(secs(1.0), f64::NAN, secs(2.0)),
            Err(ConfigError::InvalidMultiplier { .. })
        ));
        assert_eq!(
            Backoff::new(secs(3.0), 2.0, secs(2.0)),
            Err(ConfigError::BaseAboveCap {
                base: secs(3.0),
                cap: secs(2.0)
            })
        );
    }

    fn any_jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated)
        ]
    }

    proptest! {
        #[test]
        fn delay_is_never_above_cap_for_any_jitter_and_retry(
            base_ms in 0u64..10_000,
            extra_cap_ms in 0u64..100_000,
            multiplier in 1.0f64..1000.0,
            retry in prop_oneof![1u32..50, Just(1000u32), Just(u32::MAX)],
            previous_ms in proptest::option::of(0u64..u64::MAX / 2),
            jitter in any_jitter(),
            seed in any::<u64>(),
        ) {
            let cap = Duration::from_millis(base_ms + extra_cap_ms);
            let b = Backoff::new(Duration::from_millis(base_ms), multiplier, cap)
                .unwrap()
                .with_jitter(jitter);
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = b.delay(retry, previous_ms.map(Duration::from_millis), &mut rng);
            prop_assert!(d <= cap, "{d:?} > cap {cap:?}");
            let nominal = b.nominal(retry);
            prop_assert!(nominal <= cap);
            if jitter == Jitter::Decorrelated {
                prop_assert!(d >= Duration::from_millis(base_ms).min(cap));
            }
            if jitter == Jitter::Equal {
                // Half of the nominal, allowing one nanosecond of float rounding.
                prop_assert!(d + Duration::from_nanos(1) >= nominal / 2);
            }
        }
    }
}
