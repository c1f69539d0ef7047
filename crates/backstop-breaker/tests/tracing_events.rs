//! Every transition is a tracing event with the route and the reason.

use std::time::Duration;

use backstop_breaker::{Breaker, BreakerConfig, Outcome};
use backstop_classify::{FailureKind, ModelRoute};
use tokio::time::Instant;
use tracing::Level;

mod capture;

use capture::Capture;

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn each_transition_is_one_event_with_route_states_and_reason() {
    let capture = Capture::default();
    let breaker = Breaker::new(BreakerConfig::default()).unwrap();
    let mut route = ModelRoute::new("openai", "gpt-4o");
    route.credential = Some("key-2".into());
    let t0 = Instant::now();

    tracing::subscriber::with_default(capture.clone(), || {
        breaker
            .admit_at(&route, t0)
            .unwrap()
            .record_at(Outcome::QuotaExhausted { hint: None }, t0);
        let refused = breaker.admit_at(&route, t0 + Duration::from_secs(1));
        assert!(refused.is_err());
        let probe = breaker
            .admit_at(&route, t0 + Duration::from_secs(600))
            .unwrap();
        probe.record_at(
            Outcome::Failure {
                kind: FailureKind::Overloaded,
                hint: None,
            },
            t0 + Duration::from_secs(601),
        );
    });

    let events = capture.0.lock().unwrap().clone();
    let route_fields = ["upstream=openai", "model=gpt-4o", "credential=key-2"];
    let with = |extra: &[&str]| {
        let mut all = strings(&route_fields);
        all.extend(strings(extra));
        all
    };
    assert_eq!(
        events,
        vec![
            (
                Level::WARN,
                with(&[
                    "from=closed",
                    "to=open",
                    "reason=quota_exhausted",
                    "detail=QuotaExhausted",
                    "open_for_ms=600000",
                    "circuit breaker opened",
                ])
            ),
            (
                Level::DEBUG,
                strings(&[
                    "upstream=openai",
                    "model=gpt-4o",
                    "state=open",
                    "retry_in_ms=599000",
                    "circuit breaker refused a call",
                ])
            ),
            (
                Level::INFO,
                with(&[
                    "from=open",
                    "to=half_open",
                    "reason=cooldown_elapsed",
                    "circuit breaker state changed",
                ])
            ),
            (
                Level::WARN,
                with(&[
                    "from=half_open",
                    "to=open",
                    "reason=probe_failed",
                    "detail=ProbeFailed",
                    "open_for_ms=10000", // the default 5 s, doubled by the failed probe
                    "circuit breaker opened",
                ])
            ),
        ]
    );
}
