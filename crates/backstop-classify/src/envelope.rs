//! Reading a provider's JSON error body, whatever its shape.
//!
//! One reader serves every provider: OpenAI's `{"error": {...}}`, Anthropic's
//! `{"type": "error", "error": {...}}`, Azure's string codes and `innererror`, Gemini's
//! array-wrapped Google RPC status with `details`, and the flat `{"message", "type",
//! "code"}` some OpenAI-compatible servers (vLLM, llama.cpp) send. Anything else yields
//! an empty envelope: the classifier then falls back to the status.

use std::time::Duration;

use serde_json::Value;

use crate::duration_text::parse_protobuf_duration;

/// What the classifier reads from an error body. Every field is optional; strings are
/// kept as sent (matching is case-insensitive where it happens).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ErrorEnvelope {
    /// `error.type` (OpenAI, Anthropic).
    pub error_type: Option<String>,
    /// `error.code` as text (OpenAI, Azure's `"429"`, Gemini's integer).
    pub code: Option<String>,
    /// Gemini's `error.status` (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`, …).
    pub rpc_status: Option<String>,
    /// Anthropic's `error.details.error_code` (`enforced_spend_limit_reached`).
    pub detail_code: Option<String>,
    /// Azure's `error.innererror.code` (`ResponsibleAIPolicyViolation`).
    pub inner_code: Option<String>,
    /// `error.message`, or `error` itself when it is a bare string.
    pub message: Option<String>,
    /// Gemini `google.rpc.QuotaFailure` violations' `quotaId`s.
    pub quota_ids: Vec<String>,
    /// Gemini `google.rpc.RetryInfo.retryDelay`, when valid and positive.
    pub retry_delay: Option<Duration>,
}

/// How many `details` entries / quota violations are looked at: a body is capped in
/// bytes already, this keeps the work per entry bounded too.
const MAX_DETAILS: usize = 32;

impl ErrorEnvelope {
    /// Parses `body`; `None` when it is not JSON or has no recognisable error fields.
    pub fn parse(body: &[u8]) -> Option<ErrorEnvelope> {
        let value: Value = serde_json::from_slice(body).ok()?;
        Self::from_value(&value)
    }

    fn from_value(value: &Value) -> Option<ErrorEnvelope> {
        // Gemini wraps its status in a one-element array.
        let value = match value {
            Value::Array(items) => items.first()?,
            other => other,
        };
        let object = value.as_object()?;
        let mut envelope = ErrorEnvelope::default();
        match object.get("error") {
            Some(Value::Object(error)) => envelope.read_error_object(error),
            // `{"error": "model not loaded"}` (several OpenAI-compatible servers).
            Some(Value::String(message)) => envelope.message = Some(message.clone()),
            // Flat shape: `{"object": "error", "message": …, "type": …, "code": …}`.
            _ => envelope.read_error_object(object),
        }
        if envelope.is_empty() {
            None
        } else {
            Some(envelope)
        }
    }

    fn read_error_object(&mut self, error: &serde_json::Map<String, Value>) {
        self.error_type = string(error.get("type"));
        // Anthropic puts `"type": "error"` at the top level; it says nothing.
        if self.error_type.as_deref() == Some("error") {
            self.error_type = None;
        }
        self.code = text(error.get("code"));
        self.rpc_status = string(error.get("status"));
        self.message = string(error.get("message"));
        self.inner_code = error
            .get("innererror")
            .and_then(Value::as_object)
            .and_then(|inner| text(inner.get("code")));
        match error.get("details") {
            Some(Value::Object(details)) => self.detail_code = string(details.get("error_code")),
            Some(Value::Array(details)) => self.read_rpc_details(details),
            _ => {}
        }
    }

    /// Gemini's `details`: typed entries, told apart by `@type`.
    fn read_rpc_details(&mut self, details: &[Value]) {
        for detail in details.iter().take(MAX_DETAILS) {
            let Some(detail) = detail.as_object() else {
                continue;
            };
            let kind = detail.get("@type").and_then(Value::as_str).unwrap_or("");
            if kind.ends_with("google.rpc.RetryInfo") {
                if self.retry_delay.is_none() {
                    self.retry_delay = detail.get("retryDelay").and_then(protobuf_duration);
                }
            } else if kind.ends_with("google.rpc.QuotaFailure") {
                let violations = detail.get("violations").and_then(Value::as_array);
                for violation in violations.into_iter().flatten().take(MAX_DETAILS) {
                    if let Some(id) = violation.get("quotaId").and_then(Value::as_str) {
                        self.quota_ids.push(id.to_owned());
                    }
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self == &ErrorEnvelope::default()
    }

    /// Every code-like field, for matching against code tables.
    pub fn codes(&self) -> impl Iterator<Item = &str> {
        [
            self.code.as_deref(),
            self.error_type.as_deref(),
            self.detail_code.as_deref(),
            self.inner_code.as_deref(),
        ]
        .into_iter()
        .flatten()
    }

    /// The message, lower-cased, for substring matching.
    pub fn message_lowercase(&self) -> Option<String> {
        self.message.as_deref().map(str::to_lowercase)
    }
}

/// A non-empty string field.
fn string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A string field, or a number kept as its text (Gemini's integer `code`).
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A protobuf `Duration` in its JSON form (`"58s"`, `"45.837906927s"`), or the rarer
/// object form `{"seconds": 58, "nanos": 0}`.
fn protobuf_duration(value: &Value) -> Option<Duration> {
    match value {
        Value::String(s) => parse_protobuf_duration(s),
        Value::Object(o) => {
            let seconds = o.get("seconds").and_then(|v| match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse::<u64>().ok(),
                _ => None,
            })?;
            let nanos = o.get("nanos").and_then(Value::as_u64).unwrap_or(0);
            let nanos = u32::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?;
            Some(Duration::new(seconds, nanos)).filter(|d| !d.is_zero())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_envelope() {
        let e = ErrorEnvelope::parse(
            br#"{"error":{"message":"m","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
        )
        .unwrap();
        assert_eq!(e.error_type.as_deref(), Some("tokens"));
        assert_eq!(e.code.as_deref(), Some("rate_limit_exceeded"));
        assert_eq!(e.message.as_deref(), Some("m"));
    }

    #[test]
    fn reads_gemini_array_with_details() {
        let e = ErrorEnvelope::parse(
            br#"[{"error":{"code":429,"message":"x","status":"RESOURCE_EXHAUSTED","details":[
              {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
              {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"45.837906927s"}]}}]"#,
        )
        .unwrap();
        assert_eq!(e.code.as_deref(), Some("429"));
        assert_eq!(e.rpc_status.as_deref(), Some("RESOURCE_EXHAUSTED"));
        assert_eq!(
            e.quota_ids,
            vec!["GenerateRequestsPerDayPerProjectPerModel-FreeTier".to_owned()]
        );
        assert_eq!(e.retry_delay, Some(Duration::new(45, 837_906_927)));
    }

    #[test]
    fn reads_anthropic_details_and_drops_top_level_error_type() {
        let e = ErrorEnvelope::parse(
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"m","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
        )
        .unwrap();
        assert_eq!(e.error_type.as_deref(), Some("rate_limit_error"));
        assert_eq!(
            e.detail_code.as_deref(),
            Some("enforced_spend_limit_reached")
        );
    }

    #[test]
    fn reads_flat_and_string_shapes() {
        let flat = ErrorEnvelope::parse(
            br#"{"object":"error","message":"m","type":"BadRequestError","code":400}"#,
        )
        .unwrap();
        assert_eq!(flat.code.as_deref(), Some("400"));
        assert_eq!(flat.error_type.as_deref(), Some("BadRequestError"));
        let string = ErrorEnvelope::parse(br#"{"error":"model not loaded"}"#).unwrap();
        assert_eq!(string.message.as_deref(), Some("model not loaded"));
    }

    #[test]
    fn non_error_json_and_garbage_yield_nothing() {
        for body in [
            &b""[..],
            b"<html>502 Bad Gateway</html>",
            b"[]",
            b"[1,2]",
            b"42",
            b"{}",
            b"{\"error\":null}",
            b"{\"error\":{\"type\":5,\"message\":[]}}",
            b"{\"error\":{\"message\":",
        ] {
            assert_eq!(
                ErrorEnvelope::parse(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
