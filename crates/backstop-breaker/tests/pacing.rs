//! Pacing: after a 429 or 503 the key admits calls at a learned rate, each refused call
//! booking the next slot; a key that recovers from an open period admits the calls
//! that waited for it at the rate it served before, not all at once.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerState, Outcome, Pacing, Rejection};
use backstop_classify::{DelayHint, FailureKind, HintSource};
mod common;

use common::{Key, ms};

/// A backoff of one half, so the learned rates and slot intervals are exact.
fn halving() -> BreakerConfig {
    BreakerConfig {
        pacing: Some(Pacing {
            backoff: 0.5,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    }
}

impl Key {
    /// Twenty successes between 1 s and 1.95 s, then a 429 at 1.99 s.
    fn rate_limited_after_twenty_a_second(config: BreakerConfig) -> Self {
        let mut key = Key::new(config);
        for i in 0..20 {
            key.call(Outcome::Success, ms(1000 + 50 * i));
        }
        key.call(rate_limited(), ms(1990));
        key
    }
}

fn rate_limited() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::RateLimited,
        hint: None,
    }
}

fn paced(retry_in: Duration) -> Result<(), Rejection> {
    Err(Rejection {
        state: BreakerState::Closed,
        upstream_directed: true,
        retry_in,
    })
}

#[test]
fn a_429_paces_the_key_at_the_backoff_times_the_successes_of_the_last_second() {
    let mut key = Key::rate_limited_after_twenty_a_second(halving());
    assert_eq!(key.state.state(), BreakerState::Closed);
    assert_eq!(key.state.pace(), Some(10.0));
    // 10 calls a second: one slot every 100 ms from the signal at 1.99 s. Three
    // callers at 2 s: the first takes the slot due, the others book 2.09 and 2.19 s.
    assert!(key.admit(ms(2000)).is_ok());
    assert_eq!(key.admit(ms(2000)).map(|_| ()), paced(ms(90)));
    assert_eq!(key.admit(ms(2000)).map(|_| ()), paced(ms(190)));
    // Each comes back when told and finds its slot; a newcomer queues behind them.
    assert!(key.admit(ms(2090)).is_ok());
    assert!(key.admit(ms(2190)).is_ok());
    assert_eq!(key.admit(ms(2190)).map(|_| ()), paced(ms(100)));
}

#[test]
fn a_429_when_nothing_was_served_in_the_last_second_does_not_pace() {
    let mut key = Key::new(halving());
    for i in 0..10 {
        key.call(Outcome::Success, ms(50 * i));
    }
    // Nothing served between 1 s and 2 s: the upstream is down, not saturated.
    key.call(rate_limited(), ms(2000));
    assert_eq!(key.state.pace(), None);
    assert!(key.admit(ms(2000)).is_ok());
    assert!(key.admit(ms(2000)).is_ok());
}

#[test]
fn a_signal_from_a_call_admitted_before_the_last_decrease_is_not_counted_again() {
    let mut key = Key::rate_limited_after_twenty_a_second(halving());
    let a = key.admit(ms(2000)).expect("slot due");
    let b = key.admit(ms(2100)).expect("slot due");
    key.record(a, rate_limited(), ms(2100));
    assert_eq!(key.state.pace(), Some(5.0));
    // b was sent at the old rate: its 429 says nothing about 5 calls a second.
    key.record(b, rate_limited(), ms(2100));
    assert_eq!(key.state.pace(), Some(5.0));
    // A call admitted at the new rate that is refused too halves it again.
    let c = key.admit(ms(2400)).expect("slot due");
    key.record(c, rate_limited(), ms(2400));
    assert_eq!(key.state.pace(), Some(2.5));
}

#[test]
fn an_overloaded_503_paces_like_a_429_and_a_server_error_does_not() {
    let mut key = Key::new(halving());
    for i in 0..20 {
        key.call(Outcome::Success, ms(1000 + 50 * i));
    }
    key.call(
        Outcome::Failure {
            kind: FailureKind::ServerError,
            hint: None,
        },
        ms(1990),
    );
    assert_eq!(key.state.pace(), None);
    key.call(
        Outcome::Failure {
            kind: FailureKind::Overloaded,
            hint: None,
        },
        ms(1995),
    );
    assert_eq!(key.state.pace(), Some(10.0));
}

#[test]
fn the_pace_grows_only_while_it_refuses_calls() {
    let mut key = Key::rate_limited_after_twenty_a_second(BreakerConfig {
        pacing: Some(Pacing {
            backoff: 0.5,
            growth: 0.5,
            // Growth alone here; the regain below its ceiling is the next test's.
            recovery: 0.0,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    });
    assert_eq!(key.state.pace(), Some(10.0));
    // Not binding yet: a success leaves the rate alone.
    let a = key.admit(ms(2000)).expect("slot due");
    key.record(a, Outcome::Success, ms(2000));
    assert_eq!(key.state.pace(), Some(10.0));
    // Binding (a caller was refused within the last second): +0.5 a success.
    assert!(key.admit(ms(2000)).is_err());
    let b = key.admit(ms(2090)).expect("booked slot");
    key.record(b, Outcome::Success, ms(2500));
    assert_eq!(key.state.pace(), Some(10.5));
    // More than a second after the last refusal: no longer binding.
    let c = key.admit(ms(3100)).expect("slot due");
    key.record(c, Outcome::Success, ms(3100));
    assert_eq!(key.state.pace(), Some(10.5));
}

#[test]
fn below_what_it_served_the_pace_regains_ground_fast() {
    // Engaged at 0.5 × the 20 calls a second it served: 10, with 20 as its ceiling.
    let mut key = Key::rate_limited_after_twenty_a_second(BreakerConfig {
        pacing: Some(Pacing {
            backoff: 0.5,
            growth: 0.01,
            recovery: 1.0,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    });
    assert_eq!(key.state.pace(), Some(10.0));
    assert!(key.admit(ms(2000)).is_ok());
    assert!(key.admit(ms(2000)).is_err());
    // One success while binding: recovery × gap / rate = 1.0 × 10 / 10 calls a
    // second (a tenth of the gap, at 10 successes a second: the whole gap's worth
    // per second), where growth alone would add 0.01.
    let b = key.admit(ms(2100)).expect("booked slot");
    key.record(b, Outcome::Success, ms(2100));
    assert_eq!(key.state.pace(), Some(11.0));
}

#[test]
fn the_pace_lifts_after_a_quiet_window_with_nobody_waiting() {
    let mut key = Key::rate_limited_after_twenty_a_second(halving());
    // The signal was at 1.99 s and the window is 30 s.
    assert!(key.admit(ms(31_989)).is_ok());
    assert_eq!(key.state.pace(), Some(10.0));
    assert!(key.admit(ms(31_990)).is_ok());
    assert_eq!(key.state.pace(), None);
    assert!(key.admit(ms(31_990)).is_ok());
}

#[test]
fn a_key_closing_after_an_open_period_admits_at_the_rate_it_served_before() {
    let mut key = Key::new(BreakerConfig::default());
    // 10 calls a second for 10 s, then five failures at 10 s open it for 5 s.
    for i in 0..100 {
        key.call(Outcome::Success, ms(100 * i));
    }
    for _ in 0..5 {
        key.call(
            Outcome::Failure {
                kind: FailureKind::ServerError,
                hint: None,
            },
            ms(10_000),
        );
    }
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.state.pace(), None);
    let probe = key.admit(ms(15_000)).expect("probe");
    key.record(probe, Outcome::Success, ms(15_000));
    assert_eq!(key.state.state(), BreakerState::Closed);
    assert_eq!(key.state.pace(), Some(10.0));
    // Three callers who waited for the reopening: one now, then one every 100 ms.
    assert!(key.admit(ms(15_000)).is_ok());
    assert_eq!(key.admit(ms(15_000)).map(|_| ()), paced(ms(100)));
    assert_eq!(key.admit(ms(15_000)).map(|_| ()), paced(ms(200)));
}

#[test]
fn a_key_that_never_served_is_not_paced_when_it_closes() {
    let mut key = Key::new(BreakerConfig::default());
    for _ in 0..5 {
        key.call(
            Outcome::Failure {
                kind: FailureKind::ServerError,
                hint: None,
            },
            ms(0),
        );
    }
    let probe = key.admit(ms(5000)).expect("probe");
    key.record(probe, Outcome::Success, ms(5000));
    assert_eq!(key.state.state(), BreakerState::Closed);
    assert_eq!(key.state.pace(), None);
}

#[test]
fn without_pacing_a_closed_key_admits_everything() {
    let mut key = Key::rate_limited_after_twenty_a_second(BreakerConfig {
        pacing: None,
        ..BreakerConfig::default()
    });
    assert_eq!(key.state.pace(), None);
    for _ in 0..100 {
        assert!(key.admit(ms(2000)).is_ok());
    }
}

#[test]
fn a_caller_whose_deadline_comes_before_the_slot_books_nothing() {
    let mut key = Key::rate_limited_after_twenty_a_second(halving());
    let now = key.t0 + ms(2000);
    assert!(key.admit(ms(2000)).is_ok());
    let refused = key
        .state
        .admit_before(now, Some(now + ms(50)), &key.config, &mut |_| {})
        .map(|_| ());
    assert_eq!(refused, paced(ms(90)));
    // The slot at 2.09 s is still the next one.
    assert_eq!(key.admit(ms(2000)).map(|_| ()), paced(ms(90)));
}

#[test]
fn a_success_that_took_a_retry_after_a_429_slows_the_pace_like_a_429() {
    let mut key = Key::rate_limited_after_twenty_a_second(halving());
    assert_eq!(key.state.pace(), Some(10.0));
    let a = key.admit(ms(2000)).expect("slot due");
    key.record(a, Outcome::SuccessAfterSlowDown, ms(2050));
    // 18 successes recorded since 1.1 s (the last second's buckets): to half of
    // those, but never more than one extra backoff below the rate (10 × 0.5 × 0.5).
    assert_eq!(key.state.pace(), Some(5.0));
    assert_eq!(key.state.state(), BreakerState::Closed);
}

#[test]
fn a_decrease_starts_from_what_was_served_when_the_rate_overshot_it() {
    let mut key = Key::new(BreakerConfig {
        pacing: Some(Pacing {
            backoff: 0.8,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    });
    for i in 0..20 {
        key.call(Outcome::Success, ms(1000 + 50 * i));
    }
    key.call(rate_limited(), ms(1990));
    assert_eq!(key.state.pace(), Some(16.0));
    // The next second serves 15 calls; a 429 from a call admitted at 16 a second
    // sets the pace to 0.8 × 15 = 12, not 0.8 × 16.
    let mut last = None;
    for i in 0..15 {
        let at = ms(2000 + 62 * i);
        if let Ok(ticket) = key.admit(at) {
            key.record(ticket, Outcome::Success, at);
        }
        last = Some(at);
    }
    assert_eq!(last, Some(ms(2868)));
    let ticket = key.admit(ms(2990)).expect("slot due");
    key.record(ticket, rate_limited(), ms(2990));
    assert_eq!(key.state.pace(), Some(12.0));
}

mod through_the_layer {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use backstop_breaker::{BreakerConfig, BreakerLayer, Pacing};
    use backstop_classify::{
        Classification, Deadline, DelayHint, Failure, FailureKind, HintSource, LatestStart,
        ModelRoute,
    };
    use http::{Request, Response};
    use tokio::time::Instant;
    use tower::{ServiceBuilder, ServiceExt};

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_key_refuses_with_the_time_its_booked_slot_is_due_and_never_calls_the_upstream()
    {
        // Twenty successes, then a 429: paced at 10 a second (backoff one half).
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let upstream = tower::service_fn(move |request: Request<()>| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let limited = request.headers().contains_key("x-limited");
            async move {
                let mut response = Response::new(n);
                response.extensions_mut().insert(if limited {
                    Classification::Failure(Failure::new(FailureKind::RateLimited))
                } else {
                    Classification::Success
                });
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let layer = BreakerLayer::new(BreakerConfig {
            pacing: Some(Pacing {
                backoff: 0.5,
                ..Pacing::default()
            }),
            ..BreakerConfig::default()
        })
        .unwrap();
        let service = ServiceBuilder::new().layer(layer).service(upstream);
        let route = ModelRoute::new("openai", "gpt-4o");
        let request = |limited: bool, deadline: Option<Instant>| {
            let mut request = Request::new(());
            request.extensions_mut().insert(route.clone());
            if let Some(d) = deadline {
                request.extensions_mut().insert(Deadline(d));
            }
            if limited {
                request
                    .headers_mut()
                    .insert("x-limited", http::HeaderValue::from_static("1"));
            }
            request
        };
        let t0 = Instant::now();
        for i in 0..20 {
            tokio::time::sleep_until(t0 + ms(1000 + 50 * i)).await;
            service.clone().oneshot(request(false, None)).await.unwrap();
        }
        tokio::time::sleep_until(t0 + ms(1990)).await;
        service.clone().oneshot(request(true, None)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 21);

        tokio::time::sleep_until(t0 + ms(2000)).await;
        service.clone().oneshot(request(false, None)).await.unwrap();
        // The next two callers book 2.09 s and 2.19 s and are told exactly that.
        for due in [90, 190] {
            let error = service
                .clone()
                .oneshot(request(false, None))
                .await
                .unwrap_err();
            assert_eq!(error.kind(), FailureKind::BreakerOpen);
            assert_eq!(
                error.failure().hint,
                Some(DelayHint::new(ms(due), HintSource::Breaker))
            );
        }
        // A caller whose deadline comes first is refused without booking: the next
        // caller still gets 2.29 s.
        let now = Instant::now();
        let error = service
            .clone()
            .oneshot(request(false, Some(now + ms(100))))
            .await
            .unwrap_err();
        assert_eq!(error.failure().hint.map(|h| h.delay), Some(ms(290)));
        let error = service
            .clone()
            .oneshot(request(false, None))
            .await
            .unwrap_err();
        assert_eq!(error.failure().hint.map(|h| h.delay), Some(ms(290)));
        // That caller booked 2.29 s. One whose latest useful start comes before the
        // next slot (2.39 s) books nothing, whatever its deadline (the fallback
        // layer's minimum hop time): the slot stays for others.
        let mut late = request(false, Some(now + Duration::from_secs(10)));
        late.extensions_mut().insert(LatestStart(now + ms(300)));
        let error = service.clone().oneshot(late).await.unwrap_err();
        assert_eq!(error.failure().hint.map(|h| h.delay), Some(ms(390)));
        let mut early_enough = request(false, Some(now + Duration::from_secs(10)));
        early_enough
            .extensions_mut()
            .insert(LatestStart(now + ms(400)));
        let error = service.clone().oneshot(early_enough).await.unwrap_err();
        assert_eq!(error.failure().hint.map(|h| h.delay), Some(ms(390)));
        // That one booked 2.39 s: the next caller is told 2.49 s.
        let error = service
            .clone()
            .oneshot(request(false, None))
            .await
            .unwrap_err();
        assert_eq!(error.failure().hint.map(|h| h.delay), Some(ms(490)));
        // None of the refused calls reached the upstream.
        assert_eq!(calls.load(Ordering::SeqCst), 22);
    }
}

/// A 429 asking for one second (`Retry-After: 1`).
fn rate_limited_for_a_moment() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::RateLimited,
        hint: Some(DelayHint::new(
            Duration::from_secs(1),
            HintSource::RetryAfterSeconds,
        )),
    }
}

#[test]
fn a_burst_of_429s_from_a_key_still_serving_paces_it_without_opening_it() {
    let mut key = Key::new(BreakerConfig::default());
    for i in 0..20 {
        key.call(Outcome::Success, ms(1000 + 50 * i));
    }
    // Eleven calls in flight (admitted before any 429, so unpaced).
    let mut in_flight: Vec<_> = (0..11)
        .map(|_| key.admit(ms(1960)).expect("closed and unpaced"))
        .collect();
    // Six of them get a 429 asking for a moment, 40 ms after the last success: more
    // than `consecutive_failures` (5) in a row, from a key still serving. Saturated,
    // not down: paced, still closed.
    for (i, ticket) in in_flight.drain(..6).enumerate() {
        key.record(ticket, rate_limited_for_a_moment(), ms(1990 + i as u64));
    }
    assert_eq!(key.state.state(), BreakerState::Closed);
    // Paced by the first 429 at what the key served over the last second (the 20
    // successes) less the default backoff of 5 %: 19 calls a second. The other five
    // came from calls admitted before the pace, so they do not slow it again.
    assert_eq!(key.state.pace(), Some(19.0));
    assert!(key.log().is_empty());

    // More than a second after the last success the key serves nothing: the same
    // 429s count, and the fifth in a row opens it.
    for (i, ticket) in in_flight.drain(..).enumerate() {
        assert_eq!(key.state.state(), BreakerState::Closed, "after {i}");
        key.record(
            ticket,
            rate_limited_for_a_moment(),
            ms(3100 + 10 * i as u64),
        );
    }
    assert_eq!(key.state.state(), BreakerState::Open);
    assert_eq!(key.log().len(), 1);
}

#[test]
fn without_pacing_a_burst_of_429s_opens_the_key_as_before() {
    let mut key = Key::new(BreakerConfig {
        pacing: None,
        ..BreakerConfig::default()
    });
    for i in 0..20 {
        key.call(Outcome::Success, ms(1000 + 50 * i));
    }
    let in_flight: Vec<_> = (0..5)
        .map(|_| key.admit(ms(1960)).expect("closed"))
        .collect();
    for (i, ticket) in in_flight.into_iter().enumerate() {
        key.record(ticket, rate_limited_for_a_moment(), ms(1990 + i as u64));
    }
    assert_eq!(key.state.state(), BreakerState::Open);
}
