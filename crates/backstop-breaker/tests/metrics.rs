//! The metrics a breaker exports: a state gauge per key, transition and refusal
//! counters, labelled with the route (never a credential).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_breaker::events::{REJECTIONS_COUNTER, STATE_GAUGE, TRANSITIONS_COUNTER};
use backstop_breaker::{Breaker, BreakerConfig, Outcome};
use backstop_classify::{FailureKind, ModelRoute};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tokio::time::Instant;

/// One recorded update: metric name, labels as `k=v` in order, value.
type Update = (String, Vec<String>, f64);

#[derive(Default)]
struct Log {
    updates: Arc<Mutex<Vec<Update>>>,
}

struct Handle {
    name: String,
    labels: Vec<String>,
    updates: Arc<Mutex<Vec<Update>>>,
}

impl Handle {
    fn push(&self, value: f64) {
        self.updates
            .lock()
            .unwrap()
            .push((self.name.clone(), self.labels.clone(), value));
    }
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        self.push(value as f64);
    }
    fn absolute(&self, value: u64) {
        self.push(value as f64);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        self.push(value);
    }
    fn decrement(&self, value: f64) {
        self.push(-value);
    }
    fn set(&self, value: f64) {
        self.push(value);
    }
}

impl Log {
    fn handle(&self, key: &Key) -> Arc<Handle> {
        Arc::new(Handle {
            name: key.name().to_string(),
            labels: key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect(),
            updates: Arc::clone(&self.updates),
        })
    }
}

impl Recorder for Log {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn labels(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn transitions_set_the_state_gauge_and_count_transitions_and_refusals() {
    let log = Log::default();
    let breaker = Breaker::new(BreakerConfig::default()).unwrap();
    let mut route = ModelRoute::new("openai", "gpt-4o");
    route.credential = Some("key-2".into());
    let t0 = Instant::now();

    metrics::with_local_recorder(&log, || {
        for _ in 0..5 {
            breaker.admit_at(&route, t0).unwrap().record_at(
                Outcome::Failure {
                    kind: FailureKind::ServerError,
                    hint: None,
                },
                t0,
            );
        }
        assert!(breaker.admit_at(&route, t0).is_err());
        let probe = breaker
            .admit_at(&route, t0 + Duration::from_secs(30))
            .unwrap();
        probe.record_at(Outcome::Success, t0 + Duration::from_secs(31));
    });

    let route_labels = ["upstream=openai", "model=gpt-4o", "credential=key-2"];
    let with = |extra: &[&str]| {
        let mut all = labels(&route_labels);
        all.extend(labels(extra));
        all
    };
    let updates = log.updates.lock().unwrap().clone();
    assert_eq!(
        updates,
        vec![
            (STATE_GAUGE.to_string(), with(&[]), 0.0),
            (STATE_GAUGE.to_string(), with(&[]), 2.0),
            (
                TRANSITIONS_COUNTER.to_string(),
                with(&["from=closed", "to=open", "reason=consecutive_failures"]),
                1.0
            ),
            (REJECTIONS_COUNTER.to_string(), with(&["state=open"]), 1.0),
            (STATE_GAUGE.to_string(), with(&[]), 1.0),
            (
                TRANSITIONS_COUNTER.to_string(),
                with(&["from=open", "to=half_open", "reason=cooldown_elapsed"]),
                1.0
            ),
            (STATE_GAUGE.to_string(), with(&[]), 0.0),
            (
                TRANSITIONS_COUNTER.to_string(),
                with(&["from=half_open", "to=closed", "reason=probes_succeeded"]),
                1.0
            ),
        ]
    );
}

/// A recorder that reads the breaker's state from inside a metric update.
struct ReadsTheBreaker {
    breaker: Breaker,
    route: ModelRoute,
    seen: Arc<Mutex<Vec<backstop_breaker::BreakerState>>>,
}

impl GaugeFn for ReadsTheBreaker {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {
        let state = self.breaker.state(&self.route);
        self.seen.lock().unwrap().push(state);
    }
}

struct Reentrant(Arc<ReadsTheBreaker>);

impl Recorder for Reentrant {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::clone(&self.0))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn transitions_are_reported_after_the_key_lock_is_released() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let breaker = Breaker::new(BreakerConfig::default()).unwrap();
        let route = ModelRoute::new("openai", "gpt-4o");
        let reader = Arc::new(ReadsTheBreaker {
            breaker: breaker.clone(),
            route: route.clone(),
            seen: Arc::default(),
        });
        let recorder = Reentrant(Arc::clone(&reader));
        let now = Instant::now();
        metrics::with_local_recorder(&recorder, || {
            breaker
                .admit_at(&route, now)
                .unwrap()
                .record_at(Outcome::QuotaExhausted { hint: None }, now);
        });
        let seen = reader.seen.lock().unwrap().clone();
        done.send(seen).unwrap();
    });
    // Were the gauge updated under the key's lock, reading the key would deadlock.
    let seen = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("no deadlock");
    // Once when the key is first tracked, once when it opens.
    assert_eq!(
        seen,
        vec![
            backstop_breaker::BreakerState::Closed,
            backstop_breaker::BreakerState::Open
        ]
    );
}
