//! The tower layer.

use tower_layer::Layer;

use crate::{Breaker, BreakerConfig, BreakerService, BreakerStore, ConfigError, InProcessStore};

/// Wraps a service in a [`BreakerService`]. Clones (and every service it makes) share
/// one [`Breaker`].
pub struct BreakerLayer<St = InProcessStore> {
    breaker: Breaker<St>,
}

impl<St> Clone for BreakerLayer<St> {
    fn clone(&self) -> Self {
        BreakerLayer {
            breaker: self.breaker.clone(),
        }
    }
}

impl<St: std::fmt::Debug> std::fmt::Debug for BreakerLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerLayer")
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl BreakerLayer<InProcessStore> {
    /// A layer with a fresh in-process breaker.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        Ok(BreakerLayer {
            breaker: Breaker::new(config)?,
        })
    }
}

impl<St: BreakerStore> BreakerLayer<St> {
    /// A layer over an existing breaker (to share it with a health endpoint or the
    /// fallback layer).
    pub fn from_breaker(breaker: Breaker<St>) -> Self {
        BreakerLayer { breaker }
    }

    /// The breaker, to query its state.
    pub fn breaker(&self) -> &Breaker<St> {
        &self.breaker
    }
}

impl<S, St> Layer<S> for BreakerLayer<St> {
    type Service = BreakerService<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService::from_parts(inner, self.breaker.clone())
    }
}
