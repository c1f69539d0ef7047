//! A point-in-time view of one key, for dashboards, health endpoints and the fallback
//! layer.

use std::time::Duration;

use backstop_classify::ModelRoute;
use tokio::time::Instant;

use crate::{BreakerConfig, BreakerState, KeyState, TransitionReason};

/// One key's breaker as of an instant.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct KeySnapshot {
    /// The key.
    pub route: ModelRoute,
    /// The state at that instant (an open period that has ended shows as half-open).
    pub state: BreakerState,
    /// Health failures in a row.
    pub consecutive_failures: u32,
    /// Calls counted in the sliding window (while closed).
    pub window_calls: u32,
    /// Failures among them.
    pub window_failures: u32,
    /// Until when the key is open, when it is.
    pub open_until: Option<Instant>,
    /// The time left until it half-opens, when open.
    pub retry_in: Option<Duration>,
    /// Half-open probes in flight.
    pub probes_in_flight: u32,
    /// Why it last changed state.
    pub last_reason: Option<TransitionReason>,
    /// The pace in calls per second, when the key is paced.
    pub pace_per_s: Option<f64>,
}

impl KeySnapshot {
    /// The view of `state` (for `route`) at `now`: the time-driven transitions due by
    /// `now` are applied to a copy, so reading never changes the key.
    pub fn of(route: &ModelRoute, state: &KeyState, now: Instant, config: &BreakerConfig) -> Self {
        let mut state = state.clone();
        state.advance(now, config, &mut |_| {});
        let (window_calls, window_failures) = state.window_counts(now);
        KeySnapshot {
            route: route.clone(),
            state: state.state(),
            consecutive_failures: state.consecutive_failures(),
            window_calls,
            window_failures,
            open_until: state.open_until(),
            retry_in: state
                .open_until()
                .map(|until| until.saturating_duration_since(now)),
            probes_in_flight: state.probes_in_flight(),
            last_reason: state.last_reason(),
            pace_per_s: state.pace(),
        }
    }
}
