//! What one call told the breaker about the upstream's health.

use backstop_classify::{AttemptLog, Classification, DelayHint, Failure, FailureKind};
use http::StatusCode;

/// The verdict the breaker records for one finished call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream served the call.
    Success,
    /// The upstream served the call, but only after the retry layer below met a 429
    /// or 503 on an earlier attempt (its [`AttemptLog`] says so): a success, and a
    /// slow-down signal for pacing.
    SuccessAfterSlowDown,
    /// A failure that says the upstream is unhealthy
    /// ([`FailureKind::reflects_upstream_health`]): it counts towards opening, and a
    /// 429/503 with a long enough delay hint opens the key at once.
    Failure {
        /// Which failure.
        kind: FailureKind,
        /// The provider's delay hint, if it gave one.
        hint: Option<DelayHint>,
    },
    /// Quota or billing exhausted: the key opens for the long quota cooldown.
    QuotaExhausted {
        /// The provider's delay hint, if it gave one (used when longer than the cooldown).
        hint: Option<DelayHint>,
    },
    /// Says nothing about the upstream's health (a client's invalid request, a content
    /// refusal, a context-length error, a local refusal by another layer): not counted.
    Ignored,
}

impl Outcome {
    /// The verdict for a classified failure.
    pub fn from_failure(failure: &Failure) -> Self {
        Outcome::from_kind(failure.kind, failure.hint)
    }

    /// The verdict for a failure of `kind` with `hint`.
    pub fn from_kind(kind: FailureKind, hint: Option<DelayHint>) -> Self {
        if kind == FailureKind::QuotaExhausted {
            Outcome::QuotaExhausted { hint }
        } else if kind.reflects_upstream_health() {
            Outcome::Failure { kind, hint }
        } else {
            Outcome::Ignored
        }
    }

    /// The verdict for a classification.
    pub fn from_classification(classification: &Classification) -> Self {
        match classification {
            Classification::Success => Outcome::Success,
            Classification::Failure(failure) => Outcome::from_failure(failure),
        }
    }

    /// The verdict for a response: its [`Classification`] extension when the classify
    /// layer set one, else its status (2xx/3xx success, 429 rate limited, 503 and 529
    /// overloaded, other 5xx server error, other 4xx ignored). A success whose
    /// [`AttemptLog`] (set by the retry layer) shows a rate-limited or overloaded
    /// attempt is [`Outcome::SuccessAfterSlowDown`].
    pub fn from_response<B>(response: &http::Response<B>) -> Self {
        let outcome = match response.extensions().get::<Classification>() {
            Some(classification) => Outcome::from_classification(classification),
            None => Outcome::from_status(response.status()),
        };
        if outcome == Outcome::Success
            && let Some(log) = response.extensions().get::<AttemptLog>()
            && log.attempts.len() > 1
            && log.attempts.iter().any(|a| {
                a.classification.failure().is_some_and(|f| {
                    matches!(f.kind, FailureKind::RateLimited | FailureKind::Overloaded)
                })
            })
        {
            return Outcome::SuccessAfterSlowDown;
        }
        outcome
    }

    fn from_status(status: StatusCode) -> Self {
        let kind = match status.as_u16() {
            429 => FailureKind::RateLimited,
            503 | 529 => FailureKind::Overloaded,
            500..=599 => FailureKind::ServerError,
            400..=499 => return Outcome::Ignored,
            _ => return Outcome::Success,
        };
        Outcome::Failure { kind, hint: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_classify::HintSource;
    use std::time::Duration;

    #[test]
    fn only_health_kinds_and_quota_are_recorded() {
        for kind in FailureKind::ALL {
            let outcome = Outcome::from_kind(kind, None);
            let expected = match kind {
                FailureKind::QuotaExhausted => Outcome::QuotaExhausted { hint: None },
                FailureKind::RateLimited
                | FailureKind::Overloaded
                | FailureKind::ServerError
                | FailureKind::RequestTimeout
                | FailureKind::ConnectFailed
                | FailureKind::TimedOut
                | FailureKind::ConnectionLost => Outcome::Failure { kind, hint: None },
                _ => Outcome::Ignored,
            };
            assert_eq!(outcome, expected, "{kind}");
        }
    }

    #[test]
    fn breaker_open_and_budget_refusals_are_never_counted() {
        for kind in [
            FailureKind::BreakerOpen,
            FailureKind::BudgetExhausted,
            FailureKind::Throttled,
            FailureKind::InvalidRequest,
            FailureKind::ContentFiltered,
            FailureKind::ContextLengthExceeded,
        ] {
            assert_eq!(Outcome::from_kind(kind, None), Outcome::Ignored, "{kind}");
        }
    }

    #[test]
    fn classification_extension_wins_over_status() {
        let hint = DelayHint::new(Duration::from_secs(7), HintSource::RetryAfterSeconds);
        let mut response = http::Response::new(());
        *response.status_mut() = StatusCode::OK;
        response.extensions_mut().insert(Classification::Failure(
            Failure::new(FailureKind::RateLimited).with_hint(Some(hint)),
        ));
        assert_eq!(
            Outcome::from_response(&response),
            Outcome::Failure {
                kind: FailureKind::RateLimited,
                hint: Some(hint)
            }
        );
    }

    #[test]
    fn a_success_after_a_rate_limited_attempt_is_a_slow_down_signal() {
        use backstop_classify::{AttemptLog, AttemptRecord};
        let log = |kinds: &[Option<FailureKind>]| AttemptLog {
            attempts: kinds
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    AttemptRecord::new(
                        i as u32 + 1,
                        match k {
                            Some(kind) => Classification::Failure(Failure::new(*kind)),
                            None => Classification::Success,
                        },
                    )
                })
                .collect(),
            stop: None,
        };
        let with = |log: AttemptLog| {
            let mut response = http::Response::new(());
            response.extensions_mut().insert(Classification::Success);
            response.extensions_mut().insert(log);
            Outcome::from_response(&response)
        };
        assert_eq!(
            with(log(&[Some(FailureKind::RateLimited), None])),
            Outcome::SuccessAfterSlowDown
        );
        assert_eq!(
            with(log(&[Some(FailureKind::Overloaded), None])),
            Outcome::SuccessAfterSlowDown
        );
        // A 500 before the success says nothing about volume.
        assert_eq!(
            with(log(&[Some(FailureKind::ServerError), None])),
            Outcome::Success
        );
        assert_eq!(with(log(&[None])), Outcome::Success);
    }

    #[test]
    fn unclassified_responses_are_judged_by_status() {
        let cases = [
            (200, Outcome::Success),
            (
                429,
                Outcome::Failure {
                    kind: FailureKind::RateLimited,
                    hint: None,
                },
            ),
            (
                529,
                Outcome::Failure {
                    kind: FailureKind::Overloaded,
                    hint: None,
                },
            ),
            (
                502,
                Outcome::Failure {
                    kind: FailureKind::ServerError,
                    hint: None,
                },
            ),
            (400, Outcome::Ignored),
        ];
        for (status, expected) in cases {
            let mut response = http::Response::new(());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            assert_eq!(Outcome::from_response(&response), expected, "{status}");
        }
    }
}
