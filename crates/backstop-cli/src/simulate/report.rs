//! What a simulation run measured, per policy, and its stable JSON schema.
//!
//! The JSON output of `backstop simulate --json` is a [`RunReport`]. Its schema is
//! versioned by [`SCHEMA_VERSION`]: fields are only ever added within a version; a
//! rename or removal bumps it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// The version of the JSON schema below. Bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything one `backstop simulate` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The seed every scenario ran with.
    pub seed: u64,
    /// One entry per scenario, in the order they ran.
    pub scenarios: Vec<ScenarioReport>,
}

/// One scenario, every policy run against it with the same seed.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub name: String,
    /// What it models, in one sentence.
    pub description: String,
    /// Simulated seconds the offered load lasted.
    pub duration_s: f64,
    /// Logical requests offered (the same for every policy).
    pub offered_requests: u64,
    /// One entry per policy.
    pub policies: Vec<PolicyReport>,
}

/// What one policy achieved in one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    /// The policy's name (`no-retries`, `tenacity+sdk`, `openai-python`, `tower-retry+tps-budget`, `backstop`).
    pub policy: String,
    /// Logical requests completed (succeeded or failed).
    pub requests: u64,
    /// Logical requests that ended in a success.
    pub succeeded: u64,
    /// `succeeded / requests`, in 0..=1.
    pub success_rate: f64,
    /// HTTP attempts that reached the provider.
    pub upstream_attempts: u64,
    /// `upstream_attempts / requests`: how much each logical request was amplified.
    pub amplification: f64,
    /// Latency of logical requests, milliseconds of simulated time.
    pub latency_ms: LatencySummary,
    /// Logical requests answered locally (a breaker open, the adaptive throttle)
    /// without any attempt reaching the provider.
    pub rejected_locally: u64,
    /// Attempts the provider answered with a 429.
    pub rate_limited_429s: u64,
    /// Attempts the provider served with a success that reached it while the load
    /// was offered (within the scenario's duration), per second of it: what a quota
    /// counted as served, without the backlog a policy sends after the load stops.
    pub goodput_per_s: f64,
    /// Logical requests on which a fallback to another model fired.
    pub fallbacks: u64,
    /// Successful requests, by the model that served them.
    pub served_by: BTreeMap<String, u64>,
    /// For scenarios with an outage: simulated seconds from the outage's end until the
    /// success rate of requests starting in each following second stays >= 99 %.
    /// `null` when there is no outage or it never recovered within the run.
    pub recovery_s: Option<f64>,
    /// Offered load and load reaching the provider, per simulated second.
    pub timeline: Vec<TimelinePoint>,
}

/// Nearest-rank percentiles of a latency sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl LatencySummary {
    /// Summarises `samples` (any order). All zero for an empty sample.
    pub fn from_samples(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            // Nearest rank: the smallest value with at least p of the sample at or below it.
            let n = samples.len();
            let idx = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[idx].as_secs_f64() * 1000.0
        };
        LatencySummary {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1].as_secs_f64() * 1000.0,
        }
    }
}

/// One simulated second of the timeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Start of the second, from the start of the run.
    pub t_s: u64,
    /// Logical requests the clients started in this second.
    pub offered: u64,
    /// Attempts that reached the provider in this second.
    pub upstream: u64,
    /// Logical requests started in this second that ended in success.
    pub succeeded: u64,
    /// Attempts that reached the provider in this second and were answered 429.
    pub rate_limited_429s: u64,
}

/// Seconds from `outage_end_s` until every following second of `timeline` (that offered
/// any load) has a success rate >= `threshold`. `None` if that never holds.
pub fn recovery_time(timeline: &[TimelinePoint], outage_end_s: u64, threshold: f64) -> Option<f64> {
    let after: Vec<&TimelinePoint> = timeline.iter().filter(|p| p.t_s >= outage_end_s).collect();
    // Walk back from the end: the recovery point is just after the last bad second.
    let mut recovered_at = None;
    for p in after.iter().rev() {
        let healthy = p.offered == 0 || p.succeeded as f64 >= threshold * p.offered as f64;
        if healthy {
            recovered_at = Some(p.t_s);
        } else {
            break;
        }
    }
    let last_offered = after.iter().rev().find(|p| p.offered > 0)?;
    let at = recovered_at?;
    // If only the trailing empty seconds are healthy, it never recovered.
    if at > last_offered.t_s {
        return None;
    }
    Some(at.saturating_sub(outage_end_s) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t_s: u64, offered: u64, succeeded: u64) -> TimelinePoint {
        TimelinePoint {
            t_s,
            offered,
            upstream: offered,
            succeeded,
            rate_limited_429s: 0,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = LatencySummary::from_samples(&mut s);
        assert_eq!((l.p50, l.p99, l.max), (50.0, 99.0, 100.0));
        assert_eq!(
            LatencySummary::from_samples(&mut []),
            LatencySummary::default()
        );
    }

    #[test]
    fn recovery_counts_from_the_outage_end_to_the_first_lasting_healthy_second() {
        let t = [
            point(9, 10, 0),
            point(10, 10, 2),
            point(11, 10, 9),
            point(12, 10, 10),
            point(13, 10, 10),
        ];
        assert_eq!(recovery_time(&t, 10, 0.99), Some(2.0));
        // A relapse moves the recovery point past it.
        let t = [point(10, 10, 10), point(11, 10, 5), point(12, 10, 10)];
        assert_eq!(recovery_time(&t, 10, 0.99), Some(2.0));
        // Healthy right away.
        let t = [point(10, 10, 10), point(11, 10, 10)];
        assert_eq!(recovery_time(&t, 10, 0.99), Some(0.0));
        // Never healthy.
        let t = [point(10, 10, 0), point(11, 10, 0)];
        assert_eq!(recovery_time(&t, 10, 0.99), None);
    }
}
