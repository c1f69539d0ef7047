//! The shared handle: admit calls, record outcomes, query state.

use std::sync::Arc;
use std::time::Duration;

use backstop_classify::{
    ClassifiedError, DelayHint, Failure, FailureKind, HintSource, ModelRoute, PaceHandle,
};
use tokio::time::Instant;

use crate::{
    AdmittedCall, BreakerConfig, BreakerState, BreakerStore, ConfigError, InProcessStore,
    KeySnapshot, Outcome, Rejection, events,
};

/// A circuit breaker over many keys. Clones share state; the
/// [`BreakerLayer`](crate::BreakerLayer) holds one, and so can a health endpoint or
/// the fallback layer.
pub struct Breaker<St = InProcessStore> {
    store: Arc<St>,
}

impl<St> Clone for Breaker<St> {
    fn clone(&self) -> Self {
        Breaker {
            store: Arc::clone(&self.store),
        }
    }
}

impl<St: std::fmt::Debug> std::fmt::Debug for Breaker<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("store", &self.store)
            .finish()
    }
}

impl Breaker<InProcessStore> {
    /// A breaker kept in this process.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        Ok(Breaker::with_store(InProcessStore::new(config)?))
    }
}

impl<St: BreakerStore> Breaker<St> {
    /// A breaker kept in `store`.
    pub fn with_store(store: St) -> Self {
        Breaker {
            store: Arc::new(store),
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// Asks to make one call to `route` now. The clock is read only when the key's
    /// state needs it (never for a closed key that already exists).
    pub fn admit(&self, route: &ModelRoute) -> Result<BreakerPermit<St>, Rejection> {
        self.admit_with(route, &Instant::now, None)
    }

    /// Asks to make one call to `route` at `now`.
    pub fn admit_at(
        &self,
        route: &ModelRoute,
        now: Instant,
    ) -> Result<BreakerPermit<St>, Rejection> {
        self.admit_with(route, &|| now, None)
    }

    /// Asks to make one call to `route` now for a caller that gives up at
    /// `deadline`: a paced key does not book a slot the caller could not wait for.
    pub fn admit_before(
        &self,
        route: &ModelRoute,
        deadline: Option<Instant>,
    ) -> Result<BreakerPermit<St>, Rejection> {
        self.admit_with(route, &Instant::now, deadline)
    }

    fn admit_with(
        &self,
        route: &ModelRoute,
        clock: &dyn Fn() -> Instant,
        deadline: Option<Instant>,
    ) -> Result<BreakerPermit<St>, Rejection> {
        match self
            .store
            .admit_before(route, clock, deadline, &mut events::announce)
        {
            Ok(permit) => Ok(BreakerPermit { permit }),
            Err(rejection) => {
                events::refused(route, &rejection);
                Err(rejection)
            }
        }
    }

    /// Every key as of now, sorted by route.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        self.store.snapshot(Instant::now())
    }

    /// Every key as of `now`, sorted by route.
    pub fn snapshot_at(&self, now: Instant) -> Vec<KeySnapshot> {
        self.store.snapshot(now)
    }

    /// One key as of now, if it has been used.
    pub fn key(&self, route: &ModelRoute) -> Option<KeySnapshot> {
        self.store.key_snapshot(route, Instant::now())
    }

    /// The state of `route` now (closed for a key never used).
    pub fn state(&self, route: &ModelRoute) -> BreakerState {
        self.key(route).map_or(BreakerState::Closed, |k| k.state)
    }

    /// How long until `route` half-opens, when it is open now.
    pub fn retry_in(&self, route: &ModelRoute) -> Option<Duration> {
        self.key(route).and_then(|k| k.retry_in)
    }
}

/// The right to make one call. Give it the call's outcome with
/// [`BreakerPermit::record`]; dropping it unrecorded (a cancelled call) frees a
/// half-open probe slot without counting anything.
pub struct BreakerPermit<St: BreakerStore = InProcessStore> {
    permit: St::Permit,
}

impl<St: BreakerStore> std::fmt::Debug for BreakerPermit<St>
where
    St::Permit: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("permit", &self.permit)
            .finish()
    }
}

impl<St: BreakerStore> BreakerPermit<St> {
    /// The key's pace, when the call was admitted while the key was paced: the
    /// service puts it on the request so that the retry layer's retries take paced
    /// slots too.
    pub fn pace(&self) -> Option<PaceHandle> {
        self.permit.pace()
    }

    /// Records the call's outcome now.
    pub fn record(self, outcome: Outcome) {
        self.record_at(outcome, Instant::now());
    }

    /// Records the call's outcome at `now`.
    pub fn record_at(self, outcome: Outcome, now: Instant) {
        self.permit.record(outcome, now, &mut events::announce);
    }
}

impl From<Rejection> for ClassifiedError {
    /// The error a refused call fails with: [`FailureKind::BreakerOpen`] with a
    /// [`HintSource::Breaker`] hint of when to try again, so the fallback layer moves
    /// on at once and can tell its caller the earliest time any model reopens.
    ///
    /// The failure is [`Retryable::Yes`](backstop_classify::Retryable) when the wait
    /// was set by the upstream (a learned pace, a hinted cooldown: the same request
    /// will be taken then) and [`Retryable::No`](backstop_classify::Retryable) when
    /// the key opened on this breaker's own evidence: the fallback layer waits for
    /// the first kind within its deadline and fails fast on the second.
    fn from(rejection: Rejection) -> Self {
        let mut failure = Failure::new(FailureKind::BreakerOpen).with_hint(Some(DelayHint::new(
            rejection.retry_in,
            HintSource::Breaker,
        )));
        if rejection.upstream_directed {
            failure.retryable = backstop_classify::Retryable::Yes;
        }
        ClassifiedError::local(failure)
    }
}
