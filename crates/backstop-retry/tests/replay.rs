//! The request-body adapter: any body in, a capped replayable body out.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use backstop_classify::FailureKind;
use backstop_retry::{BodyLimitError, ReplayBodyLayer, RetryConfig, RetryLayer};
use bytes::Bytes;
use common::{Fake, Step};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};

/// A body of `frames` chunks of `chunk` bytes that counts how many frames were read,
/// optionally declaring its length up front.
struct Counted {
    left: usize,
    chunk: usize,
    read: Arc<AtomicUsize>,
    declared: Option<u64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        self.read.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'a'; self.chunk])))))
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

fn counted(frames: usize, chunk: usize, declared: Option<u64>) -> (Counted, Arc<AtomicUsize>) {
    let read = Arc::new(AtomicUsize::new(0));
    (
        Counted {
            left: frames,
            chunk,
            read: read.clone(),
            declared,
        },
        read,
    )
}

fn post<B>(body: B) -> http::Request<B> {
    http::Request::post("http://provider.test/v1/chat/completions")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn a_multi_frame_body_arrives_whole_and_exact() {
    let fake = Fake::new(vec![Step::ok("{}")]);
    let svc = ReplayBodyLayer::new(100).layer_on(fake.clone());
    let (body, read) = counted(5, 20, None);
    svc.oneshot(post(body)).await.unwrap();
    assert_eq!(read.load(Ordering::SeqCst), 5);
    assert_eq!(&fake.seen.lock().unwrap()[0].body[..], &[b'a'; 100][..]);
}

#[tokio::test]
async fn a_one_frame_body_is_kept_without_a_copy() {
    let fake = Fake::new(vec![Step::ok("{}")]);
    let svc = ReplayBodyLayer::default().layer_on(fake.clone());
    let bytes = Bytes::from(vec![b'x'; 4096]);
    svc.oneshot(post(Full::new(bytes.clone()))).await.unwrap();
    let seen = fake.seen.lock().unwrap()[0].body.clone();
    assert_eq!(seen.as_ptr(), bytes.as_ptr());
}

#[tokio::test]
async fn an_oversized_streamed_body_is_refused_without_calling_the_provider() {
    let fake = Fake::new(vec![Step::ok("{}")]);
    let svc = ReplayBodyLayer::new(10).layer_on(fake.clone());
    let (body, read) = counted(10, 4, None);
    let error = svc.oneshot(post(body)).await.unwrap_err();
    // 4 + 4 + 4 = 12 > 10: reading stops at the third frame.
    assert_eq!(read.load(Ordering::SeqCst), 3);
    assert_eq!(fake.attempts(), 0);
    assert_eq!(error.kind(), FailureKind::InvalidRequest);
    let cause = error
        .cause()
        .unwrap()
        .downcast_ref::<BodyLimitError>()
        .unwrap();
    assert!(matches!(cause, BodyLimitError::TooLarge { limit: 10 }));
    assert!(cause.to_string().contains("max_body_bytes"), "{cause}");
}

#[tokio::test]
async fn a_declared_length_over_the_cap_is_refused_before_reading() {
    let fake = Fake::new(vec![Step::ok("{}")]);
    let svc = ReplayBodyLayer::new(10).layer_on(fake.clone());
    let (body, read) = counted(1, 11, Some(11));
    let error = svc.oneshot(post(body)).await.unwrap_err();
    assert_eq!(read.load(Ordering::SeqCst), 0);
    assert_eq!(fake.attempts(), 0);
    assert_eq!(error.kind(), FailureKind::InvalidRequest);
}

#[tokio::test]
async fn a_body_exactly_at_the_cap_is_accepted() {
    let fake = Fake::new(vec![Step::ok("{}")]);
    let svc = ReplayBodyLayer::new(12).layer_on(fake.clone());
    let (body, _) = counted(3, 4, Some(12));
    svc.oneshot(post(body)).await.unwrap();
    assert_eq!(fake.seen.lock().unwrap()[0].body.len(), 12);
}

#[tokio::test(start_paused = true)]
async fn any_body_becomes_retryable_behind_the_adapter() {
    let fake = Fake::new(vec![Step::status(503), Step::ok("{}")]);
    let svc = ServiceBuilder::new()
        .layer(ReplayBodyLayer::default())
        .layer(RetryLayer::new(RetryConfig::batch()))
        .service(fake.clone());
    let (body, _) = counted(3, 4, None);
    let response = svc.oneshot(post(body)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(seen[0].body.len(), 12);
}

/// `ServiceBuilder` in one line for the tests above.
trait LayerOn {
    fn layer_on<S>(self, inner: S) -> backstop_retry::CollectBody<S>;
}

impl LayerOn for ReplayBodyLayer {
    fn layer_on<S>(self, inner: S) -> backstop_retry::CollectBody<S> {
        tower::Layer::layer(&self, inner)
    }
}

#[tokio::test]
async fn a_replayable_body_goes_on_as_it_is_and_the_cap_still_holds() {
    let fake = Fake::new(vec![Step::ok("{}")]);
    let svc = ReplayBodyLayer::new(4096).layer_on(fake.clone());
    let bytes = Bytes::from(vec![b'x'; 4096]);
    svc.oneshot(post(backstop_classify::ReplayBody::new(bytes.clone())))
        .await
        .unwrap();
    let seen = fake.seen.lock().unwrap()[0].body.clone();
    assert_eq!(seen.as_ptr(), bytes.as_ptr());

    let over = ReplayBodyLayer::new(4095).layer_on(fake.clone());
    let error = over
        .oneshot(post(backstop_classify::ReplayBody::new(bytes)))
        .await
        .unwrap_err();
    assert_eq!(fake.attempts(), 1, "the oversized request was not sent");
    assert_eq!(error.kind(), FailureKind::InvalidRequest);
    let cause = error.cause().unwrap().downcast_ref::<BodyLimitError>();
    assert!(matches!(
        cause,
        Some(BodyLimitError::TooLarge { limit: 4095 })
    ));
}

/// A body whose frames arrive later, through a channel (as a network body's do).
struct Arriving(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Arriving {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

#[tokio::test]
async fn a_body_still_arriving_is_read_by_the_future_before_the_provider_is_called() {
    use tower::Service;

    let fake = Fake::new(vec![Step::ok("{}")]);
    let mut svc = ReplayBodyLayer::new(100).layer_on(fake.clone());
    let (send, receive) = tokio::sync::mpsc::channel(4);
    let ready = ServiceExt::<http::Request<Arriving>>::ready(&mut svc)
        .await
        .unwrap();
    let mut future = std::pin::pin!(ready.call(post(Arriving(receive))));
    // Nothing has arrived: the call waits, and the provider has not been called.
    assert!(futures_poll_once(future.as_mut()).await.is_pending());
    assert_eq!(fake.attempts(), 0);
    send.send(Bytes::from_static(b"{\"model\":")).await.unwrap();
    send.send(Bytes::from_static(b"\"m\"}")).await.unwrap();
    drop(send);
    future.await.unwrap();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(&fake.seen.lock().unwrap()[0].body[..], b"{\"model\":\"m\"}");
}

/// Polls `future` once, with the test task's own waker.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut future: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
}
