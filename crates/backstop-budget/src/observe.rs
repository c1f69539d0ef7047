//! Metrics and tracing events: what an operator sees of the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use tokio::time::Instant;

/// Counter: logical requests deposited into the budget.
pub const METRIC_DEPOSITS: &str = "backstop_budget_deposits_total";
/// Counter: retries the budget allowed.
pub const METRIC_RETRIES_ALLOWED: &str = "backstop_budget_retries_allowed_total";
/// Counter: retries the budget refused.
pub const METRIC_RETRIES_REFUSED: &str = "backstop_budget_retries_refused_total";
/// Counter: retries the budget allowed that were then not made, and so given back
/// (also counted in [`METRIC_RETRIES_ALLOWED`]).
pub const METRIC_RETRIES_REFUNDED: &str = "backstop_budget_retries_refunded_total";
/// Counter: requests the adaptive throttle rejected before they reached the provider.
pub const METRIC_LOCAL_REJECTIONS: &str = "backstop_budget_local_rejections_total";

/// At most one exhaustion warning per this long, however often the budget flaps
/// between empty and not (it does, once per slot, in a long outage: the floor
/// refills as old withdrawals expire).
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The layer's counters (registered once, when the layer is built, under the label
/// `budget = <name>`) and the state behind its transition-only log events.
#[derive(Debug)]
pub(crate) struct Observer {
    name: Arc<str>,
    deposits: Counter,
    retries_allowed: Counter,
    retries_refused: Counter,
    retries_refunded: Counter,
    local_rejections: Counter,
    exhausted: AtomicBool,
    throttling: AtomicBool,
    origin: Instant,
    /// Nanoseconds after `origin` of the last exhaustion warning, plus one (0: none yet).
    last_warning: AtomicU64,
}

impl Observer {
    pub(crate) fn new(name: Arc<str>) -> Self {
        let label = || name.to_string();
        Observer {
            deposits: metrics::counter!(METRIC_DEPOSITS, "budget" => label()),
            retries_allowed: metrics::counter!(METRIC_RETRIES_ALLOWED, "budget" => label()),
            retries_refused: metrics::counter!(METRIC_RETRIES_REFUSED, "budget" => label()),
            retries_refunded: metrics::counter!(METRIC_RETRIES_REFUNDED, "budget" => label()),
            local_rejections: metrics::counter!(METRIC_LOCAL_REJECTIONS, "budget" => label()),
            name,
            exhausted: AtomicBool::new(false),
            throttling: AtomicBool::new(false),
            origin: Instant::now(),
            last_warning: AtomicU64::new(0),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn deposited(&self) {
        self.deposits.increment(1);
    }

    /// Counts a retry decision; logs the first refusal after a period with balance
    /// (`balance` is only evaluated then).
    pub(crate) fn retry_decided(&self, allowed: bool, balance: impl FnOnce() -> f64) {
        if allowed {
            self.retries_allowed.increment(1);
            if self.exhausted.load(Ordering::Relaxed)
                && self.exhausted.swap(false, Ordering::AcqRel)
            {
                tracing::debug!(budget = %self.name, "retry budget has balance again; retries resume");
            }
            return;
        }
        self.retries_refused.increment(1);
        if !self.exhausted.load(Ordering::Relaxed)
            && !self.exhausted.swap(true, Ordering::AcqRel)
            && self.warning_due()
        {
            tracing::warn!(
                budget = %self.name,
                balance = balance(),
                "retry budget exhausted: retries are refused and the last outcome is returned \
                 until new requests deposit or old retries leave the window"
            );
        }
    }

    /// Counts an allowed retry given back because it was not made.
    pub(crate) fn retry_refunded(&self) {
        self.retries_refunded.increment(1);
    }

    fn warning_due(&self) -> bool {
        let now = u64::try_from(
            Instant::now()
                .saturating_duration_since(self.origin)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
        .saturating_add(1);
        let interval = WARN_INTERVAL.as_nanos() as u64;
        self.last_warning
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                (last == 0 || now.saturating_sub(last) >= interval).then_some(now)
            })
            .is_ok()
    }

    /// Counts a local rejection; logs when throttling starts.
    pub(crate) fn rejected_locally(&self, probability: f64) {
        self.local_rejections.increment(1);
        if !self.throttling.load(Ordering::Relaxed) && !self.throttling.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                budget = %self.name,
                rejection_probability = probability,
                "adaptive throttling started: the provider rejects most requests, so some \
                 are rejected locally (kind `throttled`) without being sent"
            );
        }
    }

    /// Notes that the throttle let a request through; logs when throttling has
    /// stopped (`probability` is only evaluated while throttling is on).
    pub(crate) fn throttle_idle(&self, probability: impl FnOnce() -> f64) {
        if self.throttling.load(Ordering::Relaxed)
            && probability() <= 0.0
            && self.throttling.swap(false, Ordering::AcqRel)
        {
            tracing::info!(budget = %self.name, "adaptive throttling stopped: the provider accepts enough requests again");
        }
    }
}
