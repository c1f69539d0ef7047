//! The record of which model served a request, and the error that carries it when
//! none did.

use std::fmt;
use std::sync::Arc;

use backstop_classify::{AttemptLog, BoxError, ClassifiedError, Failure, ModelRoute};

use crate::policy::ChainKind;

/// Which model served a request, whether a fallback fired, and what happened on
/// every model tried.
///
/// The layer puts it in the extensions of every response it returns (served or
/// not), and inside every error it returns after sending: get it with
/// [`ServedBy::of_error`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServedBy {
    /// The model the request asked for, as its body spelled it.
    pub requested_model: Arc<str>,
    /// The model whose outcome is returned (the one that served, or the last tried).
    pub model: Arc<str>,
    /// Where that model was reached.
    pub route: ModelRoute,
    /// `true` when the returned outcome is a success.
    pub served: bool,
    /// `true` when at least one other model than the requested one was tried (waiting
    /// for the requested model's cooldown and trying it again is not a fallback).
    pub fallback_fired: bool,
    /// Every model tried, in order; the last is the returned outcome's.
    pub hops: Vec<Hop>,
    /// Why the chain stopped without a success, if it did.
    pub stop: Option<ChainStop>,
    /// When every model tried failed with a delay hint (breakers open, cooling
    /// down, rate limited), the earliest moment any of them said it may serve again:
    /// what a proxy turns into `Retry-After`.
    pub retry_at: Option<tokio::time::Instant>,
    /// How many times the request waited for a cooldown to end because every model
    /// of its chain was cooling down. Each wait starts the chain again; `hops` holds
    /// the last round only (the rounds before were refusals, and a model is named
    /// at most once).
    pub cooldown_waits: u32,
}

impl ServedBy {
    /// The record inside an error returned by the fallback layer, if it has one
    /// (errors raised before anything was sent, such as a body that is not JSON,
    /// have none).
    pub fn of_error(error: &ClassifiedError) -> Option<&ServedBy> {
        error
            .cause()
            .and_then(|c| c.downcast_ref::<ChainFailed>())
            .map(|c| &c.served_by)
    }
}

/// One model tried for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Hop {
    /// The model, as configured (or as requested, for the first hop).
    pub model: Arc<str>,
    /// Where it was reached.
    pub route: ModelRoute,
    /// The chain it was chosen from.
    pub chain: ChainKind,
    /// The inner stack's record of the attempts on this model, when it gave one.
    pub attempts: Option<AttemptLog>,
    /// The failure this model was left for (or that ended the chain); `None` when it
    /// served.
    pub failure: Option<Failure>,
}

/// Why the chain stopped without a model serving.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainStop {
    /// The failure would fail on any model (invalid request), or it happened after
    /// the request was sent and the request is not idempotent.
    NotFallbackable,
    /// Every model in the chain (and the special chain it switched to) was tried.
    ChainExhausted,
    /// The total deadline left no time for another hop.
    DeadlineReached,
    /// The request could not be adapted to the next model (its rewritten body would
    /// exceed the limit, or the target URI could not be built).
    HopNotBuilt(String),
}

impl fmt::Display for ChainStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainStop::NotFallbackable => f.write_str("the failure would happen on any model"),
            ChainStop::ChainExhausted => f.write_str("every model in the chain was tried"),
            ChainStop::DeadlineReached => f.write_str("the total deadline was reached"),
            ChainStop::HopNotBuilt(why) => write!(f, "the next hop could not be built: {why}"),
        }
    }
}

/// The cause inside a [`ClassifiedError`] the fallback layer returns when no model
/// served: it carries the [`ServedBy`] record and the last model's own error.
///
/// The `ClassifiedError` around it keeps the last failure's verdict (with its hint
/// moved to the earliest reopening when every model was cooling down) and the last
/// model's attempt log, so code that only reads the verdict needs no change.
#[derive(Debug)]
pub struct ChainFailed {
    /// The record.
    pub served_by: ServedBy,
    source: Option<BoxError>,
}

impl ChainFailed {
    pub(crate) fn new(served_by: ServedBy, source: Option<BoxError>) -> Self {
        ChainFailed { served_by, source }
    }

    /// The last model's own error (a transport error, a breaker refusal…), if any.
    pub fn last_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl fmt::Display for ChainFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no model served the request (tried ")?;
        for (i, hop) in self.served_by.hops.iter().enumerate() {
            if i > 0 {
                f.write_str(" → ")?;
            }
            write!(f, "{}", hop.model)?;
            if let Some(failure) = &hop.failure {
                write!(f, ": {}", failure.kind)?;
            }
        }
        f.write_str(")")?;
        if let Some(stop) = &self.served_by.stop {
            write!(f, "; {stop}")?;
        }
        if let Some(source) = &self.source {
            write!(f, "; last error: {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ChainFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
