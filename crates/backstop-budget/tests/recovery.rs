//! After an outage drains the budget, retries come back within one window once the
//! provider recovers. Real retry layer (backstop-retry, 3 retries, interactive
//! backoff), scripted provider (it needs per-request transient failures).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_budget::{
    BudgetModel, RetryBudgetLayer, RetryThrottle, RetryThrottleConfig, WindowedBudget,
    WindowedBudgetConfig,
};
use backstop_retry::{RetryConfig, RetryLayer};
use support::{Provider, request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const OUTAGE_END: Duration = Duration::from_secs(30);
const RUN: Duration = Duration::from_secs(60);
const SPACING: Duration = Duration::from_millis(10);
const WINDOW: Duration = Duration::from_secs(10);

/// Every request fails until `OUTAGE_END`; after it, every 20th request fails its
/// first attempt once (a transient 500) and succeeds on retry.
fn provider(start: Instant) -> Provider {
    Provider::new(move |now, id, attempt| {
        let in_outage = now < start + OUTAGE_END;
        let transient = id % 20 == 0 && attempt == 1;
        if in_outage || transient { 500 } else { 200 }
    })
}

fn retry_layer() -> RetryLayer {
    RetryLayer::new(RetryConfig::interactive().with_max_attempts(4).unwrap()).with_rng_seed(3)
}

/// Runs the traffic; returns, per request, (start offset, status of the final answer).
async fn run<M: BudgetModel>(model: M) -> Vec<(Duration, u16)> {
    let start = Instant::now();
    let layer = RetryBudgetLayer::new(model);
    let stack = layer.layer(retry_layer().layer(provider(start)));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let count = (RUN.as_millis() / SPACING.as_millis()) as u64;
    for id in 0..count {
        let at = SPACING * id as u32;
        tokio::time::sleep_until(start + at).await;
        let stack = stack.clone();
        let results = Arc::clone(&results);
        tasks.push(tokio::spawn(async move {
            let status = match stack.oneshot(request(id)).await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            if id % 20 == 0 {
                results.lock().unwrap().push((at, status));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut results = results.lock().unwrap().clone();
    results.sort();
    results
}

fn check(results: &[(Duration, u16)]) {
    // A watched request after the outage ends in 200 only if its transient failure
    // was retried: the first such one marks when retries resumed.
    let first_recovered = results
        .iter()
        .find(|&&(at, status)| at >= OUTAGE_END && status == 200)
        .map(|&(at, _)| at)
        .expect("some transient failure after the outage was retried");
    assert!(
        first_recovered <= OUTAGE_END + WINDOW,
        "retries resumed only at {first_recovered:?}"
    );
    // From one window after recovery on, every transient failure is retried.
    for &(at, status) in results.iter().filter(|(at, _)| *at >= OUTAGE_END + WINDOW) {
        assert_eq!(status, 200, "request at {at:?} was not retried");
    }
}

#[tokio::test(start_paused = true)]
async fn windowed_budget_retries_resume_within_one_window_of_recovery() {
    let results = run(WindowedBudget::new(WindowedBudgetConfig {
        window: WINDOW,
        ..WindowedBudgetConfig::default()
    })
    .unwrap())
    .await;
    check(&results);
}

#[tokio::test(start_paused = true)]
async fn retry_throttle_retries_resume_within_one_window_of_recovery() {
    let model = RetryThrottle::new(RetryThrottleConfig::default()).unwrap();
    let results = run(model).await;
    // The throttle was empty at the end of the outage: the transient failure right
    // at recovery is not retried.
    assert_eq!(
        results.iter().find(|(at, _)| *at == OUTAGE_END),
        Some(&(OUTAGE_END, 500))
    );
    check(&results);
}

#[tokio::test(start_paused = true)]
async fn the_outage_really_drains_the_windowed_budget() {
    // Guards the recovery tests against passing vacuously: during the outage the
    // budget refuses retries.
    let start = Instant::now();
    let provider = provider(start);
    let layer = RetryBudgetLayer::new(WindowedBudget::default());
    let stack = layer.layer(retry_layer().layer(provider.clone()));
    let mut tasks = Vec::new();
    for id in 0..2_000u64 {
        tokio::time::sleep_until(start + SPACING * id as u32).await;
        tasks.push(tokio::spawn(stack.clone().oneshot(request(id))));
    }
    let snapshot = layer.snapshot();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // 20 s of a full outage at 100 requests/s: the budget is spent, nearly every
    // request had its first retry refused.
    assert_eq!(snapshot.retries_available, 0, "{snapshot:?}");
    let snapshot = layer.snapshot();
    assert!(snapshot.retries_refused > 1_700, "{snapshot:?}");
    assert_eq!(provider.attempts(), 2_000 + snapshot.retries_allowed);
    // Exactly: with 1 s slots, slot 0 allows the reserve (10) and its deposits (10),
    // each slot after its deposits (10), slot 10 twenty again as slot 0's leave the
    // window: 220 over the 20 s, then 10 more in slot 20 as slot 10's leave. Every
    // request asked once, every failed retry again, but for the 5 chains (seed 3's
    // timing) that used all three retries.
    assert_eq!(snapshot.retries_allowed, 230);
    assert_eq!(snapshot.retries_refused, 1_995);
    assert_eq!(provider.attempts(), 2_230);
}
