//! Typed values the layers exchange through request extensions.
//!
//! These live in the classify crate because every other layer already depends on it:
//! it is the shared vocabulary of the stack.

use std::sync::Arc;

/// The total deadline of a logical request, across every attempt, wait and fallback hop.
///
/// The outermost layer that knows the deadline (fallback, or retry when used alone)
/// inserts it; inner layers never start an attempt or a sleep that would cross it.
/// It is a [`tokio::time::Instant`], so tests run it in virtual time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(pub tokio::time::Instant);

/// Marks a request as idempotent: a timeout or reset after it was written may be
/// retried. (A request carrying an `Idempotency-Key` header is idempotent too.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Idempotent;

/// Which model at which upstream an attempt is for; the breaker keys its state on it.
///
/// The fallback layer sets it on every hop. `credential` is a non-secret label (such
/// as `"openai-key-2"`) for setups where several keys serve one model; it never holds
/// the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRoute {
    /// The upstream's name (as configured), or the request URI's authority.
    pub upstream: Arc<str>,
    /// The model name as the upstream spells it.
    pub model: Arc<str>,
    /// A label for the credential, when several serve one model.
    pub credential: Option<Arc<str>>,
}

impl ModelRoute {
    /// A route to `model` at `upstream`.
    pub fn new(upstream: impl Into<Arc<str>>, model: impl Into<Arc<str>>) -> Self {
        ModelRoute {
            upstream: upstream.into(),
            model: model.into(),
            credential: None,
        }
    }
}

impl std::fmt::Display for ModelRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.upstream, self.model)?;
        if let Some(c) = &self.credential {
            write!(f, "#{c}")?;
        }
        Ok(())
    }
}

/// Whether a request is idempotent: it carries an `Idempotency-Key` header or the
/// [`Idempotent`] marker.
pub fn is_idempotent<B>(request: &http::Request<B>) -> bool {
    request.extensions().get::<Idempotent>().is_some()
        || request.headers().contains_key("idempotency-key")
}
