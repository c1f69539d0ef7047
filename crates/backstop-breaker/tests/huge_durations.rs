//! Durations far past any real one, from a provider (`retry-after:
//! 10000000000000000000`) or from the configuration (a cooldown or timeout of
//! `Duration::MAX` meaning "no cap", a pace floor of one call in 10^25 s): the key
//! works with them as with any other, its deadlines capped at a century
//! ([`MAX_INSTANT_DELAY`]) instead of overflowing the clock.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerState, Outcome, Pacing, Rejection};
use backstop_classify::{DelayHint, FailureKind, HintSource, MAX_INSTANT_DELAY};
mod common;

use common::{Key, ms, secs};

/// `retry-after: 10000000000000000000`: ten quintillion seconds, a valid `Duration`.
const HUGE: Duration = Duration::from_secs(10_000_000_000_000_000_000);

fn hinted(kind: FailureKind, delay: Duration) -> Outcome {
    Outcome::Failure {
        kind,
        hint: Some(DelayHint::new(delay, HintSource::RetryAfterSeconds)),
    }
}

fn server_error() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::ServerError,
        hint: None,
    }
}

fn no_hint_cap() -> BreakerConfig {
    BreakerConfig {
        max_hinted_cooldown: Duration::MAX,
        ..BreakerConfig::default()
    }
}

#[test]
fn a_huge_hint_with_no_hinted_cooldown_cap_opens_the_key_for_a_century() {
    for kind in [FailureKind::RateLimited, FailureKind::Overloaded] {
        // The hint opens the key by itself (it is at least `hint_opens_at`).
        let mut key = Key::new(no_hint_cap());
        key.call(hinted(kind, HUGE), secs(1));
        assert_eq!(key.state.state(), BreakerState::Open, "{kind}");
        assert_eq!(
            key.open_until(),
            Some(secs(1) + MAX_INSTANT_DELAY),
            "{kind}"
        );
        assert_eq!(
            key.admit(secs(2)).map(|_| ()),
            Err(Rejection {
                state: BreakerState::Open,
                upstream_directed: true,
                retry_in: MAX_INSTANT_DELAY - secs(1),
            })
        );

        // The hint sets the cooldown of a key the counting rules open.
        let mut key = Key::new(BreakerConfig {
            consecutive_failures: 1,
            ..no_hint_cap()
        });
        key.call(hinted(kind, HUGE), secs(1));
        assert_eq!(
            key.open_until(),
            Some(secs(1) + MAX_INSTANT_DELAY),
            "{kind}"
        );
    }
}

#[test]
fn a_huge_hint_on_a_failed_probe_reopens_the_key_for_a_century() {
    let mut key = Key::new(no_hint_cap());
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.open_until(), Some(secs(9)));
    // The probe at 9 s fails with the hint: the longer of it and the doubled period.
    key.call(hinted(FailureKind::Overloaded, HUGE), secs(9));
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.open_until(), Some(secs(9) + MAX_INSTANT_DELAY));
}

#[test]
fn a_quota_cooldown_of_duration_max_opens_the_key_for_a_century() {
    let mut key = Key::new(BreakerConfig {
        quota_cooldown: Duration::MAX,
        ..BreakerConfig::default()
    });
    key.call(Outcome::QuotaExhausted { hint: None }, secs(3));
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.open_until(), Some(secs(3) + MAX_INSTANT_DELAY));
}

#[test]
fn an_open_duration_of_duration_max_opens_the_key_for_a_century() {
    let mut key = Key::new(BreakerConfig {
        open_duration: Duration::MAX,
        max_open_duration: Duration::MAX,
        ..BreakerConfig::default()
    });
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.open_until(), Some(secs(4) + MAX_INSTANT_DELAY));
}

#[test]
fn a_probe_that_times_out_reopens_the_key_for_at_most_a_century() {
    // An open period that fits the clock once, doubled by the hung probe to one
    // that does not.
    let open = Duration::from_secs(5_000_000_000_000_000_000);
    let mut key = Key::new(BreakerConfig {
        open_duration: open,
        max_open_duration: Duration::MAX,
        ..BreakerConfig::default()
    });
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    let half_open = key.open_until().expect("open");
    assert_eq!(half_open, secs(4) + MAX_INSTANT_DELAY);
    let _hung = key.admit(half_open).expect("the probe");
    // The probe times out after the default 60 s: open again, for a century.
    let timed_out = half_open + secs(60);
    assert!(key.admit(timed_out).is_err());
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.open_until(), Some(timed_out + MAX_INSTANT_DELAY));
}

#[test]
fn a_probe_timeout_of_duration_max_never_expires_the_probe() {
    let mut key = Key::new(BreakerConfig {
        probe_timeout: Duration::MAX,
        ..BreakerConfig::default()
    });
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    let _probe = key.admit(secs(9)).expect("the probe");
    // A second caller is told to look again, the key still half-open.
    let again = key.admit(secs(10)).map(|_| ());
    assert_eq!(key.state.state(), BreakerState::HalfOpen);
    assert_eq!(
        again,
        Err(Rejection {
            state: BreakerState::HalfOpen,
            upstream_directed: false,
            retry_in: MAX_INSTANT_DELAY - secs(1),
        })
    );
}

/// A pace so slow its interval is no `Duration` (one call in 10^25 s): an interval of
/// a century instead, and refusals told exactly that.
#[test]
fn a_pace_slower_than_a_call_a_century_waits_a_century_between_calls() {
    let mut key = Key::new(BreakerConfig {
        pacing: Some(Pacing {
            backoff: 1e-25,
            min_rate: 1e-25,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    });
    key.call(Outcome::Success, ms(0));
    key.call(hinted(FailureKind::RateLimited, ms(100)), ms(10));
    assert_eq!(key.state.pace(), Some(1e-25));
    assert!(key.admit(ms(10)).is_ok());
    assert_eq!(
        key.admit(ms(10)).map(|_| ()),
        Err(Rejection {
            state: BreakerState::Closed,
            upstream_directed: true,
            retry_in: MAX_INSTANT_DELAY,
        })
    );
}

/// Every refusal books the next slot a whole interval later: ten thousand intervals of
/// 10^15 s would be past the clock's end. Capped at a century each, they are not.
#[test]
fn many_refusals_at_a_pace_of_one_call_in_ten_to_the_fifteen_seconds_book_slots_without_overflow() {
    let mut key = Key::new(BreakerConfig {
        pacing: Some(Pacing {
            backoff: 1e-25,
            min_rate: 1e-15,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    });
    key.call(Outcome::Success, ms(0));
    key.call(hinted(FailureKind::RateLimited, ms(100)), ms(10));
    assert_eq!(key.state.pace(), Some(1e-15));
    assert!(key.admit(ms(10)).is_ok());
    for booked in 1..=10_000u32 {
        assert_eq!(
            key.admit(ms(10)).map(|_| ()),
            Err(Rejection {
                state: BreakerState::Closed,
                upstream_directed: true,
                retry_in: MAX_INSTANT_DELAY * booked,
            })
        );
    }
}
