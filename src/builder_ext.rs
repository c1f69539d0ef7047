//! Each Backstop layer as a `ServiceBuilder` method, for users who compose their own
//! stack.

use backstop_breaker::{BreakerConfig, BreakerLayer, InProcessStore};
use backstop_budget::{BudgetModel, RetryBudgetLayer};
use backstop_classify::{ClassifyLayer, Rules};
use backstop_fallback::{FallbackConfig, FallbackLayer};
use backstop_retry::{ReplayBodyLayer, RetryConfig, RetryLayer};
use tower::ServiceBuilder;
use tower::layer::util::Stack;

/// Adds Backstop's layers to a [`tower::ServiceBuilder`], outermost first in the
/// order you call them. The recommended order is the order of these methods:
/// `replay_body`, `fallback`, `breaker`, `retry_budget`, `retry`, `classify`.
///
/// ```
/// use backstop::ServiceBuilderExt;
/// use backstop::classify::Rules;
/// use backstop::retry::RetryConfig;
/// use tower::ServiceBuilder;
///
/// let service = ServiceBuilder::new()
///     .replay_body(8 * 1024 * 1024)
///     .retry(RetryConfig::interactive())
///     .classify(Rules::openai())
///     .service(backstop::mock::MockProvider::new(backstop::mock::Scenario::new(0)));
/// # let _ = service;
/// ```
pub trait ServiceBuilderExt<L> {
    /// Collects any request body into a replayable one, up to `max_body_bytes`.
    fn replay_body(self, max_body_bytes: usize) -> ServiceBuilder<Stack<ReplayBodyLayer, L>>;
    /// Falls back to other models per `config`.
    fn fallback(self, config: FallbackConfig) -> ServiceBuilder<Stack<FallbackLayer, L>>;
    /// A circuit breaker per model route (an invalid config is refused).
    fn breaker(
        self,
        config: BreakerConfig,
    ) -> Result<ServiceBuilder<Stack<BreakerLayer<InProcessStore>, L>>, backstop_breaker::ConfigError>;
    /// A retry budget shared by every request through it.
    fn retry_budget<M: BudgetModel>(
        self,
        model: M,
    ) -> ServiceBuilder<Stack<RetryBudgetLayer<M>, L>>;
    /// Backoff retries per `config`.
    fn retry(self, config: RetryConfig) -> ServiceBuilder<Stack<RetryLayer, L>>;
    /// Classifies every outcome per `rules`.
    fn classify(self, rules: Rules) -> ServiceBuilder<Stack<ClassifyLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn replay_body(self, max_body_bytes: usize) -> ServiceBuilder<Stack<ReplayBodyLayer, L>> {
        self.layer(ReplayBodyLayer::new(max_body_bytes))
    }

    fn fallback(self, config: FallbackConfig) -> ServiceBuilder<Stack<FallbackLayer, L>> {
        self.layer(FallbackLayer::new(config))
    }

    fn breaker(
        self,
        config: BreakerConfig,
    ) -> Result<ServiceBuilder<Stack<BreakerLayer<InProcessStore>, L>>, backstop_breaker::ConfigError>
    {
        Ok(self.layer(BreakerLayer::new(config)?))
    }

    fn retry_budget<M: BudgetModel>(
        self,
        model: M,
    ) -> ServiceBuilder<Stack<RetryBudgetLayer<M>, L>> {
        self.layer(RetryBudgetLayer::new(model))
    }

    fn retry(self, config: RetryConfig) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::new(config))
    }

    fn classify(self, rules: Rules) -> ServiceBuilder<Stack<ClassifyLayer, L>> {
        self.layer(ClassifyLayer::new(rules))
    }
}
