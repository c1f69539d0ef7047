//! The layer: a cheap `Clone` holding the shared budget.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::adaptive::{AdaptiveThrottle, ThrottleSnapshot};
use crate::model::{BudgetModel, BudgetSnapshot};
use crate::observe::Observer;
use crate::scope::Shared;
use crate::service::RetryBudgetService;
use crate::windowed::WindowedBudget;

/// Applies a retry budget (and optionally adaptive throttling) to every request.
///
/// All clones of a layer, and all services it makes, share one budget. See the
/// [crate docs](crate) for the contract.
pub struct RetryBudgetLayer<M = WindowedBudget> {
    shared: Arc<Shared<M>>,
}

impl<M: BudgetModel> RetryBudgetLayer<M> {
    /// A layer over `model`, named `"default"`, without adaptive throttling.
    pub fn new(model: M) -> Self {
        Self::builder(model).build()
    }

    /// Starts configuring a layer over `model`.
    pub fn builder(model: M) -> RetryBudgetLayerBuilder<M> {
        RetryBudgetLayerBuilder {
            model,
            throttle: None,
            name: Arc::from("default"),
        }
    }

    /// The shared model.
    pub fn model(&self) -> &M {
        &self.shared.model
    }

    /// The budget's current state.
    pub fn snapshot(&self) -> BudgetSnapshot {
        self.shared.model.snapshot()
    }

    /// The adaptive throttle's current state, when it is on.
    pub fn throttle_snapshot(&self) -> Option<ThrottleSnapshot> {
        self.shared
            .throttle
            .as_ref()
            .map(AdaptiveThrottle::snapshot)
    }

    /// The name used as the `budget` label on metrics and tracing events.
    pub fn name(&self) -> &str {
        self.shared.observer.name()
    }
}

impl<M> Clone for RetryBudgetLayer<M> {
    fn clone(&self) -> Self {
        RetryBudgetLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: fmt::Debug> fmt::Debug for RetryBudgetLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudgetLayer")
            .field("name", &self.shared.observer.name())
            .field("model", &self.shared.model)
            .field("throttle", &self.shared.throttle)
            .finish()
    }
}

impl<S, M> Layer<S> for RetryBudgetLayer<M> {
    type Service = RetryBudgetService<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryBudgetService::from_shared(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`RetryBudgetLayer`].
#[derive(Debug)]
pub struct RetryBudgetLayerBuilder<M> {
    model: M,
    throttle: Option<AdaptiveThrottle>,
    name: Arc<str>,
}

impl<M: BudgetModel> RetryBudgetLayerBuilder<M> {
    /// Turns on adaptive client-side throttling.
    pub fn adaptive_throttle(mut self, throttle: AdaptiveThrottle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Names the budget: the `budget` label of its metrics and tracing events (use
    /// the upstream's or model group's name; never a credential).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the layer. Its metrics are registered now, with the recorder installed
    /// at this moment: install the recorder first.
    pub fn build(self) -> RetryBudgetLayer<M> {
        RetryBudgetLayer {
            shared: Arc::new(Shared {
                model: self.model,
                throttle: self.throttle,
                observer: Observer::new(self.name),
                origin: tokio::time::Instant::now(),
            }),
        }
    }
}
