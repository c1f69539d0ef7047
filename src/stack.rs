//! The recommended composition: one layer that stacks every Backstop layer in order.

use std::fmt;
use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer, BreakerService, InProcessStore};
use backstop_budget::{AdaptiveThrottle, RetryBudgetLayer, RetryBudgetService, WindowedBudget};
use backstop_classify::{Classify, ClassifyLayer, Rules};
use backstop_fallback::{Fallback, FallbackConfig, FallbackLayer};
use backstop_retry::{CollectBody, ReplayBodyLayer, Retry, RetryConfig, RetryLayer};
use tower::Layer;

use crate::config::ConfigError;

/// The default cap on a request body: 8 MiB, as the retry crate's body adapter.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;

/// The composed service: body adapter → fallback → breaker → budget → retry (with its
/// per-attempt timeout) → classify → `S`.
pub type BackstopService<S> = CollectBody<
    Fallback<
        BreakerService<RetryBudgetService<Retry<Classify<S>>, WindowedBudget>, InProcessStore>,
    >,
>;

/// The whole Backstop stack as one [`tower::Layer`].
///
/// Build it with [`BackstopLayer::builder`] (in code) or
/// [`StackConfig::into_layer`](crate::StackConfig::into_layer) (from TOML). Clones share
/// one retry budget and one breaker state, so every service the layer wraps draws on
/// the same budget and sees the same open breakers.
///
/// The composed service accepts `http::Request<B>` for any body `B`: the outermost
/// adapter collects it (up to the body cap) into a replayable
/// [`ReplayBody`](backstop_classify::ReplayBody), so a retry or fallback costs a
/// reference-count bump.
#[derive(Clone)]
pub struct BackstopLayer {
    max_request_body: usize,
    fallback: FallbackLayer,
    breaker: BreakerLayer<InProcessStore>,
    budget: RetryBudgetLayer<WindowedBudget>,
    retry: RetryLayer,
    classify: ClassifyLayer,
}

impl fmt::Debug for BackstopLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Each part's Debug redacts its own secrets (the fallback targets' credentials).
        f.debug_struct("BackstopLayer")
            .field("max_request_body", &self.max_request_body)
            .field("fallback", &self.fallback)
            .field("breaker", &self.breaker)
            .field("budget", &self.budget)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl BackstopLayer {
    /// A builder with every layer at its documented default and no fallback targets
    /// (requests pass to the inner service with the caller's URI and headers).
    pub fn builder() -> BackstopBuilder {
        BackstopBuilder::default()
    }

    /// The retry layer (its `config()`).
    pub fn retry(&self) -> &RetryLayer {
        &self.retry
    }

    /// The fallback layer (its `config()`: targets, chains, deadline, waits).
    pub fn fallback(&self) -> &FallbackLayer {
        &self.fallback
    }

    /// The breaker's shared state, to query (`snapshot()`) or export.
    pub fn breaker(&self) -> &BreakerLayer<InProcessStore> {
        &self.breaker
    }

    /// The retry budget layer, whose clones share the budget (`snapshot()` on its model).
    pub fn budget(&self) -> &RetryBudgetLayer<WindowedBudget> {
        &self.budget
    }
}

impl<S> Layer<S> for BackstopLayer {
    type Service = BackstopService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let classified = self.classify.layer(inner);
        let retried = self.retry.layer(classified);
        let budgeted = self.budget.layer(retried);
        let guarded = self.breaker.layer(budgeted);
        let routed = self.fallback.layer(guarded);
        ReplayBodyLayer::new(self.max_request_body).layer(routed)
    }
}

/// Builds a [`BackstopLayer`] in code, validating the parts against each other.
#[derive(Clone, Debug)]
pub struct BackstopBuilder {
    max_request_body: usize,
    rules: Rules,
    retry: RetryConfig,
    retry_seed: Option<u64>,
    budget: backstop_budget::WindowedBudgetConfig,
    throttle: Option<(backstop_budget::AdaptiveThrottleConfig, Option<u64>)>,
    /// `None` until [`BackstopBuilder::breaker`] is called: the defaults, widened at
    /// build time to fit the attempt timeout.
    breaker: Option<BreakerConfig>,
    fallback: Option<FallbackConfig>,
}

impl Default for BackstopBuilder {
    fn default() -> Self {
        BackstopBuilder {
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            rules: Rules::default(),
            retry: RetryConfig::interactive(),
            retry_seed: None,
            budget: backstop_budget::WindowedBudgetConfig::default(),
            throttle: None,
            breaker: None,
            fallback: None,
        }
    }
}

impl BackstopBuilder {
    /// The classification rules (provider profile and user rules).
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// The retry configuration (attempts, backoff, deadline, attempt timeout, hints).
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Seeds the retry layer's jitter (for reproducible runs and tests).
    pub fn retry_seed(mut self, seed: u64) -> Self {
        self.retry_seed = Some(seed);
        self
    }

    /// The retry budget shared by every request through this layer.
    pub fn budget(mut self, budget: backstop_budget::WindowedBudgetConfig) -> Self {
        self.budget = budget;
        self
    }

    /// Turns on adaptive client-side throttling (Google SRE), optionally seeded.
    pub fn adaptive_throttle(
        mut self,
        config: backstop_budget::AdaptiveThrottleConfig,
        seed: Option<u64>,
    ) -> Self {
        self.throttle = Some((config, seed));
        self
    }

    /// The circuit breaker's configuration, taken as given (and checked against the
    /// attempt timeout). Without it the breaker runs at its defaults, its window and
    /// probe timeout widened to fit the attempt timeout if need be (two attempts, one).
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Fallback targets and chains.
    pub fn fallback(mut self, fallback: FallbackConfig) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// The cap on a request body (default 8 MiB); larger bodies get a typed error
    /// without reaching the provider.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// Validates the parts against each other and builds the layer.
    ///
    /// Checks: the retry deadline fits in the fallback's total deadline; the breaker's
    /// window spans at least two attempt timeouts (otherwise a window can close before
    /// the attempts it should count have ended); the breaker's probe timeout is not
    /// shorter than an attempt; each part's own validation.
    pub fn build(mut self) -> Result<BackstopLayer, ConfigError> {
        let attempt_timeout = self.retry.attempt_timeout();
        let breaker_config = self
            .breaker
            .take()
            .unwrap_or_else(|| fitted_breaker_defaults(attempt_timeout));
        if let (Some(retry_deadline), Some(total)) = (
            self.retry.deadline(),
            self.fallback.as_ref().and_then(|f| f.total_deadline()),
        ) && retry_deadline > total
        {
            return Err(ConfigError::RetryDeadlineExceedsTotal {
                retry_deadline,
                total,
            });
        }
        let min_left = self.retry.min_attempt_time();
        if let Some(total) = self.fallback.as_ref().and_then(|f| f.total_deadline())
            && !min_left.is_zero()
            && min_left >= total
        {
            return Err(ConfigError::Invalid {
                section: "retry",
                message: format!(
                    "min_attempt_time ({min_left:?}) must be shorter than total_deadline \
                     ({total:?}), or no retry could ever start"
                ),
            });
        }
        if let Some(timeout) = attempt_timeout {
            // Saturating, as in `fitted_breaker_defaults`: an attempt timeout of
            // centuries is a setting, not an overflow.
            if breaker_config.window < timeout.saturating_mul(2) {
                return Err(ConfigError::BreakerWindowTooShort {
                    window: breaker_config.window,
                    attempt_timeout: timeout,
                });
            }
            if breaker_config.probe_timeout < timeout {
                return Err(ConfigError::ProbeTimeoutTooShort {
                    probe_timeout: breaker_config.probe_timeout,
                    attempt_timeout: timeout,
                });
            }
        }
        if self.max_request_body == 0 {
            return Err(ConfigError::Invalid {
                section: "max_request_body",
                message: "must be at least 1 byte".into(),
            });
        }
        let breaker = BreakerLayer::new(breaker_config).map_err(|e| ConfigError::Invalid {
            section: "breaker",
            message: e.to_string(),
        })?;
        let budget_model = WindowedBudget::new(self.budget).map_err(|e| ConfigError::Invalid {
            section: "budget",
            message: e.to_string(),
        })?;
        let mut budget = RetryBudgetLayer::builder(budget_model);
        if let Some((config, seed)) = self.throttle {
            let throttle = match seed {
                Some(seed) => AdaptiveThrottle::with_seed(config, seed),
                None => AdaptiveThrottle::new(config),
            }
            .map_err(|e| ConfigError::Invalid {
                section: "budget.adaptive_throttle",
                message: e.to_string(),
            })?;
            budget = budget.adaptive_throttle(throttle);
        }
        let mut retry = RetryLayer::new(self.retry.with_rules(self.rules.clone()));
        if let Some(seed) = self.retry_seed {
            retry = retry.with_rng_seed(seed);
        }
        let fallback = match self.fallback {
            Some(f) => f,
            None => FallbackConfig::builder()
                .build()
                .map_err(|e| ConfigError::Invalid {
                    section: "fallback",
                    message: e.to_string(),
                })?,
        };
        Ok(BackstopLayer {
            max_request_body: self.max_request_body,
            fallback: FallbackLayer::new(fallback),
            breaker,
            budget: budget.build(),
            retry,
            classify: ClassifyLayer::new(self.rules),
        })
    }
}

/// The breaker's defaults, with the window and probe timeout widened to fit an attempt
/// timeout: the window spans two attempts, a probe gets at least one.
pub(crate) fn fitted_breaker_defaults(attempt_timeout: Option<Duration>) -> BreakerConfig {
    let mut config = BreakerConfig::default();
    if let Some(timeout) = attempt_timeout {
        config.window = config.window.max(timeout.saturating_mul(2));
        config.probe_timeout = config.probe_timeout.max(timeout);
    }
    config
}
