//! A key forgotten to make room for a new one is a debug event naming it, and no
//! warning: the table is not stuck. (Its own test binary, with one test: a scoped
//! tracing subscriber can miss events whose callsites other test threads register
//! at the same time.)

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use backstop_breaker::{Breaker, BreakerConfig, Outcome};
use backstop_classify::ModelRoute;
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// (level, message, fields as `name=value`).
type Captured = (Level, String, Vec<String>);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields(String, Vec<String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        } else {
            self.1.push(format!("{}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.1.push(format!("{}={value}", field.name()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new(), Vec::new());
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields.0, fields.1));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn an_eviction_is_one_debug_event_naming_the_key_forgotten() {
    // 1024 keys at rest (junk answered 404) over 16 shards: whichever shard the new
    // route goes into holds some (but for a chance of about 10^-28).
    let breaker = Breaker::new(BreakerConfig {
        max_keys: 1024,
        ..BreakerConfig::default()
    })
    .unwrap();
    let t0 = Instant::now();
    let junk = |i: usize| ModelRoute::new("upstream", format!("junk-{i}"));
    for i in 0..1024 {
        breaker
            .admit_at(&junk(i), t0)
            .unwrap()
            .record_at(Outcome::Ignored, t0);
    }
    let route = ModelRoute::new("upstream", "real");
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        drop(breaker.admit_at(&route, t0).unwrap());
    });
    let gone: Vec<_> = (0..1024)
        .map(junk)
        .filter(|r| breaker.key(r).is_none())
        .collect();
    assert_eq!(breaker.snapshot_at(t0).len(), 1024);
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(breaker.key(&route).is_some());
    let events = capture.0.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![(
            Level::DEBUG,
            "circuit breaker key forgotten to make room for a new key".to_string(),
            vec![
                "upstream=upstream".to_string(),
                format!("model={}", gone[0].model),
                "credential=".to_string(),
                "why=at rest".to_string(),
            ]
        )]
    );
}
