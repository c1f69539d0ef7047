//! The classification rules: a pure function from status, headers and body bytes to a
//! [`Classification`]. No runtime, no I/O: the tower layer is plumbing around it.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::builtin::{azure_message_delay, builtin_kind};
use crate::envelope::ErrorEnvelope;
use crate::hint::HeaderHints;
use crate::{
    Classification, DelayHint, Failure, FailureKind, HintSource, Profile, ProviderError, Retryable,
    Rule,
};

/// Default cap on how much of an error body is inspected (and, in the layer, buffered).
pub const DEFAULT_MAX_ERROR_BODY: usize = 64 * 1024;

/// Default wait at or above which a rate limit's retry instruction is treated as a
/// quota (see [`Rules::with_quota_wait_threshold`]).
pub const DEFAULT_QUOTA_WAIT_THRESHOLD: Duration = Duration::from_secs(3_600);

/// The classification rules for one provider profile, plus the user's own rules.
///
/// `Rules::default()` is the generic OpenAI-compatible profile. User rules
/// ([`Rules::with_rule`]) are applied last: the built-in rules and `x-should-retry`
/// decide first, then the first matching user rule (in the order added) overrides
/// the kind and/or the retry verdict. So user rules always win.
///
/// ```
/// use std::time::SystemTime;
/// use backstop_classify::{FailureKind, Retryable, Rules};
///
/// let body = br#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
/// let verdict = Rules::openai().classify_response(
///     http::StatusCode::BAD_REQUEST,
///     &http::HeaderMap::new(),
///     body,
///     SystemTime::now(),
/// );
/// let failure = verdict.failure().unwrap();
/// assert_eq!(failure.kind, FailureKind::ContextLengthExceeded);
/// assert_eq!(failure.retryable, Retryable::No);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    profile: Profile,
    user_rules: Vec<Rule>,
    max_inspected_body: usize,
    quota_wait_threshold: Option<Duration>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(Profile::Generic)
    }
}

impl Rules {
    /// The built-in rules of `profile`.
    pub fn new(profile: Profile) -> Self {
        Rules {
            profile,
            user_rules: Vec::new(),
            max_inspected_body: DEFAULT_MAX_ERROR_BODY,
            quota_wait_threshold: Some(DEFAULT_QUOTA_WAIT_THRESHOLD),
        }
    }

    /// Any OpenAI-compatible server (the default).
    pub fn generic() -> Self {
        Rules::new(Profile::Generic)
    }

    /// OpenAI's API.
    pub fn openai() -> Self {
        Rules::new(Profile::OpenAi)
    }

    /// Azure OpenAI.
    pub fn azure() -> Self {
        Rules::new(Profile::Azure)
    }

    /// Anthropic (native or OpenAI-compatible endpoint).
    pub fn anthropic() -> Self {
        Rules::new(Profile::Anthropic)
    }

    /// Gemini's OpenAI-compatible endpoint.
    pub fn gemini() -> Self {
        Rules::new(Profile::Gemini)
    }

    /// The profile these rules were built from.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Adds a user rule; it wins over the built-in rules and over rules added later.
    pub fn with_rule(mut self, rule: Rule) -> Self {
        self.user_rules.push(rule);
        self
    }

    /// How many leading bytes of an error body are inspected (default 64 KiB). A body
    /// longer than this is classified by status and headers alone.
    pub fn with_max_inspected_body(mut self, bytes: usize) -> Self {
        self.max_inspected_body = bytes;
        self
    }

    /// The cap set by [`Rules::with_max_inspected_body`].
    pub fn max_inspected_body(&self) -> usize {
        self.max_inspected_body
    }

    /// A rate limit whose retry instruction (`retry-after`, Gemini's `retryDelay`, …)
    /// is at least `threshold` is classified [`FailureKind::QuotaExhausted`]: Azure's
    /// daily quota says "retry after 86400 seconds", and no request should wait that
    /// long. Default one hour; `None` turns it off. The hint is still reported as given.
    pub fn with_quota_wait_threshold(mut self, threshold: Option<Duration>) -> Self {
        self.quota_wait_threshold = threshold;
        self
    }

    /// Classifies a response from its status, headers and (the start of) its body.
    ///
    /// Statuses below 400 are [`Classification::Success`]. For the others the body is
    /// read as a provider error envelope when it is JSON; a body that is empty, not
    /// JSON, truncated, longer than [`Rules::max_inspected_body`] (it is then not
    /// parsed at all) or of an unknown shape is classified by status and headers.
    /// Never panics, whatever the input. `now` anchors HTTP-date and RFC 3339 hints.
    pub fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Classification {
        if status.as_u16() < 400 {
            return Classification::Success;
        }
        // A body over the cap is truncated JSON at best: status and headers decide.
        let envelope = (body.len() <= self.max_inspected_body)
            .then(|| ErrorEnvelope::parse(body))
            .flatten();
        let envelope = envelope.as_ref();
        let should_retry_header = should_retry(headers);
        let kind = builtin_kind(Some(status), envelope);

        let header_hints = HeaderHints::read(headers, now);
        let hint = header_hints
            .instruction
            .or_else(|| {
                envelope
                    .and_then(|e| e.retry_delay)
                    .map(|d| DelayHint::new(d, HintSource::GeminiRetryDelay))
            })
            .or_else(|| {
                (self.profile == Profile::Azure)
                    .then(|| envelope.and_then(azure_message_delay))
                    .flatten()
                    .map(|d| DelayHint::new(d, HintSource::ErrorMessage))
            })
            // A bucket's reset time only matters when a bucket ran dry; on a 500 it
            // would make the retry layer wait for nothing.
            .or(if kind == FailureKind::RateLimited {
                header_hints.bucket_reset
            } else {
                None
            });

        self.finish(Some(status), envelope, kind, hint, should_retry_header)
            .into()
    }

    /// Classifies an error that arrived inside a stream after a 200: an SSE
    /// `data: {"error": {...}}` line (OpenAI and compatibles, Gemini) or the data of
    /// an Anthropic `event: error`. `event_data` is the event's data; a leading
    /// `data:` is tolerated. A payload that cannot be read is a
    /// [`FailureKind::ServerError`]: the provider broke the stream.
    pub fn classify_stream_error(&self, event_data: &[u8]) -> Failure {
        let data = event_data.trim_ascii();
        let data = data
            .strip_prefix(b"data:")
            .map(<[u8]>::trim_ascii)
            .unwrap_or(data);
        let envelope = (data.len() <= self.max_inspected_body)
            .then(|| ErrorEnvelope::parse(data))
            .flatten();
        let envelope = envelope.as_ref();
        let kind = builtin_kind(None, envelope);
        let hint = envelope
            .and_then(|e| e.retry_delay)
            .map(|d| DelayHint::new(d, HintSource::GeminiRetryDelay));
        self.finish(None, envelope, kind, hint, None)
    }

    /// Classifies a *successful* completion's content: a 200 whose choices ended with
    /// `finish_reason: "content_filter"` (OpenAI, Azure) is a content-policy refusal
    /// reported as a success. `completion` is a whole `chat.completion` JSON or the
    /// data of one streamed `chat.completion.chunk`; anything else (no choices, not
    /// JSON, over [`Rules::max_inspected_body`]) is [`Classification::Success`].
    ///
    /// The layer never buffers a success, so it cannot call this itself: whoever reads
    /// the body (a fallback layer with a content-policy chain, the application) does.
    /// The failure has no status (the HTTP status was a success).
    pub fn classify_completion(&self, completion: &[u8]) -> Classification {
        let data = completion.trim_ascii();
        let data = data
            .strip_prefix(b"data:")
            .map(<[u8]>::trim_ascii)
            .unwrap_or(data);
        if data.len() > self.max_inspected_body {
            return Classification::Success;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
            return Classification::Success;
        };
        let filtered = value
            .get("choices")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|choices| {
                choices.iter().any(|choice| {
                    choice
                        .get("finish_reason")
                        .and_then(serde_json::Value::as_str)
                        == Some("content_filter")
                })
            });
        if filtered {
            Failure::new(FailureKind::ContentFiltered).into()
        } else {
            Classification::Success
        }
    }

    /// Applies what follows the built-in kind: `x-should-retry`, the long-wait quota
    /// rule, then the user rules.
    fn finish(
        &self,
        status: Option<StatusCode>,
        envelope: Option<&ErrorEnvelope>,
        mut kind: FailureKind,
        hint: Option<DelayHint>,
        should_retry_header: Option<bool>,
    ) -> Failure {
        if kind == FailureKind::RateLimited
            && let (Some(threshold), Some(hint)) = (self.quota_wait_threshold, hint)
            && hint.source.is_retry_instruction()
            && hint.delay >= threshold
        {
            kind = FailureKind::QuotaExhausted;
        }
        let mut retryable = kind.default_retryable();
        match should_retry_header {
            // The server's explicit "don't" always holds.
            Some(false) => retryable = Retryable::No,
            // Its "do" overrides a status rule, not a body that proves a retry
            // useless: Anthropic sends `x-should-retry: true` on spend-limit 429s too.
            Some(true) if !proven_unretryable(kind) => retryable = Retryable::Yes,
            _ => {}
        }
        if let Some(rule) = self.user_rules.iter().find(|r| r.matches(status, envelope)) {
            if let Some(rule_kind) = rule.kind {
                kind = rule_kind;
                retryable = rule_kind.default_retryable();
            }
            if let Some(rule_retryable) = rule.retryable {
                retryable = rule_retryable;
            }
        }
        let mut failure = Failure::new(kind)
            .with_retryable(retryable)
            .with_hint(hint)
            .with_provider_error(envelope.and_then(provider_error));
        failure.status = status;
        failure.should_retry_header = should_retry_header;
        failure
    }
}

/// Classifies by status and headers alone, with the default (generic) rules: for
/// callers that have no body, such as a `TraceLayer` classifier.
pub fn classify_status(status: StatusCode, headers: &HeaderMap) -> Classification {
    Rules::default().classify_response(status, headers, &[], SystemTime::now())
}

/// Kinds that only explicit evidence in the body produces, and that a retry can
/// never cure.
fn proven_unretryable(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::QuotaExhausted
            | FailureKind::ContextLengthExceeded
            | FailureKind::ContentFiltered
            | FailureKind::ModelNotFound
    )
}

/// `x-should-retry: true|false` (first value; anything else is ignored).
fn should_retry(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get("x-should-retry")?.to_str().ok()?.trim();
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// What goes into [`Failure::provider_error`], each string capped so that a hostile
/// body cannot make the verdict large.
fn provider_error(envelope: &ErrorEnvelope) -> Option<ProviderError> {
    const MAX: usize = 128;
    let cap = |s: &str| crate::context::prefix_within(s, MAX).to_owned();
    let error_type = envelope
        .error_type
        .as_deref()
        .or(envelope.rpc_status.as_deref())
        .map(cap);
    let code = envelope
        .detail_code
        .as_deref()
        .or(envelope.code.as_deref())
        .map(cap);
    if error_type.is_none() && code.is_none() {
        return None;
    }
    Some(ProviderError { error_type, code })
}

impl From<Failure> for Classification {
    fn from(failure: Failure) -> Self {
        Classification::Failure(failure)
    }
}
