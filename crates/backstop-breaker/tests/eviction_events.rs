//! A key forgotten to make room for a new one is a debug event naming it, and no
//! warning: the table is not stuck. (Its own test binary, with one test: a scoped
//! tracing subscriber can miss events whose callsites other test threads register
//! at the same time.)

mod capture;

use backstop_breaker::{Breaker, BreakerConfig, Outcome};
use backstop_classify::ModelRoute;
use capture::Capture;
use tokio::time::Instant;
use tracing::Level;

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
            vec![
                "upstream=upstream".to_string(),
                format!("model={}", gone[0].model),
                "credential=".to_string(),
                "why=at rest".to_string(),
                "circuit breaker key forgotten to make room for a new key".to_string(),
            ]
        )]
    );
}
