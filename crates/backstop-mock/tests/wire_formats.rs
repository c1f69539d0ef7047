//! Every fault's exact wire format: status, headers and body.

use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn header_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names
    }
}

async fn answer(fault: Fault) -> Answer {
    let mock = MockProvider::new(Scenario::new(5).model("gpt-4o", ModelPlan::always(fault)));
    let body = json!({"model": "gpt-4o", "messages": []}).to_string();
    let request = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = mock.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn openai_envelope(message: &str, ty: &str, param: Value, code: Value) -> Value {
    json!({"error": {"message": message, "type": ty, "param": param, "code": code}})
}

#[tokio::test]
async fn openai_rate_limit_sends_literal_retry_after_headers() {
    let a = answer(Fault::OpenAiRateLimit {
        retry_after: Some("2".into()),
        retry_after_ms: Some("1500".into()),
    })
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), Some("2"));
    assert_eq!(a.header("retry-after-ms"), Some("1500"));
    assert_eq!(a.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        a.header_names(),
        [
            "content-type",
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-request-id"
        ]
    );
    assert_eq!(a.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(a.json()["error"]["type"], "requests");
    assert_eq!(a.json()["error"]["param"], Value::Null);
}

#[tokio::test]
async fn openai_rate_limit_without_hints_sends_no_delay_header() {
    let a = answer(Fault::OpenAiRateLimit {
        retry_after: None,
        retry_after_ms: None,
    })
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), None);
    assert_eq!(a.header("retry-after-ms"), None);
}

#[tokio::test]
async fn malformed_hint_values_are_sent_verbatim() {
    let a = answer(Fault::OpenAiRateLimit {
        retry_after: Some("198300".into()),
        retry_after_ms: Some("-1".into()),
    })
    .await;
    assert_eq!(a.header("retry-after"), Some("198300"));
    assert_eq!(a.header("retry-after-ms"), Some("-1"));
}

#[tokio::test]
async fn openai_request_too_large_is_a_tokens_429() {
    let a = answer(Fault::OpenAiRequestTooLarge).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), None);
    assert_eq!(
        a.json(),
        openai_envelope(
            "Request too large for gpt-4o in organization org-mock on tokens per min (TPM): Limit 30000, Requested 30601. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
            "tokens",
            Value::Null,
            json!("rate_limit_exceeded"),
        )
    );
}

#[tokio::test]
async fn openai_insufficient_quota_has_type_and_code_insufficient_quota() {
    let a = answer(Fault::OpenAiInsufficientQuota).await;
    assert_eq!(a.status, 429);
    assert_eq!(
        a.json(),
        openai_envelope(
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            Value::Null,
            json!("insufficient_quota"),
        )
    );
}

#[tokio::test]
async fn openai_billing_limit_carries_the_given_code() {
    let a = answer(Fault::OpenAiBillingLimit {
        code: "organization_spend_limit_exceeded".into(),
    })
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["type"], "insufficient_quota");
    assert_eq!(
        a.json()["error"]["code"],
        "organization_spend_limit_exceeded"
    );
}

#[tokio::test]
async fn openai_slow_down_is_a_429_with_code_slow_down() {
    let a = answer(Fault::OpenAiSlowDown).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["code"], "slow_down");
}

#[tokio::test]
async fn openai_context_length_is_a_400_context_length_exceeded() {
    let a = answer(Fault::OpenAiContextLength).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.json(),
        openai_envelope(
            "This model's maximum context length is 128000 tokens. However, your messages resulted in 130401 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            json!("messages"),
            json!("context_length_exceeded"),
        )
    );
}

#[tokio::test]
async fn openai_content_policy_is_a_400_content_policy_violation() {
    let a = answer(Fault::OpenAiContentPolicy).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["code"], "content_policy_violation");
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Your request was rejected as a result of our safety system")
    );
}

#[tokio::test]
async fn openai_content_filter_finish_is_a_200_with_finish_reason_content_filter() {
    let a = answer(Fault::OpenAiContentFilterFinish).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(a.json()["choices"][0]["message"]["content"], Value::Null);
}

#[tokio::test]
async fn openai_model_not_found_is_a_404_naming_the_model() {
    let a = answer(Fault::OpenAiModelNotFound).await;
    assert_eq!(a.status, 404);
    assert_eq!(
        a.json(),
        openai_envelope(
            "The model `gpt-4o` does not exist or you do not have access to it.",
            "invalid_request_error",
            Value::Null,
            json!("model_not_found"),
        )
    );
}

#[tokio::test]
async fn openai_server_error_is_a_500_server_error() {
    let a = answer(Fault::OpenAiServerError).await;
    assert_eq!(a.status, 500);
    assert_eq!(
        a.json(),
        openai_envelope(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            Value::Null,
            Value::Null,
        )
    );
}

#[tokio::test]
async fn openai_overloaded_is_a_503_server_is_overloaded() {
    let a = answer(Fault::OpenAiOverloaded).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["type"], "service_unavailable_error");
    assert_eq!(a.json()["error"]["code"], "server_is_overloaded");
}

#[tokio::test]
async fn bad_gateway_is_a_502_with_an_html_body() {
    let a = answer(Fault::BadGateway).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.header("content-type"), Some("text/html"));
    assert!(
        a.body
            .starts_with(b"<html>\r\n<head><title>502 Bad Gateway</title>")
    );
}

#[tokio::test]
async fn gateway_timeout_is_a_504_with_an_empty_body() {
    let a = answer(Fault::GatewayTimeout).await;
    assert_eq!(a.status, 504);
    assert!(a.body.is_empty());
    assert_eq!(a.header_names(), ["x-request-id"]);
}

#[tokio::test]
async fn unauthorized_is_a_401_invalid_api_key() {
    let a = answer(Fault::Unauthorized).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn invalid_request_is_a_400_invalid_request_error() {
    let a = answer(Fault::InvalidRequest).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    assert_eq!(a.json()["error"]["param"], "temperature");
}

#[tokio::test]
async fn azure_rate_limit_has_a_string_code_and_all_three_delay_headers() {
    let a = answer(Fault::AzureRateLimit {
        message_seconds: 6,
        retry_after: Some("6".into()),
        retry_after_ms: Some("6000".into()),
    })
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), Some("6"));
    assert_eq!(a.header("retry-after-ms"), Some("6000"));
    assert_eq!(a.header("x-ms-retry-after-ms"), Some("6000"));
    let json = a.json();
    assert_eq!(json["error"]["code"], "429");
    assert_eq!(json["error"].as_object().unwrap().len(), 2);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains(" Please retry after 6 seconds. ")
    );
}

#[tokio::test]
async fn azure_daily_quota_message_names_86400_seconds_without_headers() {
    let a = answer(Fault::AzureRateLimit {
        message_seconds: 86400,
        retry_after: None,
        retry_after_ms: None,
    })
    .await;
    assert_eq!(a.header("retry-after"), None);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Please retry after 86400 seconds.")
    );
}

#[tokio::test]
async fn azure_content_filter_has_the_responsible_ai_inner_error() {
    let a = answer(Fault::AzureContentFilter).await;
    assert_eq!(a.status, 400);
    let json = a.json();
    assert_eq!(json["error"]["code"], "content_filter");
    assert_eq!(json["error"]["status"], 400);
    assert_eq!(
        json["error"]["innererror"]["code"],
        "ResponsibleAIPolicyViolation"
    );
}

fn anthropic_envelope(ty: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": ty, "message": message}, "request_id": "req_mock_0"})
}

#[tokio::test]
async fn anthropic_overloaded_is_a_529_overloaded_error() {
    let a = answer(Fault::AnthropicOverloaded).await;
    assert_eq!(a.status.as_u16(), 529);
    assert_eq!(a.header("request-id"), Some("req_mock_0"));
    assert_eq!(
        a.json(),
        anthropic_envelope("overloaded_error", "Overloaded")
    );
}

#[tokio::test]
async fn anthropic_rate_limit_sends_retry_after_or_else_x_should_retry() {
    let with = answer(Fault::AnthropicRateLimit {
        retry_after: Some("12".into()),
    })
    .await;
    assert_eq!(with.status, 429);
    assert_eq!(with.header("retry-after"), Some("12"));
    assert_eq!(with.header("x-should-retry"), None);
    assert_eq!(with.json()["error"]["type"], "rate_limit_error");

    let without = answer(Fault::AnthropicRateLimit { retry_after: None }).await;
    assert_eq!(without.header("retry-after"), None);
    assert_eq!(without.header("x-should-retry"), Some("true"));
}

#[tokio::test]
async fn anthropic_spend_limit_carries_enforced_spend_limit_reached() {
    let a = answer(Fault::AnthropicSpendLimit).await;
    assert_eq!(a.status, 429);
    let json = a.json();
    assert_eq!(json["error"]["type"], "rate_limit_error");
    assert_eq!(
        json["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
}

#[tokio::test]
async fn anthropic_prompt_too_long_is_a_400_invalid_request_error() {
    let a = answer(Fault::AnthropicPromptTooLong).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.json(),
        anthropic_envelope(
            "invalid_request_error",
            "prompt is too long: 205351 tokens > 200000 maximum"
        )
    );
}

#[tokio::test]
async fn anthropic_error_renders_any_row_of_its_table() {
    let a = answer(Fault::AnthropicError {
        status: 402,
        error_type: "billing_error".into(),
        message: "Your credit balance is too low.".into(),
    })
    .await;
    assert_eq!(a.status, 402);
    assert_eq!(
        a.json(),
        anthropic_envelope("billing_error", "Your credit balance is too low.")
    );
}

#[tokio::test]
async fn gemini_resource_exhausted_is_an_array_body_with_retry_info_and_quota_failure() {
    let a = answer(Fault::GeminiResourceExhausted {
        retry_delay: Some("45.837906927s".into()),
        per_day: false,
    })
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), None);
    let json = a.json();
    let error = &json.as_array().expect("Gemini wraps the error in an array")[0]["error"];
    assert_eq!(error["code"], 429);
    assert_eq!(error["status"], "RESOURCE_EXHAUSTED");
    let details = error["details"].as_array().unwrap();
    let by_type = |t: &str| {
        details
            .iter()
            .find(|d| d["@type"] == format!("type.googleapis.com/google.rpc.{t}"))
            .cloned()
    };
    assert_eq!(by_type("RetryInfo").unwrap()["retryDelay"], "45.837906927s");
    assert_eq!(
        by_type("QuotaFailure").unwrap()["violations"][0]["quotaId"],
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    );
}

#[tokio::test]
async fn gemini_per_day_quota_names_the_daily_quota_id_and_may_omit_retry_info() {
    let a = answer(Fault::GeminiResourceExhausted {
        retry_delay: None,
        per_day: true,
    })
    .await;
    let json = a.json();
    let details = json[0]["error"]["details"].as_array().unwrap();
    assert!(
        details
            .iter()
            .all(|d| d["@type"] != "type.googleapis.com/google.rpc.RetryInfo")
    );
    assert_eq!(
        details[0]["violations"][0]["quotaId"],
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    );
}

#[tokio::test]
async fn gemini_unavailable_and_deadline_exceeded_are_array_bodies() {
    let a = answer(Fault::GeminiUnavailable).await;
    assert_eq!(a.status, 503);
    assert_eq!(
        a.json(),
        json!([{"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}}])
    );
    let b = answer(Fault::GeminiDeadlineExceeded).await;
    assert_eq!(b.status, 504);
    assert_eq!(b.json()[0]["error"]["status"], "DEADLINE_EXCEEDED");
}

#[tokio::test]
async fn status_fault_sends_exact_status_headers_in_order_and_body() {
    let a = answer(Fault::Status {
        status: 418,
        headers: vec![
            ("retry-after".into(), "1".into()),
            ("retry-after".into(), "2".into()),
            ("x-rate-limit-reset-tokens".into(), "55".into()),
        ],
        body: "not json at all".into(),
    })
    .await;
    assert_eq!(a.status, 418);
    let values: Vec<&str> = a
        .headers
        .get_all("retry-after")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(values, ["1", "2"]);
    assert_eq!(a.header("x-rate-limit-reset-tokens"), Some("55"));
    assert_eq!(&a.body[..], b"not json at all");
}

#[tokio::test]
async fn with_header_adds_or_replaces_headers_on_any_fault() {
    let a = answer(
        Fault::OpenAiRateLimit {
            retry_after: Some("2".into()),
            retry_after_ms: None,
        }
        .with_header("x-should-retry", "false")
        .with_header("retry-after", "7"),
    )
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert_eq!(a.headers.get_all("retry-after").iter().count(), 1);
    assert_eq!(a.header("retry-after"), Some("7"));
}

#[tokio::test]
async fn an_invalid_status_built_in_code_answers_500_and_says_why() {
    let a = answer(Fault::Status {
        status: 42,
        headers: vec![],
        body: String::new(),
    })
    .await;
    assert_eq!(a.status, 500);
    assert_eq!(a.json()["error"]["type"], "mock_scenario_error");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid HTTP status 42")
    );
}

/// A plan built in code is not validated: an answer too large to build is a 500
/// that says why, not an allocation that aborts or an overflow.
#[tokio::test]
async fn a_stream_too_large_to_build_answers_500_and_says_why() {
    let cases = [
        (
            ModelPlan::ok().stream_pings(9_000_000_000_000_000_000),
            true,
            "stream_pings 9000000000000000000 is over the most one answer sends, 1000000",
        ),
        (
            ModelPlan::ok().stream_chunks(usize::MAX),
            false,
            "18446744073709551615 chunks is over the most one answer sends, 1000000",
        ),
        (
            ModelPlan::always(Fault::ResetAfterChunks { chunks: usize::MAX }),
            true,
            "18446744073709551615 chunks is over the most one answer sends, 1000000",
        ),
    ];
    for (plan, stream, why) in cases {
        let mock = MockProvider::new(Scenario::new(1).model("m", plan));
        let body = serde_json::json!({"model": "m", "stream": stream, "messages": []});
        let request = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = mock.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500, "{why}");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["error"]["type"], "mock_scenario_error");
        assert_eq!(
            json["error"]["message"],
            format!("backstop-mock scenario error: {why}")
        );
    }
}
