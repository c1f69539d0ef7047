//! The layer's plumbing: handle, deposits, shared state, errors, readiness, metrics.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use backstop_budget::{
    AdaptiveThrottle, AdaptiveThrottleConfig, BudgetModel, ClassifiedError, FailureKind,
    METRIC_DEPOSITS, METRIC_LOCAL_REJECTIONS, METRIC_RETRIES_ALLOWED, METRIC_RETRIES_REFUNDED,
    METRIC_RETRIES_REFUSED, RetryBudgetHandle, RetryBudgetLayer, RetryThrottle,
    RetryThrottleConfig, WindowedBudget, WindowedBudgetConfig,
};
use backstop_classify::{Failure, FallbackRoute};
use support::{Provider, ScriptedRetry, request};
use tower::{Layer, Service, ServiceExt, service_fn};

fn ratio_budget(ratio: f64) -> WindowedBudget {
    WindowedBudget::new(WindowedBudgetConfig {
        window: Duration::from_secs(10),
        min_retries_per_sec: 0.0,
        retry_ratio: ratio,
    })
    .unwrap()
}

/// The budget handle the layer put on `req`.
fn budget_of(req: &http::Request<String>) -> RetryBudgetHandle {
    req.extensions()
        .get::<RetryBudgetHandle>()
        .cloned()
        .expect("the budget layer adds a handle to every request")
}

/// The bodies of two requests sent one after the other (the inner services below
/// answer whether the budget allowed their retry).
async fn two_requests<S>(svc: S) -> [String; 2]
where
    S: Service<http::Request<String>, Response = http::Response<String>> + Clone,
    S::Error: std::fmt::Debug,
{
    let first = svc.clone().oneshot(request(1)).await.unwrap();
    let second = svc.oneshot(request(2)).await.unwrap();
    [first.into_body(), second.into_body()]
}

#[tokio::test(start_paused = true)]
async fn every_request_gets_a_handle_to_the_shared_budget_after_its_deposit() {
    let layer = RetryBudgetLayer::new(ratio_budget(0.5));
    let inner = service_fn(|req: http::Request<String>| async move {
        let handle = budget_of(&req);
        // Two requests at 50 %: the second one finds one retry's worth.
        let allowed = handle.0.try_withdraw();
        Ok::<_, ClassifiedError>(http::Response::new(allowed.to_string()))
    });
    let svc = layer.layer(inner);
    assert_eq!(two_requests(svc).await, ["false", "true"]);
    let s = layer.snapshot();
    assert_eq!(
        (s.deposits, s.retries_allowed, s.retries_refused),
        (2, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn clones_of_the_layer_and_its_services_share_one_budget() {
    let layer = RetryBudgetLayer::new(ratio_budget(0.1));
    let provider = Provider::always(200);
    let a = layer.clone().layer(provider.clone());
    let b = layer.layer(provider.clone());
    for id in 0..5 {
        a.clone().oneshot(request(id)).await.unwrap();
        b.clone().oneshot(request(id)).await.unwrap();
    }
    assert_eq!(layer.snapshot().deposits, 10);
    assert_eq!(layer.snapshot().retries_available, 1);
    assert_eq!(provider.attempts(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_refused_retry_returns_the_last_outcome_after_exactly_the_allowed_attempts() {
    // 10 requests at 10 % pay for exactly one retry; every request fails.
    let layer = RetryBudgetLayer::new(ratio_budget(0.1));
    let provider = Provider::always(500);
    let svc = layer.layer(ScriptedRetry::new(provider.clone(), 3, Duration::ZERO));
    for id in 0..9 {
        let r = svc.clone().oneshot(request(id)).await.unwrap();
        assert_eq!(r.status(), 500);
    }
    assert_eq!(provider.attempts(), 9, "0.9 of a retry is not a retry");
    let r = svc.clone().oneshot(request(9)).await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        provider.attempts(),
        11,
        "the tenth request got one retry, not three"
    );
}

#[tokio::test(start_paused = true)]
async fn a_locally_rejected_request_never_reaches_the_inner_service() {
    let throttle = AdaptiveThrottle::with_seed(AdaptiveThrottleConfig::default(), 3).unwrap();
    let layer = RetryBudgetLayer::builder(ratio_budget(0.1))
        .adaptive_throttle(throttle)
        .build();
    let provider = Provider::always(503);
    let svc = layer.layer(provider.clone());
    let mut rejected = None;
    for id in 0..200 {
        if let Err(e) = svc.clone().oneshot(request(id)).await {
            rejected.get_or_insert(e);
        }
    }
    let error = rejected.expect("a provider refusing 200 requests gets throttled");
    let throttle = layer.throttle_snapshot().unwrap();
    assert_eq!(provider.attempts(), 200 - throttle.local_rejections);
    assert_eq!(layer.snapshot().deposits, provider.attempts());
    assert_eq!(error.kind(), FailureKind::Throttled);
    assert!(error.kind().another_model_may_serve());
    assert_eq!(error.failure().fallback_route(), FallbackRoute::NextModel);
    assert!(
        error.to_string().starts_with(
            "throttled: rejected locally by adaptive throttling (rejection probability 0."
        ),
        "{error}"
    );
}

#[tokio::test]
async fn an_inner_classified_error_passes_through_unchanged() {
    let layer = RetryBudgetLayer::new(ratio_budget(0.1));
    let svc = layer.layer(service_fn(|_: http::Request<String>| async {
        Err::<http::Response<String>, _>(ClassifiedError::local(Failure::new(
            FailureKind::QuotaExhausted,
        )))
    }));
    let e = svc.oneshot(request(1)).await.unwrap_err();
    assert_eq!(e.kind(), FailureKind::QuotaExhausted);
}

#[tokio::test]
async fn other_inner_errors_are_classified_as_transport_errors() {
    let layer = RetryBudgetLayer::new(ratio_budget(0.1));
    let refused = layer.layer(service_fn(|_: http::Request<String>| async {
        Err::<http::Response<String>, _>(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))
    }));
    let e = refused.oneshot(request(1)).await.unwrap_err();
    assert_eq!(e.kind(), FailureKind::ConnectFailed);
    let odd = layer.layer(service_fn(|_: http::Request<String>| async {
        Err::<http::Response<String>, _>(std::fmt::Error)
    }));
    let e = odd.oneshot(request(1)).await.unwrap_err();
    assert_eq!(e.kind(), FailureKind::ConnectionLost);
}

/// Not ready until `open` is set; counts polls.
#[derive(Clone)]
struct Gate {
    open: Arc<AtomicBool>,
    polls: Arc<AtomicUsize>,
}

impl Service<http::Request<String>> for Gate {
    type Response = http::Response<String>;
    type Error = ClassifiedError;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _: http::Request<String>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(String::new())))
    }
}

#[test]
fn poll_ready_forwards_the_inner_readiness() {
    let gate = Gate {
        open: Arc::default(),
        polls: Arc::default(),
    };
    let mut svc = RetryBudgetLayer::new(ratio_budget(0.1)).layer(gate.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut poll =
        |cx: &mut Context<'_>| Service::<http::Request<String>>::poll_ready(&mut svc, cx);
    assert!(poll(&mut cx).is_pending());
    gate.open.store(true, Ordering::SeqCst);
    assert!(matches!(poll(&mut cx), Poll::Ready(Ok(()))));
    assert_eq!(gate.polls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_throttle_hears_of_each_failed_attempt_exactly_once() {
    let layer = RetryBudgetLayer::new(
        RetryThrottle::new(RetryThrottleConfig {
            max_tokens: 4,
            token_ratio: 0.5,
        })
        .unwrap(),
    );
    let provider = Provider::new(|_, id, _| match id {
        0 => 500,
        1 => 400,
        _ => 200,
    });
    let svc = layer.layer(ScriptedRetry::new(provider.clone(), 3, Duration::ZERO));
    // Request 0: attempt 1 fails (4 → 3, retry allowed), attempt 2 fails (3 → 2,
    // retry refused). Its final outcome is that second failure: not counted again.
    svc.clone().oneshot(request(0)).await.unwrap();
    assert_eq!(provider.attempts(), 2);
    assert_eq!(layer.snapshot().balance, 2.0);
    // A client error says nothing about the upstream: no change.
    svc.clone().oneshot(request(1)).await.unwrap();
    assert_eq!(layer.snapshot().balance, 2.0);
    // A success gives back half a token.
    svc.clone().oneshot(request(2)).await.unwrap();
    assert_eq!(layer.snapshot().balance, 2.5);
    // A failure that was not retried (no retry layer) costs one token at the end.
    let bare = layer.layer(Provider::always(503));
    bare.oneshot(request(3)).await.unwrap();
    assert_eq!(layer.snapshot().balance, 1.5);
}

/// An inner service that does what the retry layer does for a retry it decides on
/// and then does not make (its upstream's pace had no slot, the caller gave up during
/// the wait): asks the budget, gives an allowed withdrawal back, and answers with the
/// failure that led to it.
fn withdraws_then_refunds() -> impl Service<
    http::Request<String>,
    Response = http::Response<String>,
    Error = ClassifiedError,
    Future: Send,
> + Clone {
    service_fn(|req: http::Request<String>| async move {
        let handle = budget_of(&req);
        let allowed = handle.0.try_withdraw();
        handle.0.refund();
        // The retry layer gives a withdrawal back once; a second call changes nothing.
        handle.0.refund();
        let mut response = http::Response::new(allowed.to_string());
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, ClassifiedError>(response)
    })
}

#[tokio::test(start_paused = true)]
async fn a_withdrawal_given_back_restores_the_retry_and_is_counted() {
    let recorded = Recorded::default();
    let layer = metrics::with_local_recorder(&recorded, || {
        RetryBudgetLayer::builder(ratio_budget(0.5))
            .name("openai")
            .build()
    });
    // Two requests at 50 %: the first finds half a retry (refused, so there is
    // nothing to give back), the second one retry, allowed and given back.
    let svc = layer.layer(withdraws_then_refunds());
    assert_eq!(two_requests(svc).await, ["false", "true"]);
    let s = layer.snapshot();
    assert_eq!(
        (
            s.deposits,
            s.retries_allowed,
            s.retries_refused,
            s.retries_refunded
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(s.balance, 1.0, "the retry that was not made is not spent");
    assert_eq!(s.retries_available, 1);
    assert_eq!(recorded.get(METRIC_RETRIES_REFUNDED, "openai"), 1);
    assert_eq!(recorded.get(METRIC_RETRIES_ALLOWED, "openai"), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_throttle_counts_a_refund_but_hears_of_the_failure_once() {
    let layer = RetryBudgetLayer::new(
        RetryThrottle::new(RetryThrottleConfig {
            max_tokens: 4,
            token_ratio: 0.5,
        })
        .unwrap(),
    );
    let svc = layer.layer(withdraws_then_refunds());
    // The withdrawal recorded the failed attempt (4 → 3) and allowed the retry; the
    // retry was not made, so the request ends on that same failure: not counted again,
    // and no token comes back (the failure happened).
    let response = svc.oneshot(request(0)).await.unwrap();
    assert_eq!(response.body(), "true");
    let s = layer.snapshot();
    assert_eq!(s.balance, 3.0);
    assert_eq!((s.retries_allowed, s.retries_refunded), (1, 1));
}

/// A metrics recorder keeping each counter in an atomic, keyed by name and labels.
#[derive(Default)]
struct Recorded(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Recorded {
    fn get(&self, name: &str, budget: &str) -> u64 {
        let key = format!("{name}{{budget={budget}}}");
        self.0
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl metrics::Recorder for Recorded {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let counter = self.0.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[tokio::test(start_paused = true)]
async fn metrics_count_deposits_retries_and_local_rejections_under_the_budget_name() {
    let recorded = Recorded::default();
    let layer = metrics::with_local_recorder(&recorded, || {
        RetryBudgetLayer::builder(ratio_budget(0.2))
            .name("openai")
            .adaptive_throttle(
                AdaptiveThrottle::with_seed(AdaptiveThrottleConfig::default(), 5).unwrap(),
            )
            .build()
    });
    let provider = Provider::always(500);
    let svc = layer.layer(ScriptedRetry::new(provider.clone(), 1, Duration::ZERO));
    for id in 0..100 {
        let _ = svc.clone().oneshot(request(id)).await;
    }
    let budget = layer.snapshot();
    let throttle = layer.throttle_snapshot().unwrap();
    assert!(throttle.local_rejections > 0 && budget.retries_refused > 0);
    // With seed 5, 19 requests pass the throttle (nothing succeeds, so its rejection
    // probability climbs to 19/20) and 81 are rejected locally. The 19 deposits at
    // 0.2 make 3.8 retries, no reserve: 3 allowed, the other 16 refused.
    assert_eq!(throttle.local_rejections, 81);
    assert_eq!(throttle.requests, 19);
    assert_eq!(throttle.accepts, 0);
    assert_eq!(budget.deposits, 19);
    assert_eq!(budget.retries_allowed, 3);
    assert_eq!(budget.retries_refused, 16);
    assert_eq!(recorded.get(METRIC_DEPOSITS, "openai"), budget.deposits);
    assert_eq!(
        recorded.get(METRIC_RETRIES_ALLOWED, "openai"),
        budget.retries_allowed
    );
    assert_eq!(
        recorded.get(METRIC_RETRIES_REFUSED, "openai"),
        budget.retries_refused
    );
    assert_eq!(
        recorded.get(METRIC_LOCAL_REJECTIONS, "openai"),
        throttle.local_rejections
    );
    assert_eq!(budget.deposits + throttle.local_rejections, 100);
}

/// A model that refuses every retry and counts how the layer drives it.
#[derive(Default)]
struct Ledger {
    deposits: AtomicU64,
    withdrawals: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
}

impl backstop_budget::RetryBudget for Ledger {
    fn try_withdraw(&self) -> bool {
        self.withdrawals.fetch_add(1, Ordering::SeqCst);
        false
    }
}

impl BudgetModel for Ledger {
    fn deposit(&self) {
        self.deposits.fetch_add(1, Ordering::SeqCst);
    }
    fn record_success(&self) {
        self.successes.fetch_add(1, Ordering::SeqCst);
    }
    fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::SeqCst);
    }
    fn snapshot(&self) -> backstop_budget::BudgetSnapshot {
        let mut s = backstop_budget::BudgetSnapshot::new("ledger");
        s.deposits = self.deposits.load(Ordering::SeqCst);
        s
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_model_is_driven_exactly_as_the_trait_documents() {
    let layer = RetryBudgetLayer::new(Ledger::default());
    let provider = Provider::new(|_, id, _| if id == 0 { 500 } else { 200 });
    let retrying = layer.layer(ScriptedRetry::new(provider.clone(), 3, Duration::ZERO));
    retrying.clone().oneshot(request(0)).await.unwrap();
    retrying.clone().oneshot(request(1)).await.unwrap();
    // Without a retry layer, a failure is reported at the end.
    layer
        .layer(Provider::always(503))
        .oneshot(request(2))
        .await
        .unwrap();
    let m = layer.model();
    let counts = |c: &AtomicU64| c.load(Ordering::SeqCst);
    assert_eq!(counts(&m.deposits), 3);
    assert_eq!(
        counts(&m.withdrawals),
        1,
        "request 0 asked once and was refused"
    );
    assert_eq!(counts(&m.successes), 1);
    assert_eq!(
        counts(&m.failures),
        1,
        "request 0's refused attempt is not reported twice"
    );
    assert_eq!(provider.attempts(), 2);
    assert_eq!(layer.snapshot().model, "ledger");
    assert_eq!(layer.snapshot().deposits, 3);
}

#[tokio::test(start_paused = true)]
async fn with_the_real_retry_layer_a_refused_retry_stops_with_budget_exhausted() {
    use backstop_classify::{AttemptLog, StopReason};
    use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
    use backstop_retry::{RetryConfig, RetryLayer};

    let mock = MockProvider::new(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiServerError)),
    );
    // 10 % and no floor: the first nine requests cannot pay for a retry, the tenth can.
    let layer = RetryBudgetLayer::new(ratio_budget(0.1));
    let retry =
        RetryLayer::new(RetryConfig::interactive().with_max_attempts(4).unwrap()).with_rng_seed(1);
    let svc = layer.layer(retry.layer(mock.clone()));
    let call = || {
        svc.clone().oneshot(
            http::Request::post("/v1/chat/completions")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"model":"gpt-4o","messages":[]}"#,
                )))
                .unwrap(),
        )
    };
    for _ in 0..9 {
        let response = call().await.unwrap();
        assert_eq!(response.status(), 500);
        let log = response.extensions().get::<AttemptLog>().unwrap();
        assert_eq!(log.attempts.len(), 1);
        assert_eq!(log.stop, Some(StopReason::BudgetExhausted));
    }
    let response = call().await.unwrap();
    let log = response.extensions().get::<AttemptLog>().unwrap();
    assert_eq!(
        (log.attempts.len(), log.stop),
        (2, Some(StopReason::BudgetExhausted))
    );
    assert_eq!(mock.attempt_count(), 11);
    let s = layer.snapshot();
    assert_eq!(
        (s.deposits, s.retries_allowed, s.retries_refused),
        (10, 1, 10)
    );
}
