//! The HTTP face over real loopback sockets, with a hyper-util client.
//!
//! These tests run in real time (sockets do not follow paused time). None sleeps
//! or measures time: they wait for the mock's own events
//! ([`MockProvider::wait_for`]), under a generous failsafe timeout.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;

use backstop_mock::{Fault, MockProvider, MockServer, ModelPlan, Scenario, StreamStyle};
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;

fn scenario() -> Scenario {
    Scenario::new(3)
        .model("ok", ModelPlan::ok().stream_chunks(3))
        .model(
            "limited",
            ModelPlan::always(Fault::OpenAiRateLimit {
                retry_after: Some("2".into()),
                retry_after_ms: None,
            }),
        )
        .model("reset-before", ModelPlan::always(Fault::ResetBeforeHead))
        .model("reset-after", ModelPlan::always(Fault::ResetAfterHead))
        .model("refused", ModelPlan::always(Fault::ConnectRefused))
        .model("hang", ModelPlan::always(Fault::Hang))
        .model(
            "reset-mid-stream",
            ModelPlan::always(Fault::ResetAfterChunks { chunks: 2 }),
        )
        .model(
            "broken-stream",
            ModelPlan::always(Fault::StreamErrorAfter {
                chunks: 2,
                style: StreamStyle::OpenAi,
            }),
        )
}

async fn start() -> MockServer {
    MockServer::start(scenario(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn http1() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn chat(server: &MockServer, model: &str, stream: bool) -> Request<Full<Bytes>> {
    let body = serde_json::json!({"model": model, "stream": stream, "messages": []});
    Request::post(format!("{}/chat/completions", server.base_url()))
        .header("content-type", "application/json")
        .header("idempotency-key", "k-1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn text(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Waits until `condition` holds for `provider`, failing with `what` after 10 s
/// (a failsafe: every event waited for here comes within milliseconds).
async fn until(provider: &MockProvider, what: &str, condition: impl FnMut(&MockProvider) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), provider.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("{what} (still not so after 10 s)"));
}

/// Whether `future` is still pending after one more poll.
async fn still_pending<F: Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx).is_pending()))
        .await
}

/// The errors `error` wraps, itself first.
fn chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |e| (*e).source())
}

/// The kind of the first `io::Error` in `error`'s chain.
fn io_kind(error: &(dyn StdError + 'static)) -> Option<io::ErrorKind> {
    chain(error).find_map(|e| e.downcast_ref::<io::Error>().map(io::Error::kind))
}

/// Whether a request failed because the server closed its HTTP/1.1 connection
/// before a complete response (hyper's `IncompleteMessage`).
fn incomplete_message(error: &hyper_util::client::legacy::Error) -> bool {
    chain(error).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
    })
}

/// Whether `error` is the server resetting an HTTP/2 stream with INTERNAL_ERROR
/// (what hyper's server sends when a response body fails). Read from h2's error,
/// whose type this crate does not depend on.
fn reset_by_the_server(error: &(dyn StdError + 'static)) -> bool {
    chain(error).any(|e| {
        let debug = format!("{e:?}");
        debug.starts_with("Error { kind: Reset(") && debug.ends_with(", INTERNAL_ERROR, Remote) }")
    })
}

/// What the in-memory provider, playing the same scenario, answers to the same
/// request as the server's first attempt: the same bytes, but for `created`, which
/// counts whole seconds since each provider started (taken from the server's
/// record).
async fn in_memory_body(server: &MockServer, model: &str, stream: bool) -> Bytes {
    let attempts = server.provider().attempts();
    assert_eq!(attempts.len(), 1, "compared with the server's only attempt");
    let in_memory = MockProvider::new(scenario());
    let request = chat(server, model, stream);
    let response = in_memory.clone().oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let created =
        |since_start: Duration| format!("\"created\":{}", 1_700_000_000 + since_start.as_secs());
    let text = String::from_utf8(bytes.to_vec()).unwrap().replace(
        &created(in_memory.attempts()[0].since_start),
        &created(attempts[0].since_start),
    );
    Bytes::from(text)
}

#[tokio::test]
async fn http1_completion_round_trip_is_recorded_with_its_headers() {
    let server = start().await;
    let response = http1().request(chat(&server, "ok", false)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.headers()["x-request-id"], "req_mock_0");
    let json: serde_json::Value = serde_json::from_str(&text(response).await).unwrap();
    assert_eq!(json["model"], "ok");
    let attempts = server.provider().attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].model.as_deref(), Some("ok"));
    assert_eq!(attempts[0].header("idempotency-key"), Some("k-1"));
    server.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_too() {
    let server = start().await;
    let response = h2c()
        .request(chat(&server, "limited", false))
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "2");
    let json: serde_json::Value = serde_json::from_str(&text(response).await).unwrap();
    assert_eq!(json["error"]["code"], "rate_limit_exceeded");
    assert_eq!(server.provider().attempts_for("limited"), 1);
}

#[tokio::test]
async fn sse_stream_arrives_complete_over_http1_and_h2c() {
    let server = start().await;
    for client in [http1(), h2c()] {
        let response = client.request(chat(&server, "ok", true)).await.unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let body = text(response).await;
        let events: Vec<&str> = body.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 4, "{body}");
        assert!(
            events[..3]
                .iter()
                .all(|e| e.starts_with("data: {\"choices\""))
        );
        assert_eq!(events[3], "data: [DONE]");
    }
}

#[tokio::test]
async fn stream_error_event_arrives_after_the_chunks_over_http() {
    let server = start().await;
    let response = http1()
        .request(chat(&server, "broken-stream", true))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = text(response).await;
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 3, "{body}");
    assert!(events[2].starts_with("data: {\"error\""), "{body}");
    // Exactly the bytes the in-memory face sends for the same plan.
    assert_eq!(
        body.as_bytes(),
        &in_memory_body(&server, "broken-stream", true).await[..]
    );
}

#[tokio::test]
async fn reset_before_head_drops_the_connection_without_a_response() {
    let server = start().await;
    for client in [http1(), h2c()] {
        let error = client
            .request(chat(&server, "reset-before", false))
            .await
            .unwrap_err();
        assert!(
            !error.is_connect(),
            "the connection was made, then dropped: {error:?}"
        );
    }
    assert_eq!(server.provider().attempts_for("reset-before"), 2);
}

#[tokio::test]
async fn connect_refused_over_http_also_drops_the_connection() {
    let server = start().await;
    let error = http1()
        .request(chat(&server, "refused", false))
        .await
        .unwrap_err();
    // Connected, then closed without a response: a TCP server cannot refuse a
    // connection it has already read a model from.
    assert!(!error.is_connect(), "{error:?}");
    assert!(incomplete_message(&error), "{error:?}");
    assert_eq!(server.provider().attempts_for("refused"), 1);
    assert!(!server.provider().attempts()[0].delivered);
}

#[tokio::test]
async fn reset_after_head_sends_200_then_aborts_the_body() {
    let server = start().await;
    for client in [http1(), h2c()] {
        let response = client
            .request(chat(&server, "reset-after", true))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let version = response.version();
        let error = response.into_body().collect().await.unwrap_err();
        assert_body_cut(version, &error);
    }
    assert_eq!(server.provider().attempts_for("reset-after"), 2);
}

/// How a body cut by the server after its head fails: an HTTP/1.1 chunked body
/// ends early (the connection closes mid-body), an HTTP/2 stream is reset.
fn assert_body_cut(version: Version, error: &hyper::Error) {
    if version == Version::HTTP_2 {
        assert!(reset_by_the_server(error), "{error:?}");
    } else {
        assert_eq!(
            io_kind(error),
            Some(io::ErrorKind::UnexpectedEof),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn hang_never_answers_over_http() {
    let server = start().await;
    let mut request = Box::pin(http1().request(chat(&server, "hang", false)));
    // Drive the request until the mock holds it.
    tokio::select! {
        answer = &mut request => panic!("a hang answered: {answer:?}"),
        () = until(server.provider(), "the request never reached the mock", |p| {
            p.in_flight("hang") == 1
        }) => {}
    }
    assert!(still_pending(&mut request).await, "a hang answered");
    assert_eq!(server.provider().attempts_for("hang"), 1);
    // Shutting down with a hung request open must not hang the test; the request
    // then ends without ever having had a response.
    server.shutdown().await;
    let error = request.await.unwrap_err();
    assert!(incomplete_message(&error), "{error:?}");
}

#[tokio::test]
async fn models_are_listed_over_http() {
    let server = start().await;
    let request = Request::get(format!("{}/models", server.base_url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&text(http1().request(request).await.unwrap()).await).unwrap();
    assert_eq!(json["data"].as_array().unwrap().len(), 8);
}

#[tokio::test]
async fn after_shutdown_new_connections_are_refused() {
    let server = start().await;
    let request = chat(&server, "ok", false);
    server.shutdown().await;
    let error = http1().request(request).await.unwrap_err();
    assert!(error.is_connect(), "{error:?}");
}

#[tokio::test]
async fn reset_after_chunks_delivers_the_chunks_then_aborts() {
    let server = start().await;
    for client in [http1(), h2c()] {
        let response = client
            .request(chat(&server, "reset-mid-stream", true))
            .await
            .unwrap();
        let version = response.version();
        let mut body = response.into_body();
        let mut received = Vec::new();
        let error = loop {
            match body.frame().await {
                Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(error)) => break error,
                None => panic!("the stream must not end cleanly"),
            }
        };
        assert_body_cut(version, &error);
        let text = String::from_utf8(received).unwrap();
        assert_eq!(text.matches("data: {").count(), 2, "{text}");
        assert!(!text.contains("[DONE]"));
    }
}

#[tokio::test]
async fn shutdown_ends_hanging_requests_on_both_protocols() {
    let server = start().await;
    let provider = server.provider().clone();
    let h1_request = chat(&server, "hang", false);
    let h2_request = chat(&server, "hang", false);
    let h1 = tokio::spawn(async move { http1().request(h1_request).await });
    let h2 = tokio::spawn(async move { h2c().request(h2_request).await });
    until(&provider, "the two requests never reached the mock", |p| {
        p.in_flight("hang") == 2
    })
    .await;
    server.shutdown().await;
    until(&provider, "hung attempts must end with the server", |p| {
        p.in_flight("hang") == 0
    })
    .await;
    // Both closed without a response: HTTP/1.1 sees the connection end mid-message,
    // HTTP/2 its open stream's connection go away (a broken pipe once the server's
    // socket is closed, or a reset had it still held unread bytes).
    let error = h1.await.unwrap().unwrap_err();
    assert!(incomplete_message(&error), "{error:?}");
    let error = h2.await.unwrap().unwrap_err();
    assert!(!error.is_connect(), "{error:?}");
    assert!(
        matches!(
            io_kind(&error),
            Some(io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)
        ),
        "{error:?}"
    );
    assert_eq!(provider.attempts_for("hang"), 2);
}

#[tokio::test]
async fn sse_frames_reach_the_client_one_event_per_body_frame() {
    let scenario = Scenario::new(1).model(
        "slow",
        ModelPlan::ok()
            .stream_chunks(4)
            .chunk_delay(Duration::from_millis(15)),
    );
    let server = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for client in [http1(), h2c()] {
        let mut body = client
            .request(chat(&server, "slow", true))
            .await
            .unwrap()
            .into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            frames.push(String::from_utf8(data.to_vec()).unwrap());
        }
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert!(
            frames
                .iter()
                .all(|f| f.ends_with("\n\n") && f.matches("data: ").count() == 1)
        );
        assert_eq!(frames[4], "data: [DONE]\n\n");
    }
}
