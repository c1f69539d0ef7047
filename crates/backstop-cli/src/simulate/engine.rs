//! Runs a scenario for one policy in tokio's paused virtual time.

use std::collections::BTreeMap;
use std::time::Duration;

use backstop_classify::instant_after;
use backstop_mock::MockProvider;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::policies::{Client, Policy};
use super::report::{LatencySummary, PolicyReport, TimelinePoint, recovery_time};
use super::scenarios::SimScenario;
use super::upstream::Upstream;

/// Runs `scenario` with `policy` on a fresh single-threaded runtime whose clock is
/// paused: simulated minutes take as long as the work, not the waiting.
pub fn run_policy(scenario: &SimScenario, policy: Policy, seed: u64) -> PolicyReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime can always be built");
    runtime.block_on(simulate(scenario, policy, seed))
}

struct Finished {
    started_s: f64,
    latency: Duration,
    outcome: super::policies::Outcome,
}

async fn simulate(scenario: &SimScenario, policy: Policy, seed: u64) -> PolicyReport {
    let start = Instant::now();
    let mock = MockProvider::new(scenario.provider.clone());
    let upstream = Upstream::new(mock, start);
    let client = Client::new(policy, upstream.clone(), scenario.has_fallback, seed);

    // Poisson arrivals from the seed alone, so every policy sees the same offered load.
    let mut arrivals = SmallRng::seed_from_u64(seed);
    let mut t = 0.0f64;
    let mut tasks = Vec::new();
    loop {
        let u: f64 = arrivals.random::<f64>();
        t += -(1.0 - u).ln() / scenario.rate_per_s;
        if t >= scenario.duration.as_secs_f64() {
            break;
        }
        // Never overflowing, for a `SimScenario` built in code with a duration no
        // scenario file may give (see `scenarios::MAX_DURATION`).
        let offset = Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX);
        tokio::time::sleep_until(instant_after(start, offset)).await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let outcome = client.run().await;
            Finished {
                started_s: (begun - start).as_secs_f64(),
                latency: begun.elapsed(),
                outcome,
            }
        }));
    }
    let mut finished = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(f) = task.await {
            finished.push(f);
        }
    }
    summarise(scenario, policy, &finished, &upstream.take_log().attempts)
}

fn summarise(
    scenario: &SimScenario,
    policy: Policy,
    finished: &[Finished],
    attempts: &[(f64, u16)],
) -> PolicyReport {
    let requests = finished.len() as u64;
    let succeeded = finished.iter().filter(|f| f.outcome.succeeded).count() as u64;
    let mut served_by = BTreeMap::new();
    for f in finished {
        if let Some(model) = &f.outcome.served_by {
            *served_by.entry(model.clone()).or_insert(0u64) += 1;
        }
    }
    let seconds = scenario.duration.as_secs().max(1);
    let mut timeline: Vec<TimelinePoint> = (0..seconds)
        .map(|t_s| TimelinePoint {
            t_s,
            ..TimelinePoint::default()
        })
        .collect();
    let last = timeline.len() - 1;
    for f in finished {
        let p = &mut timeline[(f.started_s as usize).min(last)];
        p.offered += 1;
        p.succeeded += u64::from(f.outcome.succeeded);
    }
    for &(at, status) in attempts {
        // Attempts after the offered load stopped (late retries) land in the last second.
        let p = &mut timeline[(at as usize).min(last)];
        p.upstream += 1;
        p.rate_limited_429s += u64::from(status == 429);
    }
    let duration_s = scenario.duration.as_secs_f64();
    // Counted where a quota counts: successful attempts by their arrival at the
    // provider, within the load's duration.
    let goodput = attempts
        .iter()
        .filter(|(at, status)| (200..300).contains(status) && *at < duration_s)
        .count();
    let mut latencies: Vec<Duration> = finished.iter().map(|f| f.latency).collect();
    PolicyReport {
        policy: policy.name().to_string(),
        requests,
        succeeded,
        success_rate: if requests == 0 {
            0.0
        } else {
            succeeded as f64 / requests as f64
        },
        upstream_attempts: attempts.len() as u64,
        amplification: if requests == 0 {
            0.0
        } else {
            attempts.len() as f64 / requests as f64
        },
        latency_ms: LatencySummary::from_samples(&mut latencies),
        rejected_locally: finished
            .iter()
            .filter(|f| f.outcome.rejected_locally)
            .count() as u64,
        rate_limited_429s: attempts.iter().filter(|(_, s)| *s == 429).count() as u64,
        goodput_per_s: if duration_s > 0.0 {
            goodput as f64 / duration_s
        } else {
            0.0
        },
        fallbacks: finished.iter().filter(|f| f.outcome.fell_back).count() as u64,
        served_by,
        recovery_s: scenario
            .outage
            .and_then(|(_, end)| recovery_time(&timeline, end.as_secs(), 0.99)),
        timeline,
    }
}
