//! How the layer judges the outcome of a logical request, for the models' and the
//! throttle's statistics. Pure: no I/O, no clock.

use backstop_classify::{Classification, ClassifiedError, FailureKind};
use http::StatusCode;

/// How a logical request ended, as far as the budget and the throttle care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The provider served it.
    Success,
    /// It failed because the upstream is in trouble: overloaded, rate limited,
    /// failing (5xx, 408), unreachable or timing out, or an inner Backstop layer
    /// refused it for one of those reasons (budget exhausted, breaker open,
    /// throttled). The throttle counts it as not accepted.
    UpstreamFailure(FailureKind),
    /// It failed for a reason that says nothing about the upstream's load: quota,
    /// context length, content policy, model not found, auth, invalid request,
    /// conflict. The provider did answer, so the throttle counts it as accepted.
    OtherFailure(FailureKind),
}

impl Outcome {
    /// Whether the adaptive throttle counts it as an accept.
    pub fn accepted(self) -> bool {
        !matches!(self, Outcome::UpstreamFailure(_))
    }

    /// Judges a failure kind.
    pub fn of_kind(kind: FailureKind) -> Outcome {
        let refused_because_upstream_fails = matches!(
            kind,
            FailureKind::BudgetExhausted | FailureKind::BreakerOpen | FailureKind::Throttled
        );
        if kind.reflects_upstream_health() || refused_because_upstream_fails {
            Outcome::UpstreamFailure(kind)
        } else {
            Outcome::OtherFailure(kind)
        }
    }

    /// Judges a response from its [`Classification`] extension, or from its status
    /// when no classify layer ran (2xx success; 429, 408 and 5xx upstream failures;
    /// other statuses answered, so other failures).
    pub fn of_response<B>(response: &http::Response<B>) -> Outcome {
        match response.extensions().get::<Classification>() {
            Some(Classification::Success) => Outcome::Success,
            Some(Classification::Failure(failure)) => Outcome::of_kind(failure.kind),
            None => Outcome::of_status(response.status()),
        }
    }

    /// Judges an error from its classification.
    pub fn of_error(error: &ClassifiedError) -> Outcome {
        Outcome::of_kind(error.kind())
    }

    fn of_status(status: StatusCode) -> Outcome {
        match status.as_u16() {
            200..=299 => Outcome::Success,
            429 => Outcome::UpstreamFailure(FailureKind::RateLimited),
            408 => Outcome::UpstreamFailure(FailureKind::RequestTimeout),
            503 | 529 => Outcome::UpstreamFailure(FailureKind::Overloaded),
            500..=599 => Outcome::UpstreamFailure(FailureKind::ServerError),
            // 1xx/3xx reaching here are the provider answering; 4xx are the client's.
            _ => Outcome::OtherFailure(FailureKind::InvalidRequest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_classify::Failure;

    fn response(status: u16, classification: Option<Classification>) -> http::Response<()> {
        let mut r = http::Response::builder().status(status).body(()).unwrap();
        if let Some(c) = classification {
            r.extensions_mut().insert(c);
        }
        r
    }

    #[test]
    fn the_classification_wins_over_the_status() {
        let quota = Classification::Failure(Failure::new(FailureKind::QuotaExhausted));
        assert_eq!(
            Outcome::of_response(&response(429, Some(quota))),
            Outcome::OtherFailure(FailureKind::QuotaExhausted)
        );
        // A 200 whose body was a content-filter refusal.
        let filtered = Classification::Failure(Failure::new(FailureKind::ContentFiltered));
        assert!(Outcome::of_response(&response(200, Some(filtered))).accepted());
    }

    #[test]
    fn without_a_classification_the_status_decides() {
        let judge = |s| Outcome::of_response(&response(s, None));
        assert_eq!(judge(200), Outcome::Success);
        assert_eq!(
            judge(429),
            Outcome::UpstreamFailure(FailureKind::RateLimited)
        );
        assert_eq!(
            judge(529),
            Outcome::UpstreamFailure(FailureKind::Overloaded)
        );
        assert_eq!(
            judge(502),
            Outcome::UpstreamFailure(FailureKind::ServerError)
        );
        assert_eq!(
            judge(400),
            Outcome::OtherFailure(FailureKind::InvalidRequest)
        );
    }

    #[test]
    fn only_upstream_trouble_counts_as_not_accepted() {
        let not_accepted: Vec<FailureKind> = FailureKind::ALL
            .into_iter()
            .filter(|&k| !Outcome::of_kind(k).accepted())
            .collect();
        assert_eq!(
            not_accepted,
            [
                FailureKind::RateLimited,
                FailureKind::Overloaded,
                FailureKind::ServerError,
                FailureKind::RequestTimeout,
                FailureKind::ConnectFailed,
                FailureKind::TimedOut,
                FailureKind::ConnectionLost,
                FailureKind::BudgetExhausted,
                FailureKind::Throttled,
                FailureKind::BreakerOpen,
            ]
        );
    }
}
