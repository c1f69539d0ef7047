//! The budget's reason to exist: in a full outage, retries stay a bounded share of
//! the traffic instead of multiplying it. Real layers: backstop-retry's
//! `RetryLayer` (3 retries) over backstop-mock's provider failing every request.

use std::time::Duration;

use backstop_budget::{RetryBudgetLayer, WindowedBudget, WindowedBudgetConfig};
use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
use backstop_retry::{RetryConfig, RetryLayer};
use bytes::Bytes;
use http_body_util::Full;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

const REQUESTS: u64 = 10_000;
const SPACING: Duration = Duration::from_millis(10); // 100 requests/s over 100 s
const MAX_ATTEMPTS: u32 = 4; // 3 retries

fn failing_provider() -> MockProvider {
    MockProvider::new(Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiServerError)))
}

fn retry_layer() -> RetryLayer {
    // interactive(): waits 0.5 s doubling (equal jitter), seeded.
    let config = RetryConfig::interactive()
        .with_max_attempts(MAX_ATTEMPTS)
        .unwrap();
    RetryLayer::new(config).with_rng_seed(7)
}

fn chat_request() -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .unwrap()
}

/// Sends `REQUESTS` logical requests, one every `SPACING`, through `service`, and
/// waits for all of them.
async fn drive<S>(service: S)
where
    S: tower::Service<http::Request<Full<Bytes>>> + Clone + Send + 'static,
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
            let _ = service.oneshot(chat_request()).await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_ten_percent_budget_bounds_a_full_outage_to_1_121_attempts_per_request() {
    // Without a budget: the retry layer's cap, exactly.
    let unbudgeted = failing_provider();
    drive(
        ServiceBuilder::new()
            .layer(retry_layer())
            .service(unbudgeted.clone()),
    )
    .await;
    assert_eq!(unbudgeted.attempts_for("gpt-4o") as u64, REQUESTS * 4);
    assert_eq!(unbudgeted.attempt_count() as f64 / REQUESTS as f64, 4.0);

    // With the budget (the defaults, spelled out: the bound depends on them), same
    // traffic, same retry layer, same provider behaviour.
    let config = WindowedBudgetConfig {
        window: Duration::from_secs(10),
        min_retries_per_sec: 1.0,
        retry_ratio: 0.1,
    };
    let provider = failing_provider();
    let budget = RetryBudgetLayer::new(WindowedBudget::new(config).unwrap());
    drive(
        ServiceBuilder::new()
            .layer(budget.clone())
            .layer(retry_layer())
            .service(provider.clone()),
    )
    .await;

    // The bound (crate docs, "The amplification bound"): requests span 100 s = 10
    // windows and the last ones' retries (waits of at most 0.5 + 1 + 2 s) spill into
    // an 11th. Per window at most reserve + ratio × deposits per window
    // = 1/s × 10 s + 0.1 × (100/s × 10 s) = 10 + 100 retries.
    let windows = 11.0;
    let max_retries = windows * (1.0 * 10.0 + 0.1 * 100.0 * 10.0);
    let bound = 1.0 + max_retries / REQUESTS as f64;
    assert_eq!(bound, 1.121);

    let attempts = provider.attempt_count() as u64;
    let per_request = attempts as f64 / REQUESTS as f64;
    let snapshot = budget.snapshot();
    assert_eq!(snapshot.deposits, REQUESTS);
    assert_eq!(
        attempts,
        REQUESTS + snapshot.retries_allowed,
        "every allowed retry was made, and no other"
    );
    assert!(
        per_request <= bound,
        "{per_request} attempts per request exceeds the bound {bound}"
    );
    // And the budget let its share through: the ratio alone is 1 000 retries.
    assert!(
        per_request >= 1.1,
        "{per_request}: the budget refused retries it had"
    );
    // Exactly, with 1 s slots: any ten consecutive slots allow the reserve (10) plus
    // the deposits of those slots (10 a slot), so slot 0 allows 20, each slot after
    // 10, and every tenth slot 20 again as slot 0's withdrawals leave the window:
    // 10 × 110 over the 100 s of load. Slot 100, with no new deposits, allows the
    // reserve's 10 again (slot 90's 20 withdrawals and 10 deposits leave the window),
    // and nothing after: 1 110 in all, 100 under the documented bound, which counts
    // the 11th window as a full one.
    assert_eq!(snapshot.retries_allowed, 1_110);
    assert_eq!(attempts, 11_110);
    // Every request asked once after its first failure, every allowed retry that
    // failed asked again, except the 5 requests (seed 7's timing) that used all 3.
    assert_eq!(snapshot.retries_refused, 9_995);
}

#[tokio::test(start_paused = true)]
async fn the_grpc_style_throttle_allows_fewer_retries_than_half_its_tokens_in_a_full_outage() {
    use backstop_budget::{RetryThrottle, RetryThrottleConfig};

    // Tokens start at 10 and only fall while nothing succeeds; a retry needs more
    // than 5 left after its own failure is counted. So the whole outage gets at most
    // 4 retries, whatever the traffic.
    let provider = failing_provider();
    let budget = RetryBudgetLayer::new(RetryThrottle::new(RetryThrottleConfig::default()).unwrap());
    drive(
        ServiceBuilder::new()
            .layer(budget.clone())
            .layer(retry_layer())
            .service(provider.clone()),
    )
    .await;
    let snapshot = budget.snapshot();
    assert!(snapshot.retries_allowed <= 4, "{snapshot:?}");
    // Exactly 4: the first four requests fail (10 → 9, 8, 7, 6 tokens) 10 ms apart,
    // before any retry comes back, and each gets its retry. From then on nothing
    // is above half: every other ask is refused, the first ask of the other 9 996
    // requests and the second of those four: 10 000.
    assert_eq!(snapshot.retries_allowed, 4);
    assert_eq!(snapshot.retries_refused, REQUESTS);
    assert_eq!(
        provider.attempt_count() as u64,
        REQUESTS + snapshot.retries_allowed
    );
    assert_eq!(snapshot.balance, 0.0, "every failure took a token");
}
