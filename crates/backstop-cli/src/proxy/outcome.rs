//! What the caller is told about an outcome: the status of an error raised by
//! Backstop itself, the `x-backstop-*` report headers, `x-should-retry: false` on a
//! final failure and `Retry-After` when every model is cooling down.
//!
//! Pure functions of the stack's typed records ([`ServedBy`], [`ClassifiedError`]):
//! no I/O, testable without a runtime.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use backstop::classify::{ClassifiedError, FailureKind};
use backstop::fallback::ServedBy;
use backstop::retry::BodyLimitError;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

/// `x-backstop-model`: the configured name of the model whose outcome is returned.
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-backstop-model");
/// `x-backstop-attempts`: upstream attempts made for the request, on every model.
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-backstop-attempts");
/// `x-backstop-fallback`: `true` when another model than the requested one was tried.
pub const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-backstop-fallback");
/// `x-should-retry`: the official OpenAI and Anthropic SDKs obey it before any rule
/// of their own, so `false` stops them retrying on top of Backstop's retries.
pub const SHOULD_RETRY_HEADER: HeaderName = HeaderName::from_static("x-should-retry");

/// Competing delay headers a provider may have sent; when the proxy states its own
/// `Retry-After`, these go so that a client reading `retry-after-ms` first (the
/// OpenAI SDKs do) is not told another time.
const PROVIDER_DELAY_HEADERS: [&str; 2] = ["retry-after-ms", "x-ms-retry-after-ms"];

/// The proxy's account of one request, turned into response headers by
/// [`Report::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The model whose outcome is returned, when one was tried.
    pub model: Option<Arc<str>>,
    /// Upstream attempts on every model tried.
    pub attempts: usize,
    /// Whether another model than the requested one was tried.
    pub fallback: bool,
    /// `true` when the caller gets a failure after Backstop gave up: no client
    /// should retry it on top.
    pub final_failure: bool,
    /// Whole seconds until any model tried may serve again, when every one of them
    /// is cooling down.
    pub retry_after: Option<u64>,
}

impl Report {
    /// The report for a response the stack returned (served, or the provider's own
    /// failure passed on after Backstop gave up).
    pub fn of_response(served: Option<&ServedBy>, status: StatusCode, now: Instant) -> Report {
        match served {
            Some(served) => Report {
                model: Some(served.model.clone()),
                attempts: attempts(served),
                fallback: served.fallback_fired,
                final_failure: !served.served,
                retry_after: served.retry_at.map(|at| retry_after_secs(at, now)),
            },
            // Without the fallback layer's record (never the case through
            // `BackstopLayer`), the status is all there is to go by.
            None => Report {
                model: None,
                attempts: 0,
                fallback: false,
                final_failure: !status.is_success(),
                retry_after: None,
            },
        }
    }

    /// The report for an error the stack raised instead of a response.
    pub fn of_error(error: &ClassifiedError, now: Instant) -> Report {
        let served = ServedBy::of_error(error);
        // The chain's earliest reopening first; otherwise a hint that says when to
        // retry (a breaker's or a budget's cooldown, a provider's Retry-After).
        let retry_after = served
            .and_then(|s| s.retry_at)
            .map(|at| retry_after_secs(at, now))
            .or_else(|| {
                error
                    .failure()
                    .hint
                    .filter(|h| h.source.is_retry_instruction())
                    .map(|h| ceil_secs(h.delay))
            });
        Report {
            model: served.map(|s| s.model.clone()),
            attempts: served.map_or(0, attempts),
            fallback: served.is_some_and(|s| s.fallback_fired),
            final_failure: true,
            retry_after,
        }
    }

    /// Writes the report into response headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(model) = &self.model
            && let Ok(value) = HeaderValue::from_str(model)
        {
            headers.insert(MODEL_HEADER, value);
        }
        headers.insert(ATTEMPTS_HEADER, HeaderValue::from(self.attempts));
        headers.insert(
            FALLBACK_HEADER,
            HeaderValue::from_static(if self.fallback { "true" } else { "false" }),
        );
        if self.final_failure {
            headers.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
        }
        if let Some(secs) = self.retry_after {
            for name in PROVIDER_DELAY_HEADERS {
                headers.remove(name);
            }
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// Upstream attempts on every model tried (a model whose breaker refused the request
/// locally counts none).
pub fn attempts(served: &ServedBy) -> usize {
    served
        .hops
        .iter()
        .map(|hop| hop.attempts.as_ref().map_or(0, |log| log.attempts.len()))
        .sum()
}

/// Whole seconds from `now` until `at`, rounded up, at least 1: `Retry-After: 0`
/// would invite an immediate retry into a model that is still cooling down.
pub fn retry_after_secs(at: Instant, now: Instant) -> u64 {
    ceil_secs(at.saturating_duration_since(now))
}

fn ceil_secs(delay: Duration) -> u64 {
    // Saturating: rounding up the largest hint a provider can send (u64::MAX
    // seconds and a fraction) must not wrap to `Retry-After: 1`.
    let whole = delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0));
    whole.max(1)
}

/// How an error raised by Backstop itself is answered: the HTTP status and the
/// OpenAI envelope's `type` and `code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorStatus {
    /// The HTTP status.
    pub status: StatusCode,
    /// `error.type`: `invalid_request_error` for the caller's fault, `server_error`
    /// otherwise (the names OpenAI uses, so SDKs map them to their error classes).
    pub error_type: &'static str,
    /// `error.code`: the failure kind's stable name.
    pub code: &'static str,
}

/// The status for an error the stack raised: 413 for a body over the cap, 503 when
/// the breaker, budget or throttle refused locally or the provider is overloaded, 504
/// for timeouts, 502 for transport failures and refused credentials, and the status
/// a provider would have used for the rest.
pub fn error_status(error: &ClassifiedError) -> ErrorStatus {
    if body_too_large(error) {
        return ErrorStatus {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error_type: "invalid_request_error",
            code: "request_too_large",
        };
    }
    let kind = error.kind();
    use FailureKind::*;
    let status = match kind {
        BreakerOpen | BudgetExhausted | Throttled | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        TimedOut | RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
        // The upstream refused the proxy's own credential: a gateway fault, not the
        // caller's (whose key is never forwarded).
        ConnectFailed | ConnectionLost | ServerError | AuthFailed => StatusCode::BAD_GATEWAY,
        RateLimited | QuotaExhausted => StatusCode::TOO_MANY_REQUESTS,
        ModelNotFound => StatusCode::NOT_FOUND,
        Conflict => StatusCode::CONFLICT,
        InvalidRequest | ContextLengthExceeded | ContentFiltered => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    ErrorStatus {
        status,
        error_type: if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
            "invalid_request_error"
        } else {
            "server_error"
        },
        code: kind.as_str(),
    }
}

/// Whether the error's cause chain holds the body adapter's "too large" refusal.
fn body_too_large(error: &ClassifiedError) -> bool {
    let mut link = error.source();
    // Real chains are a few links deep; the bound guards against a cyclic one.
    for _ in 0..16 {
        let Some(current) = link else { return false };
        if let Some(BodyLimitError::TooLarge { .. }) = current.downcast_ref::<BodyLimitError>() {
            return true;
        }
        link = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop::classify::{DelayHint, Failure, HintSource};

    fn headers_of(report: &Report) -> Vec<(String, String)> {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        report.apply(&mut headers);
        let mut pairs: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        pairs.sort();
        pairs
    }

    #[test]
    fn served_report_has_model_attempts_fallback_and_no_retry_advice() {
        let report = Report {
            model: Some("claude-sonnet".into()),
            attempts: 2,
            fallback: true,
            final_failure: false,
            retry_after: None,
        };
        assert_eq!(
            headers_of(&report),
            [
                ("retry-after-ms", "1500"),
                ("x-backstop-attempts", "2"),
                ("x-backstop-fallback", "true"),
                ("x-backstop-model", "claude-sonnet"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn final_failure_while_cooling_down_says_do_not_retry_and_when() {
        let report = Report {
            model: Some("gpt-4o".into()),
            attempts: 3,
            fallback: false,
            final_failure: true,
            retry_after: Some(7),
        };
        assert_eq!(
            headers_of(&report),
            [
                ("retry-after", "7"),
                ("x-backstop-attempts", "3"),
                ("x-backstop-fallback", "false"),
                ("x-backstop-model", "gpt-4o"),
                ("x-should-retry", "false"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_never_says_zero() {
        let now = Instant::now();
        assert_eq!(retry_after_secs(now + Duration::from_millis(1), now), 1);
        assert_eq!(retry_after_secs(now + Duration::from_millis(2001), now), 3);
        assert_eq!(retry_after_secs(now + Duration::from_secs(2), now), 2);
        assert_eq!(retry_after_secs(now, now), 1);
        assert_eq!(
            retry_after_secs(now, now + Duration::from_secs(5)),
            1,
            "a past instant"
        );
    }

    #[test]
    fn a_hint_of_u64_max_seconds_and_a_fraction_says_u64_max_not_one() {
        let now = Instant::now();
        let huge = ClassifiedError::local(Failure::new(FailureKind::Overloaded).with_hint(Some(
            DelayHint::new(Duration::new(u64::MAX, 1), HintSource::RetryAfterMs),
        )));
        assert_eq!(Report::of_error(&huge, now).retry_after, Some(u64::MAX));
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX);
        assert_eq!(ceil_secs(Duration::new(u64::MAX, 0)), u64::MAX);
    }

    #[test]
    fn local_errors_map_to_gateway_statuses() {
        let status = |kind| error_status(&ClassifiedError::local(Failure::new(kind))).status;
        assert_eq!(status(FailureKind::BreakerOpen), 503);
        assert_eq!(status(FailureKind::BudgetExhausted), 503);
        assert_eq!(status(FailureKind::TimedOut), 504);
        assert_eq!(status(FailureKind::ConnectFailed), 502);
        assert_eq!(status(FailureKind::ConnectionLost), 502);
        assert_eq!(status(FailureKind::AuthFailed), 502);
        assert_eq!(status(FailureKind::InvalidRequest), 400);
        assert_eq!(status(FailureKind::QuotaExhausted), 429);
    }

    #[test]
    fn body_over_the_cap_is_413_whatever_its_kind() {
        let error = ClassifiedError::new(
            Failure::new(FailureKind::InvalidRequest),
            BodyLimitError::TooLarge { limit: 10 },
        );
        let status = error_status(&error);
        assert_eq!(status.status, 413);
        assert_eq!(status.code, "request_too_large");
        assert_eq!(status.error_type, "invalid_request_error");
    }

    #[test]
    fn error_without_chain_record_takes_its_retry_instruction_hint() {
        let now = Instant::now();
        let hinted = |source| {
            ClassifiedError::local(
                Failure::new(FailureKind::BreakerOpen)
                    .with_hint(Some(DelayHint::new(Duration::from_millis(4200), source))),
            )
        };
        let report = Report::of_error(&hinted(HintSource::Breaker), now);
        assert_eq!(report.retry_after, Some(5));
        assert!(report.final_failure);
        assert_eq!(report.attempts, 0);
        // A bucket-reset time is not an instruction to retry then.
        let report = Report::of_error(&hinted(HintSource::RateLimitResetTokens), now);
        assert_eq!(report.retry_after, None);
    }

    #[test]
    fn response_without_record_is_judged_by_status() {
        let now = Instant::now();
        assert!(Report::of_response(None, StatusCode::BAD_REQUEST, now).final_failure);
        assert!(!Report::of_response(None, StatusCode::OK, now).final_failure);
    }
}
