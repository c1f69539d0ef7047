//! The retry layer against a scripted fake provider, in virtual time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backstop_classify::{
    AttemptLog, Classification, ClassifiedError, Deadline, Failure, FailureKind, RetryBudget,
    RetryBudgetHandle, Retryable, StopReason,
};
use backstop_retry::{
    Backoff, HintJitter, Jitter, RetryConfig, RetryError, RetryLayer, StandardPolicy,
};
use common::{Fake, Step, read_body, request, secs};
use http::StatusCode;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

fn log_of<B>(response: &http::Response<B>) -> &AttemptLog {
    response
        .extensions()
        .get::<AttemptLog>()
        .expect("attempt log")
}

/// The waits a seeded layer draws for `n` retries: the layer derives one generator per
/// request from its seeded source and calls the backoff once per decision.
fn seeded_waits(seed: u64, backoff: Backoff, n: u32) -> Vec<Duration> {
    let mut layer_rng = SmallRng::seed_from_u64(seed);
    let mut rng = SmallRng::from_rng(&mut layer_rng);
    let mut previous = None;
    (1..=n)
        .map(|retry| {
            let d = backoff.delay(retry, previous, &mut rng);
            // The layer rounds waits up to whole milliseconds (the timer's tick).
            let d = Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64);
            previous = Some(d);
            d
        })
        .collect()
}

/// Attempt start times from the waits between them (the fake answers at once).
fn starts_from(waits: &[Duration]) -> Vec<Duration> {
    let mut at = Duration::ZERO;
    let mut starts = vec![at];
    for w in waits {
        at += *w;
        starts.push(at);
    }
    starts
}

#[tokio::test(start_paused = true)]
async fn batch_preset_waits_two_four_eight_then_returns_the_last_500() {
    let fake = Fake::new((0..4).map(|_| Step::status(500)).collect());
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(fake.attempts(), 4);
    assert_eq!(
        fake.starts(start),
        [0.0, 2.0, 4.0 + 2.0, 8.0 + 6.0].map(secs)
    );
    let log = log_of(&response);
    assert_eq!(log.stop, Some(StopReason::MaxAttempts));
    let waited: Vec<_> = log.attempts.iter().map(|a| a.waited).collect();
    assert_eq!(waited, [0.0, 2.0, 4.0, 8.0].map(secs));
    assert_eq!(start.elapsed(), secs(14.0));
    // The provider's body reaches the caller unchanged.
    let (bytes, error) = read_body(response.into_body()).await;
    assert_eq!(bytes, b"{\"error\":{}}");
    assert!(error.is_none());
}

#[tokio::test(start_paused = true)]
async fn interactive_preset_draws_equal_jitter_from_the_seed() {
    let fake = Fake::new((0..3).map(|_| Step::status(503)).collect());
    let config = RetryConfig::interactive();
    let svc = RetryLayer::new(config.clone())
        .with_rng_seed(7)
        .layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(fake.attempts(), 3);
    let expected = seeded_waits(7, *config.backoff(), 2);
    // Equal jitter: each wait in [t/2, t] of 0.5 s, 1 s.
    assert!(expected[0] >= secs(0.25) && expected[0] <= secs(0.5));
    assert!(expected[1] >= secs(0.5) && expected[1] <= secs(1.0));
    assert_eq!(fake.starts(start), starts_from(&expected));
    assert_eq!(log_of(&response).stop, Some(StopReason::MaxAttempts));
}

#[tokio::test(start_paused = true)]
async fn every_jitter_kind_gives_the_seeded_wait_sequence() {
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        let backoff = Backoff::new(secs(1.0), 2.0, secs(10.0))
            .unwrap()
            .with_jitter(jitter);
        let config = RetryConfig::interactive()
            .with_backoff(backoff)
            .with_max_attempts(5)
            .unwrap();
        let fake = Fake::new((0..5).map(|_| Step::status(500)).collect());
        let svc = RetryLayer::new(config)
            .with_rng_seed(99)
            .layer(fake.clone());
        let start = Instant::now();
        svc.oneshot(request("{}")).await.unwrap();
        let expected = seeded_waits(99, backoff, 4);
        assert_eq!(fake.starts(start), starts_from(&expected), "{jitter:?}");
        if jitter == Jitter::None {
            assert_eq!(expected, [1.0, 2.0, 4.0, 8.0].map(secs));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_non_retryable_kind_is_attempted_exactly_once() {
    let kinds: Vec<_> = FailureKind::ALL
        .into_iter()
        .filter(|k| k.default_retryable() == Retryable::No)
        .collect();
    assert!(kinds.contains(&FailureKind::QuotaExhausted));
    for kind in kinds {
        let fake = Fake::new(vec![Step::failure(400, Failure::new(kind)), Step::ok("{}")]);
        let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
        let start = Instant::now();
        let response = svc.oneshot(request("{}")).await.unwrap();
        assert_eq!(fake.attempts(), 1, "{kind}");
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(log_of(&response).stop, Some(StopReason::NotRetryable));
        let classification = response.extensions().get::<Classification>().unwrap();
        assert_eq!(classification.failure().unwrap().kind, kind);
    }
}

#[tokio::test(start_paused = true)]
async fn quota_429_is_never_retried() {
    let fake = Fake::new(vec![Step::failure(
        429,
        Failure::new(FailureKind::QuotaExhausted),
    )]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_exactly_without_hint_jitter() {
    let fake = Fake::new(vec![Step::rate_limited(secs(3.0)), Step::ok("{\"ok\":1}")]);
    let config = RetryConfig::batch().with_hint_jitter(HintJitter::none());
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.starts(start), [0.0, 3.0].map(secs));
    let log = log_of(&response);
    assert_eq!(log.stop, Some(StopReason::Succeeded));
    assert_eq!(log.attempts[1].waited, secs(3.0));
    assert_eq!(log.attempts[1].hint_used.unwrap().delay, secs(3.0));
    assert_eq!(
        log.attempts[0].provider_request_id.as_ref().unwrap(),
        "req_failed"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_gets_at_most_ten_percent_of_jitter_on_top() {
    let fake = Fake::new(vec![Step::rate_limited(secs(2.0)), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::batch())
        .with_rng_seed(1)
        .layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    let second = fake.starts(start)[1];
    // The documented bound: the hint, plus at most 10 % of it; and some jitter was
    // applied.
    assert!(second > secs(2.0) && second <= secs(2.2), "{second:?}");
    // Seed 1's first draw is 0.8711, so the extra is 0.8711 × 200 ms = 174.219 ms,
    // rounded up to tokio's whole milliseconds: 175 ms. The wait recorded is the one
    // that happened.
    assert_eq!(second, Duration::from_millis(2175));
    let log = log_of(&response);
    assert_eq!(log.attempts[1].waited, Duration::from_millis(2175));
    assert_eq!(log.attempts[1].hint_used.unwrap().delay, secs(2.0));
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_max_hint_gives_up_immediately_with_the_providers_response() {
    // The SDK that slept on `retry-after: 198300`.
    let fake = Fake::new(vec![Step::rate_limited(secs(198_300.0)), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::interactive()).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(fake.attempts(), 1);
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(log_of(&response).stop, Some(StopReason::HintTooLong));
    // The hint is preserved for the caller or the fallback layer.
    let failure = response
        .extensions()
        .get::<Classification>()
        .unwrap()
        .failure()
        .unwrap()
        .clone();
    assert_eq!(failure.hint.unwrap().delay, secs(198_300.0));
    let (bytes, _) = read_body(response.into_body()).await;
    assert_eq!(bytes, b"{\"error\":{\"type\":\"scripted\"}}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_deadline_gives_up_immediately() {
    let fake = Fake::new(vec![Step::rate_limited(secs(45.0)), Step::ok("{}")]);
    let config = RetryConfig::interactive()
        .with_deadline(Some(secs(30.0)))
        .unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(fake.attempts(), 1);
    assert_eq!(log_of(&response).stop, Some(StopReason::HintTooLong));
}

#[tokio::test(start_paused = true)]
async fn backoff_that_would_cross_the_deadline_stops_without_sleeping() {
    // Batch: waits 2, 4, 8; attempts take 5 s each; deadline 20 s. After attempt 2
    // (ends at 12 s) the 4 s wait fits (16 < 20); attempt 3 ends at 21 s: past the
    // deadline it is cut at 20 s by the deadline-bounded attempt timeout.
    let fake = Fake::new(
        (0..4)
            .map(|_| Step::Delay(secs(5.0), Box::new(Step::status(502))))
            .collect(),
    );
    let config = RetryConfig::batch()
        .with_deadline(Some(secs(20.0)))
        .unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let result = svc.oneshot(request("{}")).await;
    assert_eq!(fake.starts(start), [0.0, 7.0, 16.0].map(secs));
    assert_eq!(start.elapsed(), secs(20.0));
    let error = result.unwrap_err();
    assert_eq!(error.kind(), FailureKind::TimedOut);
    assert_eq!(error.attempt_log().unwrap().attempts.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn next_wait_crossing_the_deadline_returns_the_last_response_at_once() {
    let fake = Fake::new(
        (0..4)
            .map(|_| Step::Delay(secs(1.0), Box::new(Step::status(500))))
            .collect(),
    );
    // Attempt 1 ends at 1 s, waits 2 s; attempt 2 ends at 4 s; a 4 s wait would end
    // at 8 s, past the 7 s deadline: stop at 4 s with the second 500.
    let config = RetryConfig::batch().with_deadline(Some(secs(7.0))).unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(start.elapsed(), secs(4.0));
    assert_eq!(fake.attempts(), 2);
    assert_eq!(log_of(&response).stop, Some(StopReason::Deadline));
}

/// The `backoff_that_would_cross_the_deadline_stops_without_sleeping` scenario with
/// a minimum time left: the third attempt would start at 16 s with 4 s to go, and
/// take 5 s; with at least 5 s required it is not made, and the second 502 comes
/// back at once (12 s) instead of a timeout at 20 s.
#[tokio::test(start_paused = true)]
async fn a_retry_with_less_than_the_minimum_time_left_is_not_made() {
    for (min_left, starts, elapsed, stop) in [
        // 4 s left at 16 s: enough for a 4 s minimum (the boundary), so it is made
        // and cut by the deadline as without one.
        (4.0, vec![0.0, 7.0, 16.0], 20.0, None),
        (5.0, vec![0.0, 7.0], 12.0, Some(StopReason::Deadline)),
        // At 5 s the first 2 s wait leaves 13 s: made; at 14 s required, not.
        (14.0, vec![0.0], 5.0, Some(StopReason::Deadline)),
    ] {
        let fake = Fake::new(
            (0..4)
                .map(|_| Step::Delay(secs(5.0), Box::new(Step::status(502))))
                .collect(),
        );
        let config = RetryConfig::batch()
            .with_deadline(Some(secs(20.0)))
            .unwrap()
            .with_min_attempt_time(secs(min_left))
            .unwrap();
        let svc = RetryLayer::new(config).layer(fake.clone());
        let start = Instant::now();
        let result = svc.oneshot(request("{}")).await;
        assert_eq!(
            fake.starts(start),
            starts.iter().copied().map(secs).collect::<Vec<_>>(),
            "min {min_left}"
        );
        assert_eq!(start.elapsed(), secs(elapsed), "min {min_left}");
        match stop {
            // The provider's own last answer, at once.
            Some(reason) => {
                let response = result.unwrap();
                assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
                assert_eq!(log_of(&response).stop, Some(reason));
                assert_eq!(log_of(&response).attempts.len(), starts.len());
            }
            None => assert_eq!(result.unwrap_err().kind(), FailureKind::TimedOut),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hint_that_leaves_less_than_the_minimum_gives_up_at_once_with_the_hint() {
    // A 3 s Retry-After with 10 s to go: waited out without a minimum; with 8 s
    // required (3 + 8 > 10) the 429 goes back at once, hint kept, for the fallback.
    for (min_left, attempts, stop) in [
        (None, 2, StopReason::Succeeded),
        (Some(8.0), 1, StopReason::HintTooLong),
    ] {
        let fake = Fake::new(vec![Step::rate_limited(secs(3.0)), Step::ok("{}")]);
        let mut config = RetryConfig::interactive()
            .with_deadline(Some(secs(10.0)))
            .unwrap()
            .with_hint_jitter(HintJitter::none());
        if let Some(min) = min_left {
            config = config.with_min_attempt_time(secs(min)).unwrap();
        }
        let svc = RetryLayer::new(config).layer(fake.clone());
        let response = svc.oneshot(request("{}")).await.unwrap();
        assert_eq!(fake.attempts(), attempts, "min {min_left:?}");
        let log = log_of(&response);
        assert_eq!(log.stop, Some(stop), "min {min_left:?}");
        if stop == StopReason::HintTooLong {
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            let failure = log.attempts[0].classification.failure().unwrap();
            assert_eq!(failure.hint.map(|h| h.delay), Some(secs(3.0)));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_minimum_applies_to_a_deadline_from_the_request_too() {
    let fake = Fake::new((0..4).map(|_| Step::status(500)).collect());
    let config = RetryConfig::batch()
        .with_deadline(None)
        .unwrap()
        .with_min_attempt_time(secs(3.5))
        .unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let mut req = request("{}");
    req.extensions_mut().insert(Deadline(start + secs(5.0)));
    let response = svc.oneshot(req).await.unwrap();
    // The 2 s wait would leave 3 s, under 3.5 s: no retry, the 500 at once.
    assert_eq!(fake.attempts(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(log_of(&response).stop, Some(StopReason::Deadline));
}

#[tokio::test(start_paused = true)]
async fn an_absurd_minimum_never_panics_and_applies_only_with_a_deadline() {
    // No deadline of its own, so `Duration::MAX` is a valid setting.
    let config = RetryConfig::interactive()
        .with_min_attempt_time(Duration::MAX)
        .unwrap();
    for with_deadline in [true, false] {
        let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
        let svc = RetryLayer::new(config.clone()).layer(fake.clone());
        let mut req = request("{}");
        if with_deadline {
            req.extensions_mut()
                .insert(Deadline(Instant::now() + secs(5.0)));
        }
        let response = svc.oneshot(req).await.unwrap();
        let (attempts, stop) = if with_deadline {
            (1, StopReason::Deadline)
        } else {
            (2, StopReason::Succeeded)
        };
        assert_eq!(fake.attempts(), attempts, "deadline {with_deadline}");
        assert_eq!(log_of(&response).stop, Some(stop));
    }
}

#[test]
fn a_minimum_not_below_the_deadline_is_refused() {
    let config = RetryConfig::batch(); // 60 s deadline
    for min in [60.0, 61.0] {
        assert!(matches!(
            config.clone().with_min_attempt_time(secs(min)),
            Err(backstop_retry::ConfigError::MinAttemptTimeNotBelowDeadline { .. })
        ));
    }
    let ok = config.with_min_attempt_time(secs(59.0)).unwrap();
    assert_eq!(ok.min_attempt_time(), secs(59.0));
    // In either order: a deadline set later is checked against the minimum.
    assert!(matches!(
        ok.clone().with_deadline(Some(secs(30.0))),
        Err(backstop_retry::ConfigError::MinAttemptTimeNotBelowDeadline { .. })
    ));
    assert!(ok.with_deadline(None).is_ok());
    assert_eq!(
        RetryConfig::interactive().min_attempt_time(),
        Duration::ZERO
    );
    assert_eq!(RetryConfig::batch().min_attempt_time(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_from_the_request_is_respected_when_sooner() {
    let fake = Fake::new((0..4).map(|_| Step::status(500)).collect());
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let start = Instant::now();
    let mut req = request("{}");
    req.extensions_mut().insert(Deadline(start + secs(5.0)));
    let response = svc.oneshot(req).await.unwrap();
    // Waits 2 (ok: 2 < 5) then 4 (2 + 4 = 6 > 5: stop).
    assert_eq!(fake.attempts(), 2);
    assert_eq!(start.elapsed(), secs(2.0));
    assert_eq!(log_of(&response).stop, Some(StopReason::Deadline));
}

#[tokio::test(start_paused = true)]
async fn timeout_after_send_is_not_retried_without_an_idempotency_key() {
    let fake = Fake::new(vec![Step::Fail(FailureKind::TimedOut), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let error = svc.oneshot(request("{}")).await.unwrap_err();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(error.kind(), FailureKind::TimedOut);
    assert_eq!(
        error.attempt_log().unwrap().stop,
        Some(StopReason::NotRetryable)
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_after_send_is_retried_with_the_callers_idempotency_key_kept() {
    let fake = Fake::new(vec![
        Step::Fail(FailureKind::ConnectionLost),
        Step::ok("{}"),
    ]);
    let svc = RetryLayer::new(RetryConfig::batch().with_idempotency_key(true)).layer(fake.clone());
    let mut req = request("{}");
    req.headers_mut()
        .insert("idempotency-key", "caller-key-1".parse().unwrap());
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for s in seen.iter() {
        assert_eq!(s.headers["idempotency-key"], "caller-key-1");
    }
}

#[tokio::test(start_paused = true)]
async fn layer_adds_one_stable_idempotency_key_across_attempts() {
    let fake = Fake::new(vec![
        Step::Fail(FailureKind::TimedOut),
        Step::Fail(FailureKind::TimedOut),
        Step::ok("{}"),
    ]);
    let svc = RetryLayer::new(RetryConfig::batch().with_idempotency_key(true))
        .with_rng_seed(3)
        .layer(fake.clone());
    svc.oneshot(request("{}")).await.unwrap();
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    let key = seen[0].headers["idempotency-key"].clone();
    assert!(key.to_str().unwrap().starts_with("backstop-"));
    assert!(seen.iter().all(|s| s.headers["idempotency-key"] == key));
}

#[tokio::test(start_paused = true)]
async fn connect_failures_are_always_retried() {
    let fake = Fake::new(vec![
        Step::Fail(FailureKind::ConnectFailed),
        Step::Fail(FailureKind::ConnectFailed),
        Step::ok("{}"),
    ]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_cuts_a_hanging_attempt_and_retries_only_idempotent_requests() {
    let config = RetryConfig::batch()
        .with_attempt_timeout(Some(secs(10.0)))
        .unwrap();
    let fake = Fake::new(vec![Step::Hang, Step::ok("{}")]);
    let svc = RetryLayer::new(config.clone()).layer(fake.clone());
    let start = Instant::now();
    let error = svc.oneshot(request("{}")).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(10.0));
    assert_eq!(fake.attempts(), 1);
    assert_eq!(error.kind(), FailureKind::TimedOut);
    let cause = error.cause().unwrap().downcast_ref::<RetryError>().unwrap();
    assert_eq!(cause, &RetryError::AttemptTimedOut { after: secs(10.0) });

    let fake = Fake::new(vec![Step::Hang, Step::ok("{}")]);
    let svc = RetryLayer::new(config).layer(fake.clone());
    let mut req = request("{}");
    req.extensions_mut().insert(backstop_classify::Idempotent);
    let start = Instant::now();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.starts(start), [0.0, 12.0].map(secs));
}

#[tokio::test(start_paused = true)]
async fn attempt_number_header_counts_attempts() {
    let fake = Fake::new(vec![Step::status(500), Step::status(500), Step::ok("{}")]);
    let config = RetryConfig::batch()
        .with_attempt_header(Some(http::HeaderName::from_static("x-backstop-attempt")));
    let svc = RetryLayer::new(config).layer(fake.clone());
    svc.oneshot(request("{}")).await.unwrap();
    let numbers: Vec<_> = fake
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.headers["x-backstop-attempt"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(numbers, ["1", "2", "3"]);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_carries_the_same_body_bytes() {
    let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    svc.oneshot(request("{\"model\":\"gpt-4o\"}"))
        .await
        .unwrap();
    let seen = fake.seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|s| &s.body[..] == b"{\"model\":\"gpt-4o\"}")
    );
    // The same allocation, not a copy.
    assert_eq!(seen[0].body.as_ptr(), seen[1].body.as_ptr());
}

#[tokio::test(start_paused = true)]
async fn success_carries_a_one_attempt_log() {
    let fake = Fake::new(vec![Step::ok("{\"id\":1}")]);
    let svc = RetryLayer::new(RetryConfig::interactive()).layer(fake.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    let log = log_of(&response);
    assert_eq!(log.attempts.len(), 1);
    assert_eq!(log.stop, Some(StopReason::Succeeded));
    assert_eq!(log.attempts[0].status, Some(StatusCode::OK));
    assert_eq!(
        log.attempts[0].provider_request_id.as_ref().unwrap(),
        "req_ok"
    );
    let (bytes, _) = read_body(response.into_body()).await;
    assert_eq!(bytes, b"{\"id\":1}");
}

/// A budget with a fixed number of retries.
struct Tokens(AtomicU32);

impl RetryBudget for Tokens {
    fn try_withdraw(&self) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[tokio::test(start_paused = true)]
async fn budget_refusal_returns_the_last_response_with_its_classification() {
    let fake = Fake::new((0..4).map(|_| Step::status(503)).collect());
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let budget = Arc::new(Tokens(AtomicU32::new(1)));
    let mut req = request("{}");
    req.extensions_mut()
        .insert(RetryBudgetHandle(budget.clone()));
    let start = Instant::now();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(fake.attempts(), 2);
    assert_eq!(start.elapsed(), secs(2.0));
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(log_of(&response).stop, Some(StopReason::BudgetExhausted));
    let kind = response
        .extensions()
        .get::<Classification>()
        .unwrap()
        .failure()
        .unwrap()
        .kind;
    assert_eq!(kind, FailureKind::Overloaded);
}

#[tokio::test(start_paused = true)]
async fn budget_is_not_asked_for_non_retryable_failures() {
    let fake = Fake::new(vec![Step::status(401)]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let budget = Arc::new(Tokens(AtomicU32::new(5)));
    let mut req = request("{}");
    req.extensions_mut()
        .insert(RetryBudgetHandle(budget.clone()));
    svc.oneshot(req).await.unwrap();
    assert_eq!(budget.0.load(Ordering::SeqCst), 5);
}

/// A budget that allows every retry and counts the withdrawals and the refunds.
#[derive(Default)]
struct Ledger {
    withdrawn: AtomicU32,
    refunded: AtomicU32,
}

impl Ledger {
    /// Withdrawals made, and how many of them were given back.
    fn counts(&self) -> (u32, u32) {
        (
            self.withdrawn.load(Ordering::SeqCst),
            self.refunded.load(Ordering::SeqCst),
        )
    }

    /// A request carrying this budget.
    fn request(self: &Arc<Self>) -> http::Request<backstop_classify::ReplayBody> {
        let mut req = request("{}");
        req.extensions_mut().insert(RetryBudgetHandle(self.clone()));
        req
    }
}

impl RetryBudget for Ledger {
    fn try_withdraw(&self) -> bool {
        self.withdrawn.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn refund(&self) {
        self.refunded.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn retries_that_are_sent_keep_their_withdrawals() {
    let fake = Fake::new(vec![Step::status(500), Step::status(503), Step::ok("{}")]);
    let ledger = Arc::new(Ledger::default());
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let response = svc.oneshot(ledger.request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.attempts(), 3);
    assert_eq!(ledger.counts(), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_during_a_wait_makes_no_further_attempt() {
    let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
    let ledger = Arc::new(Ledger::default());
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let mut call = Box::pin(svc.oneshot(ledger.request()));
    let outcome = tokio::time::timeout(secs(1.0), call.as_mut()).await;
    assert!(outcome.is_err(), "still waiting its 2 s backoff");
    assert_eq!(ledger.counts(), (1, 0), "drawn for the retry it waits for");
    drop(call);
    // The retry that will not be made gives its withdrawal back.
    assert_eq!(ledger.counts(), (1, 1));
    tokio::time::sleep(secs(60.0)).await;
    assert_eq!(fake.attempts(), 1);
}

/// A replacement policy that ignores every limit: always "one more, in 1 s".
struct Always;

impl backstop_retry::RetryPolicy for Always {
    fn decide(
        &self,
        _: &backstop_retry::FailedAttempt<'_>,
        _: &mut dyn rand::RngCore,
    ) -> backstop_retry::Decision {
        backstop_retry::Decision::RetryAfter(secs(1.0), None)
    }
}

#[tokio::test(start_paused = true)]
async fn a_replaced_policy_decides_but_the_layer_caps_attempts() {
    let fake = Fake::new((0..10).map(|_| Step::status(400)).collect());
    let config = RetryConfig::batch().with_max_attempts(3).unwrap();
    let svc = RetryLayer::new(config)
        .with_policy(Always)
        .layer(fake.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(fake.attempts(), 3);
    assert_eq!(log_of(&response).stop, Some(StopReason::MaxAttempts));
    // The standard policy is still available as a value.
    let _ = StandardPolicy::from_config(&RetryConfig::batch());
}

#[tokio::test(start_paused = true)]
async fn a_replaced_policy_cannot_start_a_retry_inside_the_minimum() {
    let fake = Fake::new((0..10).map(|_| Step::status(500)).collect());
    let config = RetryConfig::batch()
        .with_max_attempts(10)
        .unwrap()
        .with_deadline(Some(secs(10.0)))
        .unwrap()
        .with_min_attempt_time(secs(6.5))
        .unwrap();
    let svc = RetryLayer::new(config)
        .with_policy(Always)
        .layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    // Retries at 1, 2 and 3 s leave 9, 8 and 7 s; one at 4 s would leave 6 s.
    assert_eq!(fake.starts(start), [0.0, 1.0, 2.0, 3.0].map(secs));
    assert_eq!(start.elapsed(), secs(3.0));
    assert_eq!(log_of(&response).stop, Some(StopReason::Deadline));
}

#[tokio::test(start_paused = true)]
async fn classified_error_from_inner_keeps_its_verdict_and_gets_the_log() {
    let fake = Fake::new(vec![Step::Fail(FailureKind::AuthFailed)]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let error: ClassifiedError = svc.oneshot(request("{}")).await.unwrap_err();
    assert_eq!(error.kind(), FailureKind::AuthFailed);
    let log = error.attempt_log().unwrap();
    assert_eq!(log.attempts.len(), 1);
    assert!(!format!("{error} {error:?}").contains("sk-secret"));
}

fn with_headers(code: u16, headers: Vec<(&'static str, &'static str)>) -> Step {
    Step::Respond {
        status: StatusCode::from_u16(code).unwrap(),
        headers,
        classification: None,
        body: common::ScriptBody::full("{}"),
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_classify_layer_retry_after_headers_are_still_honoured() {
    let fake = Fake::new(vec![
        with_headers(429, vec![("retry-after", "3")]),
        Step::ok("{}"),
    ]);
    let config = RetryConfig::batch().with_hint_jitter(HintJitter::none());
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(fake.starts(start), [0.0, 3.0].map(secs));
    let log = log_of(&response);
    let first = log.attempts[0].classification.failure().unwrap();
    assert_eq!(first.kind, FailureKind::RateLimited);
}

#[tokio::test(start_paused = true)]
async fn malformed_hints_fall_back_to_backoff() {
    for value in ["soon", "-1", "0", "inf", "1e35"] {
        let fake = Fake::new(vec![
            with_headers(429, vec![("retry-after", value)]),
            Step::ok("{}"),
        ]);
        let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
        let start = Instant::now();
        let response = svc.oneshot(request("{}")).await.unwrap();
        assert_eq!(
            fake.starts(start),
            [0.0, 2.0].map(secs),
            "retry-after: {value}"
        );
        assert_eq!(log_of(&response).attempts[1].hint_used, None);
    }
}

// The wrappers below change only the readiness of the scripted service.
type FakeRequest = http::Request<backstop_classify::ReplayBody>;
type FakeResponse = <Fake as tower::Service<FakeRequest>>::Response;
type FakeFuture = <Fake as tower::Service<FakeRequest>>::Future;

/// Pending on its first `poll_ready` after every call, then ready; counts calls made
/// on an instance that was not driven to ready. A clone starts not ready.
struct Picky {
    inner: Fake,
    ready: bool,
    pending_once: bool,
    polls: Arc<AtomicU32>,
    unready_calls: Arc<AtomicU32>,
}

impl Clone for Picky {
    fn clone(&self) -> Self {
        Picky {
            inner: self.inner.clone(),
            ready: false,
            pending_once: true,
            polls: self.polls.clone(),
            unready_calls: self.unready_calls.clone(),
        }
    }
}

impl tower::Service<FakeRequest> for Picky {
    type Response = FakeResponse;
    type Error = backstop_classify::BoxError;
    type Future = FakeFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if !self.ready {
            if self.pending_once {
                self.pending_once = false;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            self.ready = true;
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: FakeRequest) -> Self::Future {
        if !self.ready {
            self.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.ready = false;
        self.pending_once = true;
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn the_inner_service_is_driven_to_ready_before_every_attempt() {
    let fake = Fake::new(vec![Step::status(500), Step::status(500), Step::ok("{}")]);
    let picky = Picky {
        inner: fake.clone(),
        ready: false,
        pending_once: true,
        polls: Arc::new(AtomicU32::new(0)),
        unready_calls: Arc::new(AtomicU32::new(0)),
    };
    let svc = RetryLayer::new(RetryConfig::batch()).layer(picky.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.attempts(), 3);
    assert_eq!(picky.unready_calls.load(Ordering::SeqCst), 0);
    // Pending then Ready, before each of the three attempts.
    assert_eq!(picky.polls.load(Ordering::SeqCst), 6);
}

/// Ready at once for the first call, then only `delay` after each call.
struct SlowToReady {
    inner: Fake,
    delay: Duration,
    ready_at: Option<Instant>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Clone for SlowToReady {
    fn clone(&self) -> Self {
        SlowToReady {
            inner: self.inner.clone(),
            delay: self.delay,
            ready_at: self.ready_at,
            sleep: None,
        }
    }
}

impl tower::Service<FakeRequest> for SlowToReady {
    type Response = FakeResponse;
    type Error = backstop_classify::BoxError;
    type Future = FakeFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        use std::future::Future;
        if let Some(at) = self.ready_at {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            std::task::ready!(sleep.as_mut().poll(cx));
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: FakeRequest) -> Self::Future {
        self.ready_at = Some(Instant::now() + self.delay);
        self.sleep = None;
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn readiness_for_a_retry_is_awaited_only_until_the_latest_start() {
    // The 500 at 0 s, a 2 s wait, then the service is ready at 6 s. With a 10 s
    // deadline the retry goes at 6 s; with 5 s required it must start by 5 s, so the
    // wait for readiness ends there with a typed error.
    for (min_left, starts, outcome) in [
        (0.0, vec![0.0, 6.0], Ok(StatusCode::OK)),
        (5.0, vec![0.0], Err(5.0)),
    ] {
        let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
        let svc = SlowToReady {
            inner: fake.clone(),
            delay: secs(6.0),
            ready_at: None,
            sleep: None,
        };
        let config = RetryConfig::batch()
            .with_deadline(Some(secs(10.0)))
            .unwrap()
            .with_min_attempt_time(secs(min_left))
            .unwrap();
        let start = Instant::now();
        let ledger = Arc::new(Ledger::default());
        let result = RetryLayer::new(config)
            .layer(svc)
            .oneshot(ledger.request())
            .await;
        assert_eq!(
            fake.starts(start),
            starts.iter().copied().map(secs).collect::<Vec<_>>()
        );
        // The retry was drawn at the 500; given back when it was not sent.
        let refunded = u32::from(outcome.is_err());
        assert_eq!(ledger.counts(), (1, refunded), "min {min_left}");
        match outcome {
            Ok(status) => assert_eq!(result.unwrap().status(), status),
            Err(at) => {
                assert_eq!(start.elapsed(), secs(at));
                let error = result.unwrap_err();
                assert!(matches!(
                    error.cause().and_then(|c| c.downcast_ref::<RetryError>()),
                    Some(RetryError::NotReadyBeforeDeadline)
                ));
                assert_eq!(
                    error.attempt_log().unwrap().stop,
                    Some(StopReason::Deadline)
                );
            }
        }
    }
}

/// Ready for the first call; after it, its readiness fails (a pool that closed).
#[derive(Clone)]
struct ClosesAfterOneCall {
    inner: Fake,
    called: bool,
}

impl tower::Service<FakeRequest> for ClosesAfterOneCall {
    type Response = FakeResponse;
    type Error = backstop_classify::BoxError;
    type Future = FakeFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(match self.called {
            false => Ok(()),
            true => Err("connection pool closed".into()),
        })
    }

    fn call(&mut self, request: FakeRequest) -> Self::Future {
        self.called = true;
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_whose_service_fails_readiness_is_not_sent_and_gives_its_withdrawal_back() {
    let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
    let ledger = Arc::new(Ledger::default());
    let svc = ClosesAfterOneCall {
        inner: fake.clone(),
        called: false,
    };
    // The layer keeps the service that made the first attempt for the retry.
    let error = RetryLayer::new(RetryConfig::batch())
        .layer(svc)
        .oneshot(ledger.request())
        .await
        .unwrap_err();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(
        error.attempt_log().unwrap().stop,
        Some(StopReason::NotRetryable)
    );
    assert_eq!(ledger.counts(), (1, 1));
}

mod deadline_property {
    use super::*;
    use proptest::prelude::*;

    fn jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn no_attempt_starts_and_no_sleep_runs_past_the_deadline_nor_a_retry_inside_its_minimum(
            max_attempts in 1u32..8,
            base_ms in 1u64..5_000,
            multiplier in 1.0f64..4.0,
            cap_extra_ms in 0u64..30_000,
            jitter in jitter(),
            deadline_ms in 1u64..60_000,
            timeout_share in proptest::option::of(0.05f64..1.0),
            latencies_ms in proptest::collection::vec(0u64..20_000, 8),
            hints_ms in proptest::collection::vec(proptest::option::of(1u64..200_000), 8),
            min_share in proptest::option::of(0.0f64..0.9),
            seed in any::<u64>(),
        ) {
            let deadline = Duration::from_millis(deadline_ms);
            let backoff = Backoff::new(
                Duration::from_millis(base_ms),
                multiplier,
                Duration::from_millis(base_ms + cap_extra_ms),
            )
            .unwrap()
            .with_jitter(jitter);
            let config = RetryConfig::interactive()
                .with_backoff(backoff)
                .with_max_attempts(max_attempts)
                .unwrap()
                .with_deadline(Some(deadline))
                .unwrap()
                .with_attempt_timeout(timeout_share.map(|s| deadline.mul_f64(s).max(Duration::from_millis(1))))
                .unwrap()
                .with_min_attempt_time(min_share.map_or(Duration::ZERO, |s| deadline.mul_f64(s)))
                .unwrap();
            let min_left = config.min_attempt_time();
            let steps = latencies_ms
                .iter()
                .zip(&hints_ms)
                .map(|(latency, hint)| {
                    let answer = match hint {
                        Some(h) => Step::rate_limited(Duration::from_millis(*h)),
                        None => Step::status(503),
                    };
                    Step::Delay(Duration::from_millis(*latency), Box::new(answer))
                })
                .collect();
            let fake = Fake::new(steps);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let (elapsed, starts) = runtime.block_on(async {
                let svc = RetryLayer::new(config).with_rng_seed(seed).layer(fake.clone());
                let start = Instant::now();
                let _ = svc.oneshot(request("{}")).await;
                (start.elapsed(), fake.starts(start))
            });
            prop_assert!(elapsed <= deadline, "finished at {elapsed:?}, deadline {deadline:?}");
            prop_assert!(starts.len() <= max_attempts as usize);
            for s in &starts {
                prop_assert!(*s < deadline, "attempt started at {s:?}, deadline {deadline:?}");
            }
            // Every retry (not the first attempt, which is the caller's) had the
            // minimum time left when it started.
            for s in starts.iter().skip(1) {
                prop_assert!(
                    deadline - *s >= min_left,
                    "retry started at {s:?} with {:?} left, minimum {min_left:?}",
                    deadline - *s
                );
            }
        }
    }
}
