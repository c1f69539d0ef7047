//! The built-in rules: the tables of providers.md as code. Pure functions of the
//! status and the parsed error envelope.

use std::time::Duration;

use http::StatusCode;

use crate::FailureKind;
use crate::envelope::ErrorEnvelope;

/// Codes and types that mean quota or billing is exhausted (OpenAI, Anthropic).
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "billing_hard_limit_reached",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
    "billing_error",
    "enforced_spend_limit_reached",
];

const CONTEXT_CODES: &[&str] = &["context_length_exceeded"];

const CONTENT_CODES: &[&str] = &[
    "content_policy_violation",
    "content_filter",
    "responsibleaipolicyviolation",
];

const MODEL_CODES: &[&str] = &["model_not_found"];

/// Codes that mean the provider is shedding load.
const OVERLOADED_CODES: &[&str] = &[
    "slow_down",
    "server_is_overloaded",
    "engine_overloaded",
    "overloaded_error",
    "service_unavailable_error",
    "unavailable",
];

/// Message texts of context-window errors, for providers that give no code.
const CONTEXT_MESSAGES: &[&str] = &[
    "maximum context length",
    "exceed context limit",
    "is longer than the model's context length",
    "exceeds the available context size",
    "exceeds the maximum number of tokens allowed",
    "prompt is too long",
];

/// Message texts of content-policy refusals, for providers that give no code.
const CONTENT_MESSAGES: &[&str] = &[
    "content_policy_violation",
    "responsibleaipolicyviolation",
    "content_filter",
    "content management policy",
    "your request was rejected as a result of our safety system",
];

/// Types and codes that decide the kind when nothing more specific did.
fn type_kind(name: &str) -> Option<FailureKind> {
    let name = name.to_ascii_lowercase();
    Some(match name.as_str() {
        "rate_limit_error"
        | "rate_limit_exceeded"
        | "requests"
        | "tokens"
        | "resource_exhausted" => FailureKind::RateLimited,
        "server_error"
        | "api_error"
        | "internal"
        | "internal_error"
        | "internal_server_error"
        | "timeout_error"
        | "deadline_exceeded" => FailureKind::ServerError,
        "authentication_error"
        | "permission_error"
        | "invalid_api_key"
        | "unauthenticated"
        | "permission_denied" => FailureKind::AuthFailed,
        "request_too_large" => FailureKind::InvalidRequest,
        _ => return None,
    })
}

fn any_code_in(envelope: &ErrorEnvelope, table: &[&str]) -> bool {
    envelope
        .codes()
        .chain(envelope.rpc_status.as_deref())
        .any(|c| table.iter().any(|t| c.eq_ignore_ascii_case(t)))
}

fn message_has(message: Option<&str>, table: &[&str]) -> bool {
    message.is_some_and(|m| table.iter().any(|t| m.contains(t)))
}

/// The kind the body proves, whatever the status said.
fn specific_kind(status: Option<StatusCode>, envelope: &ErrorEnvelope) -> Option<FailureKind> {
    let message = envelope.message_lowercase();
    let message = message.as_deref();
    if any_code_in(envelope, QUOTA_CODES) {
        return Some(FailureKind::QuotaExhausted);
    }
    // Gemini: a per-day quota is never worth waiting for inside a request.
    if envelope
        .quota_ids
        .iter()
        .any(|id| id.to_ascii_lowercase().contains("perday"))
    {
        return Some(FailureKind::QuotaExhausted);
    }
    let rate_limited = status == Some(StatusCode::TOO_MANY_REQUESTS)
        || envelope
            .code
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case("rate_limit_exceeded"));
    if rate_limited && message.is_some_and(request_larger_than_limit) {
        return Some(FailureKind::QuotaExhausted);
    }
    if any_code_in(envelope, CONTEXT_CODES) || message_has(message, CONTEXT_MESSAGES) {
        return Some(FailureKind::ContextLengthExceeded);
    }
    if any_code_in(envelope, CONTENT_CODES) || message_has(message, CONTENT_MESSAGES) {
        return Some(FailureKind::ContentFiltered);
    }
    if any_code_in(envelope, MODEL_CODES) || model_missing(status, envelope, message) {
        return Some(FailureKind::ModelNotFound);
    }
    // Gemini answers a bad key with 400 INVALID_ARGUMENT: it is a refused credential
    // (another key or provider may serve), not a malformed request.
    if message.is_some_and(|m| m.contains("api key not valid")) {
        return Some(FailureKind::AuthFailed);
    }
    if any_code_in(envelope, OVERLOADED_CODES) {
        return Some(FailureKind::Overloaded);
    }
    None
}

/// A 404 (or Anthropic `not_found_error`) that names a model. Other 404s (a wrong
/// base URL, a wrong path) are invalid requests: falling back to another model would
/// not fix them... unless the message says the model is what is missing.
fn model_missing(
    status: Option<StatusCode>,
    envelope: &ErrorEnvelope,
    message: Option<&str>,
) -> bool {
    let Some(message) = message else {
        return false;
    };
    // Anthropic: `{"type": "not_found_error", "message": "model: claude-x"}`.
    let anthropic = envelope
        .error_type
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("not_found_error"))
        && message.starts_with("model:");
    // OpenAI-compatibles and Gemini: "The model `x` does not exist", "models/x is not
    // found for API version v1beta", Ollama's "model \"x\" not found".
    let named = status == Some(StatusCode::NOT_FOUND)
        && message.contains("model")
        && (message.contains("not found") || message.contains("does not exist"));
    anthropic || named
}

/// OpenAI's "Request too large for gpt-4o … on tokens per min (TPM): Limit 30000,
/// Requested 30601": one request larger than the whole per-minute budget can never
/// fit, however long it waits. When both numbers are present and the request does
/// fit, it is an ordinary rate limit.
fn request_larger_than_limit(message: &str) -> bool {
    if !message.contains("request too large") {
        return false;
    }
    match (
        number_after(message, "limit "),
        number_after(message, "requested "),
    ) {
        (Some(limit), Some(requested)) => requested > limit,
        _ => true,
    }
}

fn number_after(text: &str, label: &str) -> Option<u64> {
    let start = text.find(label)? + label.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Azure's "Please retry after 6 seconds." / "Try again in 50 seconds."
pub(crate) fn azure_message_delay(envelope: &ErrorEnvelope) -> Option<Duration> {
    let message = envelope.message_lowercase()?;
    ["retry after ", "try again in "]
        .into_iter()
        .find_map(|label| {
            let seconds = number_after(&message, label)?;
            let start = message.find(label)? + label.len();
            let rest = message[start..].trim_start_matches(|c: char| c.is_ascii_digit());
            (rest.starts_with(" second") && seconds > 0).then(|| Duration::from_secs(seconds))
        })
}

/// The kind from the built-in rules: the body's specific evidence, then decisive
/// types/codes, then the status.
pub(crate) fn builtin_kind(
    status: Option<StatusCode>,
    envelope: Option<&ErrorEnvelope>,
) -> FailureKind {
    if let Some(kind) = envelope.and_then(|e| specific_kind(status, e)) {
        return kind;
    }
    if let Some(kind) = envelope.and_then(|e| {
        [
            e.error_type.as_deref(),
            e.rpc_status.as_deref(),
            e.code.as_deref(),
        ]
        .into_iter()
        .flatten()
        .find_map(type_kind)
    }) {
        return kind;
    }
    // A stream error has no status; Azure and Gemini put one in `error.code`.
    let status = status.or_else(|| {
        envelope
            .and_then(|e| e.code.as_deref())
            .and_then(|c| c.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
    });
    match status.map(|s| s.as_u16()) {
        Some(408) => FailureKind::RequestTimeout,
        Some(409) => FailureKind::Conflict,
        Some(429) => FailureKind::RateLimited,
        Some(503 | 529) => FailureKind::Overloaded,
        Some(401 | 403) => FailureKind::AuthFailed,
        Some(400..=499) => FailureKind::InvalidRequest,
        // 500, 502, 504 and every other status a failure can have; and a stream
        // error nobody can read, where the provider broke the stream.
        _ => FailureKind::ServerError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_too_large_needs_the_request_to_exceed_the_limit() {
        let m =
            "request too large for gpt-4o on tokens per min (tpm): limit 30000, requested 30601.";
        assert!(request_larger_than_limit(m));
        let m =
            "request too large for gpt-4o on tokens per min (tpm): limit 30000, requested 30000.";
        assert!(!request_larger_than_limit(m));
        assert!(request_larger_than_limit("request too large for gpt-4o."));
        assert!(!request_larger_than_limit(
            "rate limit reached: limit 3, requested 9"
        ));
    }

    #[test]
    fn azure_message_delays() {
        let envelope = |message: &str| ErrorEnvelope {
            message: Some(message.to_owned()),
            ..ErrorEnvelope::default()
        };
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            azure_message_delay(&envelope("Please retry after 6 seconds.")),
            secs(6)
        );
        assert_eq!(
            azure_message_delay(&envelope("Try again in 50 seconds.")),
            secs(50)
        );
        assert_eq!(
            azure_message_delay(&envelope("Please retry after 1 second.")),
            secs(1)
        );
        assert_eq!(
            azure_message_delay(&envelope("Please retry after 0 seconds.")),
            None
        );
        assert_eq!(
            azure_message_delay(&envelope("Please retry after 6 minutes.")),
            None
        );
        assert_eq!(
            azure_message_delay(&envelope("Please retry after -6 seconds.")),
            None
        );
        assert_eq!(
            azure_message_delay(&envelope("retry after 99999999999999999999999 seconds")),
            None
        );
        assert_eq!(
            azure_message_delay(&envelope("Rate limit is exceeded.")),
            None
        );
    }
}
