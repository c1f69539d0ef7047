//! The tower layer against small fakes: what the caller receives (extensions, bytes,
//! frame timing, errors) for every kind of outcome.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backstop_classify::{
    BackstopClassifier, Classification, ClassifiedError, ClassifyLayer, Failure, FailureKind,
    HintSource, Idempotent, Retryable, Rules,
};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body fed by the test through a channel, one frame at a time; it counts how many
/// frames the layer (or the caller) has pulled out of it.
struct ChannelBody {
    frames: mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>,
    pulled: Arc<AtomicUsize>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = self.frames.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &polled {
            self.pulled.fetch_add(1, Ordering::SeqCst);
        }
        polled
    }
}

type Feed = mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>;

fn channel_body() -> (Feed, ChannelBody, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pulled = Arc::new(AtomicUsize::new(0));
    (
        tx,
        ChannelBody {
            frames: rx,
            pulled: Arc::clone(&pulled),
        },
        pulled,
    )
}

fn data(bytes: &'static [u8]) -> Result<Frame<Bytes>, std::io::Error> {
    Ok(Frame::data(Bytes::from_static(bytes)))
}

/// A service answering once with `response` (taken on first call).
fn answer_once<B: Send + 'static>(
    response: Response<B>,
) -> impl Service<Request<()>, Response = Response<B>, Error = Infallible> {
    let slot = std::sync::Mutex::new(Some(response));
    tower::service_fn(move |_req: Request<()>| {
        let response = slot.lock().unwrap().take().expect("called once");
        async move { Ok::<_, Infallible>(response) }
    })
}

fn classification<B>(response: &Response<B>) -> Classification {
    response
        .extensions()
        .get::<Classification>()
        .cloned()
        .expect("every response carries a classification")
}

fn failure<B>(response: &Response<B>) -> Failure {
    classification(response)
        .failure()
        .cloned()
        .expect("a failure")
}

/// Fails (in virtual time, at once) instead of hanging when the layer waits for
/// more of a body than it should.
async fn within_a_second<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(1), future)
        .await
        .expect("the layer waited for frames that were never sent")
}

#[tokio::test(start_paused = true)]
async fn sse_success_passes_through_frame_by_frame() {
    let (feed, body, pulled) = channel_body();
    let response = Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap();
    let service = ClassifyLayer::default().layer(answer_once(response));

    // Only the head has arrived: the response must reach the caller already.
    let response = within_a_second(service.oneshot(Request::new(())))
        .await
        .unwrap();
    assert_eq!(classification(&response), Classification::Success);
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        0,
        "a success is never read ahead"
    );

    let mut body = response.into_body();
    feed.send(data(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    ))
    .unwrap();
    let first = within_a_second(body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(
        &first[..],
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n"
    );
    // The second frame does not exist yet, and the first already reached the caller.
    assert_eq!(pulled.load(Ordering::SeqCst), 1);
    assert!(
        body.frame().now_or_never().is_none(),
        "nothing is invented or held"
    );

    feed.send(data(b"data: [DONE]\n\n")).unwrap();
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"data: [DONE]\n\n");
    drop(feed);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn success_mid_stream_error_reaches_the_caller_unchanged() {
    let (feed, body, _) = channel_body();
    let service = ClassifyLayer::default().layer(answer_once(Response::new(body)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    let mut body = response.into_body();
    feed.send(data(b"data: {}\n\n")).unwrap();
    feed.send(Err(std::io::Error::from(
        std::io::ErrorKind::ConnectionReset,
    )))
    .unwrap();
    assert_eq!(
        &body.frame().await.unwrap().unwrap().into_data().unwrap()[..],
        b"data: {}\n\n"
    );
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn error_body_is_classified_and_replayed_byte_for_byte() {
    const BODY: &[u8] =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let (feed, body, _) = channel_body();
    // Split awkwardly, mid-token.
    feed.send(Ok(Frame::data(Bytes::from_static(&BODY[..7]))))
        .unwrap();
    feed.send(Ok(Frame::data(Bytes::from_static(&BODY[7..40]))))
        .unwrap();
    feed.send(Ok(Frame::data(Bytes::from_static(&BODY[40..]))))
        .unwrap();
    drop(feed);
    let response = Response::builder()
        .status(529)
        .header("retry-after", "3")
        .body(body)
        .unwrap();
    let service = ClassifyLayer::new(Rules::anthropic()).layer(answer_once(response));

    let response = service.oneshot(Request::new(())).await.unwrap();
    let f = failure(&response);
    assert_eq!(
        (f.kind, f.retryable),
        (FailureKind::Overloaded, Retryable::Yes)
    );
    assert_eq!(
        f.hint.map(|h| (h.delay, h.source)),
        Some((Duration::from_secs(3), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        f.provider_error.and_then(|p| p.error_type).as_deref(),
        Some("overloaded_error")
    );
    assert_eq!(response.status(), 529);
    assert_eq!(response.headers()["retry-after"], "3");

    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    // The same frames, in the same order.
    assert_eq!(frames, [&BODY[..7], &BODY[7..40], &BODY[40..]]);
}

#[tokio::test(start_paused = true)]
async fn body_over_the_cap_is_classified_by_status_and_delivered_whole() {
    const QUOTA: &[u8] =
        br#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"quota"}}"#;
    let (feed, body, pulled) = channel_body();
    feed.send(Ok(Frame::data(Bytes::from_static(&QUOTA[..10]))))
        .unwrap();
    feed.send(Ok(Frame::data(Bytes::from_static(&QUOTA[10..20]))))
        .unwrap();
    feed.send(Ok(Frame::data(Bytes::from_static(&QUOTA[20..]))))
        .unwrap();
    let response = Response::builder().status(429).body(body).unwrap();
    let service = ClassifyLayer::new(Rules::openai())
        .with_max_error_body(15)
        .layer(answer_once(response));

    // The sender is still open: the layer must stop reading past the cap, not wait
    // for the end.
    let response = within_a_second(service.oneshot(Request::new(())))
        .await
        .unwrap();
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        2,
        "read until more than 15 bytes were held"
    );
    assert_eq!(failure(&response).kind, FailureKind::RateLimited);

    feed.send(Ok(Frame::data(Bytes::from_static(b" trailing"))))
        .unwrap();
    drop(feed);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let mut want = QUOTA.to_vec();
    want.extend_from_slice(b" trailing");
    assert_eq!(&bytes[..], &want[..]);
}

#[tokio::test]
async fn body_exactly_at_the_cap_is_inspected() {
    const QUOTA: &[u8] =
        br#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"quota"}}"#;
    let response = Response::builder()
        .status(429)
        .body(Full::new(Bytes::from_static(QUOTA)))
        .unwrap();
    let service = ClassifyLayer::new(Rules::openai())
        .with_max_error_body(QUOTA.len())
        .layer(answer_once(response));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(failure(&response).kind, FailureKind::QuotaExhausted);
}

#[tokio::test]
async fn mid_read_error_is_redelivered_in_place_and_status_decides() {
    let (feed, body, _) = channel_body();
    feed.send(data(br#"{"error":{"code":"insufficient_qu"#))
        .unwrap();
    feed.send(Err(std::io::Error::from(
        std::io::ErrorKind::ConnectionReset,
    )))
    .unwrap();
    let response = Response::builder().status(429).body(body).unwrap();
    let service = ClassifyLayer::default().layer(answer_once(response));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(failure(&response).kind, FailureKind::RateLimited);

    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], br#"{"error":{"code":"insufficient_qu"#);
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn trailers_after_an_error_body_are_kept() {
    let (feed, body, _) = channel_body();
    feed.send(data(
        br#"{"error":{"code":"model_not_found","message":"no"}}"#,
    ))
    .unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "5".parse().unwrap());
    feed.send(Ok(Frame::trailers(trailers.clone()))).unwrap();
    drop(feed);
    let response = Response::builder().status(404).body(body).unwrap();
    let service = ClassifyLayer::default().layer(answer_once(response));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(failure(&response).kind, FailureKind::ModelNotFound);
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers));
    assert_eq!(
        &collected.to_bytes()[..],
        br#"{"error":{"code":"model_not_found","message":"no"}}"#
    );
}

#[tokio::test]
async fn empty_error_body_classifies_by_status() {
    let response = Response::builder()
        .status(504)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let service = ClassifyLayer::default().layer(answer_once(response));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(failure(&response).kind, FailureKind::ServerError);
    assert!(response.body().is_end_stream());
    assert!(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty()
    );
}

#[tokio::test]
async fn http_date_hints_use_the_injected_clock() {
    fn clock() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_755_780_000) // Thu, 21 Aug 2025 12:40:00 GMT
    }
    let response = Response::builder()
        .status(503)
        .header("retry-after", "Thu, 21 Aug 2025 12:40:42 GMT")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let service = ClassifyLayer::default()
        .with_clock(clock)
        .layer(answer_once(response));
    let response = service.oneshot(Request::new(())).await.unwrap();
    let hint = failure(&response).hint.unwrap();
    assert_eq!(
        (hint.delay, hint.source),
        (Duration::from_secs(42), HintSource::RetryAfterDate)
    );
}

fn failing_with(
    error: impl Fn() -> BoxError + Clone + Send + 'static,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = BoxError> {
    tower::service_fn(move |_req: Request<()>| {
        let error = error.clone();
        async move { Err::<Response<Full<Bytes>>, _>(error()) }
    })
}

async fn call_err<S>(service: S, request: Request<()>) -> ClassifiedError
where
    S: Service<Request<()>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    ClassifyLayer::default()
        .layer(service)
        .oneshot(request)
        .await
        .expect_err("the inner service failed")
}

#[tokio::test]
async fn transport_errors_become_classified_errors_with_their_cause() {
    let err = call_err(
        failing_with(|| std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into()),
        Request::new(()),
    )
    .await;
    assert_eq!(err.kind(), FailureKind::ConnectFailed);
    assert_eq!(err.failure().retryable, Retryable::Yes);
    let cause = err
        .cause()
        .unwrap()
        .downcast_ref::<std::io::Error>()
        .unwrap();
    assert_eq!(cause.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn reset_after_send_stays_if_idempotent_even_for_idempotent_requests() {
    let reset = || -> BoxError { std::io::Error::from(std::io::ErrorKind::ConnectionReset).into() };
    let mut idempotent = Request::new(());
    idempotent.extensions_mut().insert(Idempotent);
    for request in [Request::new(()), idempotent] {
        let err = call_err(failing_with(reset), request).await;
        assert_eq!(err.kind(), FailureKind::ConnectionLost);
        assert_eq!(err.failure().retryable, Retryable::IfIdempotent);
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_inside_the_inner_service_is_timed_out() {
    let slow = tower::service_fn(|_req: Request<()>| async {
        std::future::pending::<()>().await;
        Ok::<Response<Full<Bytes>>, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let inner = tower::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(slow);
    let err = ClassifyLayer::default()
        .layer(inner)
        .oneshot(Request::new(()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), FailureKind::TimedOut);
    assert_eq!(err.failure().retryable, Retryable::IfIdempotent);
}

#[tokio::test]
async fn an_inner_classified_error_keeps_its_verdict() {
    let err = call_err(
        failing_with(|| ClassifiedError::local(Failure::new(FailureKind::BreakerOpen)).into()),
        Request::new(()),
    )
    .await;
    assert_eq!(err.kind(), FailureKind::BreakerOpen);
    assert!(err.cause().is_none(), "not wrapped a second time");
}

/// A service whose readiness fails: the error must surface from `poll_ready`.
#[derive(Clone)]
struct NeverReady;

impl Service<Request<()>> for NeverReady {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Err(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        panic!("called without being ready")
    }
}

#[tokio::test]
async fn poll_ready_errors_propagate_classified() {
    let mut service = ClassifyLayer::default().layer(NeverReady);
    let err = std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), FailureKind::ConnectFailed);
}

#[tokio::test]
async fn poll_ready_pending_propagates() {
    let (mut handle_service, mut handle) = tower_test_pair();
    handle.allow(0);
    let polled = std::future::poll_fn(|cx| Poll::Ready(handle_service.poll_ready(cx))).await;
    assert!(polled.is_pending());
    handle.allow(1);
    let polled = std::future::poll_fn(|cx| Poll::Ready(handle_service.poll_ready(cx))).await;
    assert!(matches!(polled, Poll::Ready(Ok(()))));
}

/// A minimal readiness-gated service (tower's `mock` module is not in tower 0.5's
/// public features, so this stands in).
struct Gate(Arc<AtomicUsize>);
struct GateHandle(Arc<AtomicUsize>);

impl GateHandle {
    fn allow(&mut self, n: usize) {
        self.0.store(n, Ordering::SeqCst);
    }
}

impl Service<Request<()>> for Gate {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.0.load(Ordering::SeqCst) > 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
    }
}

fn tower_test_pair() -> (backstop_classify::Classify<Gate>, GateHandle) {
    let permits = Arc::new(AtomicUsize::new(0));
    (
        ClassifyLayer::default().layer(Gate(Arc::clone(&permits))),
        GateHandle(permits),
    )
}

#[tokio::test]
async fn trace_classifier_reuses_the_layer_verdict_and_classifies_errors() {
    use tower_http::classify::{ClassifiedResponse, ClassifyResponse, MakeClassifier};

    // A response that went through the layer: the body-based verdict is kept.
    let response = Response::builder()
        .status(429)
        .body(Full::new(Bytes::from_static(
            br#"{"error":{"code":"insufficient_quota"}}"#,
        )))
        .unwrap();
    let response = ClassifyLayer::default()
        .layer(answer_once(response))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    let classifier = BackstopClassifier::default().make_classifier(&Request::new(()));
    match classifier.classify_response(&response) {
        ClassifiedResponse::Ready(Err(f)) => assert_eq!(f.kind, FailureKind::QuotaExhausted),
        _ => panic!("a failure, ready"),
    }
    // A bare response: status and headers.
    let bare = Response::builder().status(503).body(()).unwrap();
    match BackstopClassifier::new(Rules::openai()).classify_response(&bare) {
        ClassifiedResponse::Ready(Err(f)) => assert_eq!(f.kind, FailureKind::Overloaded),
        _ => panic!("a failure, ready"),
    }
    let ok = Response::builder().status(StatusCode::OK).body(()).unwrap();
    assert!(matches!(
        BackstopClassifier::default().classify_response(&ok),
        ClassifiedResponse::Ready(Ok(()))
    ));
    // Errors.
    let classified = ClassifiedError::local(Failure::new(FailureKind::Throttled));
    assert_eq!(
        BackstopClassifier::default()
            .classify_error(&classified)
            .kind,
        FailureKind::Throttled
    );
    let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        BackstopClassifier::default().classify_error(&io).kind,
        FailureKind::ConnectFailed
    );
    let boxed: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut));
    assert_eq!(
        BackstopClassifier::default().classify_error(&boxed).kind,
        FailureKind::TimedOut
    );
    assert_eq!(
        BackstopClassifier::default().classify_error(&"text").kind,
        FailureKind::ConnectionLost
    );
}

#[tokio::test]
async fn trace_layer_accepts_the_classifier() {
    use tower_http::trace::TraceLayer;
    let provider = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let response = Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"x")));
        Ok::<_, Infallible>(response.unwrap())
    });
    let service = tower::ServiceBuilder::new()
        .layer(TraceLayer::new(BackstopClassifier::default()))
        .layer(ClassifyLayer::default())
        .service(provider);
    let response = service
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(
        &response.into_body().collect().await.unwrap().to_bytes()[..],
        b"x"
    );
}

/// Always ready with an empty data frame, `empty` times, then `tail`, then the end.
struct EmptyFrames {
    empty: usize,
    tail: Option<Bytes>,
}

impl Body for EmptyFrames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.empty > 0 {
            self.empty -= 1;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::new()))));
        }
        Poll::Ready(self.tail.take().map(|tail| Ok(Frame::data(tail))))
    }
}

#[tokio::test]
async fn an_always_ready_body_of_empty_frames_never_monopolises_a_poll() {
    let endless = EmptyFrames {
        empty: usize::MAX,
        tail: None,
    };
    let response = Response::builder().status(500).body(endless).unwrap();
    let future = ClassifyLayer::default()
        .layer(answer_once(response))
        .oneshot(Request::new(()));
    // One poll returns (Pending, having asked to be woken) instead of spinning forever.
    assert!(future.now_or_never().is_none());

    // A finite run of empty frames still ends in a classified, exact body.
    let body = EmptyFrames {
        empty: 1_000,
        tail: Some(Bytes::from_static(
            br#"{"error":{"code":"insufficient_quota"}}"#,
        )),
    };
    let response = Response::builder().status(429).body(body).unwrap();
    let response = ClassifyLayer::default()
        .layer(answer_once(response))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert_eq!(failure(&response).kind, FailureKind::QuotaExhausted);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], br#"{"error":{"code":"insufficient_quota"}}"#);
}
