//! The tower layer in virtual time, against a scripted fake upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer, BreakerState, TransitionReason};
use backstop_classify::{
    Classification, ClassifiedError, DelayHint, Failure, FailureKind, HintSource, ModelRoute,
};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the fake upstream does with the next calls.
#[derive(Clone)]
enum Script {
    Ok,
    Fail(Failure),
    /// An error that is not a `ClassifiedError`, as a raw transport would return.
    RawError,
    /// A refused connection, as a raw transport would return.
    Refused,
    /// Never answers.
    Hang,
}

#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    script: Arc<Mutex<Script>>,
}

impl Upstream {
    fn new() -> Self {
        Upstream {
            calls: Arc::new(AtomicUsize::new(0)),
            script: Arc::new(Mutex::new(Script::Ok)),
        }
    }

    fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The fake as a tower service (clones share the script and the count).
    fn service(&self) -> Upstream {
        self.clone()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Request<String>> for Upstream {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<String>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<String>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let script = self.script.lock().unwrap().clone();
        Box::pin(async move {
            match script {
                Script::Ok => {
                    let mut response = Response::new("ok".to_string());
                    response.extensions_mut().insert(Classification::Success);
                    Ok(response)
                }
                Script::Fail(failure) => {
                    let mut response = Response::new("error".to_string());
                    *response.status_mut() =
                        failure.status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    response
                        .extensions_mut()
                        .insert(Classification::Failure(failure));
                    Ok(response)
                }
                Script::RawError => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                )
                .into()),
                Script::Refused => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused",
                )
                .into()),
                Script::Hang => std::future::pending().await,
            }
        })
    }
}

/// A fixed 30 s open period, hints from 1 s opening the key, and no pacing: the
/// timings of the tests that use it were written for those (the former defaults);
/// `open_period.rs` and `pacing.rs` cover the current ones.
fn fixed_open() -> BreakerConfig {
    BreakerConfig {
        open_duration: secs(30),
        max_open_duration: secs(30),
        hint_opens_at: Duration::from_secs(1),
        pacing: None,
        ..BreakerConfig::default()
    }
}

fn route(model: &str) -> ModelRoute {
    ModelRoute::new("openai", model)
}

fn request(route: &ModelRoute) -> Request<String> {
    let mut request = Request::new("{}".to_string());
    request.extensions_mut().insert(route.clone());
    request
}

fn server_error() -> Script {
    Script::Fail(
        Failure::new(FailureKind::ServerError).with_status(StatusCode::INTERNAL_SERVER_ERROR),
    )
}

fn breaker_hint(error: &ClassifiedError) -> Option<DelayHint> {
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    error.failure().hint
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn an_open_key_fails_at_once_without_calling_the_upstream() {
    let upstream = Upstream::new();
    upstream.set(server_error());
    let layer = BreakerLayer::new(fixed_open()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");

    for _ in 0..5 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request(&gpt))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(upstream.calls(), 5);
    assert_eq!(breaker.state(&gpt), BreakerState::Open);

    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(
        breaker_hint(&error),
        Some(DelayHint::new(secs(30), HintSource::Breaker))
    );
    assert_eq!(error.failure().retryable, backstop_classify::Retryable::No);

    tokio::time::advance(secs(12)).await;
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(
        breaker_hint(&error),
        Some(DelayHint::new(secs(18), HintSource::Breaker))
    );
    assert_eq!(upstream.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn the_key_recovers_through_one_probe_after_the_open_period() {
    let upstream = Upstream::new();
    upstream.set(server_error());
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");
    for _ in 0..5 {
        let _ = service.ready().await.unwrap().call(request(&gpt)).await;
    }

    tokio::time::advance(secs(30)).await;
    upstream.set(Script::Ok);
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.calls(), 6);
    assert_eq!(breaker.state(&gpt), BreakerState::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(
        snapshot[0].last_reason,
        Some(TransitionReason::ProbesSucceeded)
    );
}

#[tokio::test(start_paused = true)]
async fn keys_are_kept_per_model_route() {
    let upstream = Upstream::new();
    upstream.set(server_error());
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let (a, b) = (route("gpt-4o"), route("gpt-4o-mini"));
    for _ in 0..5 {
        let _ = service.ready().await.unwrap().call(request(&a)).await;
    }
    upstream.set(Script::Ok);
    let response = service.ready().await.unwrap().call(request(&b)).await;
    assert!(response.is_ok());
    assert_eq!(breaker.state(&a), BreakerState::Open);
    assert_eq!(breaker.state(&b), BreakerState::Closed);

    let mut keyed = a.clone();
    keyed.credential = Some("key-2".into());
    assert_eq!(breaker.state(&keyed), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_route_is_keyed_by_its_authority() {
    let upstream = Upstream::new();
    upstream.set(server_error());
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let to = |uri: &str| Request::builder().uri(uri).body(String::new()).unwrap();
    for _ in 0..5 {
        let _ = service
            .ready()
            .await
            .unwrap()
            .call(to("https://down.example/v1/chat/completions"))
            .await;
    }
    upstream.set(Script::Ok);
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(to("https://down.example/v1/chat/completions"))
            .await
            .is_err()
    );
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(to("https://up.example/v1/chat/completions"))
            .await
            .is_ok()
    );
    assert_eq!(
        breaker.state(&ModelRoute::new("down.example", "")),
        BreakerState::Open
    );
    assert_eq!(upstream.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_raw_transport_error_counts_as_a_lost_connection() {
    let upstream = Upstream::new();
    upstream.set(Script::RawError);
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");
    for _ in 0..5 {
        let error = service
            .ready()
            .await
            .unwrap()
            .call(request(&gpt))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), FailureKind::ConnectionLost);
        assert_eq!(
            error.to_string(),
            "connection_lost: connection reset by peer"
        );
    }
    assert_eq!(breaker.state(&gpt), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_classified_as_connect_failed_and_counts() {
    let upstream = Upstream::new();
    upstream.set(Script::Refused);
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");
    for _ in 0..4 {
        let error = service
            .ready()
            .await
            .unwrap()
            .call(request(&gpt))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), FailureKind::ConnectFailed);
    }
    assert_eq!(breaker.key(&gpt).unwrap().consecutive_failures, 4);
    assert_eq!(breaker.state(&gpt), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_classified_quota_error_passes_through_and_opens_for_ten_minutes() {
    let gpt = route("gpt-4o");
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let inner = tower::service_fn(move |_req: Request<String>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<Response<String>, _>(ClassifiedError::local(
                Failure::new(FailureKind::QuotaExhausted)
                    .with_status(StatusCode::TOO_MANY_REQUESTS),
            ))
        }
    });
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new().layer(layer).service(inner);
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), FailureKind::QuotaExhausted);
    assert_eq!(error.failure().status, Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(breaker.retry_in(&gpt), Some(secs(600)));
    tokio::time::advance(secs(599)).await;
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(
        breaker_hint(&error),
        Some(DelayHint::new(secs(1), HintSource::Breaker))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_on_a_429_opens_the_key_until_then() {
    let upstream = Upstream::new();
    upstream.set(Script::Fail(
        Failure::new(FailureKind::RateLimited)
            .with_status(StatusCode::TOO_MANY_REQUESTS)
            .with_hint(Some(DelayHint::new(
                secs(20),
                HintSource::RetryAfterSeconds,
            ))),
    ));
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(
        breaker_hint(&error),
        Some(DelayHint::new(secs(20), HintSource::Breaker))
    );
    tokio::time::advance(secs(20)).await;
    upstream.set(Script::Ok);
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(request(&gpt))
            .await
            .is_ok()
    );
    assert_eq!(upstream.calls(), 2);
}

/// Opens `gpt` and waits out the open period, leaving it half-open.
async fn half_open<S>(service: &mut S, upstream: &Upstream, gpt: &ModelRoute)
where
    S: Service<Request<String>, Response = Response<String>, Error = ClassifiedError>,
{
    upstream.set(server_error());
    for _ in 0..5 {
        let _ = service.ready().await.unwrap().call(request(gpt)).await;
    }
    tokio::time::advance(secs(30)).await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_slot() {
    let upstream = Upstream::new();
    let layer = BreakerLayer::new(fixed_open()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");
    half_open(&mut service, &upstream, &gpt).await;

    upstream.set(Script::Hang);
    let mut probe = Box::pin(service.ready().await.unwrap().call(request(&gpt)));
    assert!(probe.as_mut().now_or_never().is_none());
    assert_eq!(breaker.key(&gpt).unwrap().probes_in_flight, 1);
    // While the probe is out, others are refused, told to look again in 50 ms (the
    // probe has only just started; see `HALF_OPEN_RECHECK_MIN`).
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(
        breaker_hint(&error),
        Some(DelayHint::new(
            backstop_breaker::HALF_OPEN_RECHECK_MIN,
            HintSource::Breaker
        ))
    );
    drop(probe);
    assert_eq!(breaker.key(&gpt).unwrap().probes_in_flight, 0);
    assert_eq!(breaker.state(&gpt), BreakerState::HalfOpen);

    upstream.set(Script::Ok);
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(request(&gpt))
            .await
            .is_ok()
    );
    assert_eq!(upstream.calls(), 5 + 2);
    assert_eq!(breaker.state(&gpt), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_hung_probe_is_released_by_its_timeout_and_the_key_reopens() {
    let upstream = Upstream::new();
    let layer = BreakerLayer::new(fixed_open()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let gpt = route("gpt-4o");
    half_open(&mut service, &upstream, &gpt).await;

    upstream.set(Script::Hang);
    let hung = tokio::spawn(service.ready().await.unwrap().call(request(&gpt)));
    tokio::task::yield_now().await;
    tokio::time::advance(secs(60)).await;
    // The probe's time is up: it counted as a failure and the key reopened for 30 s.
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request(&gpt))
        .await
        .unwrap_err();
    assert_eq!(
        breaker_hint(&error),
        Some(DelayHint::new(secs(30), HintSource::Breaker))
    );
    assert_eq!(
        breaker.key(&gpt).unwrap().last_reason,
        Some(TransitionReason::ProbeTimedOut)
    );
    tokio::time::advance(secs(30)).await;
    upstream.set(Script::Ok);
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(request(&gpt))
            .await
            .is_ok()
    );
    assert_eq!(breaker.state(&gpt), BreakerState::Closed);
    assert_eq!(upstream.calls(), 5 + 2);
    hung.abort();
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_every_key_with_its_counts_and_deadline() {
    let upstream = Upstream::new();
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .service(upstream.service());
    let (a, b) = (route("a"), route("b"));
    upstream.set(server_error());
    for _ in 0..3 {
        let _ = service.ready().await.unwrap().call(request(&b)).await;
    }
    upstream.set(Script::Fail(Failure::new(FailureKind::QuotaExhausted)));
    let _ = service.ready().await.unwrap().call(request(&a)).await;
    tokio::time::advance(secs(100)).await;

    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.len(), 2);
    assert_eq!(snapshot[0].route, a);
    assert_eq!(snapshot[0].state, BreakerState::Open);
    assert_eq!(snapshot[0].retry_in, Some(secs(500)));
    assert_eq!(
        snapshot[0].last_reason,
        Some(TransitionReason::QuotaExhausted)
    );
    assert_eq!(snapshot[1].route, b);
    assert_eq!(snapshot[1].state, BreakerState::Closed);
    assert_eq!(snapshot[1].consecutive_failures, 3);
    // 100 s later the three failures have left the 30 s window.
    assert_eq!(
        (snapshot[1].window_calls, snapshot[1].window_failures),
        (0, 0)
    );
    assert_eq!(snapshot[1].open_until, None);
}
