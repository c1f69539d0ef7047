//! The retry layer over the classify layer over the mock provider, in virtual time:
//! exact attempt counts for real wire formats.

use std::time::Duration;

use backstop_classify::{AttemptLog, ClassifyLayer, FailureKind, ReplayBody, Rules, StopReason};
use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario, StreamStyle};
use backstop_retry::{HintJitter, RetryConfig, RetryError, RetryLayer};
use http::StatusCode;
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};

const PLAIN: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str =
    r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn request(body: &'static str) -> http::Request<ReplayBody> {
    http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(body))
        .unwrap()
}

fn mock(plan: ModelPlan) -> MockProvider {
    MockProvider::new(Scenario::new(1).model("gpt-4o", plan))
}

/// When each attempt reached the mock, relative to the mock's creation.
fn arrivals(mock: &MockProvider) -> Vec<Duration> {
    mock.attempts().iter().map(|a| a.since_start).collect()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

macro_rules! stack {
    ($config:expr, $rules:expr, $mock:expr) => {
        ServiceBuilder::new()
            .layer(RetryLayer::new($config).with_rng_seed(11))
            .layer(ClassifyLayer::new($rules))
            .service($mock.clone())
    };
}

#[tokio::test(start_paused = true)]
async fn two_429s_with_retry_after_then_200_take_three_attempts_at_the_hinted_times() {
    let limited = Fault::OpenAiRateLimit {
        retry_after: Some("2".into()),
        retry_after_ms: None,
    };
    let mock = mock(ModelPlan::script([limited.clone(), limited]));
    let config = RetryConfig::interactive().with_hint_jitter(HintJitter::none());
    let svc = stack!(config, Rules::openai(), mock);
    let response = svc.oneshot(request(PLAIN)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(mock.attempts_for("gpt-4o"), 3);
    assert_eq!(arrivals(&mock), [secs(0), secs(2), secs(4)]);
    let log = response.extensions().get::<AttemptLog>().unwrap();
    assert_eq!(log.stop, Some(StopReason::Succeeded));
    assert_eq!(
        log.attempts[0].provider_request_id.as_ref().unwrap(),
        "req_mock_0"
    );
}

#[tokio::test(start_paused = true)]
async fn every_never_retry_fault_from_the_providers_is_attempted_once() {
    let cases = [
        (
            Fault::OpenAiInsufficientQuota,
            Rules::openai(),
            FailureKind::QuotaExhausted,
        ),
        (
            Fault::OpenAiBillingLimit {
                code: "organization_spend_limit_exceeded".into(),
            },
            Rules::openai(),
            FailureKind::QuotaExhausted,
        ),
        (
            Fault::OpenAiRequestTooLarge,
            Rules::openai(),
            FailureKind::QuotaExhausted,
        ),
        (
            Fault::OpenAiContextLength,
            Rules::openai(),
            FailureKind::ContextLengthExceeded,
        ),
        (
            Fault::OpenAiContentPolicy,
            Rules::openai(),
            FailureKind::ContentFiltered,
        ),
        (
            Fault::OpenAiModelNotFound,
            Rules::openai(),
            FailureKind::ModelNotFound,
        ),
        (
            Fault::Unauthorized,
            Rules::openai(),
            FailureKind::AuthFailed,
        ),
        (
            Fault::InvalidRequest,
            Rules::openai(),
            FailureKind::InvalidRequest,
        ),
        (
            Fault::AzureContentFilter,
            Rules::azure(),
            FailureKind::ContentFiltered,
        ),
        (
            Fault::AnthropicSpendLimit,
            Rules::anthropic(),
            FailureKind::QuotaExhausted,
        ),
        (
            Fault::AnthropicPromptTooLong,
            Rules::anthropic(),
            FailureKind::ContextLengthExceeded,
        ),
        (
            Fault::GeminiResourceExhausted {
                retry_delay: Some("58s".into()),
                per_day: true,
            },
            Rules::gemini(),
            FailureKind::QuotaExhausted,
        ),
    ];
    for (fault, rules, kind) in cases {
        let name = fault.name();
        let mock = mock(ModelPlan::always(fault));
        let svc = stack!(RetryConfig::batch(), rules, mock);
        let start = tokio::time::Instant::now();
        let response = svc.oneshot(request(PLAIN)).await.unwrap();
        assert_eq!(mock.attempt_count(), 1, "{name}");
        assert_eq!(start.elapsed(), Duration::ZERO, "{name}");
        let log = response.extensions().get::<AttemptLog>().unwrap();
        assert_eq!(log.stop, Some(StopReason::NotRetryable), "{name}");
        assert_eq!(
            log.attempts[0].classification.failure().unwrap().kind,
            kind,
            "{name}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_retried_on_the_batch_schedule() {
    let mock = mock(ModelPlan::script([
        Fault::OpenAiServerError,
        Fault::BadGateway,
        Fault::OpenAiOverloaded,
    ]));
    let svc = stack!(RetryConfig::batch(), Rules::openai(), mock);
    let response = svc.oneshot(request(PLAIN)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(arrivals(&mock), [secs(0), secs(2), secs(6), secs(14)]);
}

#[tokio::test(start_paused = true)]
async fn an_always_failing_model_gets_exactly_max_attempts() {
    let mock = mock(ModelPlan::always(Fault::AnthropicOverloaded));
    let svc = stack!(RetryConfig::batch(), Rules::anthropic(), mock);
    let response = svc.oneshot(request(PLAIN)).await.unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(mock.attempt_count(), 4);
    let log = response.extensions().get::<AttemptLog>().unwrap();
    assert_eq!(log.stop, Some(StopReason::MaxAttempts));
}

#[tokio::test(start_paused = true)]
async fn azure_daily_quota_retry_after_is_not_waited_on() {
    let mock = mock(ModelPlan::always(Fault::AzureRateLimit {
        message_seconds: 86_400,
        retry_after: Some("86400".into()),
        retry_after_ms: None,
    }));
    let svc = stack!(RetryConfig::interactive(), Rules::azure(), mock);
    let start = tokio::time::Instant::now();
    let response = svc.oneshot(request(PLAIN)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(mock.attempt_count(), 1);
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(start_paused = true)]
async fn connection_refused_is_retried_and_reset_after_send_only_with_a_key() {
    let mock1 = mock(ModelPlan::script([
        Fault::ConnectRefused,
        Fault::ConnectRefused,
    ]));
    let svc = stack!(RetryConfig::batch(), Rules::openai(), mock1);
    assert_eq!(
        svc.oneshot(request(PLAIN)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(mock1.attempt_count(), 3);

    let mock2 = mock(ModelPlan::script([Fault::ResetBeforeHead]));
    let svc = stack!(RetryConfig::batch(), Rules::openai(), mock2);
    let error = svc.oneshot(request(PLAIN)).await.unwrap_err();
    assert_eq!(error.kind(), FailureKind::ConnectionLost);
    assert_eq!(mock2.attempt_count(), 1);

    let mock3 = mock(ModelPlan::script([Fault::ResetBeforeHead]));
    let config = RetryConfig::batch().with_idempotency_key(true);
    let svc = stack!(config, Rules::openai(), mock3);
    assert_eq!(
        svc.oneshot(request(PLAIN)).await.unwrap().status(),
        StatusCode::OK
    );
    let attempts = mock3.attempts();
    assert_eq!(attempts.len(), 2);
    let key = attempts[0].header("idempotency-key").unwrap();
    assert_eq!(attempts[1].header("idempotency-key"), Some(key));
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_is_cut_by_the_attempt_timeout() {
    let mock = mock(ModelPlan::script([Fault::Hang]));
    let config = RetryConfig::batch()
        .with_attempt_timeout(Some(secs(10)))
        .unwrap()
        .with_idempotency_key(true);
    let svc = stack!(config, Rules::openai(), mock);
    let response = svc.oneshot(request(PLAIN)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(arrivals(&mock), [secs(0), secs(12)]);
}

#[tokio::test(start_paused = true)]
async fn a_first_event_error_is_retried_and_the_caller_gets_one_clean_stream() {
    let mock = mock(ModelPlan::script([Fault::StreamErrorAfter {
        chunks: 0,
        style: StreamStyle::Anthropic,
    }]));
    let svc = stack!(RetryConfig::batch(), Rules::anthropic(), mock);
    let response = svc.oneshot(request(STREAM)).await.unwrap();
    assert_eq!(mock.attempt_count(), 2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("error"), "{text}");
    assert_eq!(text.matches("data: [DONE]").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_mid_stream_error_is_surfaced_once_and_never_replayed() {
    let mock = mock(ModelPlan::script([Fault::StreamErrorAfter {
        chunks: 2,
        style: StreamStyle::OpenAi,
    }]));
    let svc = stack!(RetryConfig::batch(), Rules::openai(), mock);
    let response = svc.oneshot(request(STREAM)).await.unwrap();
    let mut body = response.into_body();
    let mut delivered = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => delivered.extend_from_slice(frame.data_ref().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("the stream should end with the provider's error"),
        }
    };
    assert!(body.frame().await.is_none());
    let text = std::str::from_utf8(&delivered).unwrap();
    assert_eq!(text.matches("data: ").count(), 2, "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    assert_eq!(
        error.cause().unwrap().downcast_ref::<RetryError>(),
        Some(&RetryError::StreamInterrupted {
            delivered: delivered.len() as u64
        })
    );
    tokio::time::sleep(secs(120)).await;
    assert_eq!(mock.attempt_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_reset_before_its_first_byte_is_retried_only_with_a_key() {
    let mock1 = mock(ModelPlan::script([Fault::ResetAfterHead]));
    let svc = stack!(RetryConfig::batch(), Rules::openai(), mock1);
    let error = svc.oneshot(request(STREAM)).await.unwrap_err();
    assert_eq!(error.kind(), FailureKind::ConnectionLost);
    assert_eq!(mock1.attempt_count(), 1);

    let mock2 = mock(ModelPlan::script([Fault::ResetAfterHead]));
    let config = RetryConfig::batch().with_idempotency_key(true);
    let svc = stack!(config, Rules::openai(), mock2);
    let response = svc.oneshot(request(STREAM)).await.unwrap();
    assert_eq!(mock2.attempt_count(), 2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
}

/// `retry-after-ms: 18446744073709551615999`: u64::MAX seconds and 999 ms, the
/// largest hint a provider can send in whole milliseconds.
const HUGE_MS: &str = "18446744073709551615999";

/// The longest wait the layer records (it counts waits in whole milliseconds, as
/// tokio's timer does).
const LONGEST_RECORDED_WAIT: Duration = Duration::from_millis(u64::MAX);

fn huge_hint() -> Duration {
    Duration::new(u64::MAX, 999_000_000)
}

/// With no cap on hints (`Duration::MAX`), a provider's absurd hint is waited out like
/// any other: the hint plus its jitter saturates instead of overflowing, the retries
/// happen (in virtual time, decades later), and the caller gets the provider's last
/// response with its hint untouched.
#[tokio::test(start_paused = true)]
async fn a_hint_of_u64_max_seconds_with_no_hint_cap_is_waited_out_without_a_panic() {
    let overloaded = Fault::Status {
        status: 503,
        headers: vec![("retry-after-ms".into(), HUGE_MS.into())],
        body: String::new(),
    };
    let jitters = [
        // The default: up to a tenth of the hint, at most a second.
        HintJitter::default(),
        // Up to the whole hint: the jitter's own product does not fit a `Duration`.
        HintJitter::new(1.0, Duration::MAX).unwrap(),
    ];
    for jitter in jitters {
        let mock = mock(ModelPlan::always(overloaded.clone()));
        let config = RetryConfig::interactive()
            .with_max_hint(Duration::MAX)
            .with_hint_jitter(jitter);
        let svc = stack!(config, Rules::openai(), mock);
        let response = svc.oneshot(request(PLAIN)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after-ms"], HUGE_MS);
        assert_eq!(mock.attempts_for("gpt-4o"), 3, "{jitter:?}");
        let log = response.extensions().get::<AttemptLog>().unwrap();
        assert_eq!(log.stop, Some(StopReason::MaxAttempts));
        for retry in &log.attempts.as_slice()[1..] {
            assert_eq!(retry.hint_used.map(|h| h.delay), Some(huge_hint()));
            // The saturated wait, in the whole milliseconds the layer records.
            assert_eq!(retry.waited, LONGEST_RECORDED_WAIT, "{jitter:?}");
        }
    }
}

/// The same for a rate-limit reset (`x-ratelimit-reset-requests`, waited as
/// `max(backoff, hint)`) and for Gemini's `retryDelay`, each near `Duration::MAX`.
#[tokio::test(start_paused = true)]
async fn a_reset_or_retry_delay_near_duration_max_with_no_hint_cap_is_waited_out_without_a_panic() {
    let reset = Fault::Status {
        status: 429,
        headers: vec![(
            "x-ratelimit-reset-requests".into(),
            "5124095576030431h15.999999999s".into(),
        )],
        body: String::new(),
    };
    let gemini = Fault::GeminiResourceExhausted {
        retry_delay: Some("18446744073709551615.999999999s".into()),
        per_day: false,
    };
    // Gemini's long retry delay would make the 429 a quota by default: not retried.
    let cases = [
        (reset, Rules::openai()),
        (gemini, Rules::gemini().with_quota_wait_threshold(None)),
    ];
    for (fault, rules) in cases {
        let mock = mock(ModelPlan::always(fault.clone()));
        let config = RetryConfig::interactive().with_max_hint(Duration::MAX);
        let svc = stack!(config, rules, mock);
        let response = svc.oneshot(request(PLAIN)).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{fault:?}"
        );
        assert_eq!(mock.attempts_for("gpt-4o"), 3, "{fault:?}");
        let log = response.extensions().get::<AttemptLog>().unwrap();
        assert_eq!(log.stop, Some(StopReason::MaxAttempts));
        for retry in &log.attempts.as_slice()[1..] {
            assert_eq!(retry.hint_used.map(|h| h.delay), Some(Duration::MAX));
            assert_eq!(retry.waited, LONGEST_RECORDED_WAIT, "{fault:?}");
        }
    }
}

/// Time limits far past any real one (`deadline = "300000000000y"`, an attempt timeout
/// or stream idle timeout of `Duration::MAX`): their instants are capped instead of
/// overflowing, and a request that fails once and then streams is served as usual.
#[tokio::test(start_paused = true)]
async fn time_limits_near_duration_max_serve_a_request_as_usual() {
    // As humantime reads "300000000000y": years of 365.25 days.
    let three_hundred_billion_years = Duration::from_secs(300_000_000_000 * 31_557_600);
    let configs = [
        RetryConfig::interactive().with_deadline(Some(three_hundred_billion_years)),
        RetryConfig::interactive().with_deadline(Some(Duration::MAX)),
        RetryConfig::interactive().with_attempt_timeout(Some(Duration::MAX)),
        RetryConfig::interactive().with_stream_idle_timeout(Some(Duration::MAX)),
    ];
    for config in configs {
        let config = config.unwrap().with_hint_jitter(HintJitter::none());
        let plan = ModelPlan::script([Fault::OpenAiServerError])
            .stream_chunks(3)
            .chunk_delay(Duration::from_millis(10));
        let mock = mock(plan);
        let svc = stack!(config.clone(), Rules::openai(), mock);
        let response = svc.oneshot(request(STREAM)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{config:?}");
        let log = response.extensions().get::<AttemptLog>().unwrap().clone();
        assert_eq!(log.stop, Some(StopReason::Succeeded));
        assert_eq!(mock.attempts_for("gpt-4o"), 2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"), "{config:?}");
    }
}
