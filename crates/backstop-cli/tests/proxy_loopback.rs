//! End to end over loopback: hyper-util client → `backstop proxy` (in-process, on
//! 127.0.0.1:0) → backstop-mock's HTTP server, for each kind of fault. Each test
//! asserts the bytes and headers the client got and the attempts the mock saw.
//!
//! Real multi-thread runtime, real time: mock latencies are 0 and the retry backoff
//! is 1–4 ms, so most tests finish in well under a second. No test sleeps or
//! measures time: where one waits for the mock, it waits for the mock's own event
//! ([`MockProvider::wait_for`]) under a generous failsafe timeout, and where one
//! looks while a stream is open, the mock holds the stream
//! ([`MockProvider::hold_streams`]).

use std::time::Duration;

use backstop::mock::{Fault, MockProvider, MockServer, ModelPlan, Scenario, StreamStyle};
use backstop::retry::{Backoff, RetryConfig};
use backstop_cli::proxy::{self, ProxyConfig, ProxyHandle};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const OPENAI_KEY: &str = "sk-target-openai-123";
const ANTHROPIC_KEY: &str = "sk-ant-target-456";
const CLIENT_KEY: &str = "sk-client-should-never-travel";

/// A mock provider, the proxy in front of it, and a client.
struct Rig {
    mock: MockServer,
    proxy: ProxyHandle,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// The proxy's configuration for tests: gpt-4o at "openai" (bearer key) falling back
/// to claude-sonnet at "anthropic" (x-api-key), both served by `mock_url`; `extra`
/// is added at the top of the file.
fn config(mock_url: &str, extra: &str) -> ProxyConfig {
    let text = format!(
        r#"
        provider = "openai"
        {extra}

        [models.gpt-4o]
        upstream = "openai"
        base_uri = "{mock_url}"
        credential = {{ env = "OPENAI_KEY" }}

        [models.claude-sonnet]
        upstream = "anthropic"
        base_uri = "{mock_url}"
        credential = {{ header = "x-api-key", env = "ANTHROPIC_KEY" }}

        [chains]
        models = {{ "gpt-4o" = ["claude-sonnet"] }}
        "#
    );
    ProxyConfig::from_toml_str(&text)
        .expect("valid test configuration")
        .with_env(|name| match name {
            "OPENAI_KEY" => Some(OPENAI_KEY.into()),
            "ANTHROPIC_KEY" => Some(ANTHROPIC_KEY.into()),
            _ => None,
        })
        .map_stack(|builder| builder.retry(fast_retry()))
        .drain_timeout(Duration::from_secs(5))
}

/// Three attempts per model, 1–4 ms backoff (the file cannot set a backoff), a 5 s
/// attempt timeout inside a 10 s deadline.
fn fast_retry() -> RetryConfig {
    RetryConfig::interactive()
        .with_backoff(
            Backoff::new(Duration::from_millis(1), 2.0, Duration::from_millis(4)).expect("backoff"),
        )
        .with_max_attempts(3)
        .and_then(|c| c.with_deadline(Some(Duration::from_secs(10))))
        .and_then(|c| c.with_attempt_timeout(Some(Duration::from_secs(5))))
        .expect("retry config")
}

async fn rig_with(scenario: Scenario, extra: &str) -> Rig {
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock binds loopback");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(config(&mock.base_url(), extra), listener)
        .await
        .expect("proxy starts");
    Rig {
        mock,
        proxy,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

async fn rig(scenario: Scenario) -> Rig {
    rig_with(scenario, "").await
}

fn chat_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    )
}

impl Rig {
    /// A chat request carrying the client's key as an SDK or a gateway might: in
    /// its headers, a cookie, and Gemini's `?key=` beside an ordinary parameter.
    fn request(&self, body: impl Into<Bytes>) -> http::Request<Full<Bytes>> {
        http::Request::post(format!(
            "{}/chat/completions?trace=1&key={CLIENT_KEY}",
            self.proxy.base_url()
        ))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("x-api-key", CLIENT_KEY)
        .header("cookie", format!("session={CLIENT_KEY}"))
        .header("openai-organization", format!("org-{CLIENT_KEY}"))
        .header("accept-encoding", "gzip, deflate, br")
        .body(Full::new(body.into()))
        .unwrap()
    }

    async fn send(&self, request: http::Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
        let response = self.client.request(request).await.expect("proxy answers");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("whole body").to_bytes();
        (parts.status, parts.headers, bytes)
    }

    async fn chat(&self, model: &str, stream: bool) -> (StatusCode, HeaderMap, Bytes) {
        self.send(self.request(chat_body(model, stream))).await
    }

    async fn get(&self, path: &str) -> (StatusCode, HeaderMap, Bytes) {
        let uri = format!("http://{}{path}", self.proxy.local_addr());
        let request = http::Request::get(uri).body(Full::default()).unwrap();
        self.send(request).await
    }

    /// The bytes the mock sends for this request when asked directly (same plan),
    /// with the id and `created` of attempt `as_seq` so they can be compared with
    /// what went through the proxy.
    async fn direct(&self, model: &str, stream: bool, as_seq: usize) -> Bytes {
        let direct_seq = self.mock.provider().attempt_count();
        let request = http::Request::post(format!("{}/chat/completions", self.mock.base_url()))
            .body(Full::new(Bytes::from(chat_body(model, stream))))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let attempts = self.mock.provider().attempts();
        let created = |seq: usize| 1_700_000_000 + attempts[seq].since_start.as_secs();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        Bytes::from(
            text.replace(
                &format!("chatcmpl-mock-{direct_seq}"),
                &format!("chatcmpl-mock-{as_seq}"),
            )
            .replace(
                &format!("\"created\":{}", created(direct_seq)),
                &format!("\"created\":{}", created(as_seq)),
            ),
        )
    }
}

/// Waits until `condition` holds for `provider`, failing with `what` after 10 s (a
/// failsafe: every event waited for here comes within milliseconds).
async fn until(provider: &MockProvider, what: &str, condition: impl FnMut(&MockProvider) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), provider.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("{what} (still not so after 10 s)"));
}

/// Whether a request failed because the server closed its connection before a
/// complete response (hyper's `IncompleteMessage`).
fn incomplete_message(error: &hyper_util::client::legacy::Error) -> bool {
    std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// The report headers: model, attempts, fallback, x-should-retry, retry-after.
fn report(headers: &HeaderMap) -> [Option<&str>; 5] {
    [
        header(headers, "x-backstop-model"),
        header(headers, "x-backstop-attempts"),
        header(headers, "x-backstop-fallback"),
        header(headers, "x-should-retry"),
        header(headers, "retry-after"),
    ]
}

fn error_code(body: &Bytes) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).expect("a JSON error body");
    json["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_completion_passes_through_byte_for_byte_with_report_headers() {
    let rig = rig(Scenario::new(1)).await;
    let (status, headers, body) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        report(&headers),
        [Some("gpt-4o"), Some("1"), Some("false"), None, None]
    );
    assert_eq!(header(&headers, "x-request-id"), Some("req_mock_0"));
    assert_eq!(body, rig.direct("gpt-4o", false, 0).await);
    assert_eq!(
        rig.mock.provider().attempts_for("gpt-4o"),
        2,
        "proxied + direct"
    );
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 0);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_then_ok_is_retried_on_the_same_model() {
    let limited = Fault::OpenAiRateLimit {
        retry_after: None,
        retry_after_ms: Some("5".into()),
    };
    let rig = rig(Scenario::new(1).model("gpt-4o", ModelPlan::script([limited]))).await;
    let (status, headers, body) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        report(&headers),
        [Some("gpt-4o"), Some("2"), Some("false"), None, None]
    );
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "mock(gpt-4o) w1 w2"
    );
    assert_eq!(rig.mock.provider().attempts_for("gpt-4o"), 2);
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 0);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_falls_back_at_once_with_each_targets_own_key_and_never_the_callers() {
    let rig =
        rig(Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota)))
            .await;
    let (status, headers, body) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        report(&headers),
        [Some("claude-sonnet"), Some("2"), Some("true"), None, None]
    );
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["model"], "claude-sonnet");
    assert_eq!(
        rig.mock.provider().attempts_for("gpt-4o"),
        1,
        "quota is never retried"
    );
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 1);

    let attempts = rig.mock.provider().attempts();
    assert_eq!(
        attempts[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    assert_eq!(attempts[0].header("x-api-key"), None);
    assert_eq!(attempts[1].header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(attempts[1].header("authorization"), None);
    // Compressed error bodies could not be classified: upstreams get identity.
    assert_eq!(attempts[0].header("accept-encoding"), None);
    for attempt in &attempts {
        for (name, value) in &attempt.headers {
            let value = value.to_str().unwrap_or("");
            assert!(
                !value.contains(CLIENT_KEY),
                "the caller's key reached the upstream in {name}"
            );
        }
        // The rest of the caller's query goes on; its key does not.
        assert_eq!(attempt.uri.query(), Some("trace=1"));
    }
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_use_every_attempt_then_fall_back() {
    let rig =
        rig(Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiServerError))).await;
    let (status, headers, _) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        report(&headers),
        [Some("claude-sonnet"), Some("4"), Some("true"), None, None]
    );
    assert_eq!(rig.mock.provider().attempts_for("gpt-4o"), 3);
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 1);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_is_neither_retried_nor_fallen_back_and_says_do_not_retry() {
    let rig = rig(Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::InvalidRequest))).await;
    let (status, headers, body) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 400);
    assert_eq!(
        report(&headers),
        [
            Some("gpt-4o"),
            Some("1"),
            Some("false"),
            Some("false"),
            None
        ]
    );
    assert_eq!(
        body,
        rig.direct("gpt-4o", false, 0).await,
        "the provider's own error body"
    );
    assert_eq!(
        rig.mock.provider().attempts_for("gpt-4o"),
        2,
        "proxied + direct"
    );
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 0);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_cooling_down_gives_a_final_failure_with_retry_after() {
    let scenario = Scenario::new(1)
        .model(
            "gpt-4o",
            ModelPlan::always(Fault::OpenAiRateLimit {
                retry_after: Some("30".into()),
                retry_after_ms: None,
            }),
        )
        .model(
            "claude-sonnet",
            ModelPlan::always(Fault::AnthropicRateLimit {
                retry_after: Some("20".into()),
            }),
        );
    let rig = rig(scenario).await;

    // Both hints are longer than the 10 s retry deadline: one attempt each, then the
    // last model's 429 goes back with the earliest reopening.
    let (status, headers, _) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 429);
    assert_eq!(
        report(&headers),
        [
            Some("claude-sonnet"),
            Some("2"),
            Some("true"),
            Some("false"),
            Some("20")
        ]
    );
    assert_eq!(rig.mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 1);

    // Now both breakers are open: Backstop answers itself, 503, no upstream attempt.
    let (status, headers, body) = rig.chat("gpt-4o", false).await;
    assert_eq!(status, 503);
    let [model, attempts, fallback, should_retry, retry_after] = report(&headers);
    assert_eq!(
        (model, attempts, fallback, should_retry),
        (
            Some("claude-sonnet"),
            Some("0"),
            Some("true"),
            Some("false")
        )
    );
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((19..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(error_code(&body), "breaker_open");
    assert_eq!(rig.mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 1);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstreams_give_a_502_json_error_without_retry_advice_to_retry() {
    // A port nobody listens on: bind one, read its number, close it.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(config(&format!("http://{closed}/v1"), ""), listener)
        .await
        .unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(Full::new(Bytes::from(chat_body("gpt-4o", false))))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(parts.status, 502);
    assert_eq!(header(&parts.headers, "x-should-retry"), Some("false"));
    assert_eq!(header(&parts.headers, "x-backstop-fallback"), Some("true"));
    assert_eq!(
        header(&parts.headers, "x-backstop-model"),
        Some("claude-sonnet")
    );
    assert_eq!(error_code(&body), "connect_failed");
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains(OPENAI_KEY) && !text.contains(ANTHROPIC_KEY),
        "{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_passes_through_with_exact_bytes_as_it_arrives() {
    // Three chunks and [DONE], 10 ms apart, the upstream stream held after its
    // first event: looking at the mock once that event has reached the client
    // cannot race the stream's end.
    let plan = ModelPlan::ok()
        .stream_chunks(3)
        .chunk_delay(Duration::from_millis(10));
    let rig = rig(Scenario::new(1).model("gpt-4o", plan)).await;
    let held = rig.mock.provider().hold_streams();
    let response = rig
        .client
        .request(rig.request(chat_body("gpt-4o", true)))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        report(response.headers()),
        [Some("gpt-4o"), Some("1"), Some("false"), None, None]
    );
    assert_eq!(
        header(response.headers(), "content-type"),
        Some("text/event-stream")
    );
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The first event reached the client while the upstream stream was still open:
    // the proxy does not buffer the stream.
    assert_eq!(rig.mock.provider().in_flight("gpt-4o"), 1);
    drop(held);
    // The rest, and the same stream asked of the mock directly, at the same time.
    let (rest, direct) = tokio::join!(body.collect(), rig.direct("gpt-4o", true, 0));
    let mut got = first.to_vec();
    got.extend_from_slice(&rest.unwrap().to_bytes());
    assert!(got.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(
        got.iter().filter(|b| **b == b'\n').count(),
        8,
        "four events"
    );
    assert_eq!(Bytes::from(got), direct);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_failing_after_content_ends_with_one_openai_error_event() {
    let plan = ModelPlan::always(Fault::StreamErrorAfter {
        chunks: 2,
        style: StreamStyle::OpenAi,
    });
    let rig = rig(Scenario::new(1).model("gpt-4o", plan)).await;
    let (status, headers, body) = rig.chat("gpt-4o", true).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-backstop-attempts"), Some("1"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events[0].starts_with("data: {\"choices\""), "{text}");
    assert!(events[1].starts_with("data: {\"choices\""), "{text}");
    let error: serde_json::Value =
        serde_json::from_str(events[2].trim().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted");
    assert_eq!(error["error"]["type"], "server_error");
    // Content reached the caller: never replayed, never sent to another model.
    assert_eq!(rig.mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(rig.mock.provider().attempts_for("claude-sonnet"), 0);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_cap_is_413_before_reaching_any_provider() {
    let rig = rig_with(Scenario::new(1), "max_request_body = 1024").await;
    let padding = "x".repeat(2000);
    let large =
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{padding}"}}]}}"#);

    // With a Content-Length: refused before the body is read.
    let (status, headers, body) = rig.send(rig.request(large.clone())).await;
    assert_eq!(status, 413);
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    assert_eq!(error_code(&body), "request_too_large");

    // Chunked, no length: refused once the cap is crossed.
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = large
        .as_bytes()
        .chunks(500)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let chunked_client: Client<HttpConnector, StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", rig.proxy.base_url()))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let response = chunked_client.request(request).await.unwrap();
    assert_eq!(response.status(), 413);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(error_code(&body), "request_too_large");

    assert_eq!(rig.mock.provider().attempt_count(), 0);
    let (_, _, metrics) = rig.get("/metrics").await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains("backstop_proxy_requests_total{outcome=\"rejected\"} 2\n"),
        "{metrics}"
    );
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_and_malformed_body_are_refused_without_an_upstream_call() {
    let rig = rig(Scenario::new(1)).await;
    let (status, headers, body) = rig.chat("gpt-5-unknown", false).await;
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    assert_eq!(error_code(&body), "model_not_found");
    // A model name as long as the body allows is echoed cut short, not whole.
    let long_name = "m".repeat(1 << 20);
    let (status, _, body) = rig.chat(&long_name, false).await;
    assert_eq!(status, 404);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error body");
    let message = json["error"]["message"].as_str().expect("error.message");
    assert!(
        message.starts_with(&format!("the model `{}…` is not served", "m".repeat(256))),
        "{}",
        message.get(..300).unwrap_or(message)
    );
    assert!(message.len() < 1024, "{} bytes", message.len());
    let (status, _, body) = rig.send(rig.request("{not json")).await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "invalid_body");
    assert_eq!(rig.mock.provider().attempt_count(), 0);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_models_and_metrics_report_the_proxy() {
    let rig =
        rig(Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota)))
            .await;
    let (status, _, body) = rig.get("/healthz").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));

    let (status, _, body) = rig.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        r#"{"object":"list","data":[{"id":"claude-sonnet","object":"model","created":0,"owned_by":"anthropic"},{"id":"gpt-4o","object":"model","created":0,"owned_by":"openai"}]}"#
    );

    rig.chat("gpt-4o", false).await;
    rig.chat("claude-sonnet", false).await;
    let (status, headers, body) = rig.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    for line in [
        "backstop_proxy_requests_total{outcome=\"served\"} 1",
        "backstop_proxy_requests_total{outcome=\"served_by_fallback\"} 1",
        "backstop_proxy_upstream_attempts_total 3",
        "backstop_proxy_fallbacks_total 1",
        // Quota opens the primary's breaker (10 min quota cooldown).
        "backstop_breaker_state{upstream=\"openai\",model=\"gpt-4o\",credential=\"\",state=\"open\"} 1",
        "backstop_breaker_state{upstream=\"anthropic\",model=\"claude-sonnet\",credential=\"\",state=\"closed\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!text.contains(OPENAI_KEY) && !text.contains(ANTHROPIC_KEY));
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_callers_are_served() {
    let rig = rig(Scenario::new(1)).await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = h2
        .request(rig.request(chat_body("gpt-4o", false)))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response.headers(), "x-backstop-model"),
        Some("gpt-4o")
    );
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_ends_the_upstream_request() {
    // 200 chunks 1 s apart, held after the first: the upstream stream cannot end
    // by itself, so its ending within the 10 s failsafe below is the cancellation.
    let plan = ModelPlan::ok()
        .stream_chunks(200)
        .chunk_delay(Duration::from_secs(1));
    let rig = rig(Scenario::new(1).model("gpt-4o", plan)).await;
    let _held = rig.mock.provider().hold_streams();
    let response = rig
        .client
        .request(rig.request(chat_body("gpt-4o", true)))
        .await
        .unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(rig.mock.provider().in_flight("gpt-4o"), 1);
    drop(body);
    until(
        rig.mock.provider(),
        "the upstream stream is still open after the client left",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
    assert_eq!(rig.mock.provider().attempts_for("gpt-4o"), 1);
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_stream_in_flight_and_stops_accepting() {
    let plan = ModelPlan::ok()
        .stream_chunks(5)
        .chunk_delay(Duration::from_millis(40));
    let rig = rig(Scenario::new(1).model("gpt-4o", plan)).await;
    let response = rig
        .client
        .request(rig.request(chat_body("gpt-4o", true)))
        .await
        .unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();

    let addr = rig.proxy.local_addr();
    let shutdown = tokio::spawn(rig.proxy.shutdown());
    let rest = body
        .collect()
        .await
        .expect("the stream completes")
        .to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    shutdown.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_a_hung_request_once_the_drain_bound_passes() {
    let mock = MockServer::start(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::Hang)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(&mock.base_url(), "").drain_timeout(Duration::from_millis(200));
    let proxy = proxy::serve(config, listener).await.unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(Full::new(Bytes::from(chat_body("gpt-4o", false))))
        .unwrap();
    let in_flight = tokio::spawn(client.request(request));
    until(mock.provider(), "the request never reached the mock", |p| {
        p.in_flight("gpt-4o") == 1
    })
    .await;

    proxy.shutdown().await;
    // The drain bound ended it, not the 5 s attempt timeout: that would have been
    // retried (a second attempt) or answered (a 504), whereas the client's
    // connection was closed with no response at all.
    let error = in_flight
        .await
        .unwrap()
        .expect_err("the hung request was closed");
    assert!(!error.is_connect(), "{error:?}");
    assert!(incomplete_message(&error), "{error:?}");
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    // And the proxy let go of the upstream request.
    until(
        mock.provider(),
        "the upstream request outlived the proxy",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_alone_also_replaces_the_callers_key_with_each_targets() {
    // The proxy strips the caller's credentials before the stack; the fallback layer
    // strips them again for every target. This checks the second guard on its own.
    use backstop::mock::MockProvider;
    use tower::{Layer, ServiceExt};

    let mock = MockProvider::new(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota)),
    );
    let layer = backstop::StackConfig::from_toml_str(
        r#"
        [models.gpt-4o]
        upstream = "openai"
        base_uri = "http://mock.local/v1"
        credential = { env = "OPENAI_KEY" }
        [models.claude-sonnet]
        upstream = "anthropic"
        base_uri = "http://mock.local/v1"
        credential = { header = "x-api-key", env = "ANTHROPIC_KEY" }
        [chains]
        models = { "gpt-4o" = ["claude-sonnet"] }
        "#,
    )
    .unwrap()
    .into_layer_with_env(|name| match name {
        "OPENAI_KEY" => Some(OPENAI_KEY.into()),
        "ANTHROPIC_KEY" => Some(ANTHROPIC_KEY.into()),
        _ => None,
    })
    .unwrap();
    let request = http::Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("x-api-key", CLIENT_KEY)
        .header("api-key", CLIENT_KEY)
        .body(Full::new(Bytes::from(chat_body("gpt-4o", false))))
        .unwrap();
    let response = layer.layer(mock.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let attempts = mock.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        attempts[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    assert_eq!(attempts[1].header("x-api-key"), Some(ANTHROPIC_KEY));
    for attempt in &attempts {
        assert_eq!(attempt.header("api-key"), None);
        assert!(
            attempt
                .headers
                .values()
                .all(|v| !v.to_str().unwrap_or("").contains(CLIENT_KEY)),
            "the caller's key reached {:?}",
            attempt.model
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_timeout_on_a_non_idempotent_request_is_one_504_json_error() {
    let mock = MockServer::start(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::Hang)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(&mock.base_url(), "").map_stack(|builder| {
        builder.retry(
            fast_retry()
                .with_attempt_timeout(Some(Duration::from_millis(200)))
                .unwrap(),
        )
    });
    let proxy = proxy::serve(config, listener).await.unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(Full::new(Bytes::from(chat_body("gpt-4o", false))))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(parts.status, 504);
    assert_eq!(
        report(&parts.headers),
        [
            Some("gpt-4o"),
            Some("1"),
            Some("false"),
            Some("false"),
            None
        ]
    );
    assert_eq!(error_code(&body), "timed_out");
    // The provider may have accepted (and billed) it: neither retried nor sent to
    // another model without an Idempotency-Key.
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_is_a_408_after_the_read_timeout() {
    let mock = MockServer::start(Scenario::new(1), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(&mock.base_url(), "").body_read_timeout(Duration::from_millis(200));
    let proxy = proxy::serve(config, listener).await.unwrap();
    // Half a request, then nothing.
    let first: Result<http_body::Frame<Bytes>, std::io::Error> = Ok(http_body::Frame::data(
        Bytes::from_static(b"{\"model\":\"gpt-4o\","),
    ));
    let trickle = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
    let client: Client<HttpConnector, StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(StreamBody::new(trickle))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .expect("answered before the client gave up")
        .unwrap();
    assert_eq!(response.status(), 408);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(error_code(&body), "request_body_timeout");
    assert_eq!(mock.provider().attempt_count(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_include_the_adaptive_throttle_when_it_is_on() {
    let rig = rig_with(
        Scenario::new(1),
        r#"budget = { adaptive_throttle = { window = "2m", k = 2.0, seed = 7 } }"#,
    )
    .await;
    rig.chat("gpt-4o", false).await;
    let (_, _, body) = rig.get("/metrics").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    for line in [
        "backstop_throttle_rejection_probability 0",
        "backstop_throttle_local_rejections_total 0",
        "backstop_proxy_requests_total{outcome=\"served\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    rig.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configuration_it_fronts_the_builtin_mock() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scenario =
        Scenario::new(0).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota));
    let proxy = proxy::serve_builtin_mock(scenario, listener, Duration::from_secs(5))
        .await
        .expect("starts out of the box");
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(Full::new(Bytes::from(chat_body("gpt-4o", false))))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    // Quota is never retried: one attempt on gpt-4o, then its fallback.
    assert_eq!(
        report(response.headers()),
        [Some("claude-sonnet"), Some("2"), Some("true"), None, None]
    );
    let mock = proxy.mock().expect("the built-in mock");
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 1);
    proxy.shutdown().await;
}
