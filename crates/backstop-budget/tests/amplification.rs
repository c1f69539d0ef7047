//! The budget's reason to exist: in a full outage, retries stay a bounded share of
//! the traffic instead of multiplying it.

mod support;

use std::time::Duration;

use backstop_budget::{RetryBudgetLayer, WindowedBudget, WindowedBudgetConfig};
use support::{Provider, ScriptedRetry, request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const REQUESTS: u64 = 10_000;
const SPACING: Duration = Duration::from_millis(10); // 100 requests/s over 100 s
const RETRIES: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(500);

/// Sends `REQUESTS` logical requests, one every `SPACING`, through `service`, and
/// waits for all of them.
async fn drive<S>(service: S)
where
    S: tower::Service<http::Request<String>> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
{
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(REQUESTS as usize);
    for id in 0..REQUESTS {
        tokio::time::sleep_until(start + SPACING * id as u32).await;
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            let _ = service.oneshot(request(id)).await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_ten_percent_budget_bounds_a_full_outage_to_1_121_attempts_per_request() {
    // The defaults, spelled out: the bound below depends on them.
    let config = WindowedBudgetConfig {
        window: Duration::from_secs(10),
        min_retries_per_sec: 1.0,
        retry_ratio: 0.1,
    };

    // Without a budget: the retry layer's cap, exactly.
    let unbudgeted = Provider::always(500);
    drive(ScriptedRetry::new(unbudgeted.clone(), RETRIES, BACKOFF)).await;
    assert_eq!(unbudgeted.attempts(), REQUESTS * (1 + RETRIES as u64));
    assert_eq!(unbudgeted.attempts() as f64 / REQUESTS as f64, 4.0);

    // With the budget, same traffic, same retry loop, same provider behaviour.
    let provider = Provider::always(500);
    let budget = RetryBudgetLayer::new(WindowedBudget::new(config).unwrap());
    let stack = budget.layer(ScriptedRetry::new(provider.clone(), RETRIES, BACKOFF));
    drive(stack).await;

    // The bound (crate docs, "The amplification bound"): requests span 100 s = 10
    // windows and the last ones' retries (backoff 0.5 s, three of them) spill into an
    // 11th. Per window at most reserve + ratio × deposits per window
    // = 1/s × 10 s + 0.1 × (100/s × 10 s) = 10 + 100 retries.
    let windows = 11.0;
    let max_retries = windows * (1.0 * 10.0 + 0.1 * 100.0 * 10.0);
    let bound = 1.0 + max_retries / REQUESTS as f64;
    assert_eq!(bound, 1.121);

    let attempts = provider.attempts();
    let per_request = attempts as f64 / REQUESTS as f64;
    let snapshot = budget.snapshot();
    assert_eq!(snapshot.deposits, REQUESTS);
    assert_eq!(
        attempts,
        REQUESTS + snapshot.retries_allowed,
        "every allowed retry was made, no other"
    );
    assert!(
        per_request <= bound,
        "{per_request} attempts per request exceeds the bound {bound}"
    );
    // And the budget did let its share through: ratio plus floor over 100 s, less
    // what could not be spent in the first window (the reserve is 10, not more).
    assert!(
        per_request >= 1.1,
        "{per_request}: the budget refused retries it had"
    );
    eprintln!("{attempts} attempts, {per_request} per request, {snapshot:?}");
}
