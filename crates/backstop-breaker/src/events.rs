//! Transitions and refusals, made visible: one tracing event per transition, a gauge
//! of each key's state and counters of transitions and refusals (`metrics` crate; a
//! no-op until the application installs a recorder), and a debug event when the
//! in-process store forgets a key (at rest or stale) to make room for a new one.
//!
//! Metric labels are the route's upstream, model and credential label: non-secret
//! names from the configuration, never a key.

use std::sync::Arc;

use backstop_classify::ModelRoute;

use crate::{BreakerState, Rejection, Transition, TransitionReason};

/// Gauge: 0 closed, 1 half-open, 2 open, per key.
pub const STATE_GAUGE: &str = "backstop_breaker_state";
/// Counter of state changes per key, labelled `from`, `to` and `reason`.
pub const TRANSITIONS_COUNTER: &str = "backstop_breaker_transitions_total";
/// Counter of calls refused per key, labelled `state`: open, half_open, or closed (a
/// paced key with no slot free).
pub const REJECTIONS_COUNTER: &str = "backstop_breaker_rejections_total";

fn credential(route: &ModelRoute) -> Arc<str> {
    route.credential.clone().unwrap_or_else(|| Arc::from(""))
}

pub(crate) fn announce(route: &ModelRoute, transition: Transition) {
    let open_for_ms = transition
        .open_until
        .map(|until| until.saturating_duration_since(transition.at).as_millis() as u64);
    match transition.to {
        BreakerState::Open => tracing::warn!(
            upstream = %route.upstream,
            model = %route.model,
            credential = route.credential.as_deref().unwrap_or(""),
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            reason = transition.reason.as_str(),
            detail = ?transition.reason,
            open_for_ms,
            "circuit breaker opened"
        ),
        _ => tracing::info!(
            upstream = %route.upstream,
            model = %route.model,
            credential = route.credential.as_deref().unwrap_or(""),
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            reason = transition.reason.as_str(),
            "circuit breaker state changed"
        ),
    }
    metrics::gauge!(
        STATE_GAUGE,
        "upstream" => route.upstream.clone(),
        "model" => route.model.clone(),
        "credential" => credential(route),
    )
    .set(transition.to.gauge_value());
    metrics::counter!(
        TRANSITIONS_COUNTER,
        "upstream" => route.upstream.clone(),
        "model" => route.model.clone(),
        "credential" => credential(route),
        "from" => transition.from.as_str(),
        "to" => transition.to.as_str(),
        "reason" => reason_label(transition.reason),
    )
    .increment(1);
}

fn reason_label(reason: TransitionReason) -> &'static str {
    reason.as_str()
}

/// A key starts being tracked: its gauge reads closed from the start, so a key
/// that never failed still has a series.
pub(crate) fn tracked(route: &ModelRoute) {
    reads_closed(route);
}

/// A key is forgotten to make room for a new one (see
/// [`InProcessStore`](crate::InProcessStore)), `why` being `"at rest"` or
/// `"stale"`: a debug event. Its state gauge is set to closed, what a key made for
/// the route again starts at (a stale key may have been left half-open with nobody
/// calling; its series would otherwise read so for the life of the process).
pub(crate) fn evicted(route: &ModelRoute, why: &'static str) {
    tracing::debug!(
        upstream = %route.upstream,
        model = %route.model,
        credential = route.credential.as_deref().unwrap_or(""),
        why,
        "circuit breaker key forgotten to make room for a new key"
    );
    reads_closed(route);
}

fn reads_closed(route: &ModelRoute) {
    metrics::gauge!(
        STATE_GAUGE,
        "upstream" => route.upstream.clone(),
        "model" => route.model.clone(),
        "credential" => credential(route),
    )
    .set(BreakerState::Closed.gauge_value());
}

pub(crate) fn refused(route: &ModelRoute, rejection: &Rejection) {
    tracing::debug!(
        upstream = %route.upstream,
        model = %route.model,
        state = rejection.state.as_str(),
        retry_in_ms = rejection.retry_in.as_millis() as u64,
        "circuit breaker refused a call"
    );
    metrics::counter!(
        REJECTIONS_COUNTER,
        "upstream" => route.upstream.clone(),
        "model" => route.model.clone(),
        "credential" => credential(route),
        "state" => rejection.state.as_str(),
    )
    .increment(1);
}
