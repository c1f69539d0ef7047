//! The verdict: what kind of outcome an attempt had and what may be done about it.

use http::StatusCode;

use crate::DelayHint;

/// The typed verdict the classify layer attaches to every response (in its
/// extensions) and to every error (inside [`ClassifiedError`](crate::ClassifiedError)).
///
/// Outer layers (retry, budget, breaker, fallback) act on this one value and never
/// re-parse headers or bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classification {
    /// The provider answered with a success status. For a streamed response the
    /// stream may still fail later; that failure is reported in the body stream.
    Success,
    /// The attempt failed; see [`Failure`].
    Failure(Failure),
}

impl Classification {
    /// `true` for [`Classification::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Classification::Success)
    }

    /// The failure, if this is one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Classification::Success => None,
            Classification::Failure(f) => Some(f),
        }
    }
}

/// What kind of failure an attempt had.
///
/// The kind fixes the default [`Retryable`] verdict ([`FailureKind::default_retryable`])
/// and which fallback chain, if any, may serve the request instead
/// ([`FailureKind::fallback_route`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// 429 rate limit (requests or tokens per minute): waiting helps.
    RateLimited,
    /// 503, Anthropic's 529 `overloaded_error`, OpenAI's `slow_down`: the provider is
    /// shedding load; waiting (or another provider) helps.
    Overloaded,
    /// 500, 502, 504 and other 5xx: a fault on the provider's side.
    ServerError,
    /// 408 Request Timeout from the provider.
    RequestTimeout,
    /// 409 Conflict (OpenAI's SDKs retry it: a lock contention on their side).
    Conflict,
    /// The connection could not be made (refused, DNS, TLS handshake): the request
    /// provably never reached the provider, so a retry is always safe.
    ConnectFailed,
    /// The attempt timed out after the request was written (no response head, or no
    /// first stream event, in time). The provider may have accepted and billed it.
    TimedOut,
    /// The connection failed after the request was written (reset, closed early).
    /// The provider may have accepted and billed it.
    ConnectionLost,
    /// Quota or billing exhausted: `insufficient_quota`, spend limits, per-day quotas,
    /// or one request larger than the whole tokens-per-minute limit. Waiting never
    /// helps inside a request; another provider or key may serve.
    QuotaExhausted,
    /// The prompt does not fit the model's context window; a larger-context model may serve.
    ContextLengthExceeded,
    /// The provider's content policy refused the request; a content-policy fallback may serve.
    ContentFiltered,
    /// The model does not exist or this key has no access to it.
    ModelNotFound,
    /// 401 / 403: the credential was refused at this upstream.
    AuthFailed,
    /// Any other client error (400, 413, 422, …): it would fail anywhere.
    InvalidRequest,
    /// Local: the retry budget refused a retry (set by the budget/retry layers).
    BudgetExhausted,
    /// Local: adaptive client-side throttling rejected the request before sending it.
    Throttled,
    /// Local: the circuit breaker for this model/upstream is open.
    BreakerOpen,
}

impl FailureKind {
    /// Every kind, in declaration order (for tables and tests).
    pub const ALL: [FailureKind; 17] = [
        FailureKind::RateLimited,
        FailureKind::Overloaded,
        FailureKind::ServerError,
        FailureKind::RequestTimeout,
        FailureKind::Conflict,
        FailureKind::ConnectFailed,
        FailureKind::TimedOut,
        FailureKind::ConnectionLost,
        FailureKind::QuotaExhausted,
        FailureKind::ContextLengthExceeded,
        FailureKind::ContentFiltered,
        FailureKind::ModelNotFound,
        FailureKind::AuthFailed,
        FailureKind::InvalidRequest,
        FailureKind::BudgetExhausted,
        FailureKind::Throttled,
        FailureKind::BreakerOpen,
    ];

    /// Whether a retry of the same request against the same model can help.
    pub fn default_retryable(self) -> Retryable {
        use FailureKind::*;
        match self {
            RateLimited | Overloaded | ServerError | RequestTimeout | Conflict | ConnectFailed => {
                Retryable::Yes
            }
            TimedOut | ConnectionLost => Retryable::IfIdempotent,
            QuotaExhausted
            | ContextLengthExceeded
            | ContentFiltered
            | ModelNotFound
            | AuthFailed
            | InvalidRequest
            | BudgetExhausted
            | Throttled
            | BreakerOpen => Retryable::No,
        }
    }

    /// Whether another model or provider may serve a request that failed this way,
    /// and from which chain. Only [`FailureKind::InvalidRequest`] would fail anywhere.
    pub fn fallback_route(self) -> FallbackRoute {
        match self {
            FailureKind::InvalidRequest => FallbackRoute::Never,
            FailureKind::ContextLengthExceeded => FallbackRoute::ContextChain,
            FailureKind::ContentFiltered => FallbackRoute::ContentChain,
            _ => FallbackRoute::NextModel,
        }
    }

    /// `true` for the kinds another model may serve at once, without waiting for the
    /// retries on this one to run out (quota, context length, content, model not
    /// found, auth, overloaded, rate limited, and the local refusals).
    pub fn another_model_may_serve(self) -> bool {
        use FailureKind::*;
        matches!(
            self,
            QuotaExhausted
                | ContextLengthExceeded
                | ContentFiltered
                | ModelNotFound
                | AuthFailed
                | Overloaded
                | RateLimited
                | BudgetExhausted
                | Throttled
                | BreakerOpen
        )
    }

    /// Whether this failure says something about the upstream's health (the
    /// breaker counts these; a client's bad request or a content refusal never counts).
    pub fn reflects_upstream_health(self) -> bool {
        use FailureKind::*;
        matches!(
            self,
            RateLimited
                | Overloaded
                | ServerError
                | RequestTimeout
                | ConnectFailed
                | TimedOut
                | ConnectionLost
        )
    }

    /// A stable snake_case name (used for `error.type` in traces and metrics labels).
    pub fn as_str(self) -> &'static str {
        use FailureKind::*;
        match self {
            RateLimited => "rate_limited",
            Overloaded => "overloaded",
            ServerError => "server_error",
            RequestTimeout => "request_timeout",
            Conflict => "conflict",
            ConnectFailed => "connect_failed",
            TimedOut => "timed_out",
            ConnectionLost => "connection_lost",
            QuotaExhausted => "quota_exhausted",
            ContextLengthExceeded => "context_length_exceeded",
            ContentFiltered => "content_filtered",
            ModelNotFound => "model_not_found",
            AuthFailed => "auth_failed",
            InvalidRequest => "invalid_request",
            BudgetExhausted => "budget_exhausted",
            Throttled => "throttled",
            BreakerOpen => "breaker_open",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether retrying the same request against the same model can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retryable {
    /// Retry (after the delay hint, or backoff).
    Yes,
    /// Never retry: it would fail the same way.
    No,
    /// Retry only if the request is idempotent (it carries an `Idempotency-Key` header
    /// or the [`Idempotent`](crate::Idempotent) marker): the provider may already have
    /// accepted the first attempt.
    IfIdempotent,
}

/// Which fallback chain may serve a request that failed this way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FallbackRoute {
    /// The failure would happen anywhere: do not fall back.
    Never,
    /// The next model in the request's ordinary chain.
    NextModel,
    /// The context-length chain (larger-context models).
    ContextChain,
    /// The content-policy chain.
    ContentChain,
}

/// What the provider said about its error, as far as the classifier could read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProviderError {
    /// `error.type` (OpenAI, Anthropic) or `error.status` (Gemini).
    pub error_type: Option<String>,
    /// `error.code` (OpenAI, Azure; a number for Gemini, kept as text) or Anthropic's
    /// `error.details.error_code`.
    pub code: Option<String>,
}

/// A failed attempt: its kind, whether a retry can help, and the provider's delay hint.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// What went wrong.
    pub kind: FailureKind,
    /// Whether the same request to the same model may be retried. Starts as
    /// [`FailureKind::default_retryable`]; `x-should-retry` and user rules override it.
    pub retryable: Retryable,
    /// The provider's (or a local layer's) hint of when to try again, as given: the
    /// retry layer caps it.
    pub hint: Option<DelayHint>,
    /// The HTTP status, when the provider answered.
    pub status: Option<StatusCode>,
    /// The provider's error type and code, when the body had them.
    pub provider_error: Option<ProviderError>,
    /// `x-should-retry` as the provider sent it, when it did.
    pub should_retry_header: Option<bool>,
}

impl Failure {
    /// A failure of `kind` with the kind's default retry verdict and nothing else known.
    pub fn new(kind: FailureKind) -> Self {
        Failure {
            kind,
            retryable: kind.default_retryable(),
            hint: None,
            status: None,
            provider_error: None,
            should_retry_header: None,
        }
    }

    /// Sets the status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the delay hint.
    pub fn with_hint(mut self, hint: Option<DelayHint>) -> Self {
        self.hint = hint;
        self
    }

    /// Overrides the retry verdict.
    pub fn with_retryable(mut self, retryable: Retryable) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets what the provider said about its error.
    pub fn with_provider_error(mut self, provider_error: Option<ProviderError>) -> Self {
        self.provider_error = provider_error;
        self
    }

    /// Which fallback chain may serve the request instead.
    pub fn fallback_route(&self) -> FallbackRoute {
        self.kind.fallback_route()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {})", status.as_u16())?;
        }
        if let Some(code) = self
            .provider_error
            .as_ref()
            .and_then(|pe| pe.code.as_deref().or(pe.error_type.as_deref()))
        {
            write!(f, " [{code}]")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, ", retry after {:?} ({})", hint.delay, hint.source)?;
        }
        Ok(())
    }
}
