//! The open period scales to the evidence: short the first time, doubled by each
//! failed probe up to the maximum, back to the base once the key closes; and a
//! provider's delay hint sets the cooldown instead of a default.

use std::time::Duration;

use backstop_breaker::{
    BreakerConfig, BreakerState, ConfigError, Outcome, Pacing, TransitionReason,
};
use backstop_classify::{DelayHint, FailureKind, HintSource};
mod common;

use common::{Key, secs};

fn server_error() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::ServerError,
        hint: None,
    }
}

fn hinted(kind: FailureKind, delay: Duration) -> Outcome {
    Outcome::Failure {
        kind,
        hint: Some(DelayHint::new(delay, HintSource::RetryAfterSeconds)),
    }
}

#[test]
fn the_open_period_doubles_after_each_failed_probe_up_to_the_maximum() {
    let mut key = Key::new(BreakerConfig::default());
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    // The first opening: the base 5 s.
    assert_eq!(key.open_until(), Some(secs(9)));
    // Each failed probe doubles it: 10, 20, 40 s, then the 60 s cap, and stays there.
    let mut probe_at = 9;
    for period in [10, 20, 40, 60, 60] {
        key.call(server_error(), secs(probe_at));
        assert_eq!(
            key.open_until(),
            Some(secs(probe_at + period)),
            "probe at {probe_at}"
        );
        assert_eq!(key.state.last_reason(), Some(TransitionReason::ProbeFailed));
        probe_at += period;
    }
}

#[test]
fn closing_resets_the_open_period_to_the_base() {
    let mut key = Key::new(BreakerConfig {
        pacing: None,
        ..BreakerConfig::default()
    });
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    key.call(server_error(), secs(9)); // reopened for 10 s
    key.call(server_error(), secs(19)); // reopened for 20 s
    key.call(Outcome::Success, secs(39));
    assert_eq!(key.state.state(), BreakerState::Closed);
    for i in 40..45 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.open_until(), Some(secs(49)));
}

#[test]
fn a_hung_probe_doubles_the_open_period_like_a_failed_one() {
    let config = BreakerConfig::default();
    let mut key = Key::new(config.clone());
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    let _hung = key
        .state
        .admit(key.t0 + secs(9), &config, &mut |_| {})
        .expect("probe");
    // Its 60 s timeout at 69 s reopens the key for 10 s.
    key.state.advance(key.t0 + secs(70), &config, &mut |_| {});
    assert_eq!(key.open_until(), Some(secs(79)));
    assert_eq!(
        key.state.last_reason(),
        Some(TransitionReason::ProbeTimedOut)
    );
}

#[test]
fn the_tripping_failures_hint_sets_the_cooldown_even_when_shorter_than_the_open_period() {
    // Hints never open the key by themselves here: only the counting rule trips it.
    let mut key = Key::new(BreakerConfig {
        open_duration: secs(30),
        hint_opens_at: secs(3600),
        ..BreakerConfig::default()
    });
    for i in 0..4 {
        key.call(server_error(), secs(i));
    }
    key.call(hinted(FailureKind::Overloaded, secs(3)), secs(4));
    assert_eq!(key.open_until(), Some(secs(7)));
    assert_eq!(
        key.state.last_reason(),
        Some(TransitionReason::ConsecutiveFailures { failures: 5 })
    );
}

#[test]
fn a_failed_probes_hint_is_a_floor_under_the_doubled_period() {
    let mut key = Key::new(BreakerConfig {
        hint_opens_at: secs(3600),
        ..BreakerConfig::default()
    });
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    // The trouble outlasted one cooldown: a "retry after 1 s" does not bring the
    // probes back every second; the doubled 10 s applies.
    key.call(hinted(FailureKind::RateLimited, secs(1)), secs(9));
    assert_eq!(key.open_until(), Some(secs(19)));
    // A hint longer than the doubled period (20 s) is what the provider asked for.
    key.call(hinted(FailureKind::RateLimited, secs(45)), secs(19));
    assert_eq!(key.open_until(), Some(secs(64)));
}

#[test]
fn a_retry_after_of_two_seconds_or_more_opens_the_key_and_one_second_does_not() {
    let mut key = Key::new(BreakerConfig::default());
    key.call(hinted(FailureKind::RateLimited, secs(1)), secs(0));
    assert_eq!(key.state.state(), BreakerState::Closed);
    key.call(hinted(FailureKind::RateLimited, secs(2)), secs(1));
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.open_until(), Some(secs(3)));
}

#[test]
fn the_configuration_is_checked() {
    let check = |config: BreakerConfig| config.validate();
    assert_eq!(
        check(BreakerConfig {
            open_duration: secs(90),
            ..BreakerConfig::default()
        }),
        Err(ConfigError::MaxOpenBelowOpen)
    );
    // The default pacing with one field changed, validated.
    let tuned = |change: &dyn Fn(&mut Pacing)| {
        let mut pacing = Pacing::default();
        change(&mut pacing);
        check(BreakerConfig {
            pacing: Some(pacing),
            ..BreakerConfig::default()
        })
    };
    for backoff in [0.0, 1.0, f64::NAN] {
        assert!(matches!(
            tuned(&|p| p.backoff = backoff),
            Err(ConfigError::PaceBackoff(_))
        ));
    }
    for growth in [0.0, 1.5] {
        assert!(matches!(
            tuned(&|p| p.growth = growth),
            Err(ConfigError::PaceGrowth(_))
        ));
    }
    assert!(matches!(
        tuned(&|p| p.min_rate = 0.0),
        Err(ConfigError::PaceMinRate(_))
    ));
    for recovery in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            tuned(&|p| p.recovery = recovery),
            Err(ConfigError::PaceRecovery(_))
        ));
    }
    for recovery in [0.0, 1.0] {
        assert_eq!(tuned(&|p| p.recovery = recovery), Ok(()));
    }
    assert_eq!(check(BreakerConfig::default()), Ok(()));
    let message = ConfigError::MaxOpenBelowOpen.to_string();
    assert!(message.contains("max_open_duration"), "{message}");
}

#[test]
fn a_success_from_a_call_made_before_the_latest_failure_does_not_reset_the_count() {
    let config = BreakerConfig::default();
    let mut key = Key::new(config.clone());
    let at = |s: u64| key.t0 + secs(s);
    let (t0, t1) = (at(0), at(1));
    // Five slow calls go out before an outage starts; five quick ones after it fail.
    let slow: Vec<_> = (0..5)
        .map(|_| key.state.admit(t0, &config, &mut |_| {}).unwrap())
        .collect();
    let quick: Vec<_> = (0..5)
        .map(|_| key.state.admit(t1, &config, &mut |_| {}).unwrap())
        .collect();
    let mut quick = quick.into_iter();
    let mut slow = slow.into_iter();
    // Failures and the old calls' successes arrive interleaved.
    for _ in 0..4 {
        key.state.record(
            quick.next().unwrap(),
            server_error(),
            at(2),
            &config,
            &mut |_| {},
        );
        key.state.record(
            slow.next().unwrap(),
            Outcome::Success,
            at(2),
            &config,
            &mut |_| {},
        );
    }
    assert_eq!(key.state.consecutive_failures(), 4);
    key.state.record(
        quick.next().unwrap(),
        server_error(),
        at(2),
        &config,
        &mut |_| {},
    );
    assert_eq!(key.state.state(), BreakerState::Open);
    // A call made after the latest failure does reset it (checked on a fresh key).
    let mut key = Key::new(config.clone());
    key.call(server_error(), secs(0));
    key.call(Outcome::Success, secs(1));
    assert_eq!(key.state.consecutive_failures(), 0);
}
