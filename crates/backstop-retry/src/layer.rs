//! The tower layer: configuration holder.

use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tower_layer::Layer;

use crate::service::Shared;
use crate::{Retry, RetryConfig, RetryPolicy, StandardPolicy};

/// Wraps a service in [`Retry`]. Cheap to clone; every service it makes shares one
/// policy and one random-number source.
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// A layer with `config` and the [`StandardPolicy`] built from it, seeded from the
    /// operating system.
    pub fn new(config: RetryConfig) -> Self {
        let policy = Arc::new(StandardPolicy::from_config(&config));
        RetryLayer {
            shared: Arc::new(Shared {
                config,
                policy,
                rng: Mutex::new(SmallRng::from_os_rng()),
            }),
        }
    }

    /// Replaces the decision rules (the layer still enforces `max_attempts`, the
    /// deadline and the retry budget).
    pub fn with_policy(self, policy: impl RetryPolicy) -> Self {
        let shared = self.unshare();
        RetryLayer {
            shared: Arc::new(Shared {
                policy: Arc::new(policy),
                ..shared
            }),
        }
    }

    /// Seeds the random source (jitter, generated idempotency keys), so waits are
    /// reproducible in tests.
    pub fn with_rng_seed(self, seed: u64) -> Self {
        let shared = self.unshare();
        RetryLayer {
            shared: Arc::new(Shared {
                rng: Mutex::new(SmallRng::seed_from_u64(seed)),
                ..shared
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RetryConfig {
        &self.shared.config
    }

    fn unshare(self) -> Shared {
        Arc::try_unwrap(self.shared).unwrap_or_else(|arc| arc.duplicate())
    }
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry::from_shared(inner, self.shared.clone())
    }
}
