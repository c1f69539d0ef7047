//! The provider's hint of when to try again.

use std::time::Duration;

/// A delay hint, as the provider gave it (never capped here: capping is the retry
/// layer's job), with where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DelayHint {
    /// How long from the moment the response was classified.
    pub delay: Duration,
    /// The header or body field it was read from.
    pub source: HintSource,
}

impl DelayHint {
    /// A hint of `delay` from `source`.
    pub fn new(delay: Duration, source: HintSource) -> Self {
        DelayHint { delay, source }
    }
}

/// Where a [`DelayHint`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HintSource {
    /// `retry-after-ms` (OpenAI, Azure).
    RetryAfterMs,
    /// `x-ms-retry-after-ms` (Azure).
    XMsRetryAfterMs,
    /// `retry-after` in (possibly fractional) seconds.
    RetryAfterSeconds,
    /// `retry-after` as an HTTP-date, relative to now.
    RetryAfterDate,
    /// `x-ratelimit-reset-requests` (OpenAI, Groq: Go-style duration). The time until
    /// the bucket is full again: a weaker hint than Retry-After.
    RateLimitResetRequests,
    /// `x-ratelimit-reset-tokens` (OpenAI, Groq: Go-style duration). Weaker than Retry-After.
    RateLimitResetTokens,
    /// `x-rate-limit-reset-tokens` (Azure: bare seconds). Weaker than Retry-After.
    AzureRateLimitResetTokens,
    /// `anthropic-ratelimit-*-reset` (RFC 3339 timestamp). Weaker than Retry-After.
    AnthropicRateLimitReset,
    /// Gemini's `google.rpc.RetryInfo.retryDelay` in the error body.
    GeminiRetryDelay,
    /// A local circuit breaker: the time until it half-opens.
    Breaker,
    /// A local retry budget or throttle.
    Budget,
}

impl HintSource {
    /// `true` for hints that say when to retry (Retry-After and its variants, Gemini's
    /// RetryInfo, local layers); `false` for rate-limit reset times, which only say
    /// when a bucket refills.
    pub fn is_retry_instruction(self) -> bool {
        !matches!(
            self,
            HintSource::RateLimitResetRequests
                | HintSource::RateLimitResetTokens
                | HintSource::AzureRateLimitResetTokens
                | HintSource::AnthropicRateLimitReset
        )
    }

    /// The header or field name.
    pub fn as_str(self) -> &'static str {
        match self {
            HintSource::RetryAfterMs => "retry-after-ms",
            HintSource::XMsRetryAfterMs => "x-ms-retry-after-ms",
            HintSource::RetryAfterSeconds => "retry-after",
            HintSource::RetryAfterDate => "retry-after (http-date)",
            HintSource::RateLimitResetRequests => "x-ratelimit-reset-requests",
            HintSource::RateLimitResetTokens => "x-ratelimit-reset-tokens",
            HintSource::AzureRateLimitResetTokens => "x-rate-limit-reset-tokens",
            HintSource::AnthropicRateLimitReset => "anthropic-ratelimit-*-reset",
            HintSource::GeminiRetryDelay => "RetryInfo.retryDelay",
            HintSource::Breaker => "circuit breaker",
            HintSource::Budget => "retry budget",
        }
    }
}

impl std::fmt::Display for HintSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
