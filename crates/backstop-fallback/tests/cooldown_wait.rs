//! When every model of the chain is cooling down on the upstream's word (its delay
//! hint, or a pace learned from its 429s), the layer waits for the earliest reopening
//! within the request's deadline and tries again; past the deadline it fails at once,
//! and a key the breaker opened on its own evidence (failures counted) is never waited
//! for. Against the real breaker and classify layers and the mock provider, in
//! virtual time.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer};
use backstop_classify::{ClassifiedError, ClassifyLayer, FailureKind, ReplayBody, Rules};
use backstop_fallback::{FallbackConfig, FallbackLayer, ServedBy, Target};
use backstop_mock::{Capacity, Fault, MockProvider, ModelPlan, Scenario};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// One model, no other to fall back to.
fn single_model(deadline: Option<Duration>) -> backstop_fallback::FallbackConfigBuilder {
    let builder = FallbackConfig::builder().target(
        "gpt-4o",
        Target::new("openai", "https://openai.test/v1").credential("authorization", "Bearer sk-1"),
    );
    match deadline {
        Some(d) => builder.total_deadline(d),
        None => builder,
    }
}

/// fallback → breaker → classify → mock: the breaker's refusals are what the fallback
/// layer waits on.
fn stack(
    fallback: FallbackConfig,
    breaker: BreakerConfig,
    mock: MockProvider,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<backstop_classify::ClassifiedBody<backstop_mock::MockBody>>,
    Error = ClassifiedError,
    Future: Send,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback))
        .layer(BreakerLayer::new(breaker).unwrap())
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(mock)
}

fn chat() -> Request<ReplayBody> {
    Request::post("http://proxy.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap()
}

/// A 429 with `Retry-After: 5`, then healthy: one request at `t0` opens the key
/// until `t0 + 5 s`, on the provider's word.
fn opened_at_start(
    fallback: FallbackConfig,
    breaker: BreakerConfig,
) -> (
    impl Service<
        Request<ReplayBody>,
        Response = Response<backstop_classify::ClassifiedBody<backstop_mock::MockBody>>,
        Error = ClassifiedError,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    MockProvider,
) {
    let mock = MockProvider::new(Scenario::new(1).model(
        "gpt-4o",
        ModelPlan::script([rate_limited(5)]).then(Fault::Ok),
    ));
    (stack(fallback, breaker, mock.clone()), mock)
}

fn rate_limited(retry_after_s: u64) -> Fault {
    Fault::OpenAiRateLimit {
        retry_after: Some(retry_after_s.to_string()),
        retry_after_ms: None,
    }
}

async fn open_the_key<S, B>(service: &S)
where
    S: Service<Request<ReplayBody>, Response = Response<B>, Error = ClassifiedError> + Clone,
{
    let response = service.clone().oneshot(chat()).await.ok();
    assert_eq!(response.map(|r| r.status().as_u16()), Some(429));
}

/// Five 500s: five requests open the key until `+ 5 s` on the breaker's own count.
async fn open_the_key_with_failures<S>(service: &S)
where
    S: Service<Request<ReplayBody>, Error = ClassifiedError> + Clone,
{
    for _ in 0..5 {
        let response = service.clone().oneshot(chat()).await.ok();
        assert!(response.is_some(), "a 500 is a response");
    }
}

/// A request refused without a wait: at once, by the breaker, telling the caller to
/// come back in `retry_in`.
fn assert_failed_at_once_with_the_time_to_retry(
    error: &ClassifiedError,
    asked: Instant,
    retry_in: Duration,
) {
    assert_eq!(asked.elapsed(), Duration::ZERO);
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    assert_eq!(error.failure().hint.map(|h| h.delay), Some(retry_in));
    let record = ServedBy::of_error(error).unwrap();
    assert_eq!(record.cooldown_waits, 0);
    assert_eq!(record.retry_at, Some(asked + retry_in));
}

#[tokio::test(start_paused = true)]
async fn a_single_model_waits_exactly_until_its_key_reopens_then_is_served() {
    let t0 = Instant::now();
    let (service, mock) = opened_at_start(
        single_model(Some(secs(60))).build().unwrap(),
        BreakerConfig::default(),
    );
    open_the_key(&service).await;
    tokio::time::advance(secs(1)).await;

    let asked = Instant::now();
    let response = service.clone().oneshot(chat()).await.unwrap();
    assert_eq!(response.status(), 200);
    // The key was open until 5 s: the request waited exactly the 4 s left.
    assert_eq!(asked.elapsed(), secs(4));
    let attempts: Vec<Duration> = mock.attempts().iter().map(|a| a.since_start).collect();
    assert_eq!(attempts, [ms(0), secs(5)]);
    let record = response.extensions().get::<ServedBy>().unwrap();
    assert!(record.served);
    assert_eq!(record.cooldown_waits, 1);
    assert!(
        !record.fallback_fired,
        "waiting for the same model is no fallback"
    );
    // The refused round is summed up by the wait count: the record names the model
    // once, served.
    assert_eq!(record.hops.len(), 1);
    assert_eq!(record.hops[0].failure, None);
    assert_eq!(t0.elapsed(), secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_reopening_past_the_deadline_fails_at_once_with_the_time_to_retry() {
    let (service, mock) = opened_at_start(
        single_model(Some(secs(3))).build().unwrap(),
        BreakerConfig::default(),
    );
    open_the_key(&service).await;
    tokio::time::advance(secs(1)).await;

    let asked = Instant::now();
    let error = service.clone().oneshot(chat()).await.unwrap_err();
    // Reopening at 5 s, the deadline at 4 s: the caller learns when to come back.
    assert_failed_at_once_with_the_time_to_retry(&error, asked, secs(4));
    assert_eq!(mock.attempt_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reopening_that_leaves_less_than_the_minimum_hop_time_is_not_waited_for() {
    // Asked at 1 s with a 10 s deadline (until 11 s); the key reopens at 5 s, leaving
    // 6 s: waited for with a 6 s minimum, not with 6.5 s.
    for (min_left, waited) in [(ms(6000), true), (ms(6500), false)] {
        let (service, mock) = opened_at_start(
            single_model(Some(secs(10)))
                .min_hop_time(min_left)
                .build()
                .unwrap(),
            BreakerConfig::default(),
        );
        open_the_key(&service).await;
        tokio::time::advance(secs(1)).await;

        let asked = Instant::now();
        let result = service.clone().oneshot(chat()).await;
        if waited {
            assert_eq!(result.unwrap().status(), 200);
            assert_eq!(asked.elapsed(), secs(4));
            assert_eq!(mock.attempt_count(), 2);
        } else {
            assert_failed_at_once_with_the_time_to_retry(&result.unwrap_err(), asked, secs(4));
            assert_eq!(mock.attempt_count(), 1);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_opened_on_failures_is_not_waited_for_the_caller_fails_fast_with_the_time_to_retry() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "gpt-4o",
        ModelPlan::script(std::iter::repeat_n(Fault::OpenAiServerError, 5)).then(Fault::Ok),
    ));
    let service = stack(
        single_model(Some(secs(60))).build().unwrap(),
        BreakerConfig::default(),
        mock.clone(),
    );
    open_the_key_with_failures(&service).await;
    tokio::time::advance(secs(1)).await;

    let asked = Instant::now();
    let error = service.clone().oneshot(chat()).await.unwrap_err();
    // The breaker's own 5 s open period: no wait, though the deadline is 60 s away.
    assert_failed_at_once_with_the_time_to_retry(&error, asked, secs(4));
    assert_eq!(mock.attempt_count(), 5);
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_layer_never_waits() {
    let (service, mock) = opened_at_start(
        single_model(None).build().unwrap(),
        BreakerConfig::default(),
    );
    open_the_key(&service).await;
    let asked = Instant::now();
    let error = service.clone().oneshot(chat()).await.unwrap_err();
    assert_eq!(asked.elapsed(), Duration::ZERO);
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    assert_eq!(mock.attempt_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn zero_cooldown_waits_fails_at_once() {
    let (service, mock) = opened_at_start(
        single_model(Some(secs(60)))
            .cooldown_waits(0)
            .build()
            .unwrap(),
        BreakerConfig::default(),
    );
    open_the_key(&service).await;
    let asked = Instant::now();
    let error = service.clone().oneshot(chat()).await.unwrap_err();
    assert_eq!(asked.elapsed(), Duration::ZERO);
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    assert_eq!(mock.attempt_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_healthy_fallback_is_used_at_once_instead_of_waiting() {
    let mock = MockProvider::new(
        Scenario::new(1)
            .model("gpt-4o", ModelPlan::always(Fault::OpenAiServerError))
            .model("claude-sonnet-4-5", ModelPlan::ok()),
    );
    let fallback = single_model(Some(secs(60)))
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1").model("claude-sonnet-4-5"),
        )
        .chain("gpt-4o", ["claude"])
        .build()
        .unwrap();
    let service = stack(fallback, BreakerConfig::default(), mock.clone());
    for _ in 0..6 {
        let asked = Instant::now();
        let response = service.clone().oneshot(chat()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(asked.elapsed(), Duration::ZERO);
        assert_eq!(
            response
                .extensions()
                .get::<ServedBy>()
                .unwrap()
                .cooldown_waits,
            0
        );
    }
    // Five 500s opened the primary; the sixth request skipped it.
    assert_eq!(mock.attempts_for("gpt-4o"), 5);
    assert_eq!(mock.attempts_for("claude-sonnet-4-5"), 6);
}

#[tokio::test(start_paused = true)]
async fn requests_that_waited_for_the_same_reopening_reach_the_provider_one_slot_at_a_time() {
    // Healthy, then 429s with Retry-After: 5 from 10 s to 11 s.
    let mock = MockProvider::new(Scenario::new(1).model(
        "gpt-4o",
        ModelPlan::ok().outage(secs(10), secs(11), rate_limited(5)),
    ));
    let service = stack(
        single_model(Some(secs(60))).build().unwrap(),
        BreakerConfig::default(),
        mock.clone(),
    );
    let t0 = Instant::now();
    // 10 requests a second for 10 s: the key serves 10 a second.
    for i in 0..100 {
        tokio::time::sleep_until(t0 + ms(100 * i)).await;
        assert_eq!(service.clone().oneshot(chat()).await.unwrap().status(), 200);
    }
    // A 429 at 10 s opens the key until 15 s, on the provider's word.
    tokio::time::sleep_until(t0 + secs(10)).await;
    open_the_key(&service).await;
    // Twenty callers at 11 s (the provider is back, the key still open) all wait
    // for the same reopening.
    tokio::time::sleep_until(t0 + secs(11)).await;
    let callers: Vec<_> = (0..20)
        .map(|_| tokio::spawn(service.clone().oneshot(chat())))
        .collect();
    for caller in callers {
        let response = caller.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
    }
    // At 15 s one probe goes through and closes the key. The 429 at 10 s engaged a
    // pace of 0.95 times the 9 successes of the second before it (8.55 calls a
    // second: one slot every 117 ms), which the closed key keeps. The other nineteen
    // take one slot each instead of arriving together: the slot due one interval
    // before 15 s (an untaken slot is kept for one interval, no longer) and the one
    // due at 15 s, then one every 117 ms.
    let after: Vec<Duration> = mock
        .attempts()
        .iter()
        .map(|a| a.since_start)
        .filter(|t| *t >= secs(11))
        .collect();
    let mut expected = vec![secs(15), secs(15), secs(15)];
    expected.extend((1..=17).map(|k| secs(15) + ms(117 * k)));
    assert_eq!(after, expected);
}

#[tokio::test(start_paused = true)]
async fn under_a_quota_requests_wait_for_paced_slots_instead_of_failing() {
    // 10 calls per sliding second; beyond it a 429 with Retry-After: 1.
    let mock = MockProvider::new(Scenario::new(1).model(
        "gpt-4o",
        ModelPlan::ok().capacity(Capacity::per_second(10).over(Fault::OpenAiRateLimit {
            retry_after: Some("1".into()),
            retry_after_ms: None,
        })),
    ));
    let service = stack(
        single_model(Some(secs(60))).build().unwrap(),
        BreakerConfig::default(),
        mock.clone(),
    );
    let t0 = Instant::now();
    // 12 requests a second for 20 s, each in its own task.
    let mut callers = Vec::new();
    for i in 0..240u64 {
        tokio::time::sleep_until(t0 + Duration::from_micros(83_333 * i)).await;
        callers.push(tokio::spawn(service.clone().oneshot(chat())));
    }
    let mut served = 0;
    for caller in callers {
        match caller.await.unwrap() {
            Ok(response) if response.status() == 200 => served += 1,
            _ => {}
        }
    }
    let attempts = mock.attempts();
    let rejected = attempts
        .iter()
        .filter(|a| matches!(a.fault, Fault::OpenAiRateLimit { .. }))
        .count();
    // Waiting adds no attempt: every request reached the provider exactly once,
    // and the only failures are the provider's own 429s (there is no retry layer
    // in this stack), handed back as they were.
    assert_eq!(attempts.len(), 240);
    assert_eq!(served + rejected, 240);
    // The first 429s engage the pace; after that only its slow probing above the
    // quota meets one: at most 5 % of the attempts.
    assert!(rejected * 20 <= attempts.len(), "{rejected} 429s");
    // Exactly: the 11th and 12th requests (sent at 833.33 and 916.66 ms, which
    // tokio's millisecond timer makes 834 and 917 ms) exceed the quota and engage
    // the pace; then six probes above it, further and further apart.
    let rejected_at: Vec<Duration> = attempts
        .iter()
        .filter(|a| matches!(a.fault, Fault::OpenAiRateLimit { .. }))
        .map(|a| a.since_start)
        .collect();
    assert_eq!(
        rejected_at,
        [834, 917, 4_250, 6_132, 9_245, 12_906, 17_278, 21_319].map(ms)
    );
    assert_eq!(rejected, 8);
    // 12 requests a second against 10: the queue drains at about the quota (at
    // least 9 a second on average), so the last request is sent 4 to 7 s after the
    // load stops.
    let last = attempts.iter().map(|a| a.since_start).max().unwrap();
    assert!(last > secs(24) && last < secs(27), "{last:?}");
    // Exactly 24.841 s: 232 served in it, 9.3 a second.
    assert_eq!(last, ms(24_841));
}

#[tokio::test(start_paused = true)]
async fn the_waits_of_one_request_are_capped() {
    // A breaker that always says "come back in 1 s".
    let inner = tower::service_fn(|_request: Request<ReplayBody>| async {
        Err::<Response<String>, _>(ClassifiedError::local(
            backstop_classify::Failure::new(FailureKind::BreakerOpen)
                .with_hint(Some(backstop_classify::DelayHint::new(
                    secs(1),
                    backstop_classify::HintSource::Breaker,
                )))
                // A cooldown the upstream asked for: the kind the layer waits on.
                .with_retryable(backstop_classify::Retryable::Yes),
        ))
    });
    let fallback = single_model(Some(secs(60)))
        .cooldown_waits(3)
        .build()
        .unwrap();
    let asked = Instant::now();
    let error = FallbackLayer::new(fallback)
        .layer(inner)
        .oneshot(chat())
        .await
        .unwrap_err();
    // Three waits of exactly 1 s, then the fourth refusal is the answer.
    assert_eq!(asked.elapsed(), secs(3));
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    let record = ServedBy::of_error(&error).unwrap();
    assert_eq!(record.cooldown_waits, 3);
    assert_eq!(record.hops.len(), 1);
    assert_eq!(record.retry_at, Some(asked + secs(4)));
}
