//! The layer: configuration shared by every [`Classify`] service it builds.

use std::sync::Arc;
use std::time::SystemTime;

use tower_layer::Layer;

use crate::{Classify, Rules};

/// Wraps a service in [`Classify`].
///
/// Holds the [`Rules`] (shared, cloned by reference count) and the wall clock used to
/// turn HTTP-date and RFC 3339 delay hints into durations.
#[derive(Clone, Debug)]
pub struct ClassifyLayer {
    rules: Arc<Rules>,
    clock: fn() -> SystemTime,
}

impl Default for ClassifyLayer {
    fn default() -> Self {
        ClassifyLayer::new(Rules::default())
    }
}

impl ClassifyLayer {
    /// A layer applying `rules`.
    pub fn new(rules: Rules) -> Self {
        ClassifyLayer {
            rules: Arc::new(rules),
            clock: SystemTime::now,
        }
    }

    /// How many bytes of an error body (status >= 400) are buffered to classify it
    /// (default [`DEFAULT_MAX_ERROR_BODY`](crate::DEFAULT_MAX_ERROR_BODY), 64 KiB). A
    /// longer body is classified by status and headers and still reaches the caller
    /// whole. The layer holds at most this many bytes plus the one frame that crossed
    /// the cap, and only until the response is handed over.
    pub fn with_max_error_body(mut self, bytes: usize) -> Self {
        let rules = Rules::clone(&self.rules).with_max_inspected_body(bytes);
        self.rules = Arc::new(rules);
        self
    }

    /// The wall clock for date-based hints (`retry-after` HTTP-dates, Anthropic's reset
    /// timestamps). Default [`SystemTime::now`]; tests pin it.
    pub fn with_clock(mut self, clock: fn() -> SystemTime) -> Self {
        self.clock = clock;
        self
    }

    /// The rules in use.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Classify<S> {
        Classify::from_parts(inner, Arc::clone(&self.rules), self.clock)
    }
}
