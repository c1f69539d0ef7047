//! Streamed responses: first-event errors are retried, later ones surfaced once.

mod common;

use std::time::Duration;

use backstop_classify::{AttemptLog, Classification, FailureKind, Idempotent, StopReason};
use backstop_retry::{HoldFirstEvent, RetryConfig, RetryError, RetryLayer, StreamRequest};
use bytes::Bytes;
use common::{Fake, Step, read_body, request, secs};
use http::StatusCode;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const STREAM_REQUEST: &str = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
const OPENAI_ERROR: &str =
    "data: {\"error\":{\"message\":\"The server is overloaded\",\"type\":\"server_error\"}}\n\n";
const ANTHROPIC_ERROR: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

fn now(s: &'static str) -> (Duration, Result<Bytes, &'static str>) {
    (Duration::ZERO, Ok(Bytes::from_static(s.as_bytes())))
}

fn after(d: f64, s: &'static str) -> (Duration, Result<Bytes, &'static str>) {
    (secs(d), Ok(Bytes::from_static(s.as_bytes())))
}

fn good_stream() -> Step {
    Step::sse(vec![
        now("data: {\"id\":\"b\",\"n\":1}\n\n"),
        now("data: {\"id\":\"b\",\"n\":2}\n\n"),
        now("data: [DONE]\n\n"),
    ])
}

const GOOD_BYTES: &str =
    "data: {\"id\":\"b\",\"n\":1}\n\ndata: {\"id\":\"b\",\"n\":2}\n\ndata: [DONE]\n\n";

#[tokio::test(start_paused = true)]
async fn first_event_error_is_retried_and_the_caller_gets_only_the_good_stream() {
    let fake = Fake::new(vec![Step::sse(vec![now(OPENAI_ERROR)]), good_stream()]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    assert_eq!(fake.attempts(), 2);
    assert_eq!(fake.starts(start), [0.0, 2.0].map(secs));
    let log = response.extensions().get::<AttemptLog>().unwrap().clone();
    assert_eq!(log.stop, Some(StopReason::Succeeded));
    assert!(!log.attempts[0].classification.is_success());
    assert_eq!(log.attempts[0].status, Some(StatusCode::OK));
    let (bytes, error) = read_body(response.into_body()).await;
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), GOOD_BYTES);
    assert!(error.is_none());
}

#[tokio::test(start_paused = true)]
async fn anthropic_error_event_after_pings_is_still_a_first_event_error() {
    let fake = Fake::new(vec![
        Step::sse(vec![
            now("event: ping\ndata: {\"type\": \"ping\"}\n\n"),
            now(": keep-alive\n\n"),
            now(ANTHROPIC_ERROR),
        ]),
        good_stream(),
    ]);
    let config = RetryConfig::batch().with_rules(backstop_classify::Rules::anthropic());
    let svc = RetryLayer::new(config).layer(fake.clone());
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    assert_eq!(fake.attempts(), 2);
    let log = response.extensions().get::<AttemptLog>().unwrap();
    let first = log.attempts[0].classification.failure().unwrap();
    assert_eq!(first.kind, FailureKind::Overloaded);
    let (bytes, _) = read_body(response.into_body()).await;
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), GOOD_BYTES);
}

#[tokio::test(start_paused = true)]
async fn first_event_error_on_the_last_attempt_is_returned_as_a_classified_error() {
    let fake = Fake::new(vec![
        Step::sse(vec![now(OPENAI_ERROR)]),
        Step::sse(vec![now(OPENAI_ERROR)]),
    ]);
    let config = RetryConfig::batch().with_max_attempts(2).unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let error = svc.oneshot(request(STREAM_REQUEST)).await.unwrap_err();
    assert_eq!(fake.attempts(), 2);
    assert_eq!(
        error.cause().unwrap().downcast_ref::<RetryError>(),
        Some(&RetryError::FirstEventWasError)
    );
    assert_eq!(
        error.attempt_log().unwrap().stop,
        Some(StopReason::MaxAttempts)
    );
}

#[tokio::test(start_paused = true)]
async fn error_after_the_first_event_is_surfaced_once_and_never_replayed() {
    let fake = Fake::new(vec![
        Step::sse(vec![
            now("data: {\"id\":\"a\",\"n\":1}\n\n"),
            // The error event arrives split, glued to the end of a content event.
            now("data: {\"id\":\"a\",\"n\":2}\n\ndata: {\"err"),
            now("or\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n"),
            now("data: {\"id\":\"a\",\"n\":3}\n\n"),
        ]),
        good_stream(),
    ]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (bytes, error) = read_body(response.into_body()).await;
    let delivered = "data: {\"id\":\"a\",\"n\":1}\n\ndata: {\"id\":\"a\",\"n\":2}\n\n";
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), delivered);
    let error = error.expect("the stream ends with the provider's error");
    assert_eq!(
        error.cause().unwrap().downcast_ref::<RetryError>(),
        Some(&RetryError::StreamInterrupted {
            delivered: delivered.len() as u64
        })
    );
    // Never replayed: one attempt, and time does not bring another.
    tokio::time::sleep(secs(60.0)).await;
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn with_hold_off_a_first_event_error_reaches_the_caller_in_the_body() {
    let fake = Fake::new(vec![Step::sse(vec![now(OPENAI_ERROR)]), good_stream()]);
    let config = RetryConfig::batch().with_hold_first_event(HoldFirstEvent::Never);
    let svc = RetryLayer::new(config).layer(fake.clone());
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    let (bytes, error) = read_body(response.into_body()).await;
    assert!(bytes.is_empty());
    assert_eq!(
        error.unwrap().cause().unwrap().downcast_ref::<RetryError>(),
        Some(&RetryError::StreamInterrupted { delivered: 0 })
    );
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_non_stream_request_is_handed_on_at_the_head() {
    let fake = Fake::new(vec![Step::sse(vec![after(3.0, "data: {\"n\":1}\n\n")])]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request(r#"{"stream":false}"#)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let (bytes, _) = read_body(response.into_body()).await;
    assert_eq!(bytes, b"data: {\"n\":1}\n\n");
    assert_eq!(start.elapsed(), secs(3.0));
}

#[tokio::test(start_paused = true)]
async fn a_stream_request_is_held_until_its_first_event_and_bytes_come_once() {
    let fake = Fake::new(vec![Step::sse(vec![
        after(1.0, ": hello\n\ndata: {\"n\""),
        after(1.0, ":1}\n\ndata: {\"n\":2}"),
        after(1.0, "\n\n"),
    ])]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    // Held until the first event completed, in the second chunk.
    assert_eq!(start.elapsed(), secs(2.0));
    let (bytes, error) = read_body(response.into_body()).await;
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        ": hello\n\ndata: {\"n\":1}\n\ndata: {\"n\":2}\n\n"
    );
    assert!(error.is_none());
}

#[tokio::test(start_paused = true)]
async fn the_stream_marker_asks_for_holding_without_a_body_scan() {
    let fake = Fake::new(vec![Step::sse(vec![now(OPENAI_ERROR)]), good_stream()]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let mut req = request("{}");
    req.extensions_mut().insert(StreamRequest);
    svc.oneshot(req).await.unwrap();
    assert_eq!(fake.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_first_event_within_the_attempt_timeout_is_a_timeout() {
    let config = RetryConfig::batch()
        .with_attempt_timeout(Some(secs(5.0)))
        .unwrap();
    let fake = Fake::new(vec![
        Step::sse(vec![after(8.0, "data: {\"n\":1}\n\n")]),
        good_stream(),
    ]);
    let svc = RetryLayer::new(config.clone()).layer(fake.clone());
    let start = Instant::now();
    let error = svc.oneshot(request(STREAM_REQUEST)).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(5.0));
    assert_eq!(error.kind(), FailureKind::TimedOut);
    assert_eq!(
        error.cause().unwrap().downcast_ref::<RetryError>(),
        Some(&RetryError::FirstEventTimedOut { after: secs(5.0) })
    );
    assert_eq!(fake.attempts(), 1);

    // Idempotent: retried, and the caller gets the second stream.
    let fake = Fake::new(vec![
        Step::sse(vec![after(8.0, "data: {\"n\":1}\n\n")]),
        good_stream(),
    ]);
    let svc = RetryLayer::new(config).layer(fake.clone());
    let mut req = request(STREAM_REQUEST);
    req.extensions_mut().insert(Idempotent);
    let response = svc.oneshot(req).await.unwrap();
    let (bytes, _) = read_body(response.into_body()).await;
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), GOOD_BYTES);
}

#[tokio::test(start_paused = true)]
async fn a_first_event_larger_than_the_cap_is_handed_on_unchecked() {
    let big: &'static str = Box::leak(format!("data: {}\n\n", "x".repeat(100)).into_boxed_str());
    let fake = Fake::new(vec![Step::sse(vec![now(&big[..50]), now(&big[50..])])]);
    let config = RetryConfig::batch().with_first_event_cap(40).unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    let (bytes, error) = read_body(response.into_body()).await;
    assert_eq!(bytes, big.as_bytes());
    assert!(error.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_success_is_logged_as_success_and_gets_no_classification_of_its_own() {
    let fake = Fake::new(vec![good_stream()]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    let log = response.extensions().get::<AttemptLog>().unwrap();
    assert_eq!(log.attempts[0].classification, Classification::Success);
    // Below 400 without a classification reads as success to every layer.
    assert_eq!(response.extensions().get::<Classification>(), None);
}

#[tokio::test(start_paused = true)]
async fn hold_always_holds_streams_of_requests_that_did_not_say_stream() {
    let fake = Fake::new(vec![Step::sse(vec![now(OPENAI_ERROR)]), good_stream()]);
    let config = RetryConfig::batch().with_hold_first_event(HoldFirstEvent::Always);
    let svc = RetryLayer::new(config).layer(fake.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    assert_eq!(fake.attempts(), 2);
    let (bytes, _) = read_body(response.into_body()).await;
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), GOOD_BYTES);
}

#[tokio::test(start_paused = true)]
async fn with_auto_a_non_stream_request_gets_a_first_event_error_in_its_body() {
    let fake = Fake::new(vec![Step::sse(vec![now(OPENAI_ERROR)]), good_stream()]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let response = svc.oneshot(request("{}")).await.unwrap();
    let (bytes, error) = read_body(response.into_body()).await;
    assert!(bytes.is_empty());
    // Handed on at the head, like `HoldFirstEvent::Never`: the error event is the
    // first thing in the body, so the stream ends before any byte reached the caller.
    assert_eq!(
        error
            .expect("the body ends with the provider's error")
            .cause()
            .unwrap()
            .downcast_ref::<RetryError>(),
        Some(&RetryError::StreamInterrupted { delivered: 0 })
    );
    assert_eq!(fake.attempts(), 1);
}

const EV1: &str = "data: {\"id\":\"s\",\"n\":1}\n\n";
const EV2: &str = "data: {\"id\":\"s\",\"n\":2}\n\n";

/// The stream idle timeout ends a body the provider left silent, whether the stream
/// was held for its first event or handed on at once: the caller gets every byte
/// before, then one typed `TimedOut` error, at exactly the last frame plus the limit,
/// and the request is never replayed.
#[tokio::test(start_paused = true)]
async fn a_stream_silent_past_the_idle_timeout_ends_with_a_stall_error_and_no_replay() {
    for hold in [HoldFirstEvent::Auto, HoldFirstEvent::Never] {
        let fake = Fake::new(vec![
            Step::sse(vec![
                now(EV1),
                after(3.0, EV2),
                after(20.0, "data: {\"id\":\"s\",\"n\":3}\n\n"),
                now("data: [DONE]\n\n"),
            ]),
            good_stream(),
        ]);
        let config = RetryConfig::batch()
            .with_hold_first_event(hold)
            .with_stream_idle_timeout(Some(secs(5.0)))
            .unwrap();
        let svc = RetryLayer::new(config).layer(fake.clone());
        let start = Instant::now();
        let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (bytes, error) = read_body(response.into_body()).await;
        // The second event at 3 s, then 5 s of silence.
        assert_eq!(start.elapsed(), secs(8.0), "{hold:?}");
        let delivered = format!("{EV1}{EV2}");
        assert_eq!(std::str::from_utf8(&bytes).unwrap(), delivered, "{hold:?}");
        let error = error.expect("the stall ends the body with an error");
        assert_eq!(error.failure().kind, FailureKind::TimedOut);
        assert_eq!(
            error.cause().unwrap().downcast_ref::<RetryError>(),
            Some(&RetryError::StreamStalled {
                after: secs(5.0),
                delivered: delivered.len() as u64,
            }),
            "{hold:?}"
        );
        tokio::time::sleep(secs(60.0)).await;
        assert_eq!(
            fake.attempts(),
            1,
            "{hold:?}: a started stream is never replayed"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn gaps_shorter_than_the_idle_timeout_never_end_the_stream() {
    let fake = Fake::new(vec![Step::sse(vec![
        now(EV1),
        after(4.9, EV2),
        after(4.9, "data: {\"id\":\"s\",\"n\":3}\n\n"),
        after(4.9, "data: [DONE]\n\n"),
    ])]);
    let config = RetryConfig::batch()
        .with_stream_idle_timeout(Some(secs(5.0)))
        .unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request(STREAM_REQUEST)).await.unwrap();
    let (bytes, error) = read_body(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(start.elapsed(), secs(14.7));
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        format!("{EV1}{EV2}data: {{\"id\":\"s\",\"n\":3}}\n\ndata: [DONE]\n\n")
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_reads_slowly_is_not_cut_off() {
    use http_body_util::BodyExt;
    let fake = Fake::new(vec![Step::sse(vec![
        now(EV1),
        after(3.0, EV2),
        now("data: [DONE]\n\n"),
    ])]);
    let config = RetryConfig::batch()
        .with_stream_idle_timeout(Some(secs(5.0)))
        .unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let mut body = svc
        .oneshot(request(STREAM_REQUEST))
        .await
        .unwrap()
        .into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, EV1);
    // The caller does not ask for 30 s: the provider's silence is not counted.
    tokio::time::sleep(secs(30.0)).await;
    let (rest, error) = read_body(body).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        std::str::from_utf8(&rest).unwrap(),
        format!("{EV2}data: [DONE]\n\n")
    );
}

/// The same limit holds for a plain (non-stream) success body, which leaves the
/// layer on its fast path.
#[tokio::test(start_paused = true)]
async fn a_plain_body_silent_past_the_idle_timeout_ends_with_a_stall_error() {
    let fake = Fake::new(vec![Step::Respond {
        status: StatusCode::OK,
        headers: vec![("content-type", "application/json")],
        classification: None,
        body: common::ScriptBody::new(vec![now("{\"id\":"), after(10.0, "\"x\"}")]),
    }]);
    let config = RetryConfig::interactive()
        .with_stream_idle_timeout(Some(secs(2.0)))
        .unwrap();
    let svc = RetryLayer::new(config).layer(fake.clone());
    let start = Instant::now();
    let response = svc.oneshot(request(r#"{"model":"gpt-4o"}"#)).await.unwrap();
    let log = response.extensions().get::<AttemptLog>().unwrap();
    assert_eq!(log.stop, Some(StopReason::Succeeded));
    let (bytes, error) = read_body(response.into_body()).await;
    assert_eq!(bytes, b"{\"id\":");
    assert_eq!(start.elapsed(), secs(2.0));
    let error = error.expect("a stall error");
    assert_eq!(error.failure().kind, FailureKind::TimedOut);
    assert_eq!(
        error.cause().unwrap().downcast_ref::<RetryError>(),
        Some(&RetryError::StreamStalled {
            after: secs(2.0),
            delivered: 6,
        })
    );
    assert_eq!(fake.attempts(), 1);
}

#[test]
fn a_zero_idle_timeout_is_refused() {
    assert!(
        RetryConfig::interactive()
            .with_stream_idle_timeout(Some(Duration::ZERO))
            .is_err()
    );
}
