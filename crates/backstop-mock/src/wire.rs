//! Renders a [`Fault`] into what goes on the wire: status, headers and body bytes.
//!
//! A pure function, so every provider format can be checked byte for byte without
//! a runtime. The texts follow providers.md and the providers' observed traffic.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use serde_json::json;

use crate::completion::{DONE_FRAME, Served, chunk_frame, completion_json};
use crate::fault::{Fault, StreamStyle};

/// The most chunks (a plan's `stream_chunks`, a fault's `chunks`) and the most
/// `event: ping` frames (`stream_pings`) one answer may have: a million each. An
/// answer is built whole before it is sent, so this bounds its memory (a chunk is a
/// couple of hundred bytes); the largest stream any test sends is 200 000 chunks.
/// Scenarios read from text are refused beyond it; a plan built in code is answered
/// with a 500 that says why.
pub const MAX_STREAM_FRAMES: usize = 1_000_000;

/// Why an answer of `chunks` chunks after `pings` pings is not built, if it is not.
fn too_many_frames(chunks: usize, pings: usize) -> Option<String> {
    if chunks > MAX_STREAM_FRAMES {
        return Some(format!(
            "{chunks} chunks is over the most one answer sends, {MAX_STREAM_FRAMES}"
        ));
    }
    if pings > MAX_STREAM_FRAMES {
        return Some(format!(
            "stream_pings {pings} is over the most one answer sends, {MAX_STREAM_FRAMES}"
        ));
    }
    None
}

/// Everything the renderer needs to know about the attempt being answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WireContext<'a> {
    /// The served model and ids.
    pub(crate) served: Served<'a>,
    /// Whether the request asked for `"stream": true`.
    pub(crate) stream: bool,
    /// Chunks in a normal stream.
    pub(crate) chunks: usize,
    /// `event: ping` keep-alives sent before the first chunk of a stream.
    pub(crate) pings: usize,
}

/// What the mock does on the wire for one attempt.
#[derive(Debug)]
pub(crate) enum Wire {
    /// Send a response head, then the body.
    Respond {
        /// Status line.
        status: StatusCode,
        /// Headers (without `x-request-id`, which the service adds).
        headers: HeaderMap,
        /// The body.
        body: WireBody,
    },
    /// Refuse the connection.
    Refuse,
    /// Reset the connection before any response head.
    ResetBeforeHead,
    /// Never answer.
    Hang,
}

/// A response body as the mock will send it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WireBody {
    /// All at once.
    Full(Bytes),
    /// One frame at a time, then `end`.
    Sse {
        /// The frames, each a whole SSE event.
        frames: Vec<Bytes>,
        /// How the stream ends after the last frame.
        end: SseEnd,
    },
}

/// How a streamed body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SseEnd {
    /// The body ends normally.
    Clean,
    /// The body fails with a connection reset.
    Reset,
}

const OPENAI_SERVER_ERROR_MESSAGE: &str =
    "The server had an error while processing your request. Sorry about that!";

// Literal bytes, in the providers' own key order, so the events are identical
// whatever serde_json features the workspace enables.
const OPENAI_STREAM_ERROR_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
const ANTHROPIC_STREAM_ERROR_EVENT: &[u8] = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

/// Renders `fault` for the attempt described by `cx`.
pub(crate) fn render(fault: &Fault, cx: &WireContext<'_>) -> Wire {
    let model = cx.served.model;
    match fault {
        Fault::Ok => success(cx, "stop"),
        Fault::OpenAiContentFilterFinish => success(cx, "content_filter"),
        Fault::OpenAiRateLimit {
            retry_after,
            retry_after_ms,
        } => {
            let mut headers = openai_error_body_headers();
            headers_push(&mut headers, "x-ratelimit-limit-requests", "500");
            headers_push(&mut headers, "x-ratelimit-remaining-requests", "0");
            if let Some(v) = retry_after {
                headers_push(&mut headers, "retry-after", v);
            }
            if let Some(v) = retry_after_ms {
                headers_push(&mut headers, "retry-after-ms", v);
            }
            let message = format!(
                "Rate limit reached for {model} in organization org-mock on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms. Visit https://platform.openai.com/account/rate-limits to learn more."
            );
            openai_error(
                429,
                headers,
                &message,
                "requests",
                None,
                Some("rate_limit_exceeded"),
            )
        }
        Fault::OpenAiRequestTooLarge => {
            let message = format!(
                "Request too large for {model} in organization org-mock on tokens per min (TPM): Limit 30000, Requested 30601. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
            );
            openai_error(
                429,
                openai_error_body_headers(),
                &message,
                "tokens",
                None,
                Some("rate_limit_exceeded"),
            )
        }
        Fault::OpenAiInsufficientQuota => openai_error(
            429,
            openai_error_body_headers(),
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            None,
            Some("insufficient_quota"),
        ),
        Fault::OpenAiBillingLimit { code } => openai_error(
            429,
            openai_error_body_headers(),
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            None,
            Some(code),
        ),
        Fault::OpenAiSlowDown => openai_error(
            429,
            openai_error_body_headers(),
            "Please reduce your rate of requests.",
            "requests",
            None,
            Some("slow_down"),
        ),
        Fault::OpenAiContextLength => openai_error(
            400,
            openai_error_body_headers(),
            "This model's maximum context length is 128000 tokens. However, your messages resulted in 130401 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        Fault::OpenAiContentPolicy => openai_error(
            400,
            openai_error_body_headers(),
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is not allowed by our safety system.",
            "invalid_request_error",
            None,
            Some("content_policy_violation"),
        ),
        Fault::OpenAiModelNotFound => {
            let message =
                format!("The model `{model}` does not exist or you do not have access to it.");
            openai_error(
                404,
                openai_error_body_headers(),
                &message,
                "invalid_request_error",
                None,
                Some("model_not_found"),
            )
        }
        Fault::OpenAiServerError => openai_error(
            500,
            openai_error_body_headers(),
            OPENAI_SERVER_ERROR_MESSAGE,
            "server_error",
            None,
            None,
        ),
        Fault::OpenAiOverloaded => openai_error(
            503,
            openai_error_body_headers(),
            "The engine is currently overloaded, please try again later.",
            "service_unavailable_error",
            None,
            Some("server_is_overloaded"),
        ),
        Fault::BadGateway => {
            let mut headers = HeaderMap::new();
            headers_push(&mut headers, "content-type", "text/html");
            full(
                502,
                headers,
                Bytes::from_static(
                    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n",
                ),
            )
        }
        Fault::GatewayTimeout => full(504, HeaderMap::new(), Bytes::new()),
        Fault::Unauthorized => openai_error(
            401,
            openai_error_body_headers(),
            // Real OpenAI echoes a masked key; the mock never echoes any part of it.
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        Fault::InvalidRequest => openai_error(
            400,
            openai_error_body_headers(),
            "Invalid value for 'temperature': expected a number between 0 and 2.",
            "invalid_request_error",
            Some("temperature"),
            Some("invalid_value"),
        ),
        Fault::AzureRateLimit {
            message_seconds,
            retry_after,
            retry_after_ms,
        } => {
            let mut headers = openai_error_body_headers();
            if let Some(v) = retry_after {
                headers_push(&mut headers, "retry-after", v);
            }
            if let Some(v) = retry_after_ms {
                headers_push(&mut headers, "retry-after-ms", v);
                headers_push(&mut headers, "x-ms-retry-after-ms", v);
            }
            let message = format!(
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {message_seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
            );
            let body = json!({"error": {"code": "429", "message": message}});
            full(429, headers, json_bytes(&body))
        }
        Fault::AzureContentFilter => {
            let body = json!({"error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
                "type": null,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        "hate": {"filtered": false, "severity": "safe"},
                        "self_harm": {"filtered": false, "severity": "safe"},
                        "sexual": {"filtered": false, "severity": "safe"},
                        "violence": {"filtered": true, "severity": "high"},
                    },
                },
            }});
            full(400, openai_error_body_headers(), json_bytes(&body))
        }
        Fault::AnthropicOverloaded => anthropic_error(
            cx,
            529,
            HeaderMap::new(),
            "overloaded_error",
            "Overloaded",
            None,
        ),
        Fault::AnthropicRateLimit { retry_after } => {
            let mut headers = HeaderMap::new();
            match retry_after {
                Some(v) => headers_push(&mut headers, "retry-after", v),
                // Anthropic was observed sending `x-should-retry: true` on 429s that
                // carry no retry-after.
                None => headers_push(&mut headers, "x-should-retry", "true"),
            }
            anthropic_error(
                cx,
                429,
                headers,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization of 50 requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits.",
                None,
            )
        }
        Fault::AnthropicSpendLimit => anthropic_error(
            cx,
            429,
            HeaderMap::new(),
            "rate_limit_error",
            "You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.",
            Some(json!({"error_code": "enforced_spend_limit_reached"})),
        ),
        Fault::AnthropicPromptTooLong => anthropic_error(
            cx,
            400,
            HeaderMap::new(),
            "invalid_request_error",
            "prompt is too long: 205351 tokens > 200000 maximum",
            None,
        ),
        Fault::AnthropicError {
            status,
            error_type,
            message,
        } => anthropic_error(cx, *status, HeaderMap::new(), error_type, message, None),
        Fault::GeminiResourceExhausted {
            retry_delay,
            per_day,
        } => {
            let (quota_id, metric, value) = if *per_day {
                (
                    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                    "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "200",
                )
            } else {
                (
                    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "15",
                )
            };
            let mut details = vec![
                json!({
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{
                        "quotaMetric": metric,
                        "quotaId": quota_id,
                        "quotaDimensions": {"location": "global", "model": model},
                        "quotaValue": value,
                    }],
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }],
                }),
            ];
            if let Some(delay) = retry_delay {
                details.push(json!({
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": delay,
                }));
            }
            let body = json!([{"error": {
                "code": 429,
                "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
                "status": "RESOURCE_EXHAUSTED",
                "details": details,
            }}]);
            full(429, openai_error_body_headers(), json_bytes(&body))
        }
        Fault::GeminiUnavailable => gemini_status(
            503,
            "The model is overloaded. Please try again later.",
            "UNAVAILABLE",
        ),
        Fault::GeminiDeadlineExceeded => gemini_status(
            504,
            "The request timed out. Please try again.",
            "DEADLINE_EXCEEDED",
        ),
        Fault::Status {
            status,
            headers,
            body,
        } => {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                if let Err(problem) = try_append(&mut map, name, value) {
                    return scenario_error(&problem);
                }
            }
            full(*status, map, Bytes::from(body.clone()))
        }
        Fault::WithHeaders { fault, headers } => {
            let mut wire = render(fault, cx);
            if let Wire::Respond { headers: map, .. } = &mut wire {
                for (name, value) in headers {
                    match (
                        HeaderName::try_from(name.as_str()),
                        HeaderValue::try_from(value.as_str()),
                    ) {
                        (Ok(n), Ok(v)) => {
                            map.insert(n, v);
                        }
                        _ => return scenario_error(&format!("invalid header {name:?}: {value:?}")),
                    }
                }
            }
            wire
        }
        Fault::Hang => Wire::Hang,
        Fault::ConnectRefused => Wire::Refuse,
        Fault::ResetBeforeHead => Wire::ResetBeforeHead,
        Fault::ResetAfterHead => {
            let headers = if cx.stream {
                sse_headers()
            } else {
                openai_error_body_headers()
            };
            respond(
                StatusCode::OK,
                headers,
                WireBody::Sse {
                    frames: Vec::new(),
                    end: SseEnd::Reset,
                },
            )
        }
        Fault::ResetAfterChunks { chunks } => {
            let frames = match partial_chunks(cx, *chunks) {
                Ok(frames) => frames,
                Err(problem) => return scenario_error(&problem),
            };
            respond(
                StatusCode::OK,
                sse_headers(),
                WireBody::Sse {
                    frames,
                    end: SseEnd::Reset,
                },
            )
        }
        Fault::StreamErrorAfter { chunks, style } => {
            let mut frames = match partial_chunks(cx, *chunks) {
                Ok(frames) => frames,
                Err(problem) => return scenario_error(&problem),
            };
            frames.push(match style {
                StreamStyle::OpenAi => Bytes::from_static(OPENAI_STREAM_ERROR_EVENT),
                StreamStyle::Anthropic => Bytes::from_static(ANTHROPIC_STREAM_ERROR_EVENT),
            });
            respond(
                StatusCode::OK,
                sse_headers(),
                WireBody::Sse {
                    frames,
                    end: SseEnd::Clean,
                },
            )
        }
    }
}

/// A normal success: JSON, or `chunks` SSE chunks then `[DONE]`.
fn success(cx: &WireContext<'_>, finish_reason: &str) -> Wire {
    // A completion's words are one per chunk: it is as large as the stream.
    let ping_count = if cx.stream { cx.pings } else { 0 };
    if let Some(problem) = too_many_frames(cx.chunks, ping_count) {
        return scenario_error(&problem);
    }
    if cx.stream {
        let total = cx.chunks.max(1);
        let mut frames = pings(cx);
        frames.extend((0..total).map(|k| chunk_frame(&cx.served, k, total, Some(finish_reason))));
        frames.push(Bytes::from_static(DONE_FRAME));
        respond(
            StatusCode::OK,
            sse_headers(),
            WireBody::Sse {
                frames,
                end: SseEnd::Clean,
            },
        )
    } else {
        full(
            200,
            openai_error_body_headers(),
            completion_json(&cx.served, cx.chunks, finish_reason),
        )
    }
}

/// The first `k` chunks of a stream that would have had `max(k + 1, chunks)`
/// chunks, so none of them carries a finish reason; or why they are not built.
fn partial_chunks(cx: &WireContext<'_>, k: usize) -> Result<Vec<Bytes>, String> {
    if let Some(problem) = too_many_frames(k, cx.pings) {
        return Err(problem);
    }
    let total = cx.chunks.max(k + 1);
    let mut frames = pings(cx);
    frames.extend((0..k).map(|i| chunk_frame(&cx.served, i, total, None)));
    Ok(frames)
}

/// Anthropic's keep-alive events, which a client must skip.
fn pings(cx: &WireContext<'_>) -> Vec<Bytes> {
    vec![Bytes::from_static(PING_FRAME); cx.pings]
}

const PING_FRAME: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

fn openai_error(
    status: u16,
    headers: HeaderMap,
    message: &str,
    error_type: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Wire {
    let body =
        json!({"error": {"message": message, "type": error_type, "param": param, "code": code}});
    full(status, headers, json_bytes(&body))
}

fn anthropic_error(
    cx: &WireContext<'_>,
    status: u16,
    mut headers: HeaderMap,
    error_type: &str,
    message: &str,
    details: Option<serde_json::Value>,
) -> Wire {
    let request_id = format!("req_mock_{}", cx.served.seq);
    headers_push(&mut headers, "content-type", "application/json");
    headers_push(&mut headers, "request-id", &request_id);
    let mut error = json!({"type": error_type, "message": message});
    if let (Some(details), Some(obj)) = (details, error.as_object_mut()) {
        obj.insert("details".to_owned(), details);
    }
    let body = json!({"type": "error", "error": error, "request_id": request_id});
    full(status, headers, json_bytes(&body))
}

fn gemini_status(status: u16, message: &str, rpc_status: &str) -> Wire {
    let body = json!([{"error": {"code": status, "message": message, "status": rpc_status}}]);
    full(status, openai_error_body_headers(), json_bytes(&body))
}

fn openai_error_body_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

fn sse_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers
}

fn json_bytes(value: &serde_json::Value) -> Bytes {
    Bytes::from(value.to_string())
}

fn full(status: u16, headers: HeaderMap, body: Bytes) -> Wire {
    match StatusCode::from_u16(status) {
        Ok(status) => respond(status, headers, WireBody::Full(body)),
        Err(_) => scenario_error(&format!("invalid HTTP status {status}")),
    }
}

fn respond(status: StatusCode, headers: HeaderMap, body: WireBody) -> Wire {
    Wire::Respond {
        status,
        headers,
        body,
    }
}

/// A fault built in code with an invalid status or header cannot be sent as
/// written; the mock answers 500 and says why rather than panicking.
/// (Scenarios read from TOML or JSON are validated up front.)
fn scenario_error(problem: &str) -> Wire {
    let body = json!({"error": {
        "message": format!("backstop-mock scenario error: {problem}"),
        "type": "mock_scenario_error",
        "param": null,
        "code": null,
    }});
    respond(
        StatusCode::INTERNAL_SERVER_ERROR,
        openai_error_body_headers(),
        WireBody::Full(json_bytes(&body)),
    )
}

/// Appends a header whose name is a known-valid literal.
fn headers_push(headers: &mut HeaderMap, name: &'static str, value: &str) {
    // A value that came from a scenario built in code may be invalid: it is left
    // out here (scenarios read from text are validated up front instead).
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.append(HeaderName::from_static(name), value);
    }
}

fn try_append(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), String> {
    let n = HeaderName::try_from(name).map_err(|_| format!("invalid header name {name:?}"))?;
    let v = HeaderValue::try_from(value).map_err(|_| format!("invalid value for header {name}"))?;
    headers.append(n, v);
    Ok(())
}

/// Checks that `fault` can be sent as written (status in range, valid headers).
pub(crate) fn validate(fault: &Fault) -> Result<(), String> {
    let check_value = |name: &str, value: &Option<String>| match value {
        Some(v) if HeaderValue::try_from(v.as_str()).is_err() => {
            Err(format!("invalid value for header {name}"))
        }
        _ => Ok(()),
    };
    match fault {
        Fault::Status {
            status, headers, ..
        } => {
            StatusCode::from_u16(*status).map_err(|_| format!("invalid HTTP status {status}"))?;
            let mut map = HeaderMap::new();
            headers
                .iter()
                .try_for_each(|(n, v)| try_append(&mut map, n, v))
        }
        Fault::AnthropicError { status, .. } => StatusCode::from_u16(*status)
            .map(|_| ())
            .map_err(|_| format!("invalid HTTP status {status}")),
        Fault::WithHeaders { fault, headers } => {
            validate(fault)?;
            let mut map = HeaderMap::new();
            headers
                .iter()
                .try_for_each(|(n, v)| try_append(&mut map, n, v))
        }
        Fault::OpenAiRateLimit {
            retry_after,
            retry_after_ms,
        } => {
            check_value("retry-after", retry_after)?;
            check_value("retry-after-ms", retry_after_ms)
        }
        Fault::AzureRateLimit {
            retry_after,
            retry_after_ms,
            ..
        } => {
            check_value("retry-after", retry_after)?;
            check_value("retry-after-ms", retry_after_ms)
        }
        Fault::AnthropicRateLimit { retry_after } => check_value("retry-after", retry_after),
        Fault::ResetAfterChunks { chunks } | Fault::StreamErrorAfter { chunks, .. } => {
            too_many_frames(*chunks, 0).map_or(Ok(()), Err)
        }
        _ => Ok(()),
    }
}

/// Checks a plan's stream sizes (`stream_chunks`, `stream_pings`) against
/// [`MAX_STREAM_FRAMES`].
pub(crate) fn validate_stream(chunks: usize, pings: usize) -> Result<(), String> {
    if chunks > MAX_STREAM_FRAMES {
        return Err(format!(
            "stream_chunks {chunks} is over the most one answer sends, {MAX_STREAM_FRAMES}"
        ));
    }
    too_many_frames(0, pings).map_or(Ok(()), Err)
}
