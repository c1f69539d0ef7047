//! The alternative model: gRPC's retry throttling (gRFC A6).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use backstop_classify::RetryBudget;

use crate::model::{BudgetModel, BudgetSnapshot, ConfigError, check_range};

/// Fixed-point scale: one token is this many milli-tokens (gRPC allows three
/// decimals in `tokenRatio`).
const TOKEN: i64 = 1000;

/// The parameters of a [`RetryThrottle`], as in gRPC's `retryThrottling` service config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryThrottleConfig {
    /// Tokens the throttle starts with and never exceeds (1 to 1000). Default 10.
    pub max_tokens: u32,
    /// Tokens each successful request gives back (0 to 1, three decimals count).
    /// Default 0.1.
    pub token_ratio: f64,
}

impl Default for RetryThrottleConfig {
    /// gRPC's documented example: `{"maxTokens": 10, "tokenRatio": 0.1}`.
    fn default() -> Self {
        RetryThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        }
    }
}

/// gRPC-style retry throttling: tokens start at `max_tokens`, every failed attempt
/// takes one, every success gives `token_ratio` back, and a retry is allowed only
/// while more than half the tokens are left.
///
/// Unlike [`WindowedBudget`](crate::WindowedBudget) it has no window and no floor:
/// it reacts to the failure *rate* rather than to the retry count, and after an
/// outage it recovers only through successes. With the defaults, a fully failing
/// upstream gets at most 4 retries in total (10 → 6 tokens, the fifth failure leaves
/// 5 which is not more than half), then none until `(max/2 − tokens + 1)/ratio`
/// successes have come back.
///
/// ```
/// use backstop_budget::{BudgetModel, RetryThrottle, RetryThrottleConfig};
/// use backstop_classify::RetryBudget;
///
/// let throttle = RetryThrottle::new(RetryThrottleConfig { max_tokens: 4, token_ratio: 0.5 })?;
/// assert!(throttle.try_withdraw(), "4 → 3 tokens: still above half");
/// assert!(!throttle.try_withdraw(), "3 → 2 tokens: not above half");
/// for _ in 0..3 {
///     throttle.record_success(); // 2 → 3.5 tokens
/// }
/// assert!(throttle.try_withdraw(), "3.5 → 2.5 tokens: above half again");
/// # Ok::<(), backstop_budget::ConfigError>(())
/// ```
#[derive(Debug)]
pub struct RetryThrottle {
    config: RetryThrottleConfig,
    /// Milli-tokens, in `0..=max`.
    tokens: AtomicI64,
    max: i64,
    ratio: i64,
    requests: AtomicU64,
    retries_allowed: AtomicU64,
    retries_refused: AtomicU64,
    retries_refunded: AtomicU64,
}

impl RetryThrottle {
    /// A throttle with `config`, full.
    pub fn new(config: RetryThrottleConfig) -> Result<Self, ConfigError> {
        if !(1..=1000).contains(&config.max_tokens) {
            return Err(ConfigError::MaxTokens {
                given: config.max_tokens,
            });
        }
        check_range("token_ratio", config.token_ratio, 0.0, 1.0)?;
        let max = i64::from(config.max_tokens) * TOKEN;
        Ok(RetryThrottle {
            config,
            tokens: AtomicI64::new(max),
            max,
            ratio: (config.token_ratio * TOKEN as f64).round() as i64,
            requests: AtomicU64::new(0),
            retries_allowed: AtomicU64::new(0),
            retries_refused: AtomicU64::new(0),
            retries_refunded: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RetryThrottleConfig {
        &self.config
    }

    /// Takes one token for a failed attempt; returns the tokens left.
    fn take_failure(&self) -> i64 {
        let before = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some((t - TOKEN).max(0))
            })
            .unwrap_or_else(|t| t);
        (before - TOKEN).max(0)
    }

    /// gRPC retries only while tokens are strictly above half of the maximum.
    fn above_half(&self, tokens: i64) -> bool {
        2 * tokens > self.max
    }
}

impl RetryBudget for RetryThrottle {
    /// Counts the failed attempt the retry is for, then allows the retry only if
    /// more than half the tokens are left.
    fn try_withdraw(&self) -> bool {
        let left = self.take_failure();
        let allowed = self.above_half(left);
        let counter = if allowed {
            &self.retries_allowed
        } else {
            &self.retries_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        allowed
    }
}

impl BudgetModel for RetryThrottle {
    fn deposit(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn record_success(&self) {
        let max = self.max;
        let ratio = self.ratio;
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some((t + ratio).min(max))
            });
    }

    fn record_failure(&self) {
        self.take_failure();
    }

    /// Counted, but no token comes back: the withdrawal recorded the failed attempt,
    /// which did happen, rather than spent anything on the retry.
    fn give_back(&self, _withdrawn_at: tokio::time::Instant) {
        self.retries_refunded.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> BudgetSnapshot {
        let tokens = self.tokens.load(Ordering::Acquire);
        // Retry k (k = 1, 2, …) is allowed while tokens − k·TOKEN > max / 2.
        let headroom = 2 * tokens - self.max; // in half-milli-tokens
        let retries_available = if headroom <= 0 {
            0
        } else {
            // Largest k with 2·k·TOKEN < headroom.
            ((headroom - 1) / (2 * TOKEN)) as u64
        };
        BudgetSnapshot {
            model: "retry_throttle",
            balance: tokens as f64 / TOKEN as f64,
            retries_available,
            deposits: self.requests.load(Ordering::Relaxed),
            retries_allowed: self.retries_allowed.load(Ordering::Relaxed),
            retries_refused: self.retries_refused.load(Ordering::Relaxed),
            retries_refunded: self.retries_refunded.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(max_tokens: u32, token_ratio: f64) -> RetryThrottle {
        RetryThrottle::new(RetryThrottleConfig {
            max_tokens,
            token_ratio,
        })
        .unwrap()
    }

    #[test]
    fn a_full_default_throttle_allows_four_retries_in_an_outage() {
        let t = RetryThrottle::new(RetryThrottleConfig::default()).unwrap();
        assert_eq!(t.snapshot().retries_available, 4);
        let allowed: Vec<bool> = (0..6).map(|_| t.try_withdraw()).collect();
        assert_eq!(allowed, [true, true, true, true, false, false]);
        assert_eq!(t.snapshot().balance, 4.0);
        assert_eq!(t.snapshot().retries_available, 0);
    }

    #[test]
    fn tokens_never_drop_below_zero_nor_rise_above_max() {
        let t = throttle(2, 1.0);
        for _ in 0..5 {
            t.record_failure();
        }
        assert_eq!(t.snapshot().balance, 0.0);
        for _ in 0..5 {
            t.record_success();
        }
        assert_eq!(t.snapshot().balance, 2.0);
    }

    #[test]
    fn successes_bring_retries_back() {
        let t = throttle(10, 0.1);
        for _ in 0..5 {
            t.record_failure();
        }
        assert!(!t.try_withdraw(), "5 → 4 tokens");
        // 4 tokens: a retry needs 6 before its own failure is counted, so 2 tokens
        // more, that is 20 successes at 0.1.
        for _ in 0..19 {
            t.record_success();
        }
        assert_eq!(t.snapshot().retries_available, 0);
        t.record_success();
        assert_eq!(t.snapshot().balance, 6.0);
        assert_eq!(
            t.snapshot().retries_available,
            0,
            "6 − 1 = 5 is not above half"
        );
        t.record_success();
        assert_eq!(t.snapshot().retries_available, 1);
        assert!(t.try_withdraw());
    }

    #[test]
    fn snapshot_counts_requests_and_retries() {
        let t = throttle(4, 0.5);
        t.deposit();
        t.deposit();
        assert!(t.try_withdraw());
        assert!(!t.try_withdraw());
        let s = t.snapshot();
        assert_eq!(
            (s.model, s.deposits, s.retries_allowed, s.retries_refused),
            ("retry_throttle", 2, 1, 1)
        );
    }

    #[test]
    fn out_of_range_configs_are_refused() {
        assert_eq!(
            RetryThrottle::new(RetryThrottleConfig {
                max_tokens: 0,
                token_ratio: 0.1
            })
            .unwrap_err(),
            ConfigError::MaxTokens { given: 0 }
        );
        assert!(
            RetryThrottle::new(RetryThrottleConfig {
                max_tokens: 10,
                token_ratio: 1.5
            })
            .is_err()
        );
    }
}
