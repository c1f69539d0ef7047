//! Bounded memory, in process: what the stack holds is capped whatever a caller or a
//! provider sends.
//!
//! - A request body above the cap gets a typed error after at most the cap plus one
//!   frame was read (nothing, when its declared length is already above the cap),
//!   and the provider is never called.
//! - An error body above the classify layer's inspection cap is not buffered beyond
//!   it: at most the cap plus one frame has been pulled from the provider when the
//!   response reaches the caller, who then receives every byte, in order.
//! - A hung or slow provider holds no more than the requests in flight: the mock's in-flight
//!   count never exceeds them, and everything is released when attempts time out.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop::BackstopLayer;
use backstop::classify::{
    Classification, ClassifiedError, ClassifyLayer, DEFAULT_MAX_ERROR_BODY, FailureKind,
    ReplayBody, Rules,
};
use backstop::mock::{Fault, Latency, MockProvider, ModelPlan, Scenario};
use backstop::retry::{BodyLimitError, RetryConfig};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tower::{Layer, ServiceBuilder, ServiceExt};

const FRAME: usize = 64 * 1024;
const GIB: u64 = 1024 * 1024 * 1024;
const MIB: usize = 1024 * 1024;

/// A body of `total` bytes in `FRAME`-sized frames, produced only as it is pulled,
/// counting what was pulled. Byte `i` of the body is `i % 251`, so any reordering,
/// loss or duplication shows.
struct CountingBody {
    total: u64,
    produced: u64,
    declare_length: bool,
    pulled: Arc<Pulled>,
}

#[derive(Default)]
struct Pulled {
    bytes: AtomicUsize,
    frames: AtomicUsize,
}

impl Pulled {
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
    fn frames(&self) -> usize {
        self.frames.load(Ordering::SeqCst)
    }
}

impl CountingBody {
    fn new(total: u64, declare_length: bool) -> (Self, Arc<Pulled>) {
        let pulled = Arc::new(Pulled::default());
        let body = CountingBody {
            total,
            produced: 0,
            declare_length,
            pulled: pulled.clone(),
        };
        (body, pulled)
    }
}

fn expected_byte(i: u64) -> u8 {
    (i % 251) as u8
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = self.total - self.produced;
        if left == 0 {
            return Poll::Ready(None);
        }
        let len = left.min(FRAME as u64);
        let start = self.produced;
        let data: Vec<u8> = (start..start + len).map(expected_byte).collect();
        self.produced += len;
        self.pulled.bytes.fetch_add(len as usize, Ordering::SeqCst);
        self.pulled.frames.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))))
    }

    fn is_end_stream(&self) -> bool {
        self.produced == self.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.declare_length {
            SizeHint::with_exact(self.total - self.produced)
        } else {
            SizeHint::default()
        }
    }
}

fn chat_request<B>(body: B) -> http::Request<B> {
    http::Request::post("http://provider.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .expect("valid request")
}

fn too_large_limit(error: &ClassifiedError) -> Option<usize> {
    match error.cause()?.downcast_ref::<BodyLimitError>()? {
        BodyLimitError::TooLarge { limit } => Some(*limit),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_one_gib_request_body_is_refused_after_reading_at_most_the_cap_and_one_frame() {
    let mock = MockProvider::new(Scenario::new(1));
    let layer = BackstopLayer::builder()
        .max_request_body(MIB)
        .build()
        .expect("valid stack");
    let service = layer.layer(mock.clone());
    let (body, pulled) = CountingBody::new(GIB, false);

    let error = service
        .oneshot(chat_request(body))
        .await
        .expect_err("a 1 GiB body is over the 1 MiB cap");

    assert_eq!(error.kind(), FailureKind::InvalidRequest);
    assert_eq!(too_large_limit(&error), Some(MIB), "{error:?}");
    // It read until it knew: past the cap, by at most the frame that crossed it.
    assert!(pulled.bytes() > MIB, "read {} bytes", pulled.bytes());
    assert!(
        pulled.bytes() <= MIB + FRAME,
        "read {} bytes, the cap is {MIB} and a frame {FRAME}",
        pulled.bytes()
    );
    assert_eq!(
        pulled.bytes(),
        MIB + FRAME,
        "frames are 64 KiB: the 17th crosses 1 MiB"
    );
    assert_eq!(mock.attempt_count(), 0, "the provider was never called");
    let text = error.to_string();
    assert!(
        text.contains("1048576"),
        "the message names the limit: {text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_body_declaring_a_length_over_the_cap_is_refused_before_any_read() {
    let mock = MockProvider::new(Scenario::new(1));
    let layer = BackstopLayer::builder()
        .max_request_body(MIB)
        .build()
        .expect("valid stack");
    let (body, pulled) = CountingBody::new(GIB, true);

    let error = layer
        .layer(mock.clone())
        .oneshot(chat_request(body))
        .await
        .expect_err("over the cap");

    assert_eq!(too_large_limit(&error), Some(MIB), "{error:?}");
    assert_eq!(pulled.bytes(), 0);
    assert_eq!(mock.attempt_count(), 0);
}

/// A provider answering `status` with a 10 MiB error body, counting what is pulled
/// from each response's body.
fn provider_with_huge_error_body(
    status: u16,
    per_attempt: Arc<Mutex<Vec<Arc<Pulled>>>>,
) -> impl tower::Service<
    http::Request<ReplayBody>,
    Response = http::Response<CountingBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<CountingBody>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_request: http::Request<ReplayBody>| {
        let (body, pulled) = CountingBody::new(10 * MIB as u64, false);
        per_attempt.lock().unwrap().push(pulled);
        async move {
            let mut response = http::Response::new(body);
            *response.status_mut() = http::StatusCode::from_u16(status).expect("valid status");
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().expect("valid"));
            Ok(response)
        }
    })
}

/// Reads a body to its end and checks it is exactly the counting body's bytes.
async fn assert_whole_and_in_order<B>(body: B, total: usize)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut offset: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the body reads to its end");
        if let Some(data) = frame.data_ref() {
            for (i, byte) in data.iter().enumerate() {
                assert_eq!(
                    *byte,
                    expected_byte(offset + i as u64),
                    "byte {}",
                    offset + i as u64
                );
            }
            offset += data.len() as u64;
        }
    }
    assert_eq!(offset, total as u64);
}

#[tokio::test(start_paused = true)]
async fn a_ten_mib_error_body_is_held_no_further_than_the_classify_cap_and_one_frame() {
    let per_attempt = Arc::new(Mutex::new(Vec::new()));
    let service = ServiceBuilder::new()
        .layer(ClassifyLayer::new(Rules::default()))
        .service(provider_with_huge_error_body(500, per_attempt.clone()));

    let response = service
        .oneshot(chat_request(ReplayBody::from("{}")))
        .await
        .expect("a 500 is a response");

    // Before the caller reads a byte:
    let pulled = per_attempt.lock().unwrap()[0].clone();
    assert!(
        pulled.bytes() <= DEFAULT_MAX_ERROR_BODY + FRAME,
        "held {} bytes before the caller read any",
        pulled.bytes()
    );
    assert_eq!(pulled.frames(), DEFAULT_MAX_ERROR_BODY / FRAME + 1);
    let failure = response
        .extensions()
        .get::<Classification>()
        .and_then(Classification::failure)
        .expect("classified as a failure")
        .clone();
    assert_eq!(
        failure.kind,
        FailureKind::ServerError,
        "by status: the body is over the cap"
    );
    // The caller then gets every byte, in order, and the rest streams through.
    assert_whole_and_in_order(response.into_body(), 10 * MIB).await;
    assert_eq!(pulled.bytes(), 10 * MIB);
}

#[tokio::test(start_paused = true)]
async fn through_the_stack_no_attempt_holds_more_than_the_classify_cap_and_one_frame() {
    // A 503 is retried (3 attempts): each dropped attempt was read no further than
    // the cap plus a frame, and the returned one likewise until the caller reads it.
    let per_attempt = Arc::new(Mutex::new(Vec::new()));
    let retry = RetryConfig::interactive()
        .with_max_attempts(3)
        .and_then(|r| r.with_deadline(Some(Duration::from_secs(30))))
        .expect("valid retry config");
    let layer = BackstopLayer::builder()
        .retry(retry)
        .retry_seed(9)
        .build()
        .expect("valid stack");
    let service = layer.layer(provider_with_huge_error_body(503, per_attempt.clone()));

    let response = service
        .oneshot(chat_request(ReplayBody::from(r#"{"model":"gpt-4o"}"#)))
        .await
        .expect("the last 503 is returned");

    assert_eq!(response.status(), 503);
    let attempts = per_attempt.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3);
    for (i, pulled) in attempts.iter().enumerate() {
        assert_eq!(
            pulled.bytes(),
            DEFAULT_MAX_ERROR_BODY + FRAME,
            "attempt {} held more than the cap and one frame",
            i + 1
        );
    }
    assert_whole_and_in_order(response.into_body(), 10 * MIB).await;
    assert_eq!(attempts[2].bytes(), 10 * MIB);
}

/// Runs `n` concurrent requests against a provider that never answers, sampling the
/// mock's in-flight count every 10 ms of virtual time; returns the highest count
/// seen, the count after every request ended, the attempts made and the errors.
async fn hang_with(
    plan: ModelPlan,
    n: usize,
    idempotent: bool,
) -> (usize, usize, usize, Vec<ClassifiedError>) {
    let mock = MockProvider::new(Scenario::new(3).model("gpt-4o", plan));
    let retry = RetryConfig::interactive()
        .with_max_attempts(3)
        .and_then(|r| r.with_deadline(Some(Duration::from_secs(20))))
        .and_then(|r| r.with_attempt_timeout(Some(Duration::from_secs(2))))
        .expect("valid retry config");
    let layer = BackstopLayer::builder()
        .retry(retry)
        .retry_seed(3)
        .build()
        .expect("valid stack");
    let service = layer.layer(mock.clone());

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (mock, done) = (mock.clone(), done.clone());
        tokio::spawn(async move {
            let mut highest = 0;
            while !done.load(Ordering::SeqCst) {
                highest = highest.max(mock.in_flight("gpt-4o"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            highest
        })
    };
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut request = chat_request(ReplayBody::from(r#"{"model":"gpt-4o","messages":[]}"#));
        if idempotent {
            let key = format!("hang-{i}").parse().expect("valid header");
            request.headers_mut().insert("idempotency-key", key);
        }
        requests.spawn(service.clone().oneshot(request));
    }
    let mut errors = Vec::new();
    while let Some(joined) = requests.join_next().await {
        errors.push(
            joined
                .expect("request task")
                .expect_err("a hung provider never serves"),
        );
    }
    done.store(true, Ordering::SeqCst);
    let highest = sampler.await.expect("sampler");
    (
        highest,
        mock.in_flight("gpt-4o"),
        mock.attempt_count(),
        errors,
    )
}

#[tokio::test(start_paused = true)]
async fn a_hung_provider_holds_exactly_the_requests_in_flight_and_releases_them_on_timeout() {
    let (highest, after, attempts, errors) =
        hang_with(ModelPlan::always(Fault::Hang), 50, false).await;
    assert_eq!(highest, 50, "every request is held, and nothing more");
    assert_eq!(after, 0, "every timed-out attempt was released");
    // Not idempotent: a timeout after sending is never retried.
    assert_eq!(attempts, 50);
    assert_eq!(errors.len(), 50);
    assert!(errors.iter().all(|e| e.kind() == FailureKind::TimedOut));
}

#[tokio::test(start_paused = true)]
async fn retries_against_a_hung_provider_never_hold_more_than_the_requests_in_flight() {
    let (highest, after, attempts, errors) =
        hang_with(ModelPlan::always(Fault::Hang), 50, true).await;
    assert_eq!(
        highest, 50,
        "a retry replaces its attempt, it never adds to it"
    );
    assert_eq!(after, 0);
    // The default budget (10 s window, floor 1/s, 10 %) allows 10 + 50 × 0.1 = 15
    // retries: 50 first attempts time out together, 15 are retried, then none.
    assert_eq!(attempts, 65);
    assert_eq!(errors.len(), 50);
    assert!(errors.iter().all(|e| e.kind() == FailureKind::TimedOut));
}

#[tokio::test(start_paused = true)]
async fn a_slow_provider_holds_exactly_the_requests_in_flight_and_releases_them_on_timeout() {
    // Answers would come after 10 s; the attempt timeout is 2 s.
    let slow = ModelPlan::ok().latency(Latency::Fixed {
        value: Duration::from_secs(10),
    });
    let (highest, after, attempts, errors) = hang_with(slow, 50, false).await;
    assert_eq!(highest, 50);
    assert_eq!(after, 0);
    assert_eq!(attempts, 50);
    assert!(errors.iter().all(|e| e.kind() == FailureKind::TimedOut));
}
