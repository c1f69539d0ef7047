//! Adaptive client-side throttling, in virtual time, with a seeded random source.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_budget::{
    AdaptiveThrottle, AdaptiveThrottleConfig, FailureKind, RetryBudgetLayer, WindowedBudget,
};
use backstop_mock::{Capacity, Fault, MockProvider, ModelPlan, Scenario};
use bytes::Bytes;
use http_body_util::Full;
use support::{Provider, request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const RATE: u32 = 100; // requests per second
const SPACING: Duration = Duration::from_millis(10);
const WINDOW: Duration = Duration::from_secs(120);

/// The SRE book's own counting (local rejections count as requests).
fn layer(seed: u64) -> RetryBudgetLayer {
    let config = AdaptiveThrottleConfig {
        count_local_rejections: true,
        ..AdaptiveThrottleConfig::default()
    };
    let throttle = AdaptiveThrottle::with_seed(config, seed).unwrap();
    assert_eq!(throttle.config().window, WINDOW);
    assert_eq!(throttle.config().k, 2.0);
    RetryBudgetLayer::builder(WindowedBudget::default())
        .adaptive_throttle(throttle)
        .build()
}

/// What happened to one request.
#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Duration,
    /// The rejection probability the throttle had just before it.
    probability: f64,
    rejected_locally: bool,
}

/// Sends one request every `SPACING` for `run`, one after the other, recording each.
async fn drive<S, B>(
    service: S,
    layer: &RetryBudgetLayer,
    run: Duration,
    make: impl Fn(u64) -> http::Request<B>,
) -> Vec<Sent>
where
    S: tower::Service<http::Request<B>, Error = backstop_budget::ClassifiedError> + Clone,
{
    let start = Instant::now();
    let count = (run.as_millis() / SPACING.as_millis()) as u64;
    let mut log = Vec::with_capacity(count as usize);
    for id in 0..count {
        let at = SPACING * id as u32;
        tokio::time::sleep_until(start + at).await;
        let probability = layer.throttle_snapshot().unwrap().rejection_probability;
        let rejected_locally = match service.clone().oneshot(make(id)).await {
            Err(e) => {
                assert_eq!(e.kind(), FailureKind::Throttled);
                true
            }
            Ok(_) => false,
        };
        log.push(Sent {
            at,
            probability,
            rejected_locally,
        });
    }
    log
}

fn chat_request(_: u64) -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .unwrap()
}

/// Asserts that the number sent in `log` is what the probabilities the throttle
/// showed allow: within 4 standard deviations (plus one) of Σ(1 − pᵢ).
fn assert_sent_matches_formula(log: &[Sent]) -> (u64, f64) {
    let sent = log.iter().filter(|s| !s.rejected_locally).count() as u64;
    let expected: f64 = log.iter().map(|s| 1.0 - s.probability).sum();
    let variance: f64 = log
        .iter()
        .map(|s| s.probability * (1.0 - s.probability))
        .sum();
    let tolerance = 4.0 * variance.sqrt() + 1.0;
    assert!(
        (sent as f64 - expected).abs() <= tolerance,
        "sent {sent}, the formula allows {expected:.1} ± {tolerance:.1}"
    );
    (sent, expected)
}

fn between(log: &[Sent], from: Duration, until: Duration) -> Vec<Sent> {
    log.iter()
        .copied()
        .filter(|s| s.at >= from && s.at < until)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_capacity_limited_provider_is_sent_about_k_times_what_it_accepts() {
    // The provider serves 10 requests per sliding second and answers 503 beyond.
    let mock = MockProvider::new(Scenario::new(1).model(
        "gpt-4o",
        ModelPlan::ok().capacity(Capacity::per_second(10).over(Fault::OpenAiOverloaded)),
    ));
    let layer = layer(42);
    let log = drive(
        layer.layer(mock.clone()),
        &layer,
        Duration::from_secs(600),
        chat_request,
    )
    .await;
    // Past two windows, the throttle has settled: K × capacity / demand = 2 × 10 / 100.
    let settled = between(&log, 2 * WINDOW, Duration::from_secs(600));
    let (sent, _) = assert_sent_matches_formula(&settled);
    let share = sent as f64 / settled.len() as f64;
    assert!((share - 0.2).abs() < 0.02, "share sent upstream {share}");
    assert_eq!(
        mock.attempt_count() as u64,
        log.iter().filter(|s| !s.rejected_locally).count() as u64
    );
}

#[tokio::test(start_paused = true)]
async fn a_provider_rejecting_everything_is_sent_what_the_formula_allows() {
    let mock = MockProvider::new(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiOverloaded)),
    );
    let layer = layer(42);
    let log = drive(
        layer.layer(mock.clone()),
        &layer,
        Duration::from_secs(600),
        chat_request,
    )
    .await;
    let settled = between(&log, WINDOW, Duration::from_secs(600));
    let (sent, expected) = assert_sent_matches_formula(&settled);
    // With 12 000 requests in the window and no accepts, p = 12 000 / 12 001: about
    // one request per window still goes out, to notice a recovery.
    assert!(expected < 5.0, "{expected}");
    assert!(sent <= 12, "{sent} sent to a provider rejecting everything");
    assert_eq!(
        mock.attempt_count() as u64,
        log.iter().filter(|s| !s.rejected_locally).count() as u64
    );
    let snapshot = layer.throttle_snapshot().unwrap();
    assert_eq!(
        snapshot.local_rejections,
        log.iter().filter(|s| s.rejected_locally).count() as u64
    );
    // Rejected requests never deposit into the retry budget.
    assert_eq!(layer.snapshot().deposits, mock.attempt_count() as u64);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_accepts_everything_is_never_throttled() {
    let mock = MockProvider::new(Scenario::new(1).model("gpt-4o", ModelPlan::ok()));
    let layer = layer(42);
    let log = drive(
        layer.layer(mock.clone()),
        &layer,
        Duration::from_secs(300),
        chat_request,
    )
    .await;
    assert!(
        log.iter()
            .all(|s| s.probability == 0.0 && !s.rejected_locally)
    );
    assert_eq!(mock.attempt_count(), 30_000);
    assert_eq!(layer.throttle_snapshot().unwrap().local_rejections, 0);
}

/// A provider serving `capacity` requests per (whole) second until `until`, then
/// everything.
fn overloaded_until(capacity: u32, until: Duration) -> Provider {
    let start = Instant::now();
    let served = Arc::new(Mutex::new((0u64, 0u32)));
    Provider::new(move |now, _, _| {
        let elapsed = now - start;
        if elapsed >= until {
            return 200;
        }
        let mut served = served.lock().unwrap();
        let second = elapsed.as_secs();
        if served.0 != second {
            *served = (second, 0);
        }
        if served.1 < capacity {
            served.1 += 1;
            200
        } else {
            503
        }
    })
}

fn last_rejection(log: &[Sent]) -> Option<Duration> {
    log.iter().rev().find(|s| s.rejected_locally).map(|s| s.at)
}

#[tokio::test(start_paused = true)]
async fn after_an_overload_throttling_fades_as_fast_as_the_formula_predicts() {
    // During the overload the window holds 12 000 requests and 1 200 accepts. After
    // it, accepts grow as dA/dt = k·A/window − C (old accepts still expiring), so the
    // probability reaches 0 after (window / k) · ln((r − C) / ((k − 1) · C))
    // = 60 s · ln 9 ≈ 131.8 s, give or take one slot.
    let recovery = Duration::from_secs(300);
    let (k, r, c) = (2.0, f64::from(RATE), 10.0);
    let predicted = WINDOW.as_secs_f64() / k * ((r - c) / ((k - 1.0) * c)).ln();
    let slot = WINDOW.as_secs_f64() / 10.0;
    let layer = layer(42);
    let log = drive(
        layer.layer(overloaded_until(10, recovery)),
        &layer,
        Duration::from_secs(600),
        request,
    )
    .await;
    let fade = (last_rejection(&log).unwrap() - recovery).as_secs_f64();
    assert!(
        (predicted - slot..=predicted + slot).contains(&fade),
        "throttling lasted {fade} s after the overload, predicted {predicted} s"
    );
    assert!(
        between(
            &log,
            recovery + Duration::from_secs_f64(predicted + slot),
            Duration::MAX
        )
        .iter()
        .all(|s| s.probability == 0.0)
    );
}

fn layer_counting_only_sent(seed: u64) -> RetryBudgetLayer {
    let config = AdaptiveThrottleConfig {
        count_local_rejections: false,
        ..AdaptiveThrottleConfig::default()
    };
    RetryBudgetLayer::builder(WindowedBudget::default())
        .adaptive_throttle(AdaptiveThrottle::with_seed(config, seed).unwrap())
        .build()
}

#[tokio::test(start_paused = true)]
async fn counting_only_sent_requests_throttling_is_gone_one_window_after_a_total_outage() {
    let recovery = Duration::from_secs(300);
    let layer = layer_counting_only_sent(42);
    let log = drive(
        layer.layer(overloaded_until(0, recovery)),
        &layer,
        Duration::from_secs(600),
        request,
    )
    .await;
    // During the outage: what the formula allows over sent requests only, about
    // √(rate / window) ≈ 0.9 per second (a request goes out with probability
    // 1/(S + 1) and S ≈ √(rate · window) are in the window).
    let outage = between(&log, WINDOW, recovery);
    let (sent, _) = assert_sent_matches_formula(&outage);
    let per_second = sent as f64 / (recovery - WINDOW).as_secs_f64();
    assert!(
        (0.6..1.2).contains(&per_second),
        "{per_second} per second during the outage"
    );
    // After it: still throttled at first, fully open one window later at the latest.
    assert!(
        between(&log, recovery, recovery + Duration::from_secs(1))
            .iter()
            .any(|s| s.rejected_locally)
    );
    let last = last_rejection(&log).unwrap();
    assert!(last < recovery + WINDOW, "last local rejection at {last:?}");
    assert!(
        between(&log, recovery + WINDOW, Duration::MAX)
            .iter()
            .all(|s| s.probability == 0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn counting_only_sent_requests_an_overloaded_provider_gets_sqrt_k_c_r() {
    let layer = layer_counting_only_sent(42);
    let log = drive(
        layer.layer(overloaded_until(10, Duration::MAX)),
        &layer,
        Duration::from_secs(600),
        request,
    )
    .await;
    let settled = between(&log, 2 * WINDOW, Duration::MAX);
    let (sent, _) = assert_sent_matches_formula(&settled);
    let per_second = sent as f64 / (Duration::from_secs(600) - 2 * WINDOW).as_secs_f64();
    let predicted = (2.0f64 * 10.0 * f64::from(RATE)).sqrt(); // 44.7
    assert!(
        (per_second - predicted).abs() < 0.1 * predicted,
        "{per_second} per second, predicted {predicted}"
    );
}
