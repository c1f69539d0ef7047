//! The interface every budget model implements, and what it reports.

use backstop_classify::RetryBudget;

/// A retry budget model: what the [`RetryBudgetLayer`](crate::RetryBudgetLayer) drives.
///
/// Two models ship: [`WindowedBudget`](crate::WindowedBudget) (Finagle / tower
/// `TpsBudget` semantics, the default) and [`RetryThrottle`](crate::RetryThrottle)
/// (gRPC retry throttling). Implement this trait to bring another; every method is
/// called on the hot path from many threads at once, so keep them lock-free.
///
/// The layer calls, for every logical request it lets through:
///
/// 1. [`deposit`](BudgetModel::deposit) once, before the request goes in;
/// 2. [`try_withdraw_at`](BudgetModel::try_withdraw_at) each time the retry layer
///    wants to retry, that is, each time an attempt has just failed in a retryable
///    way; and [`give_back`](BudgetModel::give_back) for an allowed withdrawal whose retry
///    the retry layer then did not make (see [`RetryBudget::refund`]);
/// 3. once the logical request has ended, [`record_success`](BudgetModel::record_success)
///    if it succeeded, or [`record_failure`](BudgetModel::record_failure) if its last
///    attempt failed for a reason that reflects the upstream's health *and* that
///    attempt was not already reported through a `try_withdraw_at` that no attempt
///    followed (refused, or refunded). So every attempt that failed is reported
///    exactly once, whichever way it ended.
pub trait BudgetModel: RetryBudget {
    /// A logical request is about to be sent.
    fn deposit(&self);

    /// [`RetryBudget::try_withdraw`] at `now`, the instant a later
    /// [`give_back`](BudgetModel::give_back) of this withdrawal names. The default ignores
    /// `now`.
    fn try_withdraw_at(&self, now: tokio::time::Instant) -> bool {
        let _ = now;
        self.try_withdraw()
    }

    /// Gives back a withdrawal allowed at `withdrawn_at` whose retry was not made.
    /// Called at most once per allowed withdrawal; a model counts it in
    /// [`BudgetSnapshot::retries_refunded`]. The default does nothing, keeping the
    /// withdrawal (fewer retries, never more). [`RetryThrottle`](crate::RetryThrottle)
    /// counts it and gives no token back: its withdrawal recorded a failure, which
    /// happened, rather than spent anything on the retry.
    fn give_back(&self, withdrawn_at: tokio::time::Instant) {
        let _ = withdrawn_at;
    }

    /// A logical request ended in success.
    fn record_success(&self) {}

    /// A logical request's last attempt failed (see the trait docs for when).
    fn record_failure(&self) {}

    /// The model's current state.
    fn snapshot(&self) -> BudgetSnapshot;
}

/// The state of a budget at one moment. Counters are totals since creation.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BudgetSnapshot {
    /// Which model produced it (`"windowed"` or `"retry_throttle"`).
    pub model: &'static str,
    /// The balance in retries. For [`WindowedBudget`](crate::WindowedBudget) it is the
    /// floor's reserve plus the unexpired deposits' share minus the unexpired
    /// withdrawals, and may be negative for a while after deposits expire before the
    /// withdrawals made against them. For [`RetryThrottle`](crate::RetryThrottle) it
    /// is the token count.
    pub balance: f64,
    /// How many retries would be allowed right now if asked one after the other.
    pub retries_available: u64,
    /// Logical requests deposited.
    pub deposits: u64,
    /// Retries the budget allowed.
    pub retries_allowed: u64,
    /// Retries the budget refused.
    pub retries_refused: u64,
    /// Allowed retries given back because they were not made (counted in
    /// `retries_allowed` too): the retries sent are `retries_allowed −
    /// retries_refunded`.
    pub retries_refunded: u64,
}

impl BudgetSnapshot {
    /// An empty snapshot for `model`; a custom model sets the fields it knows.
    pub fn new(model: &'static str) -> Self {
        BudgetSnapshot {
            model,
            balance: 0.0,
            retries_available: 0,
            deposits: 0,
            retries_allowed: 0,
            retries_refused: 0,
            retries_refunded: 0,
        }
    }
}

/// A budget or throttle configuration that cannot work, with what to change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The window is outside the supported range.
    Window {
        /// The window given.
        given: std::time::Duration,
    },
    /// A ratio or rate is negative, not finite, or above its maximum.
    OutOfRange {
        /// The parameter's name.
        parameter: &'static str,
        /// The value given.
        given: f64,
        /// The smallest value allowed.
        min: f64,
        /// The largest value allowed.
        max: f64,
    },
    /// `max_tokens` of the gRPC-style throttle is outside 1..=1000.
    MaxTokens {
        /// The value given.
        given: u32,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Window { given } => write!(
                f,
                "window of {given:?} is not supported; use a window between 1 s and 1 h"
            ),
            ConfigError::OutOfRange {
                parameter,
                given,
                min,
                max,
            } => write!(
                f,
                "`{parameter}` = {given} is not supported; use a finite value between {min} and {max}"
            ),
            ConfigError::MaxTokens { given } => write!(
                f,
                "`max_tokens` = {given} is not supported; use 1 to 1000 (as gRPC's retryThrottling does)"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

pub(crate) const MIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
pub(crate) const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

pub(crate) fn check_window(window: std::time::Duration) -> Result<(), ConfigError> {
    if (MIN_WINDOW..=MAX_WINDOW).contains(&window) {
        Ok(())
    } else {
        Err(ConfigError::Window { given: window })
    }
}

pub(crate) fn check_range(
    parameter: &'static str,
    given: f64,
    min: f64,
    max: f64,
) -> Result<(), ConfigError> {
    if given.is_finite() && (min..=max).contains(&given) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            parameter,
            given,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trait_stays_object_safe() {
        fn _takes(_: &dyn BudgetModel) {}
    }

    #[test]
    fn config_errors_say_what_to_change() {
        let e = check_range("retry_ratio", f64::NAN, 0.0, 10.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`retry_ratio` = NaN is not supported; use a finite value between 0 and 10"
        );
        let e = check_window(std::time::Duration::from_millis(10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "window of 10ms is not supported; use a window between 1 s and 1 h"
        );
        assert!(check_range("retry_ratio", -0.1, 0.0, 10.0).is_err());
        assert!(check_range("retry_ratio", 10.0, 0.0, 10.0).is_ok());
    }
}
