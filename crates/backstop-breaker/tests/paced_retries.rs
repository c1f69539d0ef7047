//! Retries under a pace: a call admitted while its key is paced carries a
//! `PaceHandle`, through which the retry layer takes paced slots for its retries and
//! reports each attempt's 429 at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer, Outcome, PacedSlot, Pacing};
use backstop_classify::{Classification, Failure, FailureKind, PaceHandle};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

mod common;

use common::{Key, ms};

/// A backoff of one half and no growth, so the learned rates and slots are exact.
fn exact() -> BreakerConfig {
    BreakerConfig {
        pacing: Some(Pacing {
            backoff: 0.5,
            growth: 0.01,
            recovery: 0.0,
            ..Pacing::default()
        }),
        ..BreakerConfig::default()
    }
}

fn rate_limited() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::RateLimited,
        hint: None,
    }
}

/// Twenty successes between 1 s and 1.95 s, then a 429 at 1.99 s: paced at 10 calls
/// a second (one slot every 100 ms from 1.99 s).
fn paced_key() -> Key {
    let mut key = Key::new(exact());
    for i in 0..20 {
        key.call(Outcome::Success, ms(1000 + 50 * i));
    }
    key.call(rate_limited(), ms(1990));
    assert_eq!(key.state.pace(), Some(10.0));
    key
}

impl Key {
    fn admit_retry(
        &mut self,
        offset: Duration,
        deadline: Option<Duration>,
    ) -> Result<PacedSlot, Duration> {
        let (now, deadline) = (self.at(offset), deadline.map(|d| self.at(d)));
        self.state.admit_retry(now, deadline, &self.config)
    }

    fn retry_due_in(&self, offset: Duration) -> Duration {
        self.state.retry_due_in(self.at(offset), &self.config)
    }
}

#[test]
fn retries_take_and_book_paced_slots_like_new_calls() {
    let mut key = paced_key();
    // The slot due at 1.99 s goes to a retry, so a new call books the next one.
    assert!(key.admit_retry(ms(1990), None).is_ok());
    assert_eq!(
        key.admit(ms(1990)).map(|_| ()).unwrap_err().retry_in,
        ms(100)
    );
    // The next retry books the slot after it; asking without booking tells the same
    // wait again and again, and books nothing.
    assert_eq!(key.retry_due_in(ms(1990)), ms(200));
    assert_eq!(key.retry_due_in(ms(1990)), ms(200));
    assert_eq!(key.admit_retry(ms(1990), None), Err(ms(200)));
    assert_eq!(key.retry_due_in(ms(1990)), ms(300));
    // A retry whose deadline comes before its slot books nothing.
    assert_eq!(key.admit_retry(ms(1990), Some(ms(2200))), Err(ms(300)));
    assert_eq!(key.retry_due_in(ms(1990)), ms(300));
    // Each comes back when told and finds its slot: the new call at 2.09 s, the
    // retry at 2.19 s.
    assert!(key.admit(ms(2090)).is_ok());
    assert!(key.admit_retry(ms(2190), None).is_ok());
}

#[test]
fn an_unpaced_key_lets_every_retry_go_at_once() {
    let mut key = Key::new(exact());
    key.call(Outcome::Success, ms(10));
    assert_eq!(key.retry_due_in(ms(20)), Duration::ZERO);
    assert_eq!(key.admit_retry(ms(20), None), Ok(PacedSlot::of(0)));
    // A 429 reported for an unpaced attempt changes nothing (the call's own outcome
    // engages the pace).
    key.state
        .attempt_slowed(PacedSlot::of(0), key.at(ms(30)), &key.config);
    assert_eq!(key.state.pace(), None);
}

#[test]
fn an_attempts_429_slows_the_pace_at_once_and_once_per_generation() {
    let mut key = paced_key();
    let call = key.admit(ms(1990)).expect("slot due");
    let slot = call.paced_slot();
    assert!(slot.generation() != 0);
    // An attempt's 429 at 2.05 s halves the pace at once, not when the call ends
    // (more was served over the last second than the rate: from the rate, 10 → 5).
    key.state
        .attempt_slowed(slot, key.at(ms(2050)), &key.config);
    assert_eq!(key.state.pace(), Some(5.0));
    // The same attempt's call reporting it again, or another attempt sent in the
    // same generation, is not a second decrease.
    key.state
        .attempt_slowed(slot, key.at(ms(2060)), &key.config);
    key.record(call, rate_limited(), ms(2070));
    assert_eq!(key.state.pace(), Some(5.0));
    // A retry admitted now is in the new generation: its 429 counts.
    let retry = key
        .admit_retry(ms(2300), None)
        .expect("a slot is due at 2.3 s");
    assert_ne!(retry, slot);
    key.state
        .attempt_slowed(retry, key.at(ms(2400)), &key.config);
    // Still more served over the last second (the successes from 1.4 s on) than the
    // rate: halved from the rate again, 5 → 2.5.
    assert_eq!(key.state.pace(), Some(2.5));
}

/// A provider stand-in: answers 200 (or a 429 when told), and notes which requests
/// carried a `PaceHandle`.
#[derive(Clone, Default)]
struct Upstream {
    next_rate_limited: Arc<Mutex<bool>>,
    handles: Arc<Mutex<Vec<Option<PaceHandle>>>>,
}

impl Upstream {
    fn call(&self, request: Request<()>) -> Response<()> {
        self.handles
            .lock()
            .unwrap()
            .push(request.extensions().get::<PaceHandle>().cloned());
        let mut response = Response::new(());
        let classification = if std::mem::take(&mut *self.next_rate_limited.lock().unwrap()) {
            *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            Classification::Failure(Failure::new(FailureKind::RateLimited))
        } else {
            Classification::Success
        };
        response.extensions_mut().insert(classification);
        response
    }
}

#[tokio::test(start_paused = true)]
async fn only_a_call_admitted_under_a_pace_carries_the_pace_handle() {
    let upstream = Upstream::default();
    let inner = {
        let upstream = upstream.clone();
        tower::service_fn(move |request: Request<()>| {
            let response = upstream.call(request);
            async move { Ok::<_, std::convert::Infallible>(response) }
        })
    };
    let mut breaker = BreakerLayer::new(exact()).expect("valid").layer(inner);
    let request = || {
        Request::post("https://api.provider.test/v1/chat/completions")
            .body(())
            .expect("static request")
    };
    let start = Instant::now();
    // Twenty successes in a second, then a 429: the key is paced at 10 a second.
    for i in 0..20 {
        tokio::time::sleep_until(start + ms(50 * i)).await;
        let _ = breaker.ready().await.unwrap().call(request()).await;
    }
    *upstream.next_rate_limited.lock().unwrap() = true;
    let _ = breaker.ready().await.unwrap().call(request()).await;
    // Unpaced until then: no handle, nothing allocated for it.
    assert!(upstream.handles.lock().unwrap().iter().all(Option::is_none));
    assert_eq!(upstream.handles.lock().unwrap().len(), 21);

    // The next call takes the slot due now and carries the handle; through it a
    // retry finds the next slot 100 ms away.
    let _ = breaker.ready().await.unwrap().call(request()).await;
    let handle = upstream.handles.lock().unwrap()[21]
        .clone()
        .expect("a paced call carries the pace");
    assert_eq!(handle.0.retry_due_in(Instant::now()), ms(100));
    assert_eq!(handle.0.admit_retry(Instant::now(), None), Err(ms(100)));
    // The retry that booked the slot takes it when it comes back.
    tokio::time::advance(ms(100)).await;
    assert_eq!(handle.0.admit_retry(Instant::now(), None), Ok(()));
    // And a fresh call now waits for the slot after it.
    let refused = breaker.ready().await.unwrap().call(request()).await;
    assert!(refused.is_err());
    assert_eq!(upstream.handles.lock().unwrap().len(), 22);
}
