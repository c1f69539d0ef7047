//! The decision: after a failed attempt, retry (after how long) or stop (why).
//! Pure: no clock, no runtime; the layer passes in the time left and the rng.

use std::time::Duration;

use backstop_classify::{DelayHint, Failure, Retryable, StopReason};
use rand::{Rng, RngCore};

use crate::{Backoff, HintJitter, RetryConfig};

/// What the retry layer knows about a failed attempt when it asks the policy.
#[derive(Clone, Copy, Debug)]
pub struct FailedAttempt<'a> {
    /// The verdict on the attempt.
    pub failure: &'a Failure,
    /// Attempts made so far, this one included (1 after the first attempt).
    pub attempts_made: u32,
    /// Time left before the deadline (the layer's own or the request's
    /// [`Deadline`](backstop_classify::Deadline), whichever is sooner), or `None`
    /// when there is no deadline.
    pub time_left: Option<Duration>,
    /// Whether the request is idempotent (it carries an `Idempotency-Key`, the layer
    /// added one, or it has the [`Idempotent`](backstop_classify::Idempotent) marker).
    pub idempotent: bool,
    /// The wait before the attempt that just failed (`None` after the first attempt).
    pub previous_wait: Option<Duration>,
}

impl<'a> FailedAttempt<'a> {
    /// The first attempt failed with `failure`; no deadline, not idempotent.
    pub fn first(failure: &'a Failure) -> Self {
        FailedAttempt {
            failure,
            attempts_made: 1,
            time_left: None,
            idempotent: false,
            previous_wait: None,
        }
    }
}

/// The policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then make another attempt. The hint is the delay hint that set
    /// the wait, if one did (recorded in the [`AttemptRecord`](backstop_classify::AttemptRecord)).
    RetryAfter(Duration, Option<DelayHint>),
    /// Make no more attempts; the last outcome goes to the caller.
    Stop(StopReason),
}

/// Decides whether and when to retry a failed attempt.
///
/// The retry layer calls it after every failed attempt and then enforces, whatever
/// the policy said, its own hard limits: at most `max_attempts` attempts, no wait
/// that reaches the deadline, and the retry budget. A policy can therefore make the
/// layer retry less, never more or later than configured.
///
/// Object-safe, so it can be swapped at run time:
///
/// ```
/// use std::time::Duration;
/// use backstop_classify::{FailureKind, StopReason};
/// use backstop_retry::{Decision, FailedAttempt, RetryPolicy};
///
/// /// Retries only overload, always after one second.
/// struct OverloadOnly;
///
/// impl RetryPolicy for OverloadOnly {
///     fn decide(&self, attempt: &FailedAttempt<'_>, _rng: &mut dyn rand::RngCore) -> Decision {
///         if attempt.failure.kind == FailureKind::Overloaded {
///             Decision::RetryAfter(Duration::from_secs(1), None)
///         } else {
///             Decision::Stop(StopReason::NotRetryable)
///         }
///     }
/// }
///
/// let _boxed: Box<dyn RetryPolicy> = Box::new(OverloadOnly);
/// ```
pub trait RetryPolicy: Send + Sync + 'static {
    /// Retry after a wait, or stop.
    fn decide(&self, attempt: &FailedAttempt<'_>, rng: &mut dyn RngCore) -> Decision;
}

/// The rules the layer uses unless told otherwise, in this order:
///
/// 1. Not retryable ([`Retryable::No`]) → stop, [`StopReason::NotRetryable`].
/// 2. [`Retryable::IfIdempotent`] (a timeout or reset after the request was written)
///    on a request that is not idempotent → stop, `NotRetryable`.
/// 3. `max_attempts` made → stop, [`StopReason::MaxAttempts`].
/// 4. A delay hint that is a retry instruction (`retry-after`, `retry-after-ms`,
///    Gemini's `retryDelay`, a local layer's): longer than `max_hint` or not shorter
///    than the time left → stop at once, [`StopReason::HintTooLong`] (the caller or
///    the fallback layer gets the response with the hint); otherwise wait exactly the
///    hint plus [`HintJitter`], never less than the hint.
/// 5. A rate-limit *reset* hint (`x-ratelimit-reset-*` and similar: when the bucket is
///    full again, not when to retry): wait `max(backoff, hint)` when that fits within
///    `max_hint` and the time left, otherwise ignore the hint and use the backoff.
/// 6. No hint: the backoff's delay for this retry.
/// 7. A wait not shorter than the time left → stop, [`StopReason::Deadline`] (now,
///    not after sleeping: the fallback layer gets the remaining time).
///
/// "Fits" and "the time left" above take
/// [`RetryConfig::with_min_attempt_time`] into account: a wait fits when the retry
/// after it would still have at least that long (and some time, when it is zero)
/// before the deadline.
#[derive(Clone, Debug, PartialEq)]
pub struct StandardPolicy {
    backoff: Backoff,
    max_attempts: u32,
    max_hint: Duration,
    hint_jitter: HintJitter,
    min_attempt_time: Duration,
}

impl StandardPolicy {
    /// The rules with the backoff, attempts, hint cap and hint jitter of `config`.
    pub fn from_config(config: &RetryConfig) -> Self {
        StandardPolicy {
            backoff: config.backoff,
            max_attempts: config.max_attempts,
            max_hint: config.max_hint,
            hint_jitter: config.hint_jitter,
            min_attempt_time: config.min_attempt_time,
        }
    }
}

/// Whether a retry after `wait` still starts in time: before the deadline, with at
/// least `min_attempt_time` of `time_left` to spare (always, without a deadline).
/// The one definition of "fits", for the standard rules and the layer's own limits.
pub(crate) fn starts_in_time(
    wait: Duration,
    time_left: Option<Duration>,
    min_attempt_time: Duration,
) -> bool {
    time_left.is_none_or(|left| {
        left.checked_sub(wait)
            .is_some_and(|rest| !rest.is_zero() && rest >= min_attempt_time)
    })
}

impl RetryPolicy for StandardPolicy {
    fn decide(&self, attempt: &FailedAttempt<'_>, rng: &mut dyn RngCore) -> Decision {
        let failure = attempt.failure;
        match failure.retryable {
            Retryable::No => return Decision::Stop(StopReason::NotRetryable),
            Retryable::IfIdempotent if !attempt.idempotent => {
                return Decision::Stop(StopReason::NotRetryable);
            }
            Retryable::Yes | Retryable::IfIdempotent => {}
        }
        if attempt.attempts_made >= self.max_attempts {
            return Decision::Stop(StopReason::MaxAttempts);
        }
        let fits = |wait: Duration| starts_in_time(wait, attempt.time_left, self.min_attempt_time);
        let backoff = self
            .backoff
            .delay(attempt.attempts_made, attempt.previous_wait, rng);

        let (wait, hint_used) = match failure.hint {
            Some(hint) if hint.source.is_retry_instruction() => {
                if hint.delay > self.max_hint || !fits(hint.delay) {
                    return Decision::Stop(StopReason::HintTooLong);
                }
                // Saturating: with no cap on hints (`max_hint` = `Duration::MAX`) a
                // provider's hint may be the largest `Duration` there is.
                let with_extra = hint.delay.saturating_add(self.extra(hint.delay, rng));
                // The jitter never pushes a hint that fits past the deadline.
                let wait = if fits(with_extra) {
                    with_extra
                } else {
                    hint.delay
                };
                (wait, Some(hint))
            }
            Some(hint) if hint.delay > backoff => {
                if hint.delay <= self.max_hint && fits(hint.delay) {
                    let with_extra = hint.delay.saturating_add(self.extra(hint.delay, rng));
                    let wait = if fits(with_extra) {
                        with_extra
                    } else {
                        hint.delay
                    };
                    (wait, Some(hint))
                } else {
                    (backoff, None)
                }
            }
            Some(_) | None => (backoff, None),
        };
        if !fits(wait) {
            return Decision::Stop(StopReason::Deadline);
        }
        Decision::RetryAfter(wait, hint_used)
    }
}

impl StandardPolicy {
    fn extra(&self, hint: Duration, rng: &mut dyn RngCore) -> Duration {
        let max = self.hint_jitter.max_extra(hint);
        if max.is_zero() {
            return Duration::ZERO;
        }
        // `max.mul_f64(..)` without its panic: the factor is below 1, so the product
        // fits even for `Duration::MAX`, but the arithmetic is in `f64`.
        Duration::try_from_secs_f64(rng.random::<f64>() * max.as_secs_f64()).unwrap_or(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_classify::{FailureKind, HintSource};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(5)
    }

    fn policy() -> StandardPolicy {
        StandardPolicy::from_config(&RetryConfig::batch())
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn every_non_retryable_kind_stops_without_a_retry() {
        let p = policy();
        for kind in FailureKind::ALL {
            if kind.default_retryable() != Retryable::No {
                continue;
            }
            let f = Failure::new(kind);
            assert_eq!(
                p.decide(&FailedAttempt::first(&f), &mut rng()),
                Decision::Stop(StopReason::NotRetryable),
                "{kind}"
            );
        }
    }

    #[test]
    fn post_send_failure_is_retried_only_when_idempotent() {
        let p = policy();
        for kind in [FailureKind::TimedOut, FailureKind::ConnectionLost] {
            let f = Failure::new(kind);
            let mut a = FailedAttempt::first(&f);
            assert_eq!(
                p.decide(&a, &mut rng()),
                Decision::Stop(StopReason::NotRetryable)
            );
            a.idempotent = true;
            assert_eq!(
                p.decide(&a, &mut rng()),
                Decision::RetryAfter(secs(2), None)
            );
        }
        // A connect failure never reached the provider: retried without a key.
        let f = Failure::new(FailureKind::ConnectFailed);
        assert_eq!(
            p.decide(&FailedAttempt::first(&f), &mut rng()),
            Decision::RetryAfter(secs(2), None)
        );
    }

    #[test]
    fn a_wait_fits_only_when_the_retry_after_it_keeps_the_minimum_time_left() {
        let f = Failure::new(FailureKind::ServerError);
        // Batch: the first wait is 2 s; 10 s left.
        let attempt = FailedAttempt {
            time_left: Some(secs(10)),
            ..FailedAttempt::first(&f)
        };
        let with_min = |min: u64| {
            let config = RetryConfig::batch()
                .with_min_attempt_time(secs(min))
                .unwrap();
            StandardPolicy::from_config(&config).decide(&attempt, &mut rng())
        };
        assert_eq!(with_min(0), Decision::RetryAfter(secs(2), None));
        // 8 s left after the wait: exactly the minimum is enough, a nanosecond more is not.
        assert_eq!(with_min(8), Decision::RetryAfter(secs(2), None));
        let just_over = RetryConfig::batch()
            .with_min_attempt_time(secs(8) + Duration::from_nanos(1))
            .unwrap();
        assert_eq!(
            StandardPolicy::from_config(&just_over).decide(&attempt, &mut rng()),
            Decision::Stop(StopReason::Deadline)
        );
        // A retry instruction that would leave too little: not waited on at all.
        let hint = DelayHint::new(secs(3), HintSource::RetryAfterSeconds);
        let hinted = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        let attempt = FailedAttempt {
            time_left: Some(secs(10)),
            ..FailedAttempt::first(&hinted)
        };
        let config = RetryConfig::batch()
            .with_hint_jitter(crate::HintJitter::none())
            .with_min_attempt_time(secs(8))
            .unwrap();
        assert_eq!(
            StandardPolicy::from_config(&config).decide(&attempt, &mut rng()),
            Decision::Stop(StopReason::HintTooLong)
        );
        // Without a deadline there is nothing to keep: the minimum does not apply.
        let no_deadline = FailedAttempt::first(&f);
        assert_eq!(
            StandardPolicy::from_config(
                &RetryConfig::interactive()
                    .with_min_attempt_time(secs(30))
                    .unwrap()
            )
            .decide(
                &FailedAttempt {
                    time_left: None,
                    ..no_deadline
                },
                &mut rng()
            ),
            Decision::RetryAfter(
                RetryConfig::interactive()
                    .backoff()
                    .delay(1, None, &mut rng()),
                None
            )
        );
    }

    #[test]
    fn starts_in_time_without_a_minimum_is_the_deadline_rule() {
        for (wait, left) in [(0, 1), (1, 1), (2, 1), (5, 10), (10, 10)] {
            assert_eq!(
                starts_in_time(secs(wait), Some(secs(left)), Duration::ZERO),
                wait < left,
                "wait {wait}, left {left}"
            );
        }
        assert!(starts_in_time(Duration::MAX, None, Duration::MAX));
    }

    #[test]
    fn batch_waits_two_four_eight_then_stops_at_max_attempts() {
        let p = policy();
        let f = Failure::new(FailureKind::ServerError);
        let mut waits = Vec::new();
        let mut previous = None;
        for made in 1.. {
            let a = FailedAttempt {
                attempts_made: made,
                previous_wait: previous,
                ..FailedAttempt::first(&f)
            };
            match p.decide(&a, &mut rng()) {
                Decision::RetryAfter(w, None) => {
                    waits.push(w);
                    previous = Some(w);
                }
                Decision::Stop(reason) => {
                    assert_eq!(reason, StopReason::MaxAttempts);
                    assert_eq!(made, 4);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(waits, [secs(2), secs(4), secs(8)]);
    }

    #[test]
    fn retry_after_is_waited_at_least_and_at_most_ten_percent_longer() {
        let p = policy();
        let hint = DelayHint::new(secs(5), HintSource::RetryAfterSeconds);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        let mut r = rng();
        for _ in 0..100 {
            match p.decide(&FailedAttempt::first(&f), &mut r) {
                Decision::RetryAfter(w, Some(h)) => {
                    assert_eq!(h, hint);
                    assert!(w >= secs(5) && w <= Duration::from_millis(5500), "{w:?}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn hint_beyond_max_hint_stops_at_once() {
        let p = policy();
        // Azure's daily quota message, or the SDK that slept 2.3 days.
        let hint = DelayHint::new(secs(198_300), HintSource::RetryAfterSeconds);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        assert_eq!(
            p.decide(&FailedAttempt::first(&f), &mut rng()),
            Decision::Stop(StopReason::HintTooLong)
        );
    }

    #[test]
    fn hint_beyond_time_left_stops_at_once() {
        let p = policy();
        let hint = DelayHint::new(secs(30), HintSource::RetryAfterMs);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        let a = FailedAttempt {
            time_left: Some(secs(20)),
            ..FailedAttempt::first(&f)
        };
        assert_eq!(
            p.decide(&a, &mut rng()),
            Decision::Stop(StopReason::HintTooLong)
        );
    }

    #[test]
    fn hint_jitter_never_pushes_a_fitting_hint_past_the_deadline() {
        let p = policy();
        let hint = DelayHint::new(secs(10), HintSource::RetryAfterSeconds);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        let a = FailedAttempt {
            time_left: Some(Duration::from_millis(10_001)),
            ..FailedAttempt::first(&f)
        };
        let mut r = rng();
        for _ in 0..50 {
            match p.decide(&a, &mut r) {
                Decision::RetryAfter(w, Some(_)) => {
                    assert!(w >= secs(10) && w < Duration::from_millis(10_001))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn backoff_that_would_cross_the_deadline_stops_now() {
        let p = policy();
        let f = Failure::new(FailureKind::Overloaded);
        let a = FailedAttempt {
            time_left: Some(Duration::from_millis(1999)),
            ..FailedAttempt::first(&f)
        };
        assert_eq!(
            p.decide(&a, &mut rng()),
            Decision::Stop(StopReason::Deadline)
        );
        let a = FailedAttempt {
            time_left: Some(Duration::from_millis(2001)),
            ..a
        };
        assert_eq!(
            p.decide(&a, &mut rng()),
            Decision::RetryAfter(secs(2), None)
        );
    }

    #[test]
    fn long_reset_hint_is_ignored_in_favour_of_backoff() {
        let p = policy();
        // OpenAI's tokens bucket refills in 6 minutes: not a reason to give up.
        let hint = DelayHint::new(secs(360), HintSource::RateLimitResetTokens);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        assert_eq!(
            p.decide(&FailedAttempt::first(&f), &mut rng()),
            Decision::RetryAfter(secs(2), None)
        );
    }

    #[test]
    fn reset_hint_longer_than_backoff_sets_the_wait() {
        let p =
            StandardPolicy::from_config(&RetryConfig::batch().with_hint_jitter(HintJitter::none()));
        let hint = DelayHint::new(secs(7), HintSource::AzureRateLimitResetTokens);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(hint));
        assert_eq!(
            p.decide(&FailedAttempt::first(&f), &mut rng()),
            Decision::RetryAfter(secs(7), Some(hint))
        );
        // Shorter than the backoff: the backoff wins and no hint is recorded.
        let short = DelayHint::new(secs(1), HintSource::AzureRateLimitResetTokens);
        let f = Failure::new(FailureKind::RateLimited).with_hint(Some(short));
        assert_eq!(
            p.decide(&FailedAttempt::first(&f), &mut rng()),
            Decision::RetryAfter(secs(2), None)
        );
    }

    #[test]
    fn retryable_override_from_should_retry_header_is_obeyed() {
        let p = policy();
        // A 500 the provider marked `x-should-retry: false`.
        let f = Failure::new(FailureKind::ServerError).with_retryable(Retryable::No);
        assert_eq!(
            p.decide(&FailedAttempt::first(&f), &mut rng()),
            Decision::Stop(StopReason::NotRetryable)
        );
    }
}
