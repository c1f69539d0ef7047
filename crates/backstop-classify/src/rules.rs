//! The classification rules: a pure function from status, headers and body bytes to a
//! [`Classification`]. No runtime, no I/O: the tower layer is plumbing around it.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::envelope::ErrorEnvelope;
use crate::hint::HeaderHints;
use crate::{
    Classification, DelayHint, Failure, FailureKind, HintSource, ProviderError, Retryable,
};

/// Default cap on how much of an error body is inspected (and, in the layer, buffered).
pub const DEFAULT_MAX_ERROR_BODY: usize = 64 * 1024;

/// Default wait at or above which a rate limit's retry instruction is treated as a
/// quota (see [`Rules::with_quota_wait_threshold`]).
pub const DEFAULT_QUOTA_WAIT_THRESHOLD: Duration = Duration::from_secs(3_600);

/// Which provider's conventions to apply.
///
/// Every profile understands every provider's error envelope, because
/// OpenAI-compatible gateways pass other providers' bodies through unchanged. A
/// profile only switches on the few rules that are safe for its provider alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Profile {
    /// Any OpenAI-compatible server (vLLM, llama.cpp, Ollama, gateways): the default.
    #[default]
    Generic,
    /// OpenAI's API.
    OpenAi,
    /// Azure OpenAI: also reads "retry after N seconds" from the error message when
    /// no header gives a retry instruction.
    Azure,
    /// Anthropic, native Messages API or its OpenAI-compatible endpoint.
    Anthropic,
    /// Google Gemini's OpenAI-compatible endpoint.
    Gemini,
}

impl Profile {
    /// Every profile, for configuration help texts and tests.
    pub const ALL: [Profile; 5] = [
        Profile::Generic,
        Profile::OpenAi,
        Profile::Azure,
        Profile::Anthropic,
        Profile::Gemini,
    ];

    /// The profile's name in configuration files: `generic`, `openai`, `azure`,
    /// `anthropic`, `gemini`.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Generic => "generic",
            Profile::OpenAi => "openai",
            Profile::Azure => "azure",
            Profile::Anthropic => "anthropic",
            Profile::Gemini => "gemini",
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A profile name that is not one of [`Profile::ALL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownProfile(pub String);

impl std::fmt::Display for UnknownProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown provider profile `{}`; use one of generic, openai, azure, anthropic, gemini",
            self.0
        )
    }
}

impl std::error::Error for UnknownProfile {}

impl std::str::FromStr for Profile {
    type Err = UnknownProfile;

    /// Parses a profile name, ASCII case-insensitively.
    fn from_str(name: &str) -> Result<Self, UnknownProfile> {
        Profile::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| UnknownProfile(name.to_owned()))
    }
}

/// A user rule: conditions on the response, and the verdict to use when all of them
/// hold. Built with [`Rule::new`] and the `when_*` / `then_*` methods.
///
/// A rule with no condition matches every failure; a rule with no `then_*` changes
/// nothing. Strings match ASCII case-insensitively.
///
/// ```
/// use backstop_classify::{FailureKind, Retryable, Rule, Rules};
///
/// // A gateway that says "budget_exceeded" means a spent key, not a passing limit.
/// let rules = Rules::openai()
///     .with_rule(Rule::new().when_code("budget_exceeded").then_kind(FailureKind::QuotaExhausted))
///     // This upstream's 404s are transient routing errors.
///     .with_rule(Rule::new().when_status(http::StatusCode::NOT_FOUND).then_retryable(Retryable::Yes));
/// # let _ = rules;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    status: Option<StatusCode>,
    error_type: Option<String>,
    code: Option<String>,
    message_contains: Option<String>,
    kind: Option<FailureKind>,
    retryable: Option<Retryable>,
}

impl Rule {
    /// A rule that matches every failure and changes nothing yet.
    pub fn new() -> Self {
        Rule::default()
    }

    /// Only when the HTTP status is `status` (never matches a stream error, which has none).
    pub fn when_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Only when `error.type` (or Gemini's `error.status`) is `error_type`.
    pub fn when_error_type(mut self, error_type: impl Into<String>) -> Self {
        self.error_type = Some(error_type.into());
        self
    }

    /// Only when `error.code`, Anthropic's `error.details.error_code` or Azure's
    /// `error.innererror.code` is `code`.
    pub fn when_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Only when the error message contains `text`.
    pub fn when_message_contains(mut self, text: impl Into<String>) -> Self {
        self.message_contains = Some(text.into().to_lowercase());
        self
    }

    /// Classify as `kind` (its default retry verdict applies unless
    /// [`Rule::then_retryable`] is set too).
    pub fn then_kind(mut self, kind: FailureKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// Use this retry verdict, whatever the kind and `x-should-retry` say.
    pub fn then_retryable(mut self, retryable: Retryable) -> Self {
        self.retryable = Some(retryable);
        self
    }

    fn matches(&self, status: Option<StatusCode>, envelope: Option<&ErrorEnvelope>) -> bool {
        if self.status.is_some() && status != self.status {
            return false;
        }
        if let Some(want) = &self.error_type {
            let found = envelope.is_some_and(|e| {
                [e.error_type.as_deref(), e.rpc_status.as_deref()]
                    .into_iter()
                    .flatten()
                    .any(|t| t.eq_ignore_ascii_case(want))
            });
            if !found {
                return false;
            }
        }
        if let Some(want) = &self.code {
            let found = envelope.is_some_and(|e| {
                [
                    e.code.as_deref(),
                    e.detail_code.as_deref(),
                    e.inner_code.as_deref(),
                ]
                .into_iter()
                .flatten()
                .any(|c| c.eq_ignore_ascii_case(want))
            });
            if !found {
                return false;
            }
        }
        if let Some(want) = &self.message_contains {
            let found = envelope
                .and_then(ErrorEnvelope::message_lowercase)
                .is_some_and(|m| m.contains(want.as_str()));
            if !found {
                return false;
            }
        }
        true
    }
}

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
    let cap = |s: &str| {
        let mut end = s.len().min(MAX);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    };
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

// ---------------------------------------------------------------------------------
// The built-in tables (providers.md).

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
        .take(20)
        .collect();
    digits.parse().ok()
}

/// Azure's "Please retry after 6 seconds." / "Try again in 50 seconds."
fn azure_message_delay(envelope: &ErrorEnvelope) -> Option<Duration> {
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

impl From<Failure> for Classification {
    fn from(failure: Failure) -> Self {
        Classification::Failure(failure)
    }
}
