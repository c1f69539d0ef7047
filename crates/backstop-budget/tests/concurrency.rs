//! Many tasks on a multi-threaded runtime sharing one budget: never overdrawn, and
//! the books balance exactly.
//!
//! These run in real time (a paused clock needs a current-thread runtime), with a
//! one-hour window so nothing expires while they run.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backstop_budget::{
    AdaptiveThrottle, AdaptiveThrottleConfig, BudgetModel, RetryBudget, RetryBudgetLayer,
    RetryThrottle, RetryThrottleConfig, WindowedBudget, WindowedBudgetConfig,
};
use support::{Provider, ScriptedRetry, request};
use tower::{Layer, ServiceExt};

const TASKS: u64 = 8;

fn budget(floor: f64, ratio: f64) -> Arc<WindowedBudget> {
    Arc::new(
        WindowedBudget::new(WindowedBudgetConfig {
            window: Duration::from_secs(3600),
            min_retries_per_sec: floor,
            retry_ratio: ratio,
        })
        .unwrap(),
    )
}

async fn in_parallel<F>(per_task: impl Fn(u64) -> F) -> u64
where
    F: std::future::Future<Output = u64> + Send + 'static,
{
    let tasks: Vec<_> = (0..TASKS).map(|t| tokio::spawn(per_task(t))).collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_withdrawals_take_exactly_what_was_deposited() {
    let b = budget(0.0, 0.1);
    in_parallel(|_| {
        let b = Arc::clone(&b);
        async move {
            for _ in 0..1_000 {
                b.deposit();
            }
            0
        }
    })
    .await;
    let allowed = in_parallel(|_| {
        let b = Arc::clone(&b);
        async move { (0..500).filter(|_| b.try_withdraw()).count() as u64 }
    })
    .await;
    assert_eq!(allowed, 800, "8 000 deposits at 10 % pay for 800 retries");
    let s = b.snapshot();
    assert_eq!(
        (s.deposits, s.retries_allowed, s.retries_refused, s.balance),
        (8_000, 800, 3_200, 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interleaved_deposits_and_withdrawals_never_overdraw() {
    let b = budget(1.0 / 3600.0 * 5.0, 0.25); // a reserve of 5 retries
    let allowed = in_parallel(|_| {
        let b = Arc::clone(&b);
        async move {
            let mut allowed = 0;
            for i in 0..2_000 {
                b.deposit();
                if i % 2 == 0 && b.try_withdraw() {
                    allowed += 1;
                }
                if b.try_withdraw() {
                    allowed += 1;
                }
            }
            allowed
        }
    })
    .await;
    // 16 000 deposits × 0.25 + 5 = 4 005 retries in all; whatever was not taken
    // during the race is still in the balance, to the milli-token.
    let s = b.snapshot();
    assert_eq!(s.retries_allowed, allowed);
    assert_eq!(s.retries_allowed + s.retries_refused, TASKS * 3_000);
    assert!(allowed <= 4_005);
    assert_eq!(s.balance, 4_005.0 - allowed as f64);
    let mut drained = 0;
    while b.try_withdraw() {
        drained += 1;
    }
    assert_eq!(allowed + drained, 4_005);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_throttle_updates_lose_nothing() {
    let t = Arc::new(
        RetryThrottle::new(RetryThrottleConfig {
            max_tokens: 1000,
            token_ratio: 0.5,
        })
        .unwrap(),
    );
    // 8 × 50 failures take 400 tokens; 8 × 100 successes at 0.5 give 400 back.
    in_parallel(|_| {
        let t = Arc::clone(&t);
        async move {
            for _ in 0..50 {
                t.record_failure();
            }
            0
        }
    })
    .await;
    assert_eq!(t.snapshot().balance, 600.0);
    in_parallel(|_| {
        let t = Arc::clone(&t);
        async move {
            for _ in 0..100 {
                t.record_success();
            }
            0
        }
    })
    .await;
    assert_eq!(t.snapshot().balance, 1000.0);
    // Each try takes a token; retries are allowed while more than 500 remain after
    // it: exactly 499, whatever the interleaving.
    let allowed = in_parallel(|_| {
        let t = Arc::clone(&t);
        async move { (0..100).filter(|_| t.try_withdraw()).count() as u64 }
    })
    .await;
    assert_eq!(allowed, 499);
    assert_eq!(t.snapshot().balance, 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_through_the_layer_spend_exactly_the_budget() {
    let provider = Provider::always(503);
    let layer = RetryBudgetLayer::new(
        WindowedBudget::new(WindowedBudgetConfig {
            window: Duration::from_secs(3600),
            min_retries_per_sec: 0.0,
            retry_ratio: 0.1,
        })
        .unwrap(),
    );
    let stack = layer.layer(ScriptedRetry::new(provider.clone(), 3, Duration::ZERO));
    let failures = Arc::new(AtomicU64::new(0));
    in_parallel(|task| {
        let stack = stack.clone();
        let failures = Arc::clone(&failures);
        async move {
            for i in 0..500 {
                let r = stack
                    .clone()
                    .oneshot(request(task * 1_000 + i))
                    .await
                    .unwrap();
                if r.status() == 503 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            0
        }
    })
    .await;
    let s = layer.snapshot();
    assert_eq!(failures.load(Ordering::Relaxed), 4_000);
    assert_eq!(s.deposits, 4_000);
    assert_eq!(provider.attempts(), 4_000 + s.retries_allowed);
    assert!(s.retries_allowed <= 400);
    assert_eq!(s.retries_allowed + s.retries_available, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_throttle_records_are_all_counted() {
    let config = AdaptiveThrottleConfig {
        window: Duration::from_secs(3600),
        ..AdaptiveThrottleConfig::default()
    };
    let throttle = Arc::new(AdaptiveThrottle::with_seed(config, 9).unwrap());
    in_parallel(|task| {
        let throttle = Arc::clone(&throttle);
        async move {
            for i in 0..1_000 {
                throttle.record((task + i) % 4 != 0);
            }
            0
        }
    })
    .await;
    let s = throttle.snapshot();
    assert_eq!((s.requests, s.accepts), (8_000, 6_000));
    assert_eq!(s.rejection_probability, 0.0);
}
