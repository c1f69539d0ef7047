//! Retries under the upstream's pace (`PaceHandle`, put on the request by the
//! breaker when the key is paced): a retry takes a paced slot, waiting for it within
//! the deadline; without one before the deadline the last failure is handed on
//! untouched; each 429 an attempt gets is reported to the pace at once. Over the
//! classify layer and the mock provider, in virtual time, with a scripted pace.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_classify::{
    AttemptLog, ClassifyLayer, DelayHint, HintSource, PaceHandle, ReplayBody, RetryBudget,
    RetryBudgetHandle, Rules, StopReason, UpstreamPace,
};
use backstop_mock::{Fault, MockProvider};
use backstop_retry::{HintJitter, RetryConfig, RetryLayer};
use bytes::Bytes;
use common::{mock_answering_first, mock_rate_limited};
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

/// A pace that answers from a script, and notes every question.
#[derive(Default)]
struct ScriptedPace {
    /// What `admit_retry` answers, in turn (then `Ok`).
    answers: Mutex<VecDeque<Result<(), Duration>>>,
    /// What `retry_due_in` answers.
    due_in: Mutex<Duration>,
    /// When `admit_retry` was asked, from the start.
    asked: Mutex<Vec<Duration>>,
    /// When a slow-down was reported, from the start.
    slowed: Mutex<Vec<Duration>>,
    start: Mutex<Option<Instant>>,
}

impl ScriptedPace {
    fn new(answers: impl IntoIterator<Item = Result<(), Duration>>, due_in: Duration) -> Arc<Self> {
        Arc::new(ScriptedPace {
            answers: Mutex::new(answers.into_iter().collect()),
            due_in: Mutex::new(due_in),
            start: Mutex::new(Some(Instant::now())),
            ..ScriptedPace::default()
        })
    }

    fn since_start(&self, now: Instant) -> Duration {
        now - self.start.lock().unwrap().expect("started")
    }

    fn asked(&self) -> Vec<Duration> {
        self.asked.lock().unwrap().clone()
    }

    fn slowed(&self) -> Vec<Duration> {
        self.slowed.lock().unwrap().clone()
    }
}

impl UpstreamPace for ScriptedPace {
    fn admit_retry(&self, now: Instant, _deadline: Option<Instant>) -> Result<(), Duration> {
        self.asked.lock().unwrap().push(self.since_start(now));
        self.answers.lock().unwrap().pop_front().unwrap_or(Ok(()))
    }

    fn retry_due_in(&self, _now: Instant) -> Duration {
        *self.due_in.lock().unwrap()
    }

    fn slowed_down(&self, now: Instant) {
        self.slowed.lock().unwrap().push(self.since_start(now));
    }
}

/// A budget that allows everything and counts the withdrawals and the refunds.
#[derive(Default)]
struct CountingBudget {
    withdrawn: AtomicU32,
    refunded: AtomicU32,
}

impl CountingBudget {
    /// Withdrawals made, and how many of them were given back.
    fn counts(&self) -> (u32, u32) {
        (
            self.withdrawn.load(Ordering::SeqCst),
            self.refunded.load(Ordering::SeqCst),
        )
    }
}

impl RetryBudget for CountingBudget {
    fn try_withdraw(&self) -> bool {
        self.withdrawn.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn refund(&self) {
        self.refunded.fetch_add(1, Ordering::SeqCst);
    }
}

fn config() -> RetryConfig {
    RetryConfig::interactive()
        .with_hint_jitter(HintJitter::none())
        .with_deadline(Some(Duration::from_secs(5)))
        .expect("valid deadline")
}

fn request(
    pace: Option<&Arc<ScriptedPace>>,
    budget: &Arc<CountingBudget>,
) -> http::Request<ReplayBody> {
    let mut request = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap();
    if let Some(pace) = pace {
        request
            .extensions_mut()
            .insert(PaceHandle(Arc::clone(pace) as Arc<dyn UpstreamPace>));
    }
    request
        .extensions_mut()
        .insert(RetryBudgetHandle(Arc::clone(budget) as Arc<dyn RetryBudget>));
    request
}

/// Sends one request; the response's status, body bytes, log and how long it took.
async fn send(
    config: RetryConfig,
    mock: &MockProvider,
    pace: Option<&Arc<ScriptedPace>>,
    budget: &Arc<CountingBudget>,
) -> (StatusCode, Bytes, AttemptLog, Duration) {
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(config).with_rng_seed(3))
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(mock.clone());
    let started = Instant::now();
    let response = service.oneshot(request(pace, budget)).await.unwrap();
    let took = started.elapsed();
    let status = response.status();
    let log = response.extensions().get::<AttemptLog>().cloned().unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body, log, took)
}

#[tokio::test(start_paused = true)]
async fn a_paced_retry_waits_for_its_slot_after_the_hint() {
    let mock = mock_answering_first(mock_rate_limited());
    let pace = ScriptedPace::new([Err(Duration::from_millis(300))], Duration::ZERO);
    let budget = Arc::new(CountingBudget::default());
    let (status, _, log, took) = send(config(), &mock, Some(&pace), &budget).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mock.attempt_count(), 2);
    // The 1 s Retry-After, then the slot booked 300 ms later: exactly 1.3 s, all of it
    // in the second attempt's record.
    assert_eq!(took, Duration::from_millis(1300));
    assert_eq!(
        pace.asked(),
        [Duration::from_secs(1), Duration::from_millis(1300)]
    );
    assert_eq!(log.attempts[1].waited, Duration::from_millis(1300));
    // The hint that set the wait is the provider's, as sent: the pace's extra 300 ms
    // is not part of it.
    assert_eq!(
        log.attempts[1].hint_used,
        Some(DelayHint::new(
            Duration::from_secs(1),
            HintSource::RetryAfterSeconds
        ))
    );
    // The 429 was reported to the pace as it came, once.
    assert_eq!(pace.slowed(), [Duration::ZERO]);
    // The retry was sent: its withdrawal stands.
    assert_eq!(budget.counts(), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn no_slot_before_the_deadline_hands_the_429_on_at_once_without_drawing_the_budget() {
    let mock = mock_answering_first(mock_rate_limited());
    // The next free slot is 10 s away; the deadline is 5 s.
    let pace = ScriptedPace::new([], Duration::from_secs(10));
    let budget = Arc::new(CountingBudget::default());
    let (status, body, log, took) = send(config(), &mock, Some(&pace), &budget).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(took, Duration::ZERO);
    assert_eq!(mock.attempt_count(), 1);
    assert_eq!(log.stop, Some(StopReason::PaceRefused));
    assert!(pace.asked().is_empty());
    assert_eq!(budget.counts(), (0, 0));
    // The provider's own response, byte for byte: what one attempt alone returns.
    let alone = mock_body_of_one_attempt().await;
    assert_eq!(body, alone);
}

#[tokio::test(start_paused = true)]
async fn a_slot_refused_after_the_wait_returns_the_kept_429_untouched() {
    let mock = mock_answering_first(mock_rate_limited());
    // A slot looked free at the 429, but by the end of the 1 s wait the next one is
    // past the deadline.
    let pace = ScriptedPace::new([Err(Duration::from_secs(10))], Duration::ZERO);
    let budget = Arc::new(CountingBudget::default());
    let (status, body, log, took) = send(config(), &mock, Some(&pace), &budget).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(took, Duration::from_secs(1));
    assert_eq!(mock.attempt_count(), 1);
    assert_eq!(log.stop, Some(StopReason::PaceRefused));
    assert_eq!(log.attempts.len(), 1);
    assert_eq!(pace.asked(), [Duration::from_secs(1)]);
    // The budget was drawn at the decision, before the wait, and given back when the
    // retry was not made.
    assert_eq!(budget.counts(), (1, 1));
    assert_eq!(body, mock_body_of_one_attempt().await);
}

#[tokio::test(start_paused = true)]
async fn a_503_is_paced_but_left_to_the_calls_own_outcome_to_report() {
    let mock = mock_answering_first(Fault::OpenAiOverloaded);
    let pace = ScriptedPace::new([], Duration::ZERO);
    let budget = Arc::new(CountingBudget::default());
    let (status, _, _, _) = send(config(), &mock, Some(&pace), &budget).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mock.attempt_count(), 2);
    assert_eq!(pace.asked().len(), 1);
    assert!(pace.slowed().is_empty());
}

#[tokio::test(start_paused = true)]
async fn without_a_pace_the_retry_goes_after_the_hint_alone() {
    let mock = mock_answering_first(mock_rate_limited());
    let budget = Arc::new(CountingBudget::default());
    let (status, _, log, took) = send(config(), &mock, None, &budget).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(took, Duration::from_secs(1));
    assert_eq!(log.attempts[1].waited, Duration::from_secs(1));
}

/// The body the mock sends for the same 429 to a request that gets no retry.
async fn mock_body_of_one_attempt() -> Bytes {
    let mock = mock_answering_first(mock_rate_limited());
    let budget = Arc::new(CountingBudget::default());
    let single = RetryConfig::interactive().with_max_attempts(1).unwrap();
    send(single, &mock, None, &budget).await.1
}

#[tokio::test(start_paused = true)]
async fn a_pace_that_answers_any_duration_never_panics_nor_holds_a_retry_for_days() {
    // Without a deadline: a slot "due" in u64::MAX seconds, known at the failure, is
    // past the layer's longest wait (`max_hint`, 120 s): handed on at once.
    let no_deadline = RetryConfig::interactive()
        .with_hint_jitter(HintJitter::none())
        .with_deadline(None)
        .expect("no deadline");
    let provider = mock_answering_first(mock_rate_limited());
    let pace = ScriptedPace::new([], Duration::MAX);
    let budget = Arc::new(CountingBudget::default());
    let (status, _, log, took) = send(no_deadline.clone(), &provider, Some(&pace), &budget).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(took, Duration::ZERO);
    assert_eq!(log.stop, Some(StopReason::PaceRefused));

    // The same answer coming only after the wait (the slot looked free at the
    // failure), with and without a deadline: no overflow, the 429 handed on after the
    // 1 s wait, nothing more sent.
    for config in [no_deadline, config()] {
        let provider = mock_answering_first(mock_rate_limited());
        let pace = ScriptedPace::new([Err(Duration::MAX)], Duration::ZERO);
        let (status, _, log, took) = send(config, &provider, Some(&pace), &budget).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(took, Duration::from_secs(1));
        assert_eq!(log.stop, Some(StopReason::PaceRefused));
        assert_eq!(provider.attempt_count(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_whose_booked_slots_keep_going_to_others_gives_up_after_eight() {
    let mock = mock_answering_first(mock_rate_limited());
    // Every time it comes back, the slot is gone again: 100 ms more, eight times.
    let pace = ScriptedPace::new([Err(Duration::from_millis(100)); 8], Duration::ZERO);
    let budget = Arc::new(CountingBudget::default());
    let (status, _, log, took) = send(config(), &mock, Some(&pace), &budget).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(log.stop, Some(StopReason::PaceRefused));
    assert_eq!(mock.attempt_count(), 1);
    // The 1 s wait, then eight bookings of 100 ms each.
    assert_eq!(pace.asked().len(), 8);
    assert_eq!(took, Duration::from_millis(1800));
    assert_eq!(budget.counts(), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_paced_slot_that_leaves_less_than_the_minimum_is_refused_at_once() {
    // The next free slot is 3 s away with 5 s to the deadline: taken without a
    // minimum; with 2.5 s required (5 - 3 = 2 s left) the 429 goes on at once.
    for (min_left, attempts, took, stop) in [
        (
            Duration::ZERO,
            2,
            Duration::from_secs(1),
            StopReason::Succeeded,
        ),
        (
            Duration::from_millis(2500),
            1,
            Duration::ZERO,
            StopReason::PaceRefused,
        ),
    ] {
        let mock = mock_answering_first(mock_rate_limited());
        let pace = ScriptedPace::new([], Duration::from_secs(3));
        let budget = Arc::new(CountingBudget::default());
        let config = config().with_min_attempt_time(min_left).unwrap();
        let (_, _, log, elapsed) = send(config, &mock, Some(&pace), &budget).await;
        assert_eq!(mock.attempt_count(), attempts, "min {min_left:?}");
        assert_eq!(log.stop, Some(stop), "min {min_left:?}");
        // Refused at the failure: the budget is not drawn. (Taken, the retry goes
        // after the 1 s hint: the scripted pace admits it when asked then.)
        assert_eq!(budget.counts(), (attempts as u32 - 1, 0));
        assert_eq!(elapsed, took, "min {min_left:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slot_booked_past_the_latest_start_is_refused_after_the_wait() {
    // At the end of the 1 s hint the pace has a slot 3 s later (at 4 s). With a
    // 5 s deadline it is taken, with 1 s required too (exactly 1 s is left); with
    // 1.5 s required the latest start is 3.5 s, so the kept 429 goes back at 1 s.
    for (min_left, attempts, took) in [
        (Duration::ZERO, 2, Duration::from_secs(4)),
        // Exactly the minimum left at the slot: taken.
        (Duration::from_secs(1), 2, Duration::from_secs(4)),
        (Duration::from_millis(1500), 1, Duration::from_secs(1)),
    ] {
        let mock = mock_answering_first(mock_rate_limited());
        let pace = ScriptedPace::new([Err(Duration::from_secs(3))], Duration::ZERO);
        let budget = Arc::new(CountingBudget::default());
        let config = config().with_min_attempt_time(min_left).unwrap();
        let (status, body, log, elapsed) = send(config, &mock, Some(&pace), &budget).await;
        assert_eq!(mock.attempt_count(), attempts, "min {min_left:?}");
        assert_eq!(elapsed, took, "min {min_left:?}");
        // Drawn at the 429; given back when the retry was not made.
        let refunded = u32::from(attempts == 1);
        assert_eq!(budget.counts(), (1, refunded), "min {min_left:?}");
        if attempts == 1 {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(log.stop, Some(StopReason::PaceRefused));
            assert_eq!(body, mock_body_of_one_attempt().await);
        } else {
            assert_eq!(status, StatusCode::OK);
        }
    }
}
