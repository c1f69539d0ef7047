//! The closed-state hot path: admit a call and record its success.
//!
//! Run briefly: `cargo bench -p backstop-breaker -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant as StdInstant};

use backstop_breaker::{Breaker, BreakerConfig, Outcome};
use backstop_classify::ModelRoute;
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::time::Instant;

fn route() -> ModelRoute {
    ModelRoute::new("api.openai.com", "gpt-4o-mini")
}

fn closed_hot_path(c: &mut Criterion) {
    let breaker = Breaker::new(BreakerConfig::default()).expect("default config is valid");
    let route = route();

    // The state store alone: the instant is passed in, as the layer does once per call.
    c.bench_function("admit+record, clock passed in", |b| {
        let now = Instant::now();
        b.iter(|| {
            let permit = breaker.admit_at(black_box(&route), now).expect("closed");
            permit.record_at(Outcome::Success, now);
        })
    });

    // What the layer pays per call: two clock reads (admission, completion) included.
    c.bench_function("admit+record, with clock reads", |b| {
        b.iter(|| {
            let permit = breaker.admit(black_box(&route)).expect("closed");
            permit.record(Outcome::Success);
        })
    });

    // Two threads hammering the same key (the worst case: one key's mutex shared).
    c.bench_function("admit+record, 2 threads, same key", |b| {
        b.iter_custom(|iters| two_threads(&breaker, &route, &route, iters))
    });

    // Two threads on two keys (different models of one gateway).
    let other = ModelRoute::new("api.anthropic.com", "claude-sonnet-4");
    c.bench_function("admit+record, 2 threads, two keys", |b| {
        b.iter_custom(|iters| two_threads(&breaker, &route, &other, iters))
    });
}

/// Wall time per admit+record pair, each thread running `iters` pairs.
fn two_threads(breaker: &Breaker, a: &ModelRoute, b: &ModelRoute, iters: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(2));
    let run = |route: ModelRoute| {
        let breaker = breaker.clone();
        let barrier = Arc::clone(&barrier);
        move || {
            barrier.wait();
            let start = StdInstant::now();
            for _ in 0..iters {
                let permit = breaker.admit(black_box(&route)).expect("closed");
                permit.record(Outcome::Success);
            }
            start.elapsed()
        }
    };
    let first = thread::spawn(run(a.clone()));
    let second = thread::spawn(run(b.clone()));
    let elapsed = first.join().expect("bench thread") + second.join().expect("bench thread");
    elapsed / 2
}

criterion_group!(benches, closed_hot_path);
criterion_main!(benches);
