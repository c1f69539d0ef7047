//! hyper-util's legacy client → `ClassifyLayer` → backstop-mock's server, over real
//! loopback HTTP/1.1: one test per fault kind the mock offers, an SSE stream that
//! passes through chunk by chunk, and a port where nobody listens.

use std::time::Duration;

use backstop_classify::{
    BoxError, Classification, ClassifiedError, ClassifyLayer, DelayHint, Failure, FailureKind,
    HintSource, Retryable, Rules,
};
use backstop_mock::{Fault, MockServer, ModelPlan, Scenario, StreamStyle};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};

const MODEL: &str = "gpt-4o";

/// What the hyper client answers with.
type ClientResponse = http::Response<hyper::body::Incoming>;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(url: &str, stream: bool) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    );
    http::Request::post(format!("{url}/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn server(plan: ModelPlan) -> MockServer {
    MockServer::start(
        Scenario::new(7).model(MODEL, plan),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("bind loopback")
}

/// The hyper client as a tower service with an attempt timeout, so a hang ends.
fn transport(
    timeout: Duration,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = ClientResponse,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    let client = client();
    tower::service_fn(move |req: http::Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err(BoxError::from(e)),
                Err(elapsed) => Err(BoxError::from(elapsed)),
            }
        }
    })
}

/// One request through the layer to a server answering `fault`; the verdict, the
/// bytes the caller read, and how many attempts the server saw.
async fn exchange(
    rules: Rules,
    fault: Fault,
) -> (Result<(Classification, Bytes), ClassifiedError>, usize) {
    let server = server(ModelPlan::always(fault)).await;
    let service = ClassifyLayer::new(rules).layer(transport(Duration::from_secs(5)));
    let result = match service.oneshot(request(&server.base_url(), false)).await {
        Ok(response) => {
            let classification = response
                .extensions()
                .get::<Classification>()
                .cloned()
                .expect("classified");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            Ok((classification, bytes))
        }
        Err(e) => Err(e),
    };
    let attempts = server.provider().attempt_count();
    server.shutdown().await;
    (result, attempts)
}

/// The body the same scenario's in-memory provider sends for one request under
/// `plan`: the bytes a caller over loopback must read, unchanged.
async fn provider_bytes(plan: ModelPlan, stream: bool) -> Bytes {
    let provider = backstop_mock::MockProvider::new(Scenario::new(7).model(MODEL, plan));
    let response = provider.oneshot(request("", stream)).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

/// Asserts an HTTP failure verdict and that the body read is the one the same
/// scenario's in-memory provider sends.
async fn assert_http_failure(
    rules: Rules,
    fault: Fault,
    kind: FailureKind,
    retryable: Retryable,
    hint: Option<DelayHint>,
) -> Failure {
    let expected_body = provider_bytes(ModelPlan::always(fault.clone()), false).await;
    let (result, attempts) = exchange(rules, fault.clone()).await;
    let (classification, bytes) = result.expect("an HTTP answer");
    let failure = classification.failure().cloned().expect("a failure");
    assert_eq!(
        (failure.kind, failure.retryable),
        (kind, retryable),
        "{fault:?}"
    );
    assert_eq!(failure.hint, hint, "{fault:?}");
    assert_eq!(
        bytes, expected_body,
        "{fault:?}: the provider's bytes, unchanged"
    );
    assert_eq!(attempts, 1, "{fault:?}: exactly one attempt");
    failure
}

fn hint(ms: u64, source: HintSource) -> Option<DelayHint> {
    Some(DelayHint::new(Duration::from_millis(ms), source))
}

macro_rules! http_fault {
    ($name:ident, $rules:expr, $fault:expr, $kind:ident, $retryable:ident, $hint:expr) => {
        #[tokio::test]
        async fn $name() {
            assert_http_failure(
                $rules,
                $fault,
                FailureKind::$kind,
                Retryable::$retryable,
                $hint,
            )
            .await;
        }
    };
}

http_fault!(
    openai_rate_limit_waits_for_retry_after,
    Rules::openai(),
    Fault::OpenAiRateLimit {
        retry_after: Some("2".into()),
        retry_after_ms: Some("1500".into())
    },
    RateLimited,
    Yes,
    hint(1_500, HintSource::RetryAfterMs)
);
http_fault!(
    openai_request_too_large_is_never_retried,
    Rules::openai(),
    Fault::OpenAiRequestTooLarge,
    QuotaExhausted,
    No,
    None
);
http_fault!(
    openai_insufficient_quota_is_never_retried,
    Rules::openai(),
    Fault::OpenAiInsufficientQuota,
    QuotaExhausted,
    No,
    None
);
http_fault!(
    openai_spend_limit_is_never_retried,
    Rules::openai(),
    Fault::OpenAiBillingLimit {
        code: "project_spend_limit_exceeded".into()
    },
    QuotaExhausted,
    No,
    None
);
http_fault!(
    openai_slow_down_is_overloaded,
    Rules::openai(),
    Fault::OpenAiSlowDown,
    Overloaded,
    Yes,
    None
);
http_fault!(
    openai_context_length_is_never_retried,
    Rules::openai(),
    Fault::OpenAiContextLength,
    ContextLengthExceeded,
    No,
    None
);
http_fault!(
    openai_content_policy_is_never_retried,
    Rules::openai(),
    Fault::OpenAiContentPolicy,
    ContentFiltered,
    No,
    None
);
http_fault!(
    openai_model_not_found_is_never_retried,
    Rules::openai(),
    Fault::OpenAiModelNotFound,
    ModelNotFound,
    No,
    None
);
http_fault!(
    openai_server_error_is_retried,
    Rules::openai(),
    Fault::OpenAiServerError,
    ServerError,
    Yes,
    None
);
http_fault!(
    x_should_retry_false_overrides_a_500,
    Rules::openai(),
    Fault::OpenAiServerError.with_header("x-should-retry", "false"),
    ServerError,
    No,
    None
);
http_fault!(
    openai_overloaded_is_retried,
    Rules::openai(),
    Fault::OpenAiOverloaded,
    Overloaded,
    Yes,
    None
);
http_fault!(
    html_bad_gateway_is_a_server_error,
    Rules::generic(),
    Fault::BadGateway,
    ServerError,
    Yes,
    None
);
http_fault!(
    empty_gateway_timeout_is_a_server_error,
    Rules::generic(),
    Fault::GatewayTimeout,
    ServerError,
    Yes,
    None
);
http_fault!(
    unauthorized_is_auth_failed,
    Rules::openai(),
    Fault::Unauthorized,
    AuthFailed,
    No,
    None
);
http_fault!(
    invalid_request_is_never_retried,
    Rules::openai(),
    Fault::InvalidRequest,
    InvalidRequest,
    No,
    None
);
http_fault!(
    azure_rate_limit_with_minus_one_headers_reads_the_message,
    Rules::azure(),
    Fault::AzureRateLimit {
        message_seconds: 6,
        retry_after: Some("-1".into()),
        retry_after_ms: Some("-1".into())
    },
    RateLimited,
    Yes,
    hint(6_000, HintSource::ErrorMessage)
);
http_fault!(
    azure_daily_quota_is_never_waited_for,
    Rules::azure(),
    Fault::AzureRateLimit {
        message_seconds: 86_400,
        retry_after: Some("86400".into()),
        retry_after_ms: None
    },
    QuotaExhausted,
    No,
    hint(86_400_000, HintSource::RetryAfterSeconds)
);
http_fault!(
    azure_content_filter_is_never_retried,
    Rules::azure(),
    Fault::AzureContentFilter,
    ContentFiltered,
    No,
    None
);
http_fault!(
    anthropic_529_is_overloaded,
    Rules::anthropic(),
    Fault::AnthropicOverloaded,
    Overloaded,
    Yes,
    None
);
http_fault!(
    anthropic_rate_limit_is_retried,
    Rules::anthropic(),
    Fault::AnthropicRateLimit {
        retry_after: Some("12".into())
    },
    RateLimited,
    Yes,
    hint(12_000, HintSource::RetryAfterSeconds)
);
http_fault!(
    anthropic_spend_limit_is_never_retried,
    Rules::anthropic(),
    Fault::AnthropicSpendLimit,
    QuotaExhausted,
    No,
    None
);
http_fault!(
    anthropic_prompt_too_long_is_context_length,
    Rules::anthropic(),
    Fault::AnthropicPromptTooLong,
    ContextLengthExceeded,
    No,
    None
);
http_fault!(
    anthropic_billing_error_is_quota,
    Rules::anthropic(),
    Fault::AnthropicError {
        status: 402,
        error_type: "billing_error".into(),
        message: "Your credit balance is too low".into()
    },
    QuotaExhausted,
    No,
    None
);
http_fault!(
    gemini_per_minute_quota_waits_for_retry_delay,
    Rules::gemini(),
    Fault::GeminiResourceExhausted {
        retry_delay: Some("45.837906927s".into()),
        per_day: false
    },
    RateLimited,
    Yes,
    Some(DelayHint::new(
        Duration::new(45, 837_906_927),
        HintSource::GeminiRetryDelay
    ))
);
http_fault!(
    gemini_per_day_quota_is_never_retried,
    Rules::gemini(),
    Fault::GeminiResourceExhausted {
        retry_delay: Some("58s".into()),
        per_day: true
    },
    QuotaExhausted,
    No,
    hint(58_000, HintSource::GeminiRetryDelay)
);
http_fault!(
    gemini_unavailable_is_overloaded,
    Rules::gemini(),
    Fault::GeminiUnavailable,
    Overloaded,
    Yes,
    None
);
http_fault!(
    gemini_deadline_exceeded_is_a_server_error,
    Rules::gemini(),
    Fault::GeminiDeadlineExceeded,
    ServerError,
    Yes,
    None
);
http_fault!(
    arbitrary_status_409_is_a_conflict,
    Rules::generic(),
    Fault::Status {
        status: 409,
        headers: vec![],
        body: "busy".into()
    },
    Conflict,
    Yes,
    None
);

#[tokio::test]
async fn anthropic_429_without_retry_after_obeys_x_should_retry() {
    let failure = assert_http_failure(
        Rules::anthropic(),
        Fault::AnthropicRateLimit { retry_after: None },
        FailureKind::RateLimited,
        Retryable::Yes,
        None,
    )
    .await;
    assert_eq!(failure.should_retry_header, Some(true));
}

#[tokio::test]
async fn successes_are_classified_success_and_untouched() {
    for fault in [Fault::Ok, Fault::OpenAiContentFilterFinish] {
        let (result, attempts) = exchange(Rules::openai(), fault.clone()).await;
        let (classification, bytes) = result.expect("an answer");
        assert_eq!(classification, Classification::Success, "{fault:?}");
        assert_eq!(
            bytes,
            provider_bytes(ModelPlan::always(fault.clone()), false).await,
            "{fault:?}: the provider's bytes, unchanged"
        );
        assert_eq!(attempts, 1);
    }
}

#[tokio::test]
async fn nobody_listening_is_connect_failed_and_always_retryable() {
    // Bind, learn the port, close it: nobody listens there any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let err = ClassifyLayer::default()
        .layer(transport(Duration::from_secs(5)))
        .oneshot(request(&format!("http://127.0.0.1:{port}/v1"), false))
        .await
        .expect_err("connection refused");
    assert_eq!(err.kind(), FailureKind::ConnectFailed);
    assert_eq!(err.failure().retryable, Retryable::Yes);
}

#[tokio::test]
async fn connection_closed_before_the_head_is_connection_lost() {
    // Over HTTP the mock closes an accepted connection for both of these: the request
    // was sent, so only an idempotent request may be retried.
    for fault in [Fault::ResetBeforeHead, Fault::ConnectRefused] {
        let (result, attempts) = exchange(Rules::openai(), fault.clone()).await;
        let err = result.expect_err("no answer");
        assert_eq!(err.kind(), FailureKind::ConnectionLost, "{fault:?}");
        assert_eq!(
            err.failure().retryable,
            Retryable::IfIdempotent,
            "{fault:?}"
        );
        assert_eq!(attempts, 1, "{fault:?}");
    }
}

#[tokio::test]
async fn a_hang_ends_at_the_attempt_timeout_as_timed_out() {
    let server = server(ModelPlan::always(Fault::Hang)).await;
    let err = ClassifyLayer::default()
        .layer(transport(Duration::from_millis(200)))
        .oneshot(request(&server.base_url(), false))
        .await
        .expect_err("hang");
    assert_eq!(err.kind(), FailureKind::TimedOut);
    assert_eq!(err.failure().retryable, Retryable::IfIdempotent);
    assert_eq!(server.provider().attempt_count(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn reset_after_head_is_success_then_a_body_error() {
    let server = server(ModelPlan::always(Fault::ResetAfterHead)).await;
    let response = ClassifyLayer::default()
        .layer(transport(Duration::from_secs(5)))
        .oneshot(request(&server.base_url(), false))
        .await
        .expect("a head");
    assert_eq!(
        response.extensions().get::<Classification>(),
        Some(&Classification::Success)
    );
    assert!(response.into_body().collect().await.is_err());
    server.shutdown().await;
}

/// Reads the body frame by frame, keeping each data frame as it arrived.
async fn data_frames<B>(mut body: B) -> (Vec<Bytes>, bool)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
            Err(_) => return (frames, true),
        }
    }
    (frames, false)
}

#[tokio::test]
async fn sse_stream_passes_through_chunk_by_chunk() {
    // 250 ms between events: the first event is alone on the wire, so if the layer
    // buffered the stream the caller's first frame would hold more than one event.
    let server = server(
        ModelPlan::ok()
            .stream_chunks(3)
            .chunk_delay(Duration::from_millis(250)),
    )
    .await;
    let response = ClassifyLayer::default()
        .layer(transport(Duration::from_secs(5)))
        .oneshot(request(&server.base_url(), true))
        .await
        .unwrap();
    assert_eq!(
        response.extensions().get::<Classification>(),
        Some(&Classification::Success)
    );
    let mut body = response.into_body();

    // The first event arrives alone, long before the stream ends.
    let first = loop {
        let frame = body.frame().await.expect("a frame").expect("no error");
        if let Ok(data) = frame.into_data() {
            break data;
        }
    };
    assert_eq!(String::from_utf8_lossy(&first).matches("data:").count(), 1);
    assert!(!String::from_utf8_lossy(&first).contains("[DONE]"));

    let (rest, failed) = data_frames(body).await;
    assert!(!failed);
    // 3 chunks then [DONE], all delivered. (Only the first frame's boundaries are
    // asserted: a test runner starved for longer than the gap could read two later
    // events in one go, which says nothing about the layer.)
    let text = String::from_utf8(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .concat(),
    )
    .unwrap();
    assert_eq!(text.matches("data:").count(), 4, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn sse_error_event_after_200_passes_through_and_classifies() {
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
        let plan = ModelPlan::always(Fault::StreamErrorAfter { chunks: 2, style });
        let expected_body = provider_bytes(plan.clone(), true).await;
        let server = server(plan).await;
        let response = ClassifyLayer::new(rules.clone())
            .layer(transport(Duration::from_secs(5)))
            .oneshot(request(&server.base_url(), true))
            .await
            .unwrap();
        assert!(
            response
                .extensions()
                .get::<Classification>()
                .unwrap()
                .is_success()
        );
        let (frames, failed) = data_frames(response.into_body()).await;
        assert!(!failed);
        let body = Bytes::from(frames.concat());
        assert_eq!(
            body, expected_body,
            "{style:?}: the provider's bytes, unchanged"
        );
        let text = String::from_utf8(body.to_vec()).unwrap();
        let data = text
            .split("\n\n")
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data:")))
            .find(|d| d.contains("\"error\""))
            .expect("an error event");
        assert_eq!(
            rules.classify_stream_error(data.as_bytes()).kind,
            kind,
            "{style:?}"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn sse_reset_after_chunks_delivers_the_chunks_then_fails() {
    let server = server(ModelPlan::always(Fault::ResetAfterChunks { chunks: 2 })).await;
    let response = ClassifyLayer::default()
        .layer(transport(Duration::from_secs(5)))
        .oneshot(request(&server.base_url(), true))
        .await
        .unwrap();
    assert!(
        response
            .extensions()
            .get::<Classification>()
            .unwrap()
            .is_success()
    );
    let (frames, failed) = data_frames(response.into_body()).await;
    assert!(failed, "the reset reaches the caller as a body error");
    let text = String::from_utf8(frames.concat()).unwrap();
    assert_eq!(text.matches("data:").count(), 2);
    server.shutdown().await;
}
