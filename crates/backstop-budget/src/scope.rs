//! What the layer shares between its clones, and the per-request handle it gives
//! the retry layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backstop_classify::RetryBudget;

use crate::adaptive::AdaptiveThrottle;
use crate::model::BudgetModel;
use crate::observe::Observer;
use crate::outcome::Outcome;

/// Everything the clones of one layer share.
#[derive(Debug)]
pub(crate) struct Shared<M> {
    pub(crate) model: M,
    pub(crate) throttle: Option<AdaptiveThrottle>,
    pub(crate) observer: Observer,
}

/// The [`RetryBudget`] the layer puts in each request's extensions.
///
/// It forwards to the shared model and remembers whether the last retry it was asked
/// for was refused: in that case the attempt that failed has already been reported
/// to the model (through `try_withdraw`), so the final outcome must not report it
/// again. One small allocation per logical request buys that exactness.
pub(crate) struct RequestScope<M> {
    shared: Arc<Shared<M>>,
    last_refused: AtomicBool,
}

impl<M: BudgetModel> RequestScope<M> {
    pub(crate) fn new(shared: Arc<Shared<M>>) -> Self {
        RequestScope {
            shared,
            last_refused: AtomicBool::new(false),
        }
    }

    /// Reports how the logical request ended to the model and the throttle.
    pub(crate) fn finish(&self, outcome: Outcome) {
        let shared = &self.shared;
        match outcome {
            Outcome::Success => shared.model.record_success(),
            Outcome::UpstreamFailure(_) if !self.last_refused.load(Ordering::Acquire) => {
                shared.model.record_failure()
            }
            Outcome::UpstreamFailure(_) | Outcome::OtherFailure(_) => {}
        }
        if let Some(throttle) = &shared.throttle {
            throttle.record(outcome.accepted());
        }
    }
}

impl<M: BudgetModel> RetryBudget for RequestScope<M> {
    fn try_withdraw(&self) -> bool {
        let allowed = self.shared.model.try_withdraw();
        self.last_refused.store(!allowed, Ordering::Release);
        self.shared
            .observer
            .retry_decided(allowed, || self.shared.model.snapshot().balance);
        allowed
    }
}
