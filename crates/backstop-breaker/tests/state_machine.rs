//! The per-key state machine, driven with explicit instants: every transition, with
//! its exact time.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerState, Outcome, Rejection, Ticket, TransitionReason};
use backstop_classify::{DelayHint, FailureKind, HintSource};

mod common;

use common::{Key, ms, secs};

fn server_error() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::ServerError,
        hint: None,
    }
}

fn rate_limited(delay: Duration, source: HintSource) -> Outcome {
    Outcome::Failure {
        kind: FailureKind::RateLimited,
        hint: Some(DelayHint::new(delay, source)),
    }
}

use BreakerState::{Closed, HalfOpen, Open};

/// The machine with a fixed 30 s open period, hints from 1 s opening the key, and no
/// pacing: the timings below were
/// written for those (the former defaults). The growing open period, the hint-set
/// cooldown and pacing of the current defaults are tested in `open_period.rs` and
/// `pacing.rs`.
fn fixed_open() -> BreakerConfig {
    BreakerConfig {
        open_duration: secs(30),
        max_open_duration: secs(30),
        hint_opens_at: Duration::from_secs(1),
        pacing: None,
        ..BreakerConfig::default()
    }
}

#[test]
fn five_consecutive_failures_open_the_key_for_30_seconds() {
    let mut key = Key::new(fixed_open());
    for i in 0..4 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.consecutive_failures(), 4);
    key.call(server_error(), secs(4));
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(34)));
    assert_eq!(
        key.log(),
        vec![(
            Closed,
            Open,
            secs(4),
            TransitionReason::ConsecutiveFailures { failures: 5 }
        )]
    );
    assert_eq!(
        key.admit(secs(34) - ms(1)),
        Err(Rejection {
            state: Open,
            upstream_directed: false,
            retry_in: ms(1)
        })
    );
    let probe = key.admit(secs(34)).expect("half-open admits a probe");
    assert!(probe.is_probe());
    assert_eq!(
        key.log()[1],
        (Open, HalfOpen, secs(34), TransitionReason::CooldownElapsed)
    );
}

#[test]
fn a_success_resets_the_consecutive_count() {
    let mut key = Key::new(fixed_open());
    for i in 0..4 {
        key.call(server_error(), secs(i));
    }
    key.call(Outcome::Success, secs(4));
    for i in 5..9 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.consecutive_failures(), 4);
    assert!(key.transitions.is_empty());
}

fn ratio_only() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 0,
        ..fixed_open()
    }
}

#[test]
fn failure_ratio_needs_the_minimum_throughput() {
    let mut key = Key::new(ratio_only());
    // 9 calls, 5 failed: 55 % but under the 10-call minimum.
    for i in 0..9 {
        let outcome = if i % 2 == 0 {
            server_error()
        } else {
            Outcome::Success
        };
        key.call(outcome, ms(100 * i));
    }
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.window_counts(key.at(secs(1))), (9, 5));
    // The tenth call fails: 6 of 10.
    key.call(server_error(), secs(1));
    assert_eq!(
        key.log(),
        vec![(
            Closed,
            Open,
            secs(1),
            TransitionReason::FailureRatio {
                failures: 6,
                calls: 10
            }
        )]
    );
    assert_eq!(key.open_until(), Some(secs(31)));
}

#[test]
fn exactly_half_failed_opens_and_just_under_half_does_not() {
    let mut key = Key::new(ratio_only());
    for i in 0..6 {
        key.call(Outcome::Success, ms(i));
    }
    for i in 6..10 {
        key.call(server_error(), ms(i));
    }
    // 4 of 10: closed. One more failure: 5 of 11 (45 %): closed.
    key.call(server_error(), ms(10));
    assert_eq!(key.state.state(), Closed);
    // 6 of 12 = 50 %: opens.
    key.call(server_error(), ms(11));
    assert_eq!(key.state.state(), Open);
    assert_eq!(
        key.state.last_reason(),
        Some(TransitionReason::FailureRatio {
            failures: 6,
            calls: 12
        })
    );
}

#[test]
fn failures_older_than_the_window_no_longer_count() {
    // Buckets of 3 s: at 30 s the bucket holding t = 0..3 s has left the window.
    let mut key = Key::new(ratio_only());
    for i in 0..9 {
        key.call(server_error(), ms(i));
    }
    key.call(server_error(), secs(30));
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.window_counts(key.at(secs(30))), (1, 1));
}

#[test]
fn failures_still_inside_the_window_count() {
    let mut key = Key::new(ratio_only());
    for i in 0..9 {
        key.call(server_error(), ms(i));
    }
    key.call(server_error(), secs(29));
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(59)));
}

fn opened_at_4s(config: BreakerConfig) -> Key {
    let mut key = Key::new(config);
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.open_until(), Some(secs(34)));
    key
}

#[test]
fn half_open_admits_one_probe_and_refuses_others_until_its_timeout() {
    let mut key = opened_at_4s(fixed_open());
    let probe = key.admit(secs(34)).expect("probe");
    assert!(probe.is_probe());
    // The others are told to look again after as long as the probe has run (at
    // least 50 ms), never later than its timeout at 94 s.
    assert_eq!(
        key.admit(secs(34)),
        Err(Rejection {
            state: HalfOpen,
            upstream_directed: false,
            retry_in: ms(50)
        })
    );
    assert_eq!(
        key.admit(secs(35)),
        Err(Rejection {
            state: HalfOpen,
            upstream_directed: false,
            retry_in: secs(1)
        })
    );
    assert_eq!(
        key.admit(secs(74)),
        Err(Rejection {
            state: HalfOpen,
            upstream_directed: false,
            retry_in: secs(20)
        })
    );
    assert_eq!(key.state.probes_in_flight(), 1);
}

#[test]
fn a_successful_probe_closes_the_key_and_clears_the_counts() {
    let mut key = opened_at_4s(fixed_open());
    let probe = key.admit(secs(40)).expect("probe");
    key.record(probe, Outcome::Success, secs(42));
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.consecutive_failures(), 0);
    assert_eq!(key.state.window_counts(key.at(secs(42))), (0, 0));
    assert_eq!(
        key.log()[1..],
        [
            (Open, HalfOpen, secs(34), TransitionReason::CooldownElapsed),
            (
                HalfOpen,
                Closed,
                secs(42),
                TransitionReason::ProbesSucceeded
            ),
        ]
    );
    // Closed again: four failures do not reopen it.
    for i in 43..47 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.state.state(), Closed);
}

#[test]
fn a_failed_probe_reopens_for_the_open_duration() {
    let mut key = opened_at_4s(fixed_open());
    let probe = key.admit(secs(34)).expect("probe");
    key.record(probe, server_error(), secs(36));
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(66)));
    assert_eq!(
        key.log()[2],
        (HalfOpen, Open, secs(36), TransitionReason::ProbeFailed)
    );
}

#[test]
fn a_hung_probe_is_released_at_its_timeout_as_a_failure() {
    let mut key = opened_at_4s(fixed_open());
    let hung = key.admit(secs(34)).expect("probe");
    // The probe times out at 94 s: the key reopens then, until 124 s.
    assert_eq!(
        key.admit(secs(94)),
        Err(Rejection {
            state: Open,
            upstream_directed: false,
            retry_in: secs(30)
        })
    );
    assert_eq!(
        key.log()[2],
        (HalfOpen, Open, secs(94), TransitionReason::ProbeTimedOut)
    );
    // Its late success no longer counts.
    key.record(hung, Outcome::Success, secs(100));
    assert_eq!(key.state.state(), Open);
    // At 124 s the next probe goes through.
    assert!(key.admit(secs(124)).expect("probe").is_probe());
}

#[test]
fn a_probe_timeout_is_applied_at_its_exact_time_even_when_nobody_asks() {
    let mut key = opened_at_4s(fixed_open());
    let _hung = key.admit(secs(34)).expect("probe");
    // Nobody calls until 200 s: the probe timed out at 94 s, the key reopened until
    // 124 s and has been half-open since.
    let probe = key.admit(secs(200)).expect("probe");
    assert!(probe.is_probe());
    assert_eq!(
        key.log()[2..],
        [
            (HalfOpen, Open, secs(94), TransitionReason::ProbeTimedOut),
            (Open, HalfOpen, secs(124), TransitionReason::CooldownElapsed),
        ]
    );
}

#[test]
fn a_dropped_probe_frees_its_slot_without_counting() {
    let mut key = opened_at_4s(fixed_open());
    let probe = key.admit(secs(34)).expect("probe");
    key.release(probe, secs(35));
    assert_eq!(key.state.state(), HalfOpen);
    assert_eq!(key.state.probes_in_flight(), 0);
    assert!(key.admit(secs(35)).expect("next probe").is_probe());
}

#[test]
fn several_probes_must_succeed_when_configured() {
    let mut key = opened_at_4s(BreakerConfig {
        half_open_probes: 2,
        probe_successes_to_close: 2,
        ..fixed_open()
    });
    let a = key.admit(secs(34)).expect("probe a");
    let b = key.admit(secs(34)).expect("probe b");
    assert_eq!(key.admit(secs(34)).map(|_| ()).unwrap_err().state, HalfOpen);
    key.record(a, Outcome::Success, secs(35));
    assert_eq!(key.state.state(), HalfOpen);
    key.record(b, Outcome::Success, secs(36));
    assert_eq!(key.state.state(), Closed);
}

#[test]
fn an_ignored_probe_outcome_frees_the_slot_and_decides_nothing() {
    let mut key = opened_at_4s(fixed_open());
    let probe = key.admit(secs(34)).expect("probe");
    key.record(
        probe,
        Outcome::from_kind(FailureKind::InvalidRequest, None),
        secs(35),
    );
    assert_eq!(key.state.state(), HalfOpen);
    assert_eq!(key.state.probes_in_flight(), 0);
}

#[test]
fn a_hinted_429_opens_at_once_until_the_hinted_time() {
    let mut key = Key::new(fixed_open());
    key.call(
        rate_limited(secs(20), HintSource::RetryAfterSeconds),
        secs(3),
    );
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(23)));
    assert_eq!(
        key.log(),
        vec![(
            Closed,
            Open,
            secs(3),
            TransitionReason::DelayHint {
                delay: secs(20),
                source: HintSource::RetryAfterSeconds
            }
        )]
    );
}

#[test]
fn a_hinted_503_opens_at_once_and_gemini_retry_delay_counts_as_a_hint() {
    let mut key = Key::new(fixed_open());
    key.call(
        Outcome::Failure {
            kind: FailureKind::Overloaded,
            hint: Some(DelayHint::new(ms(45_837), HintSource::GeminiRetryDelay)),
        },
        secs(0),
    );
    assert_eq!(key.open_until(), Some(ms(45_837)));
}

#[test]
fn a_hint_under_one_second_is_left_to_the_retry_layer_and_counts_as_a_failure() {
    let mut key = Key::new(fixed_open());
    key.call(rate_limited(ms(999), HintSource::RetryAfterMs), secs(0));
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.consecutive_failures(), 1);
}

#[test]
fn a_rate_limit_reset_time_is_not_a_retry_instruction_and_does_not_open() {
    let mut key = Key::new(fixed_open());
    key.call(
        rate_limited(secs(360), HintSource::RateLimitResetTokens),
        secs(0),
    );
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.consecutive_failures(), 1);
}

#[test]
fn a_server_error_with_a_retry_after_only_counts() {
    let mut key = Key::new(fixed_open());
    key.call(
        Outcome::Failure {
            kind: FailureKind::ServerError,
            hint: Some(DelayHint::new(secs(60), HintSource::RetryAfterSeconds)),
        },
        secs(0),
    );
    assert_eq!(key.state.state(), Closed);
}

#[test]
fn an_absurd_retry_after_is_capped_at_ten_minutes() {
    let mut key = Key::new(fixed_open());
    key.call(
        rate_limited(secs(198_300), HintSource::RetryAfterSeconds),
        secs(1),
    );
    assert_eq!(key.open_until(), Some(secs(601)));
}

#[test]
fn the_tripping_failure_hint_wins_when_longer_than_the_open_duration() {
    let mut key = Key::new(BreakerConfig {
        hint_opens_at: secs(3600),
        ..fixed_open()
    });
    for i in 0..4 {
        key.call(server_error(), secs(i));
    }
    key.call(
        rate_limited(secs(45), HintSource::RetryAfterSeconds),
        secs(4),
    );
    assert_eq!(key.open_until(), Some(secs(49)));
    assert_eq!(
        key.state.last_reason(),
        Some(TransitionReason::ConsecutiveFailures { failures: 5 })
    );
}

#[test]
fn quota_exhausted_opens_for_ten_minutes() {
    let mut key = Key::new(fixed_open());
    key.call(Outcome::QuotaExhausted { hint: None }, secs(2));
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(602)));
    assert_eq!(
        key.log(),
        vec![(Closed, Open, secs(2), TransitionReason::QuotaExhausted)]
    );
}

#[test]
fn azure_daily_quota_hint_is_capped_like_any_other() {
    let mut key = Key::new(BreakerConfig {
        quota_cooldown: secs(60),
        ..fixed_open()
    });
    key.call(
        Outcome::QuotaExhausted {
            hint: Some(DelayHint::new(secs(86_400), HintSource::RetryAfterSeconds)),
        },
        secs(0),
    );
    assert_eq!(key.open_until(), Some(secs(600)));
}

#[test]
fn reopening_keeps_the_later_deadline() {
    let mut key = Key::new(fixed_open());
    // Several calls in flight while closed.
    let tickets: Vec<Ticket> = (0..3)
        .map(|_| key.admit(secs(0)).expect("closed"))
        .collect();
    key.record(
        tickets[0],
        rate_limited(secs(120), HintSource::RetryAfterSeconds),
        secs(1),
    );
    assert_eq!(key.open_until(), Some(secs(121)));
    // A shorter cooldown arriving later never shortens it.
    key.record(
        tickets[1],
        rate_limited(secs(10), HintSource::RetryAfterSeconds),
        secs(2),
    );
    assert_eq!(key.open_until(), Some(secs(121)));
    assert_eq!(key.transitions.len(), 1);
    // A longer one extends it.
    key.record(tickets[2], Outcome::QuotaExhausted { hint: None }, secs(3));
    assert_eq!(key.open_until(), Some(secs(603)));
    assert_eq!(
        key.log()[1],
        (Open, Open, secs(3), TransitionReason::QuotaExhausted)
    );
}

#[test]
fn a_late_result_from_before_the_key_opened_does_not_count() {
    let mut key = Key::new(fixed_open());
    let early = key.admit(secs(0)).expect("closed");
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.state.state(), Open);
    // Its success neither closes the key nor counts once it has closed again.
    key.record(early, Outcome::Success, secs(5));
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(34)));
}

#[test]
fn a_late_hinted_429_from_before_the_key_opened_reopens_it() {
    let mut key = Key::new(fixed_open());
    // Admitted while closed; its answer arrives only once the key is half-open.
    let slow = key.admit(secs(0)).expect("closed");
    for i in 0..5 {
        key.call(server_error(), secs(i));
    }
    assert_eq!(key.admit(secs(34)).map(|t| t.is_probe()), Ok(true));
    key.record(
        slow,
        rate_limited(secs(90), HintSource::RetryAfterSeconds),
        secs(36),
    );
    assert_eq!(key.state.state(), Open);
    assert_eq!(key.open_until(), Some(secs(126)));
}

#[test]
fn client_errors_and_local_refusals_never_count() {
    let mut key = Key::new(fixed_open());
    for (i, kind) in [
        FailureKind::InvalidRequest,
        FailureKind::ContentFiltered,
        FailureKind::ContextLengthExceeded,
        FailureKind::BreakerOpen,
        FailureKind::BudgetExhausted,
        FailureKind::Throttled,
        FailureKind::AuthFailed,
        FailureKind::ModelNotFound,
    ]
    .into_iter()
    .cycle()
    .take(40)
    .enumerate()
    {
        key.call(Outcome::from_kind(kind, None), ms(i as u64));
    }
    assert_eq!(key.state.state(), Closed);
    assert_eq!(key.state.consecutive_failures(), 0);
    assert_eq!(key.state.window_counts(key.at(secs(1))), (0, 0));
}

fn overloaded() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::Overloaded,
        hint: None,
    }
}

/// Whether a refusal tells the fallback layer it may wait: only when the upstream
/// directed the cooldown (its hint, its 429s/503s), never for breakage the breaker
/// counted itself.
#[test]
fn a_refusal_says_whether_the_upstream_directed_the_wait() {
    // Five 500s: the breaker's own evidence. Open and then half-open refusals say no.
    let mut broken = opened_at_4s(fixed_open());
    assert_eq!(
        broken.admit(secs(5)).map(|_| ()),
        Err(Rejection {
            state: Open,
            upstream_directed: false,
            retry_in: secs(29)
        })
    );
    let probe = broken.admit(secs(34)).expect("probe");
    assert!(!broken.admit(secs(34)).unwrap_err().upstream_directed);
    // The probe fails with a 503: the upstream now asks for fewer calls.
    broken.record(probe, overloaded(), secs(35));
    assert!(broken.admit(secs(36)).unwrap_err().upstream_directed);

    // Five 503s "overloaded": the upstream asked for fewer calls.
    let mut overloaded_key = Key::new(fixed_open());
    for i in 0..5 {
        overloaded_key.call(overloaded(), secs(i));
    }
    assert_eq!(overloaded_key.state.state(), Open);
    assert!(overloaded_key.admit(secs(5)).unwrap_err().upstream_directed);

    // One 429 with Retry-After: 10 opens the key on the provider's word.
    let mut hinted = Key::new(fixed_open());
    hinted.call(
        rate_limited(secs(10), HintSource::RetryAfterSeconds),
        secs(0),
    );
    assert_eq!(
        hinted.admit(secs(1)).map(|_| ()),
        Err(Rejection {
            state: Open,
            upstream_directed: true,
            retry_in: secs(9)
        })
    );
    // A probe that then hangs to its timeout is the breaker's own evidence again.
    let _hung = hinted.admit(secs(10)).expect("probe");
    assert!(!hinted.admit(secs(70)).unwrap_err().upstream_directed);
}
