//! What the layer shares between its clones, and the per-request handle it gives
//! the retry layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backstop_classify::RetryBudget;
use tokio::time::Instant;

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
    /// The instant a request's withdrawal time is counted from (see [`LastDraw`]).
    pub(crate) origin: Instant,
}

/// The [`RetryBudget`] the layer puts in each request's extensions.
///
/// It forwards to the shared model and remembers what the request's last withdrawal
/// left to settle: a refused one (or one given back) has already reported the
/// attempt that failed to the model (through `try_withdraw`), so the final outcome
/// must not report it again; an allowed one may still be given back, and the model
/// needs its instant to find it. One small allocation per logical request buys that
/// exactness.
pub(crate) struct RequestScope<M> {
    shared: Arc<Shared<M>>,
    last_draw: AtomicU64,
}

/// What [`RequestScope::last_draw`] holds, in one word (the scope stays the size it
/// was before refunds).
#[derive(Clone, Copy, Debug, PartialEq)]
enum LastDraw {
    /// No withdrawal yet, or one whose retry was sent: a failure is news to the model.
    Nothing,
    /// The failed attempt was reported through a withdrawal no attempt followed
    /// (refused, or allowed and given back).
    Reported,
    /// Allowed this long after the layer's origin; may still be given back.
    Allowed(Duration),
}

impl LastDraw {
    const NOTHING: u64 = 0;
    const REPORTED: u64 = 1;

    fn encode(self) -> u64 {
        match self {
            LastDraw::Nothing => Self::NOTHING,
            LastDraw::Reported => Self::REPORTED,
            // 2⁶⁴ ns is 584 years: the clamp is never reached.
            LastDraw::Allowed(after) => u64::try_from(after.as_nanos())
                .unwrap_or(u64::MAX - 2)
                .saturating_add(2),
        }
    }

    fn decode(word: u64) -> Self {
        match word {
            Self::NOTHING => LastDraw::Nothing,
            Self::REPORTED => LastDraw::Reported,
            n => LastDraw::Allowed(Duration::from_nanos(n - 2)),
        }
    }
}

impl<M: BudgetModel> RequestScope<M> {
    pub(crate) fn new(shared: Arc<Shared<M>>) -> Self {
        RequestScope {
            shared,
            last_draw: AtomicU64::new(LastDraw::Nothing.encode()),
        }
    }

    /// Reports how the logical request ended to the model and the throttle.
    pub(crate) fn finish(&self, outcome: Outcome) {
        let shared = &self.shared;
        let reported =
            LastDraw::decode(self.last_draw.load(Ordering::Acquire)) == LastDraw::Reported;
        match outcome {
            Outcome::Success => shared.model.record_success(),
            Outcome::UpstreamFailure(_) if !reported => shared.model.record_failure(),
            Outcome::UpstreamFailure(_) | Outcome::OtherFailure(_) => {}
        }
        if let Some(throttle) = &shared.throttle {
            throttle.record(outcome.accepted());
        }
    }
}

impl<M: BudgetModel> RetryBudget for RequestScope<M> {
    fn try_withdraw(&self) -> bool {
        let shared = &self.shared;
        let now = Instant::now();
        let allowed = shared.model.try_withdraw_at(now);
        let draw = if allowed {
            LastDraw::Allowed(now.saturating_duration_since(shared.origin))
        } else {
            LastDraw::Reported
        };
        self.last_draw.store(draw.encode(), Ordering::Release);
        shared
            .observer
            .retry_decided(allowed, || shared.model.snapshot().balance);
        allowed
    }

    fn refund(&self) {
        let last = self.last_draw.load(Ordering::Acquire);
        let LastDraw::Allowed(after) = LastDraw::decode(last) else {
            return; // nothing allowed to give back
        };
        // The exchange makes a second refund of the same withdrawal a no-op.
        let reported = LastDraw::Reported.encode();
        if self
            .last_draw
            .compare_exchange(last, reported, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.shared.model.give_back(self.shared.origin + after);
            self.shared.observer.retry_refunded();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_draw_survives_its_encoding() {
        for draw in [
            LastDraw::Nothing,
            LastDraw::Reported,
            LastDraw::Allowed(Duration::ZERO),
            LastDraw::Allowed(Duration::from_nanos(1)),
            LastDraw::Allowed(Duration::from_secs(86_400 * 365)),
        ] {
            assert_eq!(LastDraw::decode(draw.encode()), draw);
        }
    }
}
