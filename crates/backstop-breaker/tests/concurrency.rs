//! Many tasks on a multi-threaded runtime: counts stay exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backstop_breaker::{
    Breaker, BreakerConfig, BreakerLayer, BreakerState, Outcome, TransitionReason,
};
use backstop_classify::{Classification, FailureKind, ModelRoute};
use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt};

const TASKS: usize = 16;
const CALLS: usize = 250;

/// Rules that never trip, and one window bucket of an hour, so every call counts.
fn counting_only() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 0,
        minimum_calls: 0,
        window: Duration::from_secs(3600),
        window_buckets: 1,
        ..BreakerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_through_the_layer_are_all_counted() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let inner = tower::service_fn(move |_req: Request<()>| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::task::yield_now().await;
            let mut response = Response::new(());
            // One call in four fails.
            let verdict = if n.is_multiple_of(4) {
                Classification::Failure(backstop_classify::Failure::new(FailureKind::ServerError))
            } else {
                Classification::Success
            };
            response.extensions_mut().insert(verdict);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let layer = BreakerLayer::new(counting_only()).unwrap();
    let breaker = layer.breaker().clone();
    let service = ServiceBuilder::new().layer(layer).service(inner);
    let route = ModelRoute::new("openai", "gpt-4o");

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut service = service.clone();
            let route = route.clone();
            tokio::spawn(async move {
                for _ in 0..CALLS {
                    let mut request = Request::new(());
                    request.extensions_mut().insert(route.clone());
                    service.ready().await.unwrap().call(request).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }

    let key = breaker.key(&route).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), TASKS * CALLS);
    assert_eq!(key.window_calls as usize, TASKS * CALLS);
    assert_eq!(key.window_failures as usize, TASKS * CALLS / 4);
    assert_eq!(key.state, BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_open_the_key_at_exactly_the_threshold() {
    let breaker = Breaker::new(BreakerConfig {
        consecutive_failures: 1000,
        minimum_calls: 0,
        ..BreakerConfig::default()
    })
    .unwrap();
    let route = ModelRoute::new("openai", "gpt-4o");
    let admitted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let breaker = breaker.clone();
            let route = route.clone();
            let admitted = Arc::clone(&admitted);
            tokio::spawn(async move {
                for _ in 0..CALLS {
                    if let Ok(permit) = breaker.admit(&route) {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        permit.record(Outcome::Failure {
                            kind: FailureKind::ServerError,
                            hint: None,
                        });
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let key = breaker.key(&route).unwrap();
    assert_eq!(key.state, BreakerState::Open);
    // Permits taken before the 1000th failure opened the key may still record
    // afterwards; they are stale and no longer count, so the count stops at 1000.
    assert_eq!(key.consecutive_failures, 1000);
    assert_eq!(
        key.last_reason,
        Some(TransitionReason::ConsecutiveFailures { failures: 1000 })
    );
    let admitted = admitted.load(Ordering::SeqCst);
    assert!(
        (1000..1000 + TASKS).contains(&admitted),
        "admitted {admitted}: at most one in-flight call per task after the key opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_admits_exactly_the_configured_probes_under_contention() {
    let breaker = Breaker::new(BreakerConfig {
        half_open_probes: 3,
        open_duration: Duration::from_millis(1),
        ..BreakerConfig::default()
    })
    .unwrap();
    let route = ModelRoute::new("openai", "gpt-4o");
    let now = tokio::time::Instant::now();
    for _ in 0..5 {
        breaker.admit_at(&route, now).unwrap().record_at(
            Outcome::Failure {
                kind: FailureKind::ServerError,
                hint: None,
            },
            now,
        );
    }
    let later = now + Duration::from_secs(1);
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let breaker = breaker.clone();
            let route = route.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                // The permit is handed back alive, so the slot stays taken.
                breaker.admit_at(&route, later).ok()
            })
        })
        .collect();
    let mut probes = Vec::new();
    for task in tasks {
        probes.extend(task.await.unwrap());
    }
    assert_eq!(probes.len(), 3);
    assert_eq!(breaker.key(&route).unwrap().probes_in_flight, 3);
}
