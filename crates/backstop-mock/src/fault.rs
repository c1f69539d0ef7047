//! What the mock answers to one attempt: a success or one provider failure.

use serde::{Deserialize, Serialize};

/// One answer the mock can give, each in the provider's exact wire format.
///
/// The wire formats (status, headers, body bytes) are rendered by the mock's
/// `wire` module and documented on each variant. In TOML or JSON a fault is a
/// table tagged by `kind` in snake case: `{ kind = "openai_rate_limit", retry_after = "2" }`.
///
/// Every response also carries `x-request-id: req_mock_<seq>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 200: a `chat.completion` JSON, or SSE chunks then `data: [DONE]` when the
    /// request asked for `"stream": true`.
    Ok,
    /// OpenAI: 200 whose choice ends with `finish_reason: "content_filter"` and no
    /// content (content policy reported as a success).
    #[serde(rename = "openai_content_filter_finish")]
    OpenAiContentFilterFinish,
    /// OpenAI: 429 `rate_limit_exceeded`, type `requests`. The optional hints are sent
    /// as the literal header values given (`retry-after`, `retry-after-ms`), so
    /// malformed values can be injected too. No `x-ratelimit-reset-*` header is sent:
    /// add one with [`Fault::with_header`] when a test wants it.
    #[serde(rename = "openai_rate_limit")]
    OpenAiRateLimit {
        /// Literal `retry-after` header value, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<String>,
        /// Literal `retry-after-ms` header value, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<String>,
    },
    /// OpenAI: 429 `rate_limit_exceeded`, type `tokens`, "Request too large for
    /// `<model>` … Limit 30000, Requested 30601": one request larger than the whole
    /// TPM limit, which can never succeed.
    #[serde(rename = "openai_request_too_large")]
    OpenAiRequestTooLarge,
    /// OpenAI: 429 with type and code `insufficient_quota` (billing exhausted).
    #[serde(rename = "openai_insufficient_quota")]
    OpenAiInsufficientQuota,
    /// OpenAI: 429 with type `insufficient_quota` and one of the newer billing codes
    /// (`credit_balance_exhausted`, `organization_spend_limit_exceeded`, …).
    #[serde(rename = "openai_billing_limit")]
    OpenAiBillingLimit {
        /// The `error.code` to send.
        code: String,
    },
    /// OpenAI: 429 `slow_down` (ramping up too fast).
    #[serde(rename = "openai_slow_down")]
    OpenAiSlowDown,
    /// OpenAI: 400 `invalid_request_error` / `context_length_exceeded`.
    #[serde(rename = "openai_context_length")]
    OpenAiContextLength,
    /// OpenAI: 400 `content_policy_violation`.
    #[serde(rename = "openai_content_policy")]
    OpenAiContentPolicy,
    /// OpenAI: 404 `model_not_found`, naming the requested model.
    #[serde(rename = "openai_model_not_found")]
    OpenAiModelNotFound,
    /// OpenAI: 500 `server_error`.
    #[serde(rename = "openai_server_error")]
    OpenAiServerError,
    /// OpenAI: 503 `service_unavailable_error` / `server_is_overloaded`.
    #[serde(rename = "openai_overloaded")]
    OpenAiOverloaded,
    /// 502 with an HTML body, as a CDN in front of a provider sends it.
    BadGateway,
    /// 504 with an empty body.
    GatewayTimeout,
    /// OpenAI: 401 `invalid_api_key`. The request's key is never echoed.
    Unauthorized,
    /// OpenAI: 400 `invalid_request_error` about a request parameter.
    InvalidRequest,
    /// Azure OpenAI: 429 with the string code `"429"` and the message "… Please retry
    /// after `message_seconds` seconds. …". `retry_after` is sent as `retry-after`,
    /// `retry_after_ms` as both `retry-after-ms` and `x-ms-retry-after-ms` (literal
    /// values, so `-1` can be injected).
    AzureRateLimit {
        /// The seconds named in the message text.
        message_seconds: u64,
        /// Literal `retry-after` header value, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<String>,
        /// Literal `retry-after-ms` and `x-ms-retry-after-ms` header value, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<String>,
    },
    /// Azure OpenAI: 400 `content_filter` with inner code `ResponsibleAIPolicyViolation`.
    AzureContentFilter,
    /// Anthropic: 529 `overloaded_error`.
    AnthropicOverloaded,
    /// Anthropic: 429 `rate_limit_error`. Sends `retry-after` when given; without it
    /// sends `x-should-retry: true`, as Anthropic was observed to do.
    AnthropicRateLimit {
        /// Literal `retry-after` header value, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<String>,
    },
    /// Anthropic: 429 `rate_limit_error` with
    /// `error.details.error_code = "enforced_spend_limit_reached"`.
    AnthropicSpendLimit,
    /// Anthropic: 400 `invalid_request_error`, "prompt is too long: 205351 tokens > 200000 maximum".
    AnthropicPromptTooLong,
    /// Anthropic: any other row of its error table (`billing_error` 402,
    /// `permission_error` 403, `request_too_large` 413, `api_error` 500, …) in the
    /// Anthropic envelope.
    AnthropicError {
        /// HTTP status.
        status: u16,
        /// `error.type`.
        error_type: String,
        /// `error.message`.
        message: String,
    },
    /// Gemini (OpenAI-compatible endpoint): 429 with the JSON *array* body wrapping a
    /// `RESOURCE_EXHAUSTED` status, a `QuotaFailure` whose `quotaId` is per day or per
    /// minute, and a `RetryInfo.retryDelay` when given. No `retry-after` header.
    GeminiResourceExhausted {
        /// Literal `retryDelay` value (`"58s"`, `"45.837906927s"`), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_delay: Option<String>,
        /// `GenerateRequestsPerDayPerProjectPerModel-FreeTier` when true, the
        /// per-minute quota id otherwise.
        #[serde(default)]
        per_day: bool,
    },
    /// Gemini: 503 `UNAVAILABLE` in the array body.
    GeminiUnavailable,
    /// Gemini: 504 `DEADLINE_EXCEEDED` in the array body.
    GeminiDeadlineExceeded,
    /// Anything else: the exact status, headers (in order, duplicates allowed) and body.
    Status {
        /// HTTP status.
        status: u16,
        /// Headers as `[name, value]` pairs.
        #[serde(default)]
        headers: Vec<(String, String)>,
        /// Body bytes, as text.
        #[serde(default)]
        body: String,
    },
    /// Another fault with extra headers added (or replacing same-named ones), such as
    /// `x-should-retry: false`. Build it with [`Fault::with_header`].
    WithHeaders {
        /// The fault whose response gets the headers.
        fault: Box<Fault>,
        /// Headers as `[name, value]` pairs, applied in order.
        headers: Vec<(String, String)>,
    },
    /// Never answers: the caller's timeout must fire. The attempt is recorded.
    Hang,
    /// The connection is refused: the request provably never reached the provider.
    /// In memory: `io::ErrorKind::ConnectionRefused`, the attempt is recorded with
    /// `delivered: false`. Over HTTP the connection is closed without an answer.
    ConnectRefused,
    /// The connection is reset after the request was sent, before any response head:
    /// `io::ErrorKind::ConnectionReset`.
    ResetBeforeHead,
    /// A 200 head, then the body fails with `io::ErrorKind::ConnectionReset` before
    /// any byte.
    ResetAfterHead,
    /// A 200 SSE stream that sends `chunks` chunks then fails with
    /// `io::ErrorKind::ConnectionReset` (no error event, no `[DONE]`). Always SSE.
    ResetAfterChunks {
        /// Chunks sent before the reset.
        chunks: usize,
    },
    /// A 200 SSE stream that sends `chunks` chunks, then an error event in the given
    /// provider's style, then ends (no `[DONE]`). Always SSE.
    StreamErrorAfter {
        /// Chunks sent before the error event.
        chunks: usize,
        /// How the error event is written.
        style: StreamStyle,
    },
}

/// How a mid-stream error event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStyle {
    /// `data: {"error": {"message": …, "type": "server_error", …}}`
    #[serde(rename = "openai")]
    OpenAi,
    /// `event: error` then `data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`
    Anthropic,
}

impl Fault {
    /// Adds a response header to this fault's answer (replacing a same-named header
    /// the fault would send). Chained calls accumulate on one [`Fault::WithHeaders`].
    ///
    /// ```
    /// use backstop_mock::Fault;
    /// let f = Fault::OpenAiServerError.with_header("x-should-retry", "false");
    /// assert_eq!(f.name(), "openai_server_error");
    /// ```
    #[must_use]
    pub fn with_header(self, name: impl Into<String>, value: impl Into<String>) -> Fault {
        match self {
            Fault::WithHeaders { fault, mut headers } => {
                headers.push((name.into(), value.into()));
                Fault::WithHeaders { fault, headers }
            }
            other => Fault::WithHeaders {
                fault: Box::new(other),
                headers: vec![(name.into(), value.into())],
            },
        }
    }

    /// One example of every kind of fault, for tests that must cover them all (the
    /// match inside fails to compile when a variant is added without being listed).
    pub fn one_of_each() -> Vec<Fault> {
        let all = vec![
            Fault::Ok,
            Fault::OpenAiContentFilterFinish,
            Fault::OpenAiRateLimit {
                retry_after: Some("1".into()),
                retry_after_ms: None,
            },
            Fault::OpenAiRequestTooLarge,
            Fault::OpenAiInsufficientQuota,
            Fault::OpenAiBillingLimit { code: "c".into() },
            Fault::OpenAiSlowDown,
            Fault::OpenAiContextLength,
            Fault::OpenAiContentPolicy,
            Fault::OpenAiModelNotFound,
            Fault::OpenAiServerError,
            Fault::OpenAiOverloaded,
            Fault::BadGateway,
            Fault::GatewayTimeout,
            Fault::Unauthorized,
            Fault::InvalidRequest,
            Fault::AzureRateLimit {
                message_seconds: 6,
                retry_after: None,
                retry_after_ms: Some("6000".into()),
            },
            Fault::AzureContentFilter,
            Fault::AnthropicOverloaded,
            Fault::AnthropicRateLimit { retry_after: None },
            Fault::AnthropicSpendLimit,
            Fault::AnthropicPromptTooLong,
            Fault::AnthropicError {
                status: 403,
                error_type: "permission_error".into(),
                message: "m".into(),
            },
            Fault::GeminiResourceExhausted {
                retry_delay: None,
                per_day: true,
            },
            Fault::GeminiUnavailable,
            Fault::GeminiDeadlineExceeded,
            Fault::Status {
                status: 418,
                headers: vec![],
                body: String::new(),
            },
            Fault::Hang,
            Fault::ConnectRefused,
            Fault::ResetBeforeHead,
            Fault::ResetAfterHead,
            Fault::ResetAfterChunks { chunks: 1 },
            Fault::StreamErrorAfter {
                chunks: 1,
                style: StreamStyle::OpenAi,
            },
        ];
        for fault in &all {
            match fault {
                Fault::Ok
                | Fault::OpenAiContentFilterFinish
                | Fault::OpenAiRateLimit { .. }
                | Fault::OpenAiRequestTooLarge
                | Fault::OpenAiInsufficientQuota
                | Fault::OpenAiBillingLimit { .. }
                | Fault::OpenAiSlowDown
                | Fault::OpenAiContextLength
                | Fault::OpenAiContentPolicy
                | Fault::OpenAiModelNotFound
                | Fault::OpenAiServerError
                | Fault::OpenAiOverloaded
                | Fault::BadGateway
                | Fault::GatewayTimeout
                | Fault::Unauthorized
                | Fault::InvalidRequest
                | Fault::AzureRateLimit { .. }
                | Fault::AzureContentFilter
                | Fault::AnthropicOverloaded
                | Fault::AnthropicRateLimit { .. }
                | Fault::AnthropicSpendLimit
                | Fault::AnthropicPromptTooLong
                | Fault::AnthropicError { .. }
                | Fault::GeminiResourceExhausted { .. }
                | Fault::GeminiUnavailable
                | Fault::GeminiDeadlineExceeded
                | Fault::Status { .. }
                | Fault::WithHeaders { .. }
                | Fault::Hang
                | Fault::ConnectRefused
                | Fault::ResetBeforeHead
                | Fault::ResetAfterHead
                | Fault::ResetAfterChunks { .. }
                | Fault::StreamErrorAfter { .. } => {}
            }
        }
        all
    }

    /// The snake-case name of the answer (the serde `kind`); for
    /// [`Fault::WithHeaders`] the name of the wrapped fault.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Ok => "ok",
            Fault::OpenAiContentFilterFinish => "openai_content_filter_finish",
            Fault::OpenAiRateLimit { .. } => "openai_rate_limit",
            Fault::OpenAiRequestTooLarge => "openai_request_too_large",
            Fault::OpenAiInsufficientQuota => "openai_insufficient_quota",
            Fault::OpenAiBillingLimit { .. } => "openai_billing_limit",
            Fault::OpenAiSlowDown => "openai_slow_down",
            Fault::OpenAiContextLength => "openai_context_length",
            Fault::OpenAiContentPolicy => "openai_content_policy",
            Fault::OpenAiModelNotFound => "openai_model_not_found",
            Fault::OpenAiServerError => "openai_server_error",
            Fault::OpenAiOverloaded => "openai_overloaded",
            Fault::BadGateway => "bad_gateway",
            Fault::GatewayTimeout => "gateway_timeout",
            Fault::Unauthorized => "unauthorized",
            Fault::InvalidRequest => "invalid_request",
            Fault::AzureRateLimit { .. } => "azure_rate_limit",
            Fault::AzureContentFilter => "azure_content_filter",
            Fault::AnthropicOverloaded => "anthropic_overloaded",
            Fault::AnthropicRateLimit { .. } => "anthropic_rate_limit",
            Fault::AnthropicSpendLimit => "anthropic_spend_limit",
            Fault::AnthropicPromptTooLong => "anthropic_prompt_too_long",
            Fault::AnthropicError { .. } => "anthropic_error",
            Fault::GeminiResourceExhausted { .. } => "gemini_resource_exhausted",
            Fault::GeminiUnavailable => "gemini_unavailable",
            Fault::GeminiDeadlineExceeded => "gemini_deadline_exceeded",
            Fault::Status { .. } => "status",
            Fault::WithHeaders { fault, .. } => fault.name(),
            Fault::Hang => "hang",
            Fault::ConnectRefused => "connect_refused",
            Fault::ResetBeforeHead => "reset_before_head",
            Fault::ResetAfterHead => "reset_after_head",
            Fault::ResetAfterChunks { .. } => "reset_after_chunks",
            Fault::StreamErrorAfter { .. } => "stream_error_after",
        }
    }

    /// True for [`Fault::Ok`] (possibly with extra headers).
    pub fn is_ok(&self) -> bool {
        match self {
            Fault::Ok => true,
            Fault::WithHeaders { fault, .. } => fault.is_ok(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_the_serde_kind_of_every_variant() {
        for fault in Fault::one_of_each() {
            let json = serde_json::to_value(&fault).unwrap();
            assert_eq!(json["kind"], fault.name(), "{fault:?}");
        }
    }

    #[test]
    fn every_variant_round_trips_through_json() {
        for fault in Fault::one_of_each() {
            let wrapped = fault.clone().with_header("x-should-retry", "false");
            for f in [fault, wrapped] {
                let text = serde_json::to_string(&f).unwrap();
                assert_eq!(serde_json::from_str::<Fault>(&text).unwrap(), f, "{text}");
            }
        }
    }

    #[test]
    fn with_header_accumulates_on_one_wrapper() {
        let f = Fault::Ok.with_header("a", "1").with_header("b", "2");
        assert_eq!(
            f,
            Fault::WithHeaders {
                fault: Box::new(Fault::Ok),
                headers: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            }
        );
        assert!(f.is_ok());
        assert_eq!(f.name(), "ok");
    }
}
