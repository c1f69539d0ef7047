//! The layer in front of backstop-mock's in-memory provider, in virtual time: one case
//! per fault the mock offers, each asserting the verdict, the exact bytes the caller
//! receives, and the exact number of attempts the mock saw.

use std::time::Duration;

use backstop_classify::{
    Classification, ClassifiedError, ClassifyLayer, DelayHint, Failure, FailureKind, HintSource,
    Retryable, Rules,
};
use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario, StreamStyle};
use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};

const MODEL: &str = "gpt-4o";

fn request(stream: bool) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    );
    http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn mock(fault: Fault) -> MockProvider {
    MockProvider::new(Scenario::new(42).model(MODEL, ModelPlan::always(fault).stream_chunks(3)))
}

/// The response through the layer, and the bytes the mock sends for the same answer
/// when called directly (a second mock with the same seed and scenario).
async fn through_layer(
    rules: Rules,
    fault: Fault,
) -> (
    Result<Response<Bytes>, ClassifiedError>,
    Option<Bytes>,
    Option<Classification>,
) {
    let direct = mock(fault.clone()).oneshot(request(false)).await.ok();
    let direct_bytes = match direct {
        Some(r) => r.into_body().collect().await.ok().map(|c| c.to_bytes()),
        None => None,
    };
    let provider = mock(fault);
    let result = ClassifyLayer::new(rules)
        .layer(provider.clone())
        .oneshot(request(false))
        .await;
    assert_eq!(
        provider.attempt_count(),
        1,
        "exactly one attempt reached the mock"
    );
    match result {
        Ok(response) => {
            let classification = response.extensions().get::<Classification>().cloned();
            let (head, body) = response.into_parts();
            let bytes = body.collect().await.expect("whole body").to_bytes();
            (
                Ok(Response::from_parts(head, bytes)),
                direct_bytes,
                classification,
            )
        }
        Err(e) => (Err(e), direct_bytes, None),
    }
}

async fn failure_of(rules: Rules, fault: Fault) -> Failure {
    let (response, direct, classification) = through_layer(rules, fault).await;
    let response = response.expect("an HTTP answer");
    assert_eq!(
        Some(response.body().clone()),
        direct,
        "byte-identical to what the mock sends"
    );
    classification
        .and_then(|c| c.failure().cloned())
        .expect("a failure verdict")
}

fn hint(ms: u64, source: HintSource) -> Option<DelayHint> {
    Some(DelayHint::new(Duration::from_millis(ms), source))
}

#[tokio::test(start_paused = true)]
async fn every_http_fault_of_the_mock_is_classified() {
    use FailureKind::*;
    use Retryable::{No, Yes};
    let cases: Vec<(Rules, Fault, FailureKind, Retryable, Option<DelayHint>)> = vec![
        (
            Rules::openai(),
            Fault::OpenAiRateLimit {
                retry_after: Some("2".into()),
                retry_after_ms: None,
            },
            RateLimited,
            Yes,
            hint(2_000, HintSource::RetryAfterSeconds),
        ),
        (
            Rules::openai(),
            Fault::OpenAiRateLimit {
                retry_after: Some("2".into()),
                retry_after_ms: Some("1500".into()),
            },
            RateLimited,
            Yes,
            hint(1_500, HintSource::RetryAfterMs),
        ),
        (
            Rules::openai(),
            Fault::OpenAiRateLimit {
                retry_after: Some("-1".into()),
                retry_after_ms: Some("inf".into()),
            },
            RateLimited,
            Yes,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiRateLimit {
                retry_after: None,
                retry_after_ms: None,
            }
            .with_header("x-ratelimit-reset-requests", "2m59.56s"),
            RateLimited,
            Yes,
            hint(179_560, HintSource::RateLimitResetRequests),
        ),
        (
            Rules::openai(),
            Fault::OpenAiRequestTooLarge,
            QuotaExhausted,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiInsufficientQuota,
            QuotaExhausted,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiBillingLimit {
                code: "organization_spend_limit_exceeded".into(),
            },
            QuotaExhausted,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiBillingLimit {
                code: "credit_balance_exhausted".into(),
            },
            QuotaExhausted,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiSlowDown,
            Overloaded,
            Yes,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiContextLength,
            ContextLengthExceeded,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiContentPolicy,
            ContentFiltered,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiModelNotFound,
            ModelNotFound,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiServerError,
            ServerError,
            Yes,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiServerError.with_header("x-should-retry", "false"),
            ServerError,
            No,
            None,
        ),
        (
            Rules::openai(),
            Fault::OpenAiOverloaded,
            Overloaded,
            Yes,
            None,
        ),
        (Rules::generic(), Fault::BadGateway, ServerError, Yes, None),
        (
            Rules::generic(),
            Fault::GatewayTimeout,
            ServerError,
            Yes,
            None,
        ),
        (Rules::openai(), Fault::Unauthorized, AuthFailed, No, None),
        (
            Rules::openai(),
            Fault::InvalidRequest,
            InvalidRequest,
            No,
            None,
        ),
        (
            Rules::azure(),
            Fault::AzureRateLimit {
                message_seconds: 6,
                retry_after: Some("6".into()),
                retry_after_ms: None,
            },
            RateLimited,
            Yes,
            hint(6_000, HintSource::RetryAfterSeconds),
        ),
        (
            Rules::azure(),
            Fault::AzureRateLimit {
                message_seconds: 6,
                retry_after: None,
                retry_after_ms: Some("5500".into()),
            },
            RateLimited,
            Yes,
            hint(5_500, HintSource::RetryAfterMs),
        ),
        (
            Rules::azure(),
            Fault::AzureRateLimit {
                message_seconds: 6,
                retry_after: Some("-1".into()),
                retry_after_ms: Some("-1".into()),
            },
            RateLimited,
            Yes,
            hint(6_000, HintSource::ErrorMessage),
        ),
        (
            Rules::azure(),
            Fault::AzureRateLimit {
                message_seconds: 86_400,
                retry_after: Some("86400".into()),
                retry_after_ms: None,
            },
            QuotaExhausted,
            No,
            hint(86_400_000, HintSource::RetryAfterSeconds),
        ),
        (
            Rules::azure(),
            Fault::AzureContentFilter,
            ContentFiltered,
            No,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicOverloaded,
            Overloaded,
            Yes,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicRateLimit {
                retry_after: Some("12".into()),
            },
            RateLimited,
            Yes,
            hint(12_000, HintSource::RetryAfterSeconds),
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicRateLimit { retry_after: None },
            RateLimited,
            Yes,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicSpendLimit,
            QuotaExhausted,
            No,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicPromptTooLong,
            ContextLengthExceeded,
            No,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicError {
                status: 402,
                error_type: "billing_error".into(),
                message: "Your credit balance is too low".into(),
            },
            QuotaExhausted,
            No,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicError {
                status: 403,
                error_type: "permission_error".into(),
                message: "no".into(),
            },
            AuthFailed,
            No,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicError {
                status: 413,
                error_type: "request_too_large".into(),
                message: "Request exceeds the maximum allowed number of bytes.".into(),
            },
            InvalidRequest,
            No,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicError {
                status: 500,
                error_type: "api_error".into(),
                message: "Internal server error".into(),
            },
            ServerError,
            Yes,
            None,
        ),
        (
            Rules::anthropic(),
            Fault::AnthropicError {
                status: 504,
                error_type: "timeout_error".into(),
                message: "timed out".into(),
            },
            ServerError,
            Yes,
            None,
        ),
        (
            Rules::gemini(),
            Fault::GeminiResourceExhausted {
                retry_delay: Some("58s".into()),
                per_day: false,
            },
            RateLimited,
            Yes,
            hint(58_000, HintSource::GeminiRetryDelay),
        ),
        (
            Rules::gemini(),
            Fault::GeminiResourceExhausted {
                retry_delay: Some("45.837906927s".into()),
                per_day: false,
            },
            RateLimited,
            Yes,
            Some(DelayHint::new(
                Duration::new(45, 837_906_927),
                HintSource::GeminiRetryDelay,
            )),
        ),
        (
            Rules::gemini(),
            Fault::GeminiResourceExhausted {
                retry_delay: Some("21s".into()),
                per_day: true,
            },
            QuotaExhausted,
            No,
            hint(21_000, HintSource::GeminiRetryDelay),
        ),
        (
            Rules::gemini(),
            Fault::GeminiUnavailable,
            Overloaded,
            Yes,
            None,
        ),
        (
            Rules::gemini(),
            Fault::GeminiDeadlineExceeded,
            ServerError,
            Yes,
            None,
        ),
        (
            Rules::generic(),
            Fault::Status {
                status: 409,
                headers: vec![],
                body: String::new(),
            },
            Conflict,
            Yes,
            None,
        ),
        (
            Rules::generic(),
            Fault::Status {
                status: 408,
                headers: vec![
                    ("retry-after".into(), "1".into()),
                    ("retry-after".into(), "5".into()),
                ],
                body: "timeout".into(),
            },
            RequestTimeout,
            Yes,
            hint(1_000, HintSource::RetryAfterSeconds),
        ),
    ];
    for (rules, fault, kind, retryable, want_hint) in cases {
        let name = format!("{fault:?}");
        let f = failure_of(rules, fault).await;
        assert_eq!((f.kind, f.retryable), (kind, retryable), "{name}");
        assert_eq!(f.hint, want_hint, "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn anthropic_429_without_retry_after_carries_x_should_retry() {
    let f = failure_of(
        Rules::anthropic(),
        Fault::AnthropicRateLimit { retry_after: None },
    )
    .await;
    assert_eq!(f.should_retry_header, Some(true));
    assert_eq!(f.retryable, Retryable::Yes);
}

#[tokio::test(start_paused = true)]
async fn successes_are_success_and_untouched() {
    for (fault, content_filtered) in [(Fault::Ok, false), (Fault::OpenAiContentFilterFinish, true)]
    {
        let (response, direct, classification) = through_layer(Rules::openai(), fault).await;
        assert_eq!(classification, Some(Classification::Success));
        let body = response.unwrap().into_body();
        assert_eq!(Some(body.clone()), direct);
        // Whoever reads the body finds the refusal a 200 hides.
        let content = Rules::openai().classify_completion(&body);
        assert_eq!(
            content.failure().map(|f| f.kind),
            content_filtered.then_some(FailureKind::ContentFiltered)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn transport_faults_become_classified_errors() {
    for (fault, kind, retryable) in [
        (
            Fault::ConnectRefused,
            FailureKind::ConnectFailed,
            Retryable::Yes,
        ),
        (
            Fault::ResetBeforeHead,
            FailureKind::ConnectionLost,
            Retryable::IfIdempotent,
        ),
    ] {
        let provider = mock(fault.clone());
        let err = ClassifyLayer::default()
            .layer(provider.clone())
            .oneshot(request(false))
            .await
            .expect_err("no answer");
        assert_eq!(
            (err.kind(), err.failure().retryable),
            (kind, retryable),
            "{fault:?}"
        );
        assert_eq!(provider.attempt_count(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_hang_under_an_attempt_timeout_is_timed_out_after_exactly_that_long() {
    let provider = mock(Fault::Hang);
    let service = tower::ServiceBuilder::new()
        .layer(ClassifyLayer::default())
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(10)))
        .service(provider.clone());
    let started = tokio::time::Instant::now();
    let err = service.oneshot(request(false)).await.expect_err("hang");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_eq!(err.kind(), FailureKind::TimedOut);
    assert_eq!(provider.attempt_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn reset_after_head_is_a_success_whose_body_fails() {
    let response = ClassifyLayer::default()
        .layer(mock(Fault::ResetAfterHead))
        .oneshot(request(false))
        .await
        .unwrap();
    assert_eq!(
        response.extensions().get::<Classification>(),
        Some(&Classification::Success)
    );
    let err = response.into_body().collect().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

/// Reads a streamed body frame by frame; returns the frames and the error, if any.
async fn frames_of<B>(body: B) -> (Vec<Bytes>, Option<B::Error>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut body = body;
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
            Err(e) => return (frames, Some(e)),
        }
    }
    (frames, None)
}

#[tokio::test(start_paused = true)]
async fn sse_streams_pass_through_frame_by_frame_and_stream_errors_classify() {
    for (style, rules, kind) in [
        (
            StreamStyle::OpenAi,
            Rules::openai(),
            FailureKind::ServerError,
        ),
        (
            StreamStyle::Anthropic,
            Rules::anthropic(),
            FailureKind::Overloaded,
        ),
    ] {
        let fault = Fault::StreamErrorAfter { chunks: 2, style };
        let direct = mock(fault.clone()).oneshot(request(true)).await.unwrap();
        let (direct_frames, _) = frames_of(direct.into_body()).await;

        let response = ClassifyLayer::new(rules.clone())
            .layer(mock(fault))
            .oneshot(request(true))
            .await
            .unwrap();
        assert_eq!(
            response.extensions().get::<Classification>(),
            Some(&Classification::Success)
        );
        let (frames, error) = frames_of(response.into_body()).await;
        assert!(error.is_none());
        // The same frames, with the same boundaries: nothing was buffered or merged.
        assert_eq!(frames, direct_frames, "{style:?}");
        assert_eq!(frames.len(), 3, "{style:?}: two chunks and an error event");

        // Whoever reads the stream classifies the error event with the same rules.
        let text = String::from_utf8(frames.concat()).unwrap();
        let data = text
            .split("\n\n")
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data:")))
            .find(|d| d.contains("\"error\""))
            .expect("an error event");
        let failure = rules.classify_stream_error(data.as_bytes());
        assert_eq!(failure.kind, kind, "{style:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn sse_reset_after_chunks_delivers_the_chunks_then_the_error() {
    let response = ClassifyLayer::default()
        .layer(mock(Fault::ResetAfterChunks { chunks: 2 }))
        .oneshot(request(true))
        .await
        .unwrap();
    assert!(
        response
            .extensions()
            .get::<Classification>()
            .unwrap()
            .is_success()
    );
    let (frames, error) = frames_of(response.into_body()).await;
    assert_eq!(frames.len(), 2);
    assert_eq!(
        error.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}
