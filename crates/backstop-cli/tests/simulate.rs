//! `backstop simulate`: the JSON report parses, its numbers are consistent, and the same
//! seed gives the same output.

use backstop_cli::simulate::{self, RunReport, SCHEMA_VERSION};

/// A short scenario (10 simulated seconds) so the test stays fast in debug builds.
const SHORT: &str = r#"
name = "short-outage"
description = "primary 503s from 2 s to 6 s, healthy fallback"
duration = "10s"
rate_per_s = 20.0
has_fallback = true
outage = ["2s", "6s"]

[provider]
seed = 1

[provider.models.gpt-4o]
outages = [{ from = "2s", until = "6s", fault = { kind = "openai_overloaded" } }]

[provider.models.claude-sonnet]
"#;

fn run(seed: u64) -> RunReport {
    let scenario = simulate::scenarios::from_toml(SHORT, seed).expect("the test scenario parses");
    let report = simulate::run_scenario(&scenario, seed, |_| {});
    RunReport {
        schema_version: SCHEMA_VERSION,
        seed,
        scenarios: vec![report],
    }
}

#[test]
fn json_report_parses_and_its_numbers_are_consistent() {
    let report = run(7);
    let text = serde_json::to_string(&report).expect("serialises");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parses back");
    assert_eq!(json["schema_version"], SCHEMA_VERSION);
    let scenario = &json["scenarios"][0];
    let offered = scenario["offered_requests"]
        .as_u64()
        .expect("offered_requests");
    assert!(
        offered > 100,
        "20 req/s for 10 s offers about 200 requests, got {offered}"
    );
    // The Poisson arrivals come from the seed alone: seed 7 offers exactly 211.
    assert_eq!(offered, 211, "seed 7's Poisson arrivals over 10 s");
    let policies = scenario["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), simulate::Policy::ALL.len());
    for p in policies {
        let name = p["policy"].as_str().expect("policy name");
        let requests = p["requests"].as_u64().expect("requests");
        let attempts = p["upstream_attempts"].as_u64().expect("attempts");
        let local = p["rejected_locally"].as_u64().expect("rejected_locally");
        let succeeded = p["succeeded"].as_u64().expect("succeeded");
        assert_eq!(requests, offered, "{name}: every offered request completes");
        assert!(
            attempts + local >= requests,
            "{name}: {attempts} attempts + {local} local < {requests} requests"
        );
        assert!(succeeded <= requests, "{name}");
        let rate = p["success_rate"].as_f64().expect("success_rate");
        assert!((0.0..=1.0).contains(&rate), "{name}: success rate {rate}");
        assert!(
            (rate - succeeded as f64 / requests as f64).abs() < 1e-12,
            "{name}"
        );
        let served: u64 = p["served_by"]
            .as_object()
            .expect("served_by")
            .values()
            .map(|v| v.as_u64().unwrap_or(0))
            .sum();
        assert_eq!(
            served, succeeded,
            "{name}: every success is attributed to a model"
        );
        let latency = &p["latency_ms"];
        let p50 = latency["p50"].as_f64().expect("latency_ms.p50");
        let p99 = latency["p99"].as_f64().expect("latency_ms.p99");
        let max = latency["max"].as_f64().expect("latency_ms.max");
        assert!(p50 <= p99, "{name}: p50 {p50} > p99 {p99}");
        assert!(p99 <= max, "{name}: p99 {p99} > max {max}");
        let timeline = p["timeline"].as_array().expect("timeline");
        let offered_in_timeline: u64 = timeline
            .iter()
            .map(|t| t["offered"].as_u64().unwrap_or(0))
            .sum();
        let upstream_in_timeline: u64 = timeline
            .iter()
            .map(|t| t["upstream"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(offered_in_timeline, requests, "{name}");
        assert_eq!(upstream_in_timeline, attempts, "{name}");
        let rate_limited_in_timeline: u64 = timeline
            .iter()
            .map(|t| t["rate_limited_429s"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(
            rate_limited_in_timeline,
            p["rate_limited_429s"].as_u64().expect("rate_limited_429s"),
            "{name}"
        );
        // Goodput counts successful attempts that reached the provider during the
        // load: never more than the successes, never more than the attempts.
        let goodput = p["goodput_per_s"].as_f64().expect("goodput_per_s");
        let duration = scenario["duration_s"].as_f64().expect("duration_s");
        assert!(goodput * duration <= succeeded as f64 + 1e-9, "{name}");
        assert!(goodput * duration <= attempts as f64 + 1e-9, "{name}");
        // With seed 7 every success reaches the provider within the 10 s of load, so
        // goodput is exactly the successes over the duration, for each policy.
        let (expected_succeeded, expected_goodput) = match name {
            "no-retries" => (131, 13.1),
            "tenacity+sdk" => (211, 21.1),
            "openai-python" => (158, 15.8),
            "tower-retry+tps-budget" => (133, 13.3),
            "backstop" => (211, 21.1),
            other => panic!("unexpected policy {other}"),
        };
        assert_eq!(succeeded, expected_succeeded, "{name}: successes, seed 7");
        assert!(
            (goodput - expected_goodput).abs() < 1e-9,
            "{name}: goodput {goodput}/s, expected {expected_goodput}/s"
        );
    }
    // The policies differ where they should: no retries fails during the outage, the
    // Backstop stack falls back and serves everything.
    let by_name = |n: &str| {
        policies
            .iter()
            .find(|p| p["policy"] == n)
            .expect("policy present")
    };
    let no_retries_rate = by_name("no-retries")["success_rate"]
        .as_f64()
        .expect("success_rate");
    assert!(no_retries_rate < 1.0, "no retries fails during the outage");
    assert_eq!(
        by_name("no-retries")["upstream_attempts"],
        by_name("no-retries")["requests"]
    );
    assert_eq!(by_name("backstop")["success_rate"].as_f64(), Some(1.0));
    let backstop_fallbacks = by_name("backstop")["fallbacks"]
        .as_u64()
        .expect("fallbacks");
    assert!(backstop_fallbacks > 0, "the Backstop stack falls back");
    assert_eq!(backstop_fallbacks, 147, "seed 7");
}

#[test]
fn same_seed_gives_the_same_report_and_another_seed_does_not() {
    let a = serde_json::to_string(&run(11)).expect("serialises");
    let b = serde_json::to_string(&run(11)).expect("serialises");
    assert_eq!(a, b);
    let c = serde_json::to_string(&run(12)).expect("serialises");
    assert_ne!(a, c);
}

#[test]
fn the_plot_has_one_panel_per_policy_with_offered_and_upstream_series() {
    let report = run(5);
    let scenario = &report.scenarios[0];
    let svg = simulate::plot::render_svg(scenario);
    assert!(
        svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
        "{svg}"
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    // Two series (offered, upstream) per policy, each with one point per second.
    assert_eq!(
        svg.matches("<polyline").count(),
        2 * scenario.policies.len()
    );
    let seconds = scenario.policies[0].timeline.len();
    for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
        let points = line
            .split("points=\"")
            .nth(1)
            .expect("points")
            .trim_end_matches("\"/>");
        assert_eq!(points.split(' ').count(), seconds, "{line}");
    }
    for p in &scenario.policies {
        assert!(
            svg.contains(&format!("{} (amplification", p.policy)),
            "{}",
            p.policy
        );
    }
}

#[test]
fn the_embedded_scenarios_say_what_they_model_and_include_both_primary_outages() {
    let scenarios = simulate::scenarios::defaults(42);
    let names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "transient",
            "primary-outage",
            "primary-outage-503",
            "full-outage",
            "rate-limited",
            "overload"
        ]
    );
    for s in &scenarios {
        assert!(!s.description.is_empty(), "{}", s.name);
    }
    let primary_outage = &scenarios[1];
    assert!(primary_outage.description.contains("429"));
    assert!(primary_outage.description.contains("Retry-After: 1"));
    assert!(scenarios[2].description.contains("503"));
}

#[test]
fn the_table_has_one_row_per_policy_with_its_goodput() {
    let report = run(3);
    let scenario = &report.scenarios[0];
    let table = simulate::render_table(scenario);
    let header = table
        .lines()
        .find(|l| l.starts_with("policy"))
        .expect("a header row");
    assert!(header.contains("goodput/s"), "{header}");
    for p in &scenario.policies {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{:<24} ", p.policy)))
            .unwrap_or_else(|| panic!("a row for {}", p.policy));
        assert!(row.contains(&format!(" {:.1} ", p.goodput_per_s)), "{row}");
    }
}

/// `SHORT` with another duration and rate.
fn with_load(duration: &str, rate_per_s: &str) -> String {
    SHORT
        .replace("duration = \"10s\"", &format!("duration = \"{duration}\""))
        .replace("rate_per_s = 20.0", &format!("rate_per_s = {rate_per_s}"))
}

fn refusal(text: &str) -> String {
    match simulate::scenarios::from_toml(text, 1) {
        Ok(_) => panic!("the scenario should be refused:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_duration_over_a_day_is_refused_before_anything_is_planned() {
    // Its timeline alone would overflow the capacity of a `Vec`.
    assert_eq!(
        refusal(&with_load("18446744073709551615s", "20.0")),
        "invalid scenario file: duration 584542046090years 7months 15days 17h 5m 3s is over the longest a simulation runs, 1day"
    );
    assert_eq!(
        refusal(&with_load("25h", "0.01")),
        "invalid scenario file: duration 1day 1h is over the longest a simulation runs, 1day"
    );
    simulate::scenarios::from_toml(&with_load("24h", "11.0"), 1).expect("a day is accepted");
}

#[test]
fn more_than_a_million_planned_requests_are_refused() {
    assert_eq!(
        refusal(&with_load("1h", "1000.0")),
        "invalid scenario file: duration 1h at rate_per_s 1000 plans 3600000 requests, over the most a simulation runs, 1000000; shorten duration or lower rate_per_s"
    );
    simulate::scenarios::from_toml(&with_load("10s", "100000.0"), 1)
        .expect("a million requests are accepted");
}
