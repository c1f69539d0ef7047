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
    /// "Please retry after N seconds" / "Try again in N seconds" in an Azure OpenAI
    /// error message, read only under the Azure profile and only when no header gave
    /// a retry instruction.
    ErrorMessage,
    /// A local circuit breaker: the time until it half-opens.
    Breaker,
    /// A local retry budget or throttle.
    Budget,
}

impl HintSource {
    /// `true` for hints the provider sent (a header or its error body); `false` for
    /// the local layers' own ([`HintSource::Breaker`], [`HintSource::Budget`]).
    pub fn is_from_provider(self) -> bool {
        !matches!(self, HintSource::Breaker | HintSource::Budget)
    }

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
            HintSource::ErrorMessage => "error message",
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

/// The provider's delay hint from response headers, the strongest one present.
///
/// Precedence, first valid wins:
///
/// 1. `retry-after-ms` (milliseconds, may be fractional),
/// 2. `x-ms-retry-after-ms` (Azure, milliseconds),
/// 3. `retry-after`: seconds (integer or fractional) or an HTTP-date, relative to `now`;
///
/// then, only when none of those is present, the weaker bucket-reset times (they say
/// when a rate-limit bucket is full again, not when to retry):
///
/// 4. `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (OpenAI, Groq: Go-style
///    durations such as `6m0s`, `12ms`, `2m59.56s`). When `x-ratelimit-remaining-*`
///    says which bucket is empty (`0`), that bucket's reset is used; otherwise the later
///    of the two, since waiting for the earlier one may still find the other bucket empty;
/// 5. `x-rate-limit-reset-tokens` (Azure, bare seconds);
/// 6. `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset` (RFC 3339
///    UTC timestamps such as `2025-08-21T12:40:59Z`, parsed strictly by `humantime`,
///    which takes `Z` or `+00:00` and refuses other offsets: Anthropic sends UTC),
///    relative to `now`, with the same empty-bucket rule as 4.
///
/// Negative, zero, non-finite (`inf`, `nan`), exponent (`1e35`), `-1`, empty and
/// unparseable values, dates not after `now`, and values too large for a
/// [`Duration`] mean "no hint" from that header. When a header is repeated, the first
/// value that gives a valid hint is used (a proxy may append a second, broken copy).
/// The hint is reported as given, never capped: capping is the retry layer's job.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use backstop_classify::{parse_delay_hint, HintSource};
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("retry-after", "1.5".parse().unwrap());
/// headers.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
/// let hint = parse_delay_hint(&headers, SystemTime::now()).unwrap();
/// assert_eq!(hint.delay, Duration::from_millis(1500));
/// assert_eq!(hint.source, HintSource::RetryAfterSeconds);
/// ```
pub fn parse_delay_hint(
    headers: &http::HeaderMap,
    now: std::time::SystemTime,
) -> Option<DelayHint> {
    let hints = HeaderHints::read(headers, now);
    hints.instruction.or(hints.bucket_reset)
}

/// The header hints split by strength, so the classifier can put a body hint (Gemini's
/// RetryInfo) between them and use bucket resets only for rate limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HeaderHints {
    /// From `retry-after-ms`, `x-ms-retry-after-ms` or `retry-after`.
    pub instruction: Option<DelayHint>,
    /// From a rate-limit bucket reset header.
    pub bucket_reset: Option<DelayHint>,
}

impl HeaderHints {
    pub(crate) fn read(headers: &http::HeaderMap, now: std::time::SystemTime) -> HeaderHints {
        use crate::duration_text::{parse_millis, parse_seconds};

        let instruction = first_valid(headers, "retry-after-ms", parse_millis)
            .map(|d| DelayHint::new(d, HintSource::RetryAfterMs))
            .or_else(|| {
                first_valid(headers, "x-ms-retry-after-ms", parse_millis)
                    .map(|d| DelayHint::new(d, HintSource::XMsRetryAfterMs))
            })
            .or_else(|| retry_after(headers, now));
        let bucket_reset = openai_bucket_reset(headers)
            .or_else(|| {
                first_valid(headers, "x-rate-limit-reset-tokens", parse_seconds)
                    .map(|d| DelayHint::new(d, HintSource::AzureRateLimitResetTokens))
            })
            .or_else(|| anthropic_bucket_reset(headers, now));
        HeaderHints {
            instruction,
            bucket_reset,
        }
    }
}

/// The first value of `name` that `parse` turns into a positive duration.
fn first_valid(
    headers: &http::HeaderMap,
    name: &str,
    parse: impl Fn(&str) -> Option<Duration>,
) -> Option<Duration> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(parse)
        .find(|d| !d.is_zero())
}

/// `retry-after`: a value is tried as seconds first, then as an HTTP-date.
fn retry_after(headers: &http::HeaderMap, now: std::time::SystemTime) -> Option<DelayHint> {
    headers
        .get_all(http::header::RETRY_AFTER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|text| {
            if let Some(d) = crate::duration_text::parse_seconds(text) {
                return (!d.is_zero()).then(|| DelayHint::new(d, HintSource::RetryAfterSeconds));
            }
            let date = httpdate::parse_http_date(text.trim()).ok()?;
            until(date, now).map(|d| DelayHint::new(d, HintSource::RetryAfterDate))
        })
}

/// Time from `now` to `at`, when `at` is strictly later.
fn until(at: std::time::SystemTime, now: std::time::SystemTime) -> Option<Duration> {
    at.duration_since(now).ok().filter(|d| !d.is_zero())
}

/// Whether `x-…-remaining-…` says the bucket is empty.
fn bucket_empty(headers: &http::HeaderMap, name: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.trim() == "0")
}

/// Picks among bucket resets: the latest of the empty buckets, or, when none is known
/// to be empty, the latest of all.
fn pick_bucket(resets: &[(Option<Duration>, bool)]) -> Option<Duration> {
    let empty = resets
        .iter()
        .filter(|(_, empty)| *empty)
        .filter_map(|(d, _)| *d)
        .max();
    empty.or_else(|| resets.iter().filter_map(|(d, _)| *d).max())
}

fn openai_bucket_reset(headers: &http::HeaderMap) -> Option<DelayHint> {
    use crate::duration_text::parse_go_duration;
    let requests = first_valid(headers, "x-ratelimit-reset-requests", parse_go_duration);
    let tokens = first_valid(headers, "x-ratelimit-reset-tokens", parse_go_duration);
    let requests_empty = bucket_empty(headers, "x-ratelimit-remaining-requests");
    let tokens_empty = bucket_empty(headers, "x-ratelimit-remaining-tokens");
    let delay = pick_bucket(&[(requests, requests_empty), (tokens, tokens_empty)])?;
    // Name the bucket whose reset was taken (requests on a tie).
    let source = if Some(delay) == requests {
        HintSource::RateLimitResetRequests
    } else {
        HintSource::RateLimitResetTokens
    };
    Some(DelayHint::new(delay, source))
}

fn anthropic_bucket_reset(
    headers: &http::HeaderMap,
    now: std::time::SystemTime,
) -> Option<DelayHint> {
    const BUCKETS: [(&str, &str); 4] = [
        (
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-requests-remaining",
        ),
        (
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-tokens-remaining",
        ),
        (
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-input-tokens-remaining",
        ),
        (
            "anthropic-ratelimit-output-tokens-reset",
            "anthropic-ratelimit-output-tokens-remaining",
        ),
    ];
    let resets = BUCKETS.map(|(reset_name, remaining_name)| {
        let reset = headers
            .get_all(reset_name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| humantime::parse_rfc3339(v.trim()).ok())
            .find_map(|at| until(at, now));
        (reset, bucket_empty(headers, remaining_name))
    });
    pick_bucket(&resets).map(|d| DelayHint::new(d, HintSource::AnthropicRateLimitReset))
}
