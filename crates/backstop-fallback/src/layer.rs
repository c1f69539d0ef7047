//! The layer: holds the validated configuration.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::config::FallbackConfig;
use crate::service::Fallback;

/// Wraps a service in [`Fallback`]. Cheap to clone: the configuration is shared.
#[derive(Clone)]
pub struct FallbackLayer {
    config: Arc<FallbackConfig>,
}

impl FallbackLayer {
    /// A layer with this (already validated) configuration.
    pub fn new(config: FallbackConfig) -> Self {
        FallbackLayer {
            config: Arc::new(config),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FallbackConfig {
        &self.config
    }
}

impl fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // FallbackConfig's Debug redacts credentials.
        f.debug_struct("FallbackLayer")
            .field("config", &self.config)
            .finish()
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback::shared(inner, Arc::clone(&self.config))
    }
}
