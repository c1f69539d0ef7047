//! The in-process store: many keys, the key cap, the snapshot.

use std::sync::Arc;

use backstop_breaker::{Breaker, BreakerConfig, BreakerState, MAX_KEY_NAME_BYTES, Outcome};
use backstop_classify::{FailureKind, ModelRoute};
use tokio::time::Instant;

fn route(i: usize) -> ModelRoute {
    let mut route = ModelRoute::new(format!("upstream-{}", i % 7), format!("model-{i}"));
    if i.is_multiple_of(5) {
        route.credential = Some(Arc::from(format!("key-{}", i % 3)));
    }
    route
}

fn server_error() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::ServerError,
        hint: None,
    }
}

#[test]
fn every_route_finds_its_own_key_among_many() {
    let breaker = Breaker::new(BreakerConfig::default()).unwrap();
    let now = Instant::now();
    for i in 0..500usize {
        let outcome = if i.is_multiple_of(3) {
            Outcome::QuotaExhausted { hint: None }
        } else {
            Outcome::Success
        };
        breaker
            .admit_at(&route(i), now)
            .unwrap()
            .record_at(outcome, now);
    }
    for i in 0..500usize {
        let expected = if i.is_multiple_of(3) {
            BreakerState::Open
        } else {
            BreakerState::Closed
        };
        assert_eq!(breaker.state(&route(i)), expected, "route {i}");
    }
    let snapshot = breaker.snapshot_at(now);
    assert_eq!(snapshot.len(), 500);
    assert!(snapshot.windows(2).all(|w| w[0].route < w[1].route));
    assert_eq!(
        snapshot
            .iter()
            .filter(|k| k.state == BreakerState::Open)
            .count(),
        167
    );
    // The same upstream and model under another credential label is another key.
    let mut other = route(3);
    other.credential = Some(Arc::from("key-9"));
    assert_eq!(breaker.state(&other), BreakerState::Closed);
    assert!(breaker.key(&other).is_none());
}

#[test]
fn keys_beyond_max_keys_pass_untracked() {
    let breaker = Breaker::new(BreakerConfig {
        max_keys: 2,
        ..BreakerConfig::default()
    })
    .unwrap();
    let now = Instant::now();
    for i in 0..3 {
        for _ in 0..10 {
            if let Ok(permit) = breaker.admit_at(&route(i), now) {
                permit.record_at(server_error(), now);
            }
        }
    }
    assert_eq!(breaker.state(&route(0)), BreakerState::Open);
    assert_eq!(breaker.state(&route(1)), BreakerState::Open);
    // The third key is not tracked: it is never refused.
    assert!(breaker.admit_at(&route(2), now).is_ok());
    assert!(breaker.key(&route(2)).is_none());
    assert_eq!(breaker.snapshot_at(now).len(), 2);
}

#[test]
fn a_route_with_an_overlong_name_passes_untracked_and_takes_no_key() {
    let breaker = Breaker::new(BreakerConfig {
        max_keys: 2,
        ..BreakerConfig::default()
    })
    .unwrap();
    let now = Instant::now();
    let longest = "m".repeat(MAX_KEY_NAME_BYTES);
    let overlong_model = ModelRoute::new("upstream", "m".repeat(MAX_KEY_NAME_BYTES + 1));
    let overlong_upstream = ModelRoute::new("u".repeat(MAX_KEY_NAME_BYTES + 1), "model");
    let mut overlong_label = ModelRoute::new("upstream", "model");
    overlong_label.credential = Some(Arc::from("k".repeat(MAX_KEY_NAME_BYTES + 1)));
    for junk in [&overlong_model, &overlong_upstream, &overlong_label] {
        for _ in 0..10 {
            let permit = breaker.admit_at(junk, now).expect("never refused");
            permit.record_at(server_error(), now);
        }
        assert!(breaker.key(junk).is_none());
    }
    assert!(breaker.snapshot_at(now).is_empty());
    // The key cap is still all there for real routes; a name of the longest
    // length is one.
    for real in [ModelRoute::new("upstream", longest), route(1)] {
        for _ in 0..10 {
            if let Ok(permit) = breaker.admit_at(&real, now) {
                permit.record_at(server_error(), now);
            }
        }
        assert_eq!(breaker.state(&real), BreakerState::Open);
    }
}

#[test]
fn an_invalid_config_is_refused_with_an_actionable_message() {
    let error = Breaker::new(BreakerConfig {
        failure_ratio: 1.5,
        ..BreakerConfig::default()
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "breaker failure_ratio 1.5 is outside (0, 1]; use e.g. 0.5 to open at 50 % failures"
    );
    let error = Breaker::new(BreakerConfig {
        half_open_probes: 0,
        ..BreakerConfig::default()
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "breaker half_open_probes is zero; it must be positive"
    );
}
