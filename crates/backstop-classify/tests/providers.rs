//! One table per provider format: status + headers + body in, verdict out. Every row
//! of providers.md is here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backstop_classify::{
    Classification, DelayHint, Failure, FailureKind, FallbackRoute, HintSource, Retryable, Rule,
    Rules,
};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// 2025-08-21T12:40:00Z: the anchor for date-based hints.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_755_780_000)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn classify(rules: &Rules, status: u16, hdrs: &[(&str, &str)], body: &str) -> Failure {
    let status = StatusCode::from_u16(status).unwrap();
    match rules.classify_response(status, &headers(hdrs), body.as_bytes(), now()) {
        Classification::Failure(f) => f,
        Classification::Success => panic!("{status} classified as success"),
    }
}

fn hint(secs_millis: u64, source: HintSource) -> Option<DelayHint> {
    Some(DelayHint::new(Duration::from_millis(secs_millis), source))
}

/// One row: what goes in, what must come out.
struct Row {
    name: &'static str,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    kind: FailureKind,
    retryable: Retryable,
    hint: Option<DelayHint>,
}

fn check_rows(rules: &Rules, rows: &[Row]) {
    for row in rows {
        let failure = classify(rules, row.status, row.headers, row.body);
        assert_eq!(failure.kind, row.kind, "{}: kind", row.name);
        assert_eq!(failure.retryable, row.retryable, "{}: retryable", row.name);
        assert_eq!(failure.hint, row.hint, "{}: hint", row.name);
        assert_eq!(
            failure.status,
            Some(StatusCode::from_u16(row.status).unwrap()),
            "{}: status",
            row.name
        );
    }
}

use FailureKind::*;
use Retryable::{IfIdempotent, No, Yes};

#[test]
fn openai_table() {
    let rows = [
        Row {
            name: "RPM limit, retry-after-ms",
            status: 429,
            headers: &[
                ("retry-after-ms", "1200"),
                ("x-ratelimit-reset-requests", "6m0s"),
            ],
            body: r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): Limit 500, Used 500, Requested 1.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(1_200, HintSource::RetryAfterMs),
        },
        Row {
            name: "TPM limit, only reset headers: the empty bucket's reset",
            status: 429,
            headers: &[
                ("x-ratelimit-remaining-requests", "499"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-requests", "120ms"),
                ("x-ratelimit-reset-tokens", "7.66s"),
            ],
            body: r#"{"error":{"message":"Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29000, Requested 1500.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(7_660, HintSource::RateLimitResetTokens),
        },
        Row {
            name: "Request too large for the whole TPM limit",
            status: 429,
            headers: &[("retry-after", "1")],
            body: r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 30601. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: hint(1_000, HintSource::RetryAfterSeconds),
        },
        Row {
            name: "insufficient_quota (type and code)",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "insufficient_quota, older null code",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":null}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "credit_balance_exhausted",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"credit balance is too low","type":"invalid_request_error","code":"credit_balance_exhausted"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "organization_spend_limit_exceeded",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"spend limit","type":"insufficient_quota","code":"organization_spend_limit_exceeded"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "project_spend_limit_exceeded",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"spend limit","type":"requests","code":"project_spend_limit_exceeded"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "organization_usage_limit_exceeded",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"usage limit","type":null,"code":"organization_usage_limit_exceeded"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "slow_down on 429",
            status: 429,
            headers: &[],
            body: r#"{"error":{"message":"Please reduce your request rate.","type":"requests","code":"slow_down"}}"#,
            kind: Overloaded,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "slow_down on 503 (formerly)",
            status: 503,
            headers: &[],
            body: r#"{"error":{"message":"Please reduce your request rate.","type":"server_error","code":"slow_down"}}"#,
            kind: Overloaded,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "context_length_exceeded",
            status: 400,
            headers: &[],
            body: r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            kind: ContextLengthExceeded,
            retryable: No,
            hint: None,
        },
        Row {
            name: "model_not_found",
            status: 404,
            headers: &[],
            body: r#"{"error":{"message":"The model `gpt-5-nano` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            kind: ModelNotFound,
            retryable: No,
            hint: None,
        },
        Row {
            name: "content_policy_violation",
            status: 400,
            headers: &[],
            body: r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#,
            kind: ContentFiltered,
            retryable: No,
            hint: None,
        },
        Row {
            name: "server_error",
            status: 500,
            headers: &[],
            body: r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "overloaded",
            status: 503,
            headers: &[("retry-after", "2")],
            body: r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"service_unavailable_error","param":null,"code":"server_is_overloaded"}}"#,
            kind: Overloaded,
            retryable: Yes,
            hint: hint(2_000, HintSource::RetryAfterSeconds),
        },
        Row {
            name: "bad gateway, HTML",
            status: 502,
            headers: &[("content-type", "text/html")],
            body: "<html><head><title>502 Bad Gateway</title></head></html>",
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "gateway timeout, empty",
            status: 504,
            headers: &[],
            body: "",
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "401 invalid_api_key",
            status: 401,
            headers: &[],
            body: r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            kind: AuthFailed,
            retryable: No,
            hint: None,
        },
    ];
    check_rows(&Rules::openai(), &rows);
}

#[test]
fn openai_request_too_large_that_fits_is_an_ordinary_rate_limit() {
    let body = r#"{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 2000.","type":"tokens","code":"rate_limit_exceeded"}}"#;
    assert_eq!(classify(&Rules::openai(), 429, &[], body).kind, RateLimited);
}

#[test]
fn x_should_retry_overrides_the_status_rule_and_is_recorded() {
    let rules = Rules::openai();
    // false beats a retryable status.
    let f = classify(&rules, 503, &[("x-should-retry", "false")], "");
    assert_eq!(
        (f.kind, f.retryable, f.should_retry_header),
        (Overloaded, No, Some(false))
    );
    // true beats a non-retryable status rule.
    let f = classify(&rules, 400, &[("x-should-retry", "true")], "{}");
    assert_eq!(
        (f.kind, f.retryable, f.should_retry_header),
        (InvalidRequest, Yes, Some(true))
    );
    // true does not beat a body that proves a retry useless.
    let quota =
        r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"quota"}}"#;
    let f = classify(&rules, 429, &[("x-should-retry", "true")], quota);
    assert_eq!(
        (f.kind, f.retryable, f.should_retry_header),
        (QuotaExhausted, No, Some(true))
    );
    // Anything but true/false is ignored.
    let f = classify(&rules, 500, &[("x-should-retry", "maybe")], "");
    assert_eq!((f.retryable, f.should_retry_header), (Yes, None));
}

#[test]
fn bucket_reset_hints_only_apply_to_rate_limits() {
    // OpenAI sends rate-limit headers on every response; a 500 must not wait for a bucket.
    let f = classify(
        &Rules::openai(),
        500,
        &[("x-ratelimit-reset-requests", "6m0s")],
        "",
    );
    assert_eq!(f.hint, None);
    let f = classify(
        &Rules::openai(),
        429,
        &[("x-ratelimit-reset-requests", "6m0s")],
        "",
    );
    assert_eq!(f.hint, hint(360_000, HintSource::RateLimitResetRequests));
}

#[test]
fn anthropic_table() {
    let rows = [
        Row {
            name: "400 invalid_request_error",
            status: 400,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: field required"},"request_id":"req_1"}"#,
            kind: InvalidRequest,
            retryable: No,
            hint: None,
        },
        Row {
            name: "401 authentication_error",
            status: 401,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            kind: AuthFailed,
            retryable: No,
            hint: None,
        },
        Row {
            name: "402 billing_error",
            status: 402,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"billing_error","message":"Your credit balance is too low"}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "403 permission_error",
            status: 403,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"permission_error","message":"no access"}}"#,
            kind: AuthFailed,
            retryable: No,
            hint: None,
        },
        Row {
            name: "404 not_found_error naming a model",
            status: 404,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-3-opus-2099"}}"#,
            kind: ModelNotFound,
            retryable: No,
            hint: None,
        },
        Row {
            name: "404 not_found_error on a wrong path",
            status: 404,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"not_found_error","message":"Not Found"}}"#,
            kind: InvalidRequest,
            retryable: No,
            hint: None,
        },
        Row {
            name: "413 request_too_large",
            status: 413,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#,
            kind: InvalidRequest,
            retryable: No,
            hint: None,
        },
        Row {
            name: "429 rate_limit_error with retry-after",
            status: 429,
            headers: &[
                ("retry-after", "12"),
                ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:59Z"),
            ],
            body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(12_000, HintSource::RetryAfterSeconds),
        },
        Row {
            name: "429 with x-should-retry true and only reset timestamps",
            status: 429,
            headers: &[
                ("x-should-retry", "true"),
                ("anthropic-ratelimit-requests-remaining", "10"),
                ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:05Z"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2025-08-21T12:40:59Z",
                ),
            ],
            body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"rate limited"}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(59_000, HintSource::AnthropicRateLimitReset),
        },
        Row {
            name: "429 spend limit, even with x-should-retry true",
            status: 429,
            headers: &[("x-should-retry", "true")],
            body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified workspace API usage limits.","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: None,
        },
        Row {
            name: "500 api_error",
            status: 500,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "504 timeout_error",
            status: 504,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"timeout_error","message":"Request timed out"}}"#,
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "529 overloaded_error",
            status: 529,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            kind: Overloaded,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "context overflow",
            status: 400,
            headers: &[],
            body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 205351 tokens > 200000 maximum"}}"#,
            kind: ContextLengthExceeded,
            retryable: No,
            hint: None,
        },
    ];
    check_rows(&Rules::anthropic(), &rows);
}

#[test]
fn anthropic_spend_limit_records_the_detail_code_and_the_header() {
    let f = classify(
        &Rules::anthropic(),
        429,
        &[("x-should-retry", "true")],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"m","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
    );
    let pe = f.provider_error.clone().unwrap();
    assert_eq!(pe.error_type.as_deref(), Some("rate_limit_error"));
    assert_eq!(pe.code.as_deref(), Some("enforced_spend_limit_reached"));
    assert_eq!(f.should_retry_header, Some(true));
    assert_eq!(f.fallback_route(), FallbackRoute::NextModel);
}

#[test]
fn anthropic_stream_errors_after_a_200() {
    let rules = Rules::anthropic();
    let f = rules.classify_stream_error(
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    assert_eq!((f.kind, f.retryable, f.status), (Overloaded, Yes, None));
    let f = rules.classify_stream_error(
        br#"data: {"type":"error","error":{"type":"api_error","message":"boom"}}"#,
    );
    assert_eq!(f.kind, ServerError);
    let f = rules.classify_stream_error(
        br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#,
    );
    assert_eq!(f.kind, RateLimited);
}

#[test]
fn openai_gemini_and_garbage_stream_errors() {
    let rules = Rules::generic();
    let f = rules.classify_stream_error(
        br#"{"error":{"message":"The server had an error","type":"server_error","code":null}}"#,
    );
    assert_eq!(f.kind, ServerError);
    let f = rules.classify_stream_error(
        br#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
    );
    assert_eq!((f.kind, f.retryable), (QuotaExhausted, No));
    // Gemini and Azure carry the status in error.code.
    let f = rules
        .classify_stream_error(br#"{"error":{"code":503,"message":"The model is overloaded."}}"#);
    assert_eq!(f.kind, Overloaded);
    let f = rules.classify_stream_error(br#"[{"error":{"code":429,"message":"exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"3s"}]}}]"#);
    assert_eq!(
        (f.kind, f.hint),
        (RateLimited, hint(3_000, HintSource::GeminiRetryDelay))
    );
    for garbage in [
        &b""[..],
        b"data: [DONE]",
        b"not json",
        b"{\"error\":",
        b"\xff\xfe",
    ] {
        let f = rules.classify_stream_error(garbage);
        assert_eq!((f.kind, f.retryable), (ServerError, Yes), "{garbage:?}");
    }
}

#[test]
fn azure_table() {
    let rows = [
        Row {
            name: "429 string code with retry-after",
            status: 429,
            headers: &[("retry-after", "6")],
            body: r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease"}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(6_000, HintSource::RetryAfterSeconds),
        },
        Row {
            name: "429 with only the message's wait",
            status: 429,
            headers: &[],
            body: r#"{"error":{"code":"429","message":"Rate limit is exceeded. Try again in 50 seconds."}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(50_000, HintSource::ErrorMessage),
        },
        Row {
            name: "retry-after-ms beats retry-after",
            status: 429,
            headers: &[("retry-after", "6"), ("retry-after-ms", "5500")],
            body: r#"{"error":{"code":"429","message":"Please retry after 6 seconds."}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(5_500, HintSource::RetryAfterMs),
        },
        Row {
            name: "x-ms-retry-after-ms",
            status: 429,
            headers: &[("x-ms-retry-after-ms", "750")],
            body: r#"{"error":{"code":"429","message":"Rate limit is exceeded."}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(750, HintSource::XMsRetryAfterMs),
        },
        Row {
            name: "only x-rate-limit-reset-tokens",
            status: 429,
            headers: &[("x-rate-limit-reset-tokens", "55")],
            body: r#"{"error":{"code":"429","message":"Rate limit is exceeded."}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(55_000, HintSource::AzureRateLimitResetTokens),
        },
        Row {
            name: "-1 and 0 in every hint header mean no hint",
            status: 429,
            headers: &[
                ("retry-after", "-1"),
                ("retry-after-ms", "0"),
                ("x-ms-retry-after-ms", "-1"),
                ("x-rate-limit-reset-tokens", "-1"),
            ],
            body: r#"{"error":{"code":"429","message":"Rate limit is exceeded."}}"#,
            kind: RateLimited,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "daily quota: retry after 86400 seconds",
            status: 429,
            headers: &[("retry-after", "86400")],
            body: r#"{"error":{"code":"429","message":"Requests to the Embeddings_Create Operation have exceeded call rate limit of your current AIServices S0 pricing tier. Please retry after 86400 seconds."}}"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: hint(86_400_000, HintSource::RetryAfterSeconds),
        },
        Row {
            name: "content filter",
            status: 400,
            headers: &[],
            body: r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"}}}}}"#,
            kind: ContentFiltered,
            retryable: No,
            hint: None,
        },
        Row {
            name: "content filter, inner code only",
            status: 400,
            headers: &[],
            body: r#"{"error":{"message":"filtered","code":"BadRequest","innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#,
            kind: ContentFiltered,
            retryable: No,
            hint: None,
        },
    ];
    check_rows(&Rules::azure(), &rows);
}

#[test]
fn azure_message_hint_is_read_only_under_the_azure_profile() {
    let body =
        r#"{"error":{"code":"429","message":"Rate limit is exceeded. Try again in 50 seconds."}}"#;
    assert_eq!(classify(&Rules::generic(), 429, &[], body).hint, None);
    assert_eq!(classify(&Rules::openai(), 429, &[], body).hint, None);
    assert_eq!(
        classify(&Rules::azure(), 429, &[], body).hint,
        hint(50_000, HintSource::ErrorMessage)
    );
}

#[test]
fn gemini_table() {
    let rows = [
        Row {
            name: "RESOURCE_EXHAUSTED, array body, no details",
            status: 429,
            headers: &[],
            body: r#"[{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}]"#,
            kind: RateLimited,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "per-minute quota with RetryInfo",
            status: 429,
            headers: &[],
            body: r#"[{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}]"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(58_000, HintSource::GeminiRetryDelay),
        },
        Row {
            name: "fractional retryDelay",
            status: 429,
            headers: &[],
            body: r#"[{"error":{"code":429,"message":"x","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"45.837906927s"}]}}]"#,
            kind: RateLimited,
            retryable: Yes,
            hint: Some(DelayHint::new(
                Duration::new(45, 837_906_927),
                HintSource::GeminiRetryDelay,
            )),
        },
        Row {
            name: "per-day quota: never waited for",
            status: 429,
            headers: &[],
            body: r#"[{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"21s"}]}}]"#,
            kind: QuotaExhausted,
            retryable: No,
            hint: hint(21_000, HintSource::GeminiRetryDelay),
        },
        Row {
            name: "a retry-after header beats the body",
            status: 429,
            headers: &[("retry-after", "3")],
            body: r#"[{"error":{"code":429,"message":"x","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"58s"}]}}]"#,
            kind: RateLimited,
            retryable: Yes,
            hint: hint(3_000, HintSource::RetryAfterSeconds),
        },
        Row {
            name: "503 UNAVAILABLE",
            status: 503,
            headers: &[],
            body: r#"[{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}]"#,
            kind: Overloaded,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "504 DEADLINE_EXCEEDED",
            status: 504,
            headers: &[],
            body: r#"[{"error":{"code":504,"message":"Deadline expired before operation could complete.","status":"DEADLINE_EXCEEDED"}}]"#,
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "500 INTERNAL",
            status: 500,
            headers: &[],
            body: r#"[{"error":{"code":500,"message":"An internal error has occurred.","status":"INTERNAL"}}]"#,
            kind: ServerError,
            retryable: Yes,
            hint: None,
        },
        Row {
            name: "context overflow",
            status: 400,
            headers: &[],
            body: r#"[{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}]"#,
            kind: ContextLengthExceeded,
            retryable: No,
            hint: None,
        },
        Row {
            name: "model not found",
            status: 404,
            headers: &[],
            body: r#"[{"error":{"code":404,"message":"models/gemini-9.0-pro is not found for API version v1beta, or is not supported for generateContent.","status":"NOT_FOUND"}}]"#,
            kind: ModelNotFound,
            retryable: No,
            hint: None,
        },
        Row {
            name: "bad key: 400 INVALID_ARGUMENT",
            status: 400,
            headers: &[],
            body: r#"[{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT"}}]"#,
            kind: AuthFailed,
            retryable: No,
            hint: None,
        },
        Row {
            name: "other INVALID_ARGUMENT",
            status: 400,
            headers: &[],
            body: r#"[{"error":{"code":400,"message":"Invalid value at 'contents[0].role'","status":"INVALID_ARGUMENT"}}]"#,
            kind: InvalidRequest,
            retryable: No,
            hint: None,
        },
        Row {
            name: "403 PERMISSION_DENIED",
            status: 403,
            headers: &[],
            body: r#"[{"error":{"code":403,"message":"denied","status":"PERMISSION_DENIED"}}]"#,
            kind: AuthFailed,
            retryable: No,
            hint: None,
        },
    ];
    check_rows(&Rules::gemini(), &rows);
    // The same bodies classify the same under the generic profile (gateways).
    check_rows(&Rules::generic(), &rows);
}

#[test]
fn context_window_messages_without_a_code() {
    for message in [
        "This model's maximum context length is 8192 tokens",
        "Input tokens exceed context limit",
        "The prompt is longer than the model's context length",
        "the request exceeds the available context size, try increasing it",
        "The input token count exceeds the maximum number of tokens allowed",
        "prompt is too long: 300000 tokens > 200000 maximum",
    ] {
        let body = format!(r#"{{"error":{{"message":"{message}","type":"BadRequestError"}}}}"#);
        let f = classify(&Rules::generic(), 400, &[], &body);
        assert_eq!(f.kind, ContextLengthExceeded, "{message}");
        assert_eq!(f.fallback_route(), FallbackRoute::ContextChain);
    }
}

#[test]
fn content_policy_messages_without_a_code() {
    for message in [
        "Error: content_policy_violation",
        "Blocked: ResponsibleAIPolicyViolation",
        "finish: content_filter",
        "Your request was rejected as a result of our safety system.",
    ] {
        let body = format!(r#"{{"error":{{"message":"{message}"}}}}"#);
        let f = classify(&Rules::generic(), 400, &[], &body);
        assert_eq!(f.kind, ContentFiltered, "{message}");
        assert_eq!(f.fallback_route(), FallbackRoute::ContentChain);
    }
}

#[test]
fn status_fallbacks_without_a_body() {
    for (status, kind, retryable) in [
        (408, RequestTimeout, Yes),
        (409, Conflict, Yes),
        (429, RateLimited, Yes),
        (500, ServerError, Yes),
        (502, ServerError, Yes),
        (504, ServerError, Yes),
        (503, Overloaded, Yes),
        (529, Overloaded, Yes),
        (401, AuthFailed, No),
        (403, AuthFailed, No),
        (404, InvalidRequest, No),
        (400, InvalidRequest, No),
        (413, InvalidRequest, No),
        (422, InvalidRequest, No),
        (418, InvalidRequest, No),
        (501, ServerError, Yes),
        (599, ServerError, Yes),
    ] {
        let f = classify(&Rules::generic(), status, &[], "");
        assert_eq!((f.kind, f.retryable), (kind, retryable), "{status}");
        let classified = backstop_classify::classify_status(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
        );
        assert_eq!(classified.failure().map(|f| f.kind), Some(kind), "{status}");
    }
}

#[test]
fn statuses_below_400_are_success() {
    for status in [200, 201, 204, 301, 304, 399] {
        let status = StatusCode::from_u16(status).unwrap();
        let body = br#"{"error":{"code":"insufficient_quota"}}"#;
        assert_eq!(
            Rules::generic().classify_response(
                status,
                &headers(&[("x-should-retry", "false")]),
                body,
                now()
            ),
            Classification::Success
        );
    }
}

#[test]
fn unreadable_bodies_classify_by_status() {
    let quota =
        r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"quota"}}"#;
    for body in [
        "not json at all",
        &quota[..quota.len() - 5], // truncated
        "[]",
        "[1]",
        "null",
        r#"{"error":{"code":{"nested":true}}}"#,
        "\u{feff}{}",
    ] {
        let f = classify(&Rules::openai(), 429, &[("retry-after", "4")], body);
        assert_eq!(
            (f.kind, f.retryable, f.hint),
            (RateLimited, Yes, hint(4_000, HintSource::RetryAfterSeconds)),
            "{body:?}"
        );
    }
}

#[test]
fn a_body_over_the_inspection_cap_classifies_by_status() {
    let quota =
        r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"quota"}}"#;
    let rules = Rules::openai().with_max_inspected_body(quota.len() - 1);
    assert_eq!(classify(&rules, 429, &[], quota).kind, RateLimited);
    let rules = Rules::openai().with_max_inspected_body(quota.len());
    assert_eq!(classify(&rules, 429, &[], quota).kind, QuotaExhausted);
}

#[test]
fn user_rules_override_built_ins_without_forking() {
    let body = r#"{"error":{"message":"Budget has been exceeded! Current cost: 10.2","type":"budget_exceeded","code":"400"}}"#;
    // Built in: a plain 400.
    assert_eq!(
        classify(&Rules::generic(), 400, &[], body).kind,
        InvalidRequest
    );
    let rules = Rules::generic().with_rule(
        Rule::new()
            .when_error_type("BUDGET_EXCEEDED")
            .then_kind(QuotaExhausted),
    );
    let f = classify(&rules, 400, &[], body);
    assert_eq!((f.kind, f.retryable), (QuotaExhausted, No));

    // By status: a 404 this upstream uses for a transient route miss.
    let rules = Rules::generic().with_rule(
        Rule::new()
            .when_status(StatusCode::NOT_FOUND)
            .then_retryable(Yes),
    );
    let f = classify(&rules, 404, &[], "");
    assert_eq!((f.kind, f.retryable), (InvalidRequest, Yes));
    assert_eq!(classify(&rules, 400, &[], "").retryable, No);

    // By code, overriding a built-in kind.
    let rules =
        Rules::openai().with_rule(Rule::new().when_code("slow_down").then_kind(RateLimited));
    let slow = r#"{"error":{"message":"slow","code":"slow_down"}}"#;
    assert_eq!(classify(&rules, 429, &[], slow).kind, RateLimited);

    // By message substring (case-insensitive), and a user retry verdict beats x-should-retry.
    let rules = Rules::generic().with_rule(
        Rule::new()
            .when_message_contains("Model Is Loading")
            .then_kind(Overloaded)
            .then_retryable(IfIdempotent),
    );
    let loading = r#"{"error":"model is loading, please wait"}"#;
    let f = classify(&rules, 400, &[("x-should-retry", "false")], loading);
    assert_eq!((f.kind, f.retryable), (Overloaded, IfIdempotent));

    // All conditions of a rule must hold; the first matching rule wins.
    let rules = Rules::generic()
        .with_rule(
            Rule::new()
                .when_status(StatusCode::BAD_REQUEST)
                .when_code("x")
                .then_kind(Conflict),
        )
        .with_rule(Rule::new().when_code("x").then_kind(AuthFailed))
        .with_rule(Rule::new().when_code("x").then_kind(ServerError));
    let x = r#"{"error":{"code":"x"}}"#;
    assert_eq!(classify(&rules, 400, &[], x).kind, Conflict);
    assert_eq!(classify(&rules, 422, &[], x).kind, AuthFailed);

    // Rules apply to stream errors too (no status there).
    let rules = Rules::generic().with_rule(Rule::new().when_code("x").then_kind(Throttled));
    assert_eq!(
        rules
            .classify_stream_error(br#"{"error":{"code":"x"}}"#)
            .kind,
        Throttled
    );
}

#[test]
fn quota_wait_threshold_is_configurable() {
    let f = classify(&Rules::openai(), 429, &[("retry-after", "3599")], "");
    assert_eq!(f.kind, RateLimited);
    let f = classify(&Rules::openai(), 429, &[("retry-after", "3600")], "");
    assert_eq!(f.kind, QuotaExhausted);
    // A bucket reset is not an instruction: it never turns a rate limit into a quota.
    let f = classify(
        &Rules::openai(),
        429,
        &[("x-ratelimit-reset-tokens", "2h")],
        "",
    );
    assert_eq!(f.kind, RateLimited);
    let rules = Rules::openai().with_quota_wait_threshold(None);
    assert_eq!(
        classify(&rules, 429, &[("retry-after", "198300")], "").kind,
        RateLimited
    );
    let rules = Rules::openai().with_quota_wait_threshold(Some(Duration::from_secs(60)));
    assert_eq!(
        classify(&rules, 429, &[("retry-after", "60")], "").kind,
        QuotaExhausted
    );
}

#[test]
fn provider_error_strings_are_capped() {
    let long = "x".repeat(10_000);
    let body = format!(r#"{{"error":{{"type":"{long}","code":"{long}"}}}}"#);
    let f = classify(&Rules::generic(), 400, &[], &body);
    let pe = f.provider_error.unwrap();
    assert_eq!(pe.error_type.map(|s| s.len()), Some(128));
    assert_eq!(pe.code.map(|s| s.len()), Some(128));
}

#[test]
fn verdicts_never_carry_the_provider_message() {
    // OpenAI echoes part of a refused key in its message; the verdict keeps only the
    // type and code, so neither Debug nor Display can leak it.
    let body = r#"{"error":{"message":"Incorrect API key provided: sk-proj-SECRET123. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    let f = classify(&Rules::openai(), 401, &[], body);
    assert_eq!(f.kind, AuthFailed);
    for text in [format!("{f:?}"), format!("{f}")] {
        assert!(!text.contains("SECRET123"), "{text}");
    }
    assert_eq!(format!("{f}"), "auth_failed (HTTP 401) [invalid_api_key]");
}

#[test]
fn profiles_parse_from_their_names() {
    use backstop_classify::{Profile, UnknownProfile};
    for profile in Profile::ALL {
        assert_eq!(profile.as_str().parse::<Profile>(), Ok(profile));
        assert_eq!(Rules::new(profile).profile(), profile);
    }
    assert_eq!(" OpenAI ".parse::<Profile>(), Ok(Profile::OpenAi));
    let err = "bedrock".parse::<Profile>().unwrap_err();
    assert_eq!(err, UnknownProfile("bedrock".into()));
    assert_eq!(
        err.to_string(),
        "unknown provider profile `bedrock`; use one of generic, openai, azure, anthropic, gemini"
    );
    assert_eq!(Rules::default().profile(), Profile::Generic);
}

#[test]
fn content_filter_finish_reason_in_a_200_is_content_filtered() {
    let rules = Rules::openai();
    let filtered = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null},"finish_reason":"content_filter"}]}"#;
    let f = rules
        .classify_completion(filtered)
        .failure()
        .cloned()
        .unwrap();
    assert_eq!((f.kind, f.retryable, f.status), (ContentFiltered, No, None));
    assert_eq!(f.fallback_route(), FallbackRoute::ContentChain);
    // A streamed chunk, with its `data:` prefix.
    let chunk = br#"data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"content_filter"}]}"#;
    assert!(!rules.classify_completion(chunk).is_success());
    for fine in [
        &br#"{"choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"stop"}]}"#[..],
        br#"{"choices":[{"delta":{"content":"x"},"finish_reason":null}]}"#,
        b"data: [DONE]",
        b"",
        b"not json",
        br#"{"choices":"content_filter"}"#,
    ] {
        assert!(
            rules.classify_completion(fine).is_success(),
            "{:?}",
            String::from_utf8_lossy(fine)
        );
    }
}
