//! `backstop simulate`: resilience policies side by side, in virtual time, against the
//! in-memory mock provider.

mod engine;
pub mod plot;
mod policies;
pub mod report;
pub mod scenarios;
mod stack;
mod upstream;

pub use engine::run_policy;
pub use policies::Policy;
pub use report::{RunReport, SCHEMA_VERSION, ScenarioReport};
pub use scenarios::SimScenario;

/// Runs every policy against `scenario`, calling `progress` after each.
pub fn run_scenario(
    scenario: &SimScenario,
    seed: u64,
    mut progress: impl FnMut(&str),
) -> ScenarioReport {
    let mut policies = Vec::new();
    let mut offered = 0;
    for policy in Policy::ALL {
        let report = run_policy(scenario, policy, seed);
        offered = offered.max(report.requests);
        progress(policy.name());
        policies.push(report);
    }
    ScenarioReport {
        name: scenario.name.clone(),
        description: scenario.description.clone(),
        duration_s: scenario.duration.as_secs_f64(),
        offered_requests: offered,
        policies,
    }
}

/// The human-readable table for one scenario.
pub fn render_table(scenario: &ScenarioReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## {} ({} requests over {} s)\n{}\n",
        scenario.name, scenario.offered_requests, scenario.duration_s, scenario.description
    );
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>8} {:>9}  served by",
        "policy",
        "success",
        "amplif.",
        "p50 ms",
        "p99 ms",
        "max ms",
        "429s",
        "goodput/s",
        "fallbacks",
        "local",
        "recovery"
    );
    for p in &scenario.policies {
        let served: Vec<String> = p
            .served_by
            .iter()
            .map(|(m, n)| format!("{m}={n}"))
            .collect();
        let recovery = p
            .recovery_s
            .map_or_else(|| "-".to_string(), |s| format!("{s:.0} s"));
        let _ = writeln!(
            out,
            "{:<24} {:>7.2}% {:>8.2} {:>9.0} {:>9.0} {:>9.0} {:>7} {:>9.1} {:>9} {:>8} {:>9}  {}",
            p.policy,
            p.success_rate * 100.0,
            p.amplification,
            p.latency_ms.p50,
            p.latency_ms.p99,
            p.latency_ms.max,
            p.rate_limited_429s,
            p.goodput_per_s,
            p.fallbacks,
            p.rejected_locally,
            recovery,
            served.join(" ")
        );
    }
    out
}
