//! The proxy under hostile or heavy clients, over loopback: malformed HTTP, huge
//! heads, slow clients, clients leaving mid-stream, overload, thousands of
//! concurrent streams. Each test asserts what the client sees (exact status lines,
//! bodies, bytes) and that the proxy keeps serving afterwards.
//!
//! Real time (sockets), with short limits (hundreds of milliseconds) so that every
//! test finishes in a few seconds. Times are only ever bounded from below (a limit
//! never cuts early); that a limit does cut is shown by what the client sees, not
//! by how soon. Waiting for the mock is waiting for its events
//! ([`MockProvider::wait_for`]) under a generous failsafe timeout, never polling.
//! The concurrency test needs about 6 000 file descriptors; it says so when
//! `ulimit -n` is lower.

use std::time::Duration;

use backstop::mock::{Fault, Latency, MockProvider, MockServer, ModelPlan, Scenario};
use backstop_cli::proxy::{self, ProxyConfig, ProxyHandle};
use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The mock provider and the proxy in front of it (the built-in mock's
/// configuration: gpt-4o falling back to claude-sonnet), with `configure` applied.
async fn start(
    scenario: Scenario,
    configure: impl FnOnce(ProxyConfig) -> ProxyConfig,
) -> (MockServer, ProxyHandle) {
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock binds loopback");
    let config = proxy::builtin_mock(&mock.base_url())
        .expect("valid configuration")
        .drain_timeout(Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(configure(config), listener)
        .await
        .expect("proxy starts");
    (mock, proxy)
}

/// The mock provider and a proxy configured from `toml`, in which `{mock}` stands
/// for the mock's base URL, with `configure` applied.
async fn start_from_toml(
    scenario: Scenario,
    toml: &str,
    configure: impl FnOnce(ProxyConfig) -> ProxyConfig,
) -> (MockServer, ProxyHandle) {
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock binds loopback");
    let config = ProxyConfig::from_toml_str(&toml.replace("{mock}", &mock.base_url()))
        .expect("valid configuration")
        .drain_timeout(Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(configure(config), listener)
        .await
        .expect("proxy starts");
    (mock, proxy)
}

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn chat_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    )
}

fn chat(proxy: &ProxyHandle, model: &str, stream: bool) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(model, stream))))
        .unwrap()
}

async fn healthz(client: &HttpClient, proxy: &ProxyHandle) -> StatusCode {
    let uri = format!("http://{}/healthz", proxy.local_addr());
    client
        .get(uri.parse().unwrap())
        .await
        .expect("the proxy answers")
        .status()
}

/// One value from the proxy's `/metrics`.
async fn metric(proxy: &ProxyHandle, name: &str) -> u64 {
    let uri = format!("http://{}/metrics", proxy.local_addr());
    let response = http1().get(uri.parse().unwrap()).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(text.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        .parse()
        .unwrap()
}

/// Writes `bytes` on a new connection, then reads until the proxy closes it (at
/// most 3 s). Returns what was read and whether the proxy closed.
async fn raw_exchange(proxy: &ProxyHandle, bytes: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(3)).await
}

async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let closed = loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_elapsed) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Waits until `condition` holds for `provider`, failing with `what` after
/// `failsafe`.
async fn until_within(
    provider: &MockProvider,
    failsafe: Duration,
    what: &str,
    condition: impl FnMut(&MockProvider) -> bool,
) {
    tokio::time::timeout(failsafe, provider.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("{what} (still not so after {failsafe:?})"));
}

/// [`until_within`] 10 s: a failsafe, for events that come within milliseconds.
async fn until(provider: &MockProvider, what: &str, condition: impl FnMut(&MockProvider) -> bool) {
    until_within(provider, Duration::from_secs(10), what, condition).await;
}

fn status_line(response: &str) -> &str {
    response.split("\r\n").next().unwrap_or("")
}

fn error_code(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).expect("a JSON error body");
    json["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_400_and_close_and_the_proxy_keeps_serving() {
    let (mock, proxy) = start(Scenario::new(1), |c| c).await;
    let cases: [(&str, &[u8]); 7] = [
        ("garbage bytes", b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"),
        ("no method or path", b"HTTP/1.1\r\n\r\n"),
        ("bad request line", b"GET\r\n\r\n"),
        ("space in the path", b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "control byte in a header value",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
        ),
        (
            "invalid header name",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        ),
        (
            "conflicting content lengths",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
        ),
    ];
    for (case, bytes) in cases {
        let (response, closed) = raw_exchange(&proxy, bytes).await;
        assert_eq!(
            status_line(&response),
            "HTTP/1.1 400 Bad Request",
            "{case}: {response:?}"
        );
        assert!(closed, "{case}: the connection is closed after a 400");
    }
    // Nothing reached the provider, and the proxy still serves.
    assert_eq!(mock.provider().attempt_count(), 0);
    assert_eq!(healthz(&http1(), &proxy).await, 200);
    assert_eq!(healthz(&h2c(), &proxy).await, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunked_encoding_is_a_400_json_error_without_an_upstream_call() {
    let (mock, proxy) = start(Scenario::new(1), |c| c).await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (case, chunks) in [
        ("chunk size not hex", "zz\r\n{}\r\n0\r\n\r\n"),
        ("chunk longer than its size", "2\r\n{\"model\"\r\n0\r\n\r\n"),
    ] {
        let (response, closed) = raw_exchange(&proxy, format!("{head}{chunks}").as_bytes()).await;
        assert_eq!(
            status_line(&response),
            "HTTP/1.1 400 Bad Request",
            "{case}: {response:?}"
        );
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
        assert_eq!(error_code(body.as_bytes()), "body_read_failed", "{case}");
        assert!(closed, "{case}: a connection whose framing broke is closed");
    }
    assert_eq!(mock.provider().attempt_count(), 0);
    assert_eq!(healthz(&http1(), &proxy).await, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_cap_are_431_and_the_proxy_keeps_serving() {
    let (mock, proxy) = start(Scenario::new(1), |c| c.max_header_bytes(16 * 1024)).await;
    // One 20 KiB header.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let (response, closed) = raw_exchange(&proxy, huge.as_bytes()).await;
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(closed);
    // More headers than hyper's 100, each small.
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (response, closed) = raw_exchange(&proxy, many.as_bytes()).await;
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(closed);
    // A head that never ends: refused once it passes the cap, not buffered on.
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        .await
        .unwrap();
    let mut written = 0usize;
    let chunk = vec![b'a'; 4096];
    while written < 1024 * 1024 {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
        written += chunk.len();
    }
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert_eq!(
        status_line(&response),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(closed);

    // HTTP/2: the cap is the advertised header list size; h2 answers the stream 431.
    let request = http::Request::get(format!("http://{}/healthz", proxy.local_addr()))
        .header("x-huge", "a".repeat(20 * 1024))
        .body(Full::default())
        .unwrap();
    let response = h2c().request(request).await.expect("an answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(mock.provider().attempt_count(), 0);
    assert_eq!(healthz(&http1(), &proxy).await, 200);
    assert_eq!(healthz(&h2c(), &proxy).await, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_is_cut_at_the_header_timeout_while_others_are_served() {
    let timeout = Duration::from_millis(400);
    let (_mock, proxy) = start(Scenario::new(1), |c| c.header_read_timeout(timeout)).await;
    let addr = proxy.local_addr();

    // Each clock starts before its client connects: the proxy's starts once it has
    // accepted the connection, which may be before `connect` returns.
    // Trickles its head one byte every 50 ms: never finishes within 400 ms.
    let (trickling, loris_connected) = tokio::sync::oneshot::channel();
    let loris = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut trickling = Some(trickling);
        for byte in head {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            if let Some(trickling) = trickling.take() {
                let _ = trickling.send(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        (started.elapsed(), response, closed)
    });
    // Connects and sends nothing at all (no protocol chosen yet).
    let silent = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        (started.elapsed(), response, closed)
    });
    // Half of the HTTP/2 preface, then nothing.
    let half_h2 = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        (started.elapsed(), response, closed)
    });

    // Meanwhile, from the loris's first byte on, other clients are served, on new
    // connections each time: every one of them.
    loris_connected.await.expect("the loris connected");
    let mut served = 0;
    while !loris.is_finished() {
        let client = http1();
        let response = client.request(chat(&proxy, "gpt-4o", false)).await.unwrap();
        assert_eq!(response.status(), 200);
        served += 1;
    }
    assert!(served >= 1, "nothing served while the loris was connected");

    for (who, task) in [("loris", loris), ("silent", silent), ("half h2", half_h2)] {
        let (elapsed, response, closed) = task.await.unwrap();
        // Closed by the proxy (not by the 10 s read deadline), without an answer,
        // and never before the timeout.
        assert!(closed, "{who}: still open after 10 s");
        assert!(elapsed >= timeout, "{who}: closed after {elapsed:?}");
        // The head never arrived: there is no request to answer.
        assert_eq!(response, "", "{who}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let (_mock, proxy) = start(Scenario::new(1), |c| c.header_read_timeout(timeout)).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // From the request's end: the proxy's idle clock can only start once it has
    // read the request (and answered it), so this lower bound also shows that the
    // clock started at the connection's opening did not carry on.
    let started = Instant::now();
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
    assert!(response.ends_with("\r\n\r\nok"), "{response:?}");
    // Closed by the proxy after exactly one answer, and never before the timeout.
    assert!(closed, "still open after 10 s");
    let elapsed = started.elapsed();
    assert!(elapsed >= timeout, "closed after {elapsed:?}");
    proxy.shutdown().await;
}

/// An h2c connection of its own, driven by a task whose result is the
/// connection's end.
async fn h2c_connection(
    proxy: &ProxyHandle,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    (sender, tokio::spawn(connection))
}

/// Waits for `connection` to end (failing after 10 s, a failsafe); how long it
/// took from `from`.
async fn closed_after(
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    from: Instant,
) -> Duration {
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the proxy closed the connection (still open after 10 s)");
    // GOAWAY, then a clean close: not an error on the client's side.
    ended.unwrap().expect("a graceful close");
    from.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let (_mock, proxy) = start(Scenario::new(1), |c| c.header_read_timeout(timeout)).await;

    // Never used after its handshake. Measured from before it connects: the proxy's
    // idle clock starts once it has read the preface, before the client sees the
    // handshake done.
    let opened = Instant::now();
    let (_unused, never_used) = h2c_connection(&proxy).await;
    // Used once, two thirds of the timeout after it opened, then idle (its client
    // answers the proxy's pings all the while). Its idle time is measured from the
    // request: the proxy's idle clock starts when it has sent the response, which
    // the client cannot see, and a clock started when the client has read it runs
    // a little behind the proxy's.
    let (mut sender, used_once) = h2c_connection(&proxy).await;
    tokio::time::sleep(timeout * 2 / 3).await;
    let request = http::Request::get(format!("http://{}/healthz", proxy.local_addr()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let idle_from = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");

    // Each closed gracefully by the proxy (GOAWAY), never before the timeout.
    for (who, elapsed) in [
        ("never used", closed_after(never_used, opened).await),
        ("used once", closed_after(used_once, idle_from).await),
    ] {
        assert!(elapsed >= timeout, "{who}: closed after {elapsed:?}");
    }
    // The proxy serves on.
    assert_eq!(healthz(&h2c(), &proxy).await, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_longer_than_the_idle_timeout_is_served_whole_then_the_connection_closes() {
    let timeout = Duration::from_millis(300);
    // The head after 600 ms, then 4 chunks 200 ms apart: open for 1.4 s, 4.7 times
    // the idle timeout, with no other stream on its connection.
    let plan = ModelPlan::ok()
        .latency(Latency::Fixed {
            value: Duration::from_millis(600),
        })
        .stream_chunks(4)
        .chunk_delay(Duration::from_millis(200));
    let (mock, proxy) = start(Scenario::new(1).model("gpt-4o", plan), |c| {
        c.header_read_timeout(timeout)
    })
    .await;
    let (mut sender, connection) = h2c_connection(&proxy).await;
    let started = Instant::now();
    let response = sender
        .send_request(chat(&proxy, "gpt-4o", true))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let ended = Instant::now();
    assert!(
        ended - started >= Duration::from_millis(1400),
        "the stream took {:?}",
        ended - started
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 5, "4 chunks and [DONE]: {text:?}");
    assert_eq!(events[4], "data: [DONE]");
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    // The whole stream (all five events, over 1.4 s: 4.7 idle timeouts) on a
    // connection still open: idle only once the stream is over. Then it is
    // closed, gracefully. (How long after its last byte is not measured: the
    // proxy's clock starts when it sends that byte, which the client cannot see.)
    assert!(
        !connection.is_finished(),
        "closed while the stream was open"
    );
    closed_after(connection, ended).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_resetting_its_stream_mid_stream_ends_the_upstream_request() {
    // 200 chunks 1 s apart, held after the first: the upstream stream cannot end
    // by itself, so its ending within the 10 s failsafe below is the cancellation.
    let plan = ModelPlan::ok()
        .stream_chunks(200)
        .chunk_delay(Duration::from_secs(1));
    let (mock, proxy) = start(Scenario::new(1).model("gpt-4o", plan), |c| c).await;
    let _held = mock.provider().hold_streams();
    let client = h2c();
    let response = client.request(chat(&proxy, "gpt-4o", true)).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert_eq!(mock.provider().in_flight("gpt-4o"), 1);
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 1);
    // Dropping the body resets the stream (RST_STREAM); the connection stays open.
    drop(body);
    until(
        mock.provider(),
        "the upstream stream is still open after the client reset it",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
    // The proxy's own slot is freed too (it is dropped with the body, before the
    // upstream connection can tell the mock), and the same connection serves on.
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 0);
    let response = client
        .request(chat(&proxy, "claude-sonnet", false))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_in_flight_are_shed_at_once_with_a_retryable_503() {
    let (mock, proxy) = start(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::Hang)),
        |c| c.max_in_flight(4),
    )
    .await;
    // Four requests hang at the provider and hold every slot.
    let client = http1();
    let hung: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.request(chat(&proxy, "gpt-4o", false))))
        .collect();
    until(mock.provider(), "the four never reached the mock", |p| {
        p.in_flight("gpt-4o") == 4
    })
    .await;

    for model in ["gpt-4o", "claude-sonnet", "gpt-4o"] {
        // Shed, not queued: the four slots are held by hangs, so a queued request
        // would never be answered (the timeout is only a failsafe).
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(chat(&proxy, model, false)),
        )
        .await
        .expect("shed, not queued")
        .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["x-should-retry"], "true");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            "{\"error\":{\"message\":\"backstop proxy is at its limit of 4 requests in flight; retry after 1 s, or raise --max-in-flight\",\"type\":\"server_error\",\"param\":null,\"code\":\"proxy_overloaded\"}}"
        );
    }
    // A request whose body never ends is shed too: its body is never read.
    let endless = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
        Bytes::from_static(b"{\"model\":\"gpt-4o\","),
    ))])
    .chain(futures_util::stream::pending());
    let streaming: Client<HttpConnector, StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(StreamBody::new(endless))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(2), streaming.request(request))
        .await
        .expect("shed without waiting for the body")
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Health and metrics are never shed; nothing more reached the provider.
    assert_eq!(healthz(&client, &proxy).await, 200);
    assert_eq!(
        metric(&proxy, "backstop_proxy_requests_total{outcome=\"shed\"}").await,
        4
    );
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 4);
    assert_eq!(metric(&proxy, "backstop_proxy_max_in_flight").await, 4);
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 4);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 0);

    // The hung callers leave: their slots free, and the next request is served.
    for task in hung {
        task.abort();
    }
    // The proxy drops each caller's request, slot and upstream call at once; the
    // mock sees the upstream call end only after that.
    until(
        mock.provider(),
        "the upstream calls outlived their callers",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 0);
    let response = http1()
        .request(chat(&proxy, "claude-sonnet", false))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_a_new_connection_gets_an_immediate_503_and_is_closed() {
    let (mock, proxy) = start(Scenario::new(1), |c| c.max_connections(2)).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        stream.write_all(request).await.unwrap();
        let (response, closed) = read_until_closed(&mut stream, Duration::from_millis(300)).await;
        assert!(response.ends_with("\r\n\r\nok"), "{response:?}");
        assert!(!closed, "kept alive");
        open.push(stream);
    }
    // The third connection is answered, its request unread, and closed: exactly
    // the refusal's bytes, then the end.
    let (response, closed) = raw_exchange(&proxy, request).await;
    assert!(closed);
    assert_eq!(
        response.as_bytes(),
        &proxy::connection_limit_answer(2)[..],
        "{response}"
    );
    // A client library sees an ordinary retryable 503.
    let response = http1()
        .request(chat(&proxy, "gpt-4o", false))
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["x-should-retry"], "true");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(error_code(&body), "proxy_connection_limit");
    assert_eq!(mock.provider().attempt_count(), 0);
    // Counted, as read over one of the two connections already open.
    open[0]
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (metrics, _) = read_until_closed(&mut open[0], Duration::from_millis(300)).await;
    for line in [
        "backstop_proxy_connections_open 2",
        "backstop_proxy_connections_refused_total 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    drop(open.pop());
    // One of the two left: new connections are served again once the proxy has
    // seen it go, which it tells no one: ask until it serves (a failsafe bounds
    // the asking).
    let served_again = async {
        loop {
            let (response, _) = raw_exchange(
                &proxy,
                b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await;
            if response.starts_with("HTTP/1.1 200 OK\r\n") {
                break;
            }
            assert_eq!(
                response.as_bytes(),
                &proxy::connection_limit_answer(2)[..],
                "{response}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), served_again)
        .await
        .expect("still refused 10 s after a connection closed");
    drop(open);
    proxy.shutdown().await;
}

/// The soft limit on open files, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_streams_all_complete_with_exact_bytes() {
    // 1 000 streams over 8 h2c connections and 1 000 over their own HTTP/1.1
    // connections, all open at once: ~1 000 client and ~1 000 proxy sockets, and
    // 2 000 upstream connections on each side of the proxy → mock hop.
    const H2_STREAMS: usize = 1000;
    const H1_STREAMS: usize = 1000;
    const H2_CONNECTIONS: usize = 8;
    let needed = 2 * H1_STREAMS + 2 * (H1_STREAMS + H2_STREAMS) + 2 * H2_CONNECTIONS + 512;
    if let Some(limit) = open_files_limit() {
        assert!(
            limit >= needed as u64,
            "this test opens ~{needed} sockets; raise the open files limit (ulimit -n {needed}) from {limit}"
        );
    }
    // Five chunks and [DONE], 100 ms apart once the mock answers. It answers none
    // until all 2 000 requests are in flight at once (however long gathering them
    // takes: each attempt may wait up to 2 minutes for its answer).
    let plan = ModelPlan::ok()
        .stream_chunks(5)
        .chunk_delay(Duration::from_millis(100));
    let (mock, proxy) = start_from_toml(
        Scenario::new(1).model("gpt-4o", plan),
        r#"
        provider = "openai"
        total_deadline = "10m"

        [retry]
        max_attempts = 3
        deadline = "5m"
        attempt_timeout = "2m"

        [models.gpt-4o]
        upstream = "mock"
        base_uri = "{mock}"
        "#,
        |c| c.max_in_flight(4096).max_connections(4096),
    )
    .await;
    let held = mock.provider().hold_answers();

    let h2_clients: Vec<HttpClient> = (0..H2_CONNECTIONS).map(|_| h2c()).collect();
    let mut tasks = Vec::with_capacity(H2_STREAMS + H1_STREAMS);
    for i in 0..H2_STREAMS + H1_STREAMS {
        // An HTTP/1.1 client per stream: its own connection.
        let client = if i < H2_STREAMS {
            h2_clients[i % H2_CONNECTIONS].clone()
        } else {
            http1()
        };
        let request = chat(&proxy, "gpt-4o", true);
        tasks.push(tokio::spawn(async move {
            let response = client.request(request).await.expect("answered");
            let version = response.version();
            let status = response.status();
            let id = response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("whole stream")
                .to_bytes();
            (version, status, id, body)
        }));
    }
    // Every one of them through the proxy and at the provider at once, each
    // attempted once; none answered yet.
    until_within(
        mock.provider(),
        Duration::from_secs(60),
        "the 2 000 requests were never all at the provider",
        |p| p.in_flight("gpt-4o") == H2_STREAMS + H1_STREAMS,
    )
    .await;
    assert_eq!(mock.provider().in_flight("gpt-4o"), H2_STREAMS + H1_STREAMS);
    assert_eq!(
        mock.provider().attempts_for("gpt-4o"),
        H2_STREAMS + H1_STREAMS
    );
    assert_eq!(
        metric(&proxy, "backstop_proxy_in_flight").await,
        (H2_STREAMS + H1_STREAMS) as u64
    );
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "answered while held"
    );
    // Let them all go: 2 000 streams, all at once.
    drop(held);
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap());
    }

    // What the mock sends for attempt `seq`, from one direct request (the last seq)
    // with its id and timestamp replaced.
    let attempts = mock.provider().attempts();
    let direct_seq = attempts.len();
    let direct = http1()
        .request(
            http::Request::post(format!("{}/chat/completions", mock.base_url()))
                .body(Full::new(Bytes::from(chat_body("gpt-4o", true))))
                .unwrap(),
        )
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let direct = String::from_utf8(direct.to_vec()).unwrap();
    let attempts = mock.provider().attempts();
    let created = |seq: usize| 1_700_000_000 + attempts[seq].since_start.as_secs();
    let mut h2 = 0;
    for (version, status, id, body) in results {
        assert_eq!(status, 200);
        let seq: usize = id.strip_prefix("req_mock_").unwrap().parse().unwrap();
        let expected = direct
            .replace(
                &format!("chatcmpl-mock-{direct_seq}"),
                &format!("chatcmpl-mock-{seq}"),
            )
            .replace(
                &format!("\"created\":{}", created(direct_seq)),
                &format!("\"created\":{}", created(seq)),
            );
        assert_eq!(body, expected.as_bytes(), "stream {id}");
        h2 += usize::from(version == http::Version::HTTP_2);
    }
    assert_eq!(h2, H2_STREAMS);
    assert_eq!(
        mock.provider().attempts_for("gpt-4o"),
        H2_STREAMS + H1_STREAMS + 1
    );
    assert_eq!(
        metric(&proxy, "backstop_proxy_requests_total{outcome=\"served\"}").await,
        2000
    );
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 0);
    proxy.shutdown().await;
}

/// A chat body for `model` of exactly `len` bytes (the message is padded).
fn chat_body_of(model: &str, len: usize) -> Bytes {
    let bare = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":""}}]}}"#);
    let pad = "x".repeat(len - bare.len());
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"{pad}"}}]}}"#);
    assert_eq!(body.len(), len);
    Bytes::from(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_beyond_the_body_budget_are_shed_with_a_retryable_503() {
    // Bodies up to 400 bytes each, 400 bytes in all.
    let (mock, proxy) = start_from_toml(
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::Hang)),
        r#"
        provider = "openai"
        max_request_body = 400

        [models.gpt-4o]
        upstream = "mock"
        base_uri = "{mock}"

        [models.claude-sonnet]
        upstream = "mock"
        base_uri = "{mock}"
        "#,
        |c| c.max_buffered_body_bytes(400),
    )
    .await;
    let post = |body: Bytes| {
        http::Request::post(format!("{}/chat/completions", proxy.base_url()))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap()
    };

    // 250 bytes held by a request hanging at the provider.
    let client = http1();
    let hung = tokio::spawn(client.request(post(chat_body_of("gpt-4o", 250))));
    until(mock.provider(), "the first never reached the mock", |p| {
        p.in_flight("gpt-4o") == 1
    })
    .await;
    assert_eq!(
        metric(&proxy, "backstop_proxy_buffered_body_bytes").await,
        250
    );
    assert_eq!(
        metric(&proxy, "backstop_proxy_max_buffered_body_bytes").await,
        400
    );

    // A declared 200 bytes does not fit the 150 left: shed at once.
    let response = client
        .request(post(chat_body_of("claude-sonnet", 200)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["x-should-retry"], "true");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let budget_spent = "{\"error\":{\"message\":\"backstop proxy holds its limit of 400 bytes of request bodies; retry after 1 s, or raise --max-buffered-body-bytes\",\"type\":\"server_error\",\"param\":null,\"code\":\"proxy_body_budget\"}}";
    assert_eq!(body, budget_spent);

    // A body without a declared length is counted as it arrives: 200 bytes in two
    // chunks outgrow the budget at the second.
    let streaming: Client<HttpConnector, StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let chunked = |body: Bytes| {
        let (a, b) = (body.slice(..100), body.slice(100..));
        let frames = futures_util::stream::iter([
            Ok::<_, std::io::Error>(http_body::Frame::data(a)),
            Ok(http_body::Frame::data(b)),
        ]);
        http::Request::post(format!("{}/chat/completions", proxy.base_url()))
            .body(StreamBody::new(frames))
            .unwrap()
    };
    let response = streaming
        .request(chunked(chat_body_of("claude-sonnet", 200)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, budget_spent);
    // One that fits is served, and gives its bytes back once answered.
    let response = streaming
        .request(chunked(chat_body_of("claude-sonnet", 150)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        metric(&proxy, "backstop_proxy_buffered_body_bytes").await,
        250
    );
    assert_eq!(
        metric(&proxy, "backstop_proxy_requests_total{outcome=\"shed\"}").await,
        2
    );
    // Nothing shed reached a provider.
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 1);

    // The hung caller leaves: its bytes come back, and the shed request now fits.
    hung.abort();
    // The proxy drops the caller's request, its bytes and its upstream call at
    // once; the mock sees the upstream call end only after that.
    until(
        mock.provider(),
        "the upstream call outlived its caller",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
    assert_eq!(
        metric(&proxy, "backstop_proxy_buffered_body_bytes").await,
        0
    );
    let response = client
        .request(post(chat_body_of("claude-sonnet", 400)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        metric(&proxy, "backstop_proxy_buffered_body_bytes").await,
        0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_provider_leaves_silent_ends_with_an_error_event_at_the_idle_timeout() {
    // The first chunk at once, the next after 30 s: the stream stalls.
    let plan = ModelPlan::ok()
        .stream_chunks(3)
        .chunk_delay(Duration::from_secs(30));
    let (mock, proxy) = start_from_toml(
        Scenario::new(1).model("gpt-4o", plan),
        r#"
        provider = "openai"

        [retry]
        stream_idle_timeout = "400ms"

        [models.gpt-4o]
        upstream = "mock"
        base_uri = "{mock}"
        "#,
        |c| c,
    )
    .await;

    let started = Instant::now();
    let response = http1().request(chat(&proxy, "gpt-4o", true)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    // Never before the idle timeout; that the timeout ended it (not the mock's
    // next chunk, 30 s on) is in the error event below.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "the stream ended after {elapsed:?}"
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.len(), 2, "the first chunk, then the error: {text:?}");
    assert!(events[0].starts_with("data: {\"choices\":"), "{text:?}");
    assert!(
        events[1].contains("the provider sent nothing for 400ms"),
        "{text:?}"
    );
    assert!(
        events[1].contains("\"code\":\"stream_interrupted\""),
        "{text:?}"
    );
    // Never replayed.
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    proxy.shutdown().await;
    mock.shutdown().await;
}

/// The mock answering gpt-4o with a stream far larger than every buffer between
/// the proxy and a client (socket buffers, hyper's), about 36 MB of SSE, and a
/// proxy with a 300 ms write timeout.
async fn start_cutting_at_300ms() -> (MockServer, ProxyHandle) {
    let huge_stream = ModelPlan::ok().stream_chunks(200_000);
    start(Scenario::new(1).model("gpt-4o", huge_stream), |c| {
        c.write_timeout(Duration::from_millis(300))
    })
    .await
}

/// A client socket with a 4 KiB receive buffer: what it leaves unread soon fills
/// the proxy's socket.
fn small_receive_buffer() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
}

/// What a client that stopped reading leaves behind once the write timeout has
/// cut it: its upstream request ended (20 s is a failsafe), one write timeout
/// counted, nothing in flight, and one attempt at the provider (never replayed).
async fn assert_cut_at_the_write_timeout(mock: &MockServer, proxy: &ProxyHandle) {
    until_within(
        mock.provider(),
        Duration::from_secs(20),
        "the upstream stream is still open after the client stopped reading",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
    assert_eq!(
        metric(proxy, "backstop_proxy_write_timeouts_total").await,
        1
    );
    assert_eq!(metric(proxy, "backstop_proxy_in_flight").await, 0);
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_is_closed_at_the_write_timeout() {
    let (mock, proxy) = start_cutting_at_300ms().await;
    // A client with a small receive buffer, which reads the status line and then
    // nothing more.
    let socket = small_receive_buffer();
    let mut stream = socket.connect(proxy.local_addr()).await.unwrap();
    let body = chat_body("gpt-4o", true);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    assert_eq!(mock.provider().in_flight("gpt-4o"), 1);

    assert_cut_at_the_write_timeout(&mock, &proxy).await;
    // The proxy closed the connection: what the client reads now is the part of
    // the stream that was in its buffers, then the end.
    let (rest, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(closed, "the connection is still open");
    assert!(
        !rest.contains("data: [DONE]"),
        "the whole stream arrived: {} bytes",
        rest.len()
    );
    // The proxy serves on.
    assert_eq!(healthz(&http1(), &proxy).await, StatusCode::OK);
    proxy.shutdown().await;
    mock.shutdown().await;
}

/// A client connection that stops reading from its socket once `reading` is
/// cleared (a frozen process): its HTTP/2 stack then takes nothing more, and
/// answers nothing either.
struct StopsReading {
    inner: TcpStream,
    reading: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for StopsReading {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.reading.load(std::sync::atomic::Ordering::SeqCst) {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            std::task::Poll::Pending
        }
    }
}

impl tokio::io::AsyncWrite for StopsReading {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens an HTTP/2 connection on `io` (its client set up by `configure`), asks it
/// for a gpt-4o stream and returns the 200 response with its body unread.
async fn unread_h2_stream<I>(
    proxy: &ProxyHandle,
    io: I,
    configure: impl FnOnce(&mut hyper::client::conn::http2::Builder<TokioExecutor>),
) -> http::Response<hyper::body::Incoming>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut client = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    configure(&mut client);
    let (mut sender, connection) = client
        .handshake::<_, Full<Bytes>>(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(chat(proxy, "gpt-4o", true))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_its_connection_is_closed_at_the_write_timeout() {
    let (mock, proxy) = start_cutting_at_300ms().await;
    let socket = small_receive_buffer();
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let io = StopsReading {
        inner: socket.connect(proxy.local_addr()).await.unwrap(),
        reading: reading.clone(),
    };
    // Flow-control windows far larger than the stream: what stops the proxy is the
    // socket, not HTTP/2 flow control.
    let response = unread_h2_stream(&proxy, io, |client| {
        client
            .initial_stream_window_size(1 << 30)
            .initial_connection_window_size(1 << 30);
    })
    .await;
    // The client freezes, its response held but never read.
    reading.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(mock.provider().in_flight("gpt-4o"), 1);

    assert_cut_at_the_write_timeout(&mock, &proxy).await;
    drop(response);
    proxy.shutdown().await;
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_leaves_its_only_stream_unread_is_closed_at_the_write_timeout() {
    let (mock, proxy) = start_cutting_at_300ms().await;
    // The client's HTTP/2 stack keeps reading its socket and answering pings, but
    // the application never reads the body: the stream's 64 KiB window fills and is
    // never released. The socket never makes the proxy's writes wait.
    let io = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let response = unread_h2_stream(&proxy, io, |client| {
        client.initial_stream_window_size(65_535);
    })
    .await;
    assert_eq!(mock.provider().in_flight("gpt-4o"), 1);

    assert_cut_at_the_write_timeout(&mock, &proxy).await;
    // Its only stream is due to be cut alone at the same instant: the connection's
    // close is what is counted.
    assert_eq!(
        metric(&proxy, "backstop_proxy_unread_streams_cut_total").await,
        0
    );
    drop(response);
    proxy.shutdown().await;
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_left_unread_beside_one_read_loses_its_upstream_request_at_the_write_timeout()
 {
    // gpt-4o: a stream far larger than the client's 64 KiB stream window, left
    // unread. claude-sonnet: five chunks, read to the end on the same connection.
    let read_plan = ModelPlan::ok()
        .stream_chunks(5)
        .chunk_delay(Duration::from_millis(20));
    let scenario = Scenario::new(1)
        .model("gpt-4o", ModelPlan::ok().stream_chunks(200_000))
        .model("claude-sonnet", read_plan);
    let (mock, proxy) = start(scenario, |c| c.write_timeout(Duration::from_millis(300))).await;
    let mut client = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    client.initial_stream_window_size(65_535);
    let io = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (mut sender, connection) = client
        .handshake::<_, Full<Bytes>>(TokioIo::new(io))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let unread = sender
        .send_request(chat(&proxy, "gpt-4o", true))
        .await
        .unwrap();
    assert_eq!(unread.status(), 200);
    // The read stream's answer is held at the provider until the unread one is cut:
    // it waits for its provider all along, so the connection is never stalled.
    let held = mock.provider().hold_answers();
    let read = tokio::spawn(sender.send_request(chat(&proxy, "claude-sonnet", true)));
    until(
        mock.provider(),
        "the read stream reached the provider",
        |p| p.in_flight("claude-sonnet") == 1,
    )
    .await;
    assert_eq!(mock.provider().in_flight("gpt-4o"), 1);

    until_within(
        mock.provider(),
        Duration::from_secs(20),
        "the unread stream's upstream request is still open",
        |p| p.in_flight("gpt-4o") == 0,
    )
    .await;
    // Cut alone: the read stream still waits for its answer on the same connection.
    assert_eq!(mock.provider().in_flight("claude-sonnet"), 1);
    assert!(!connection.is_finished(), "the connection was closed");
    assert_eq!(
        metric(&proxy, "backstop_proxy_unread_streams_cut_total").await,
        1
    );
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 1);
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);

    // The client reads the cut stream after all: what its window held, then a
    // reset, never the stream's end.
    let mut cut = unread.into_body();
    let mut received = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match cut.frame().await {
                Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(error)) => break Some(error),
                None => break None,
            }
        }
    })
    .await
    .expect("the cut stream neither ended nor failed");
    let error = format!("{:?}", ended.expect("the cut stream ended cleanly"));
    assert!(
        error.contains("Reset") && error.contains("INTERNAL_ERROR"),
        "{error}"
    );
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("data: {"), "{received}");
    assert!(!received.contains("[DONE]"), "{} bytes", received.len());

    // The connection lives on: the read stream, answered only now, arrives whole.
    drop(held);
    let response = read.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 6, "{text}");
    for event in &events[..5] {
        let chunk: serde_json::Value =
            serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{text}");
        assert_eq!(chunk["model"], "claude-sonnet", "{text}");
    }
    assert_eq!(events[5], "data: [DONE]");
    assert!(!connection.is_finished(), "the connection was closed");
    assert_eq!(
        metric(&proxy, "backstop_proxy_write_timeouts_total").await,
        0
    );
    assert_eq!(
        metric(&proxy, "backstop_proxy_unread_streams_cut_total").await,
        1
    );
    assert_eq!(metric(&proxy, "backstop_proxy_in_flight").await, 0);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 1);
    drop(sender);
    proxy.shutdown().await;
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_provider_pauses_past_the_write_timeout_arrives_whole() {
    // Five chunks 500 ms apart, on a 200 ms write timeout: the stream waits for its
    // provider, not for the client, and is never cut.
    let plan = ModelPlan::ok()
        .stream_chunks(5)
        .chunk_delay(Duration::from_millis(500));
    let (mock, proxy) = start(Scenario::new(1).model("gpt-4o", plan), |c| {
        c.write_timeout(Duration::from_millis(200))
    })
    .await;
    let response = h2c().request(chat(&proxy, "gpt-4o", true)).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(text.matches("data: {").count(), 5, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        metric(&proxy, "backstop_proxy_write_timeouts_total").await,
        0
    );
    proxy.shutdown().await;
    mock.shutdown().await;
}

/// `--header-read-timeout 10000000000000000000s` would make hyper panic on the first
/// connection (it adds the timeout to its clock unchecked), and `--max-connections`
/// over `usize::MAX >> 3` the semaphore holding the slots: the proxy refuses to
/// start with either, naming the setting and its limit.
#[tokio::test]
async fn settings_too_large_to_run_with_are_refused_at_start() {
    const HUGE: Duration = Duration::from_secs(10_000_000_000_000_000_000);
    type Configure = fn(ProxyConfig) -> ProxyConfig;
    let cases: [(Configure, &str); 3] = [
        (|c| c.header_read_timeout(HUGE), "--header-read-timeout"),
        (|c| c.write_timeout(HUGE), "--write-timeout"),
        (|c| c.max_connections(usize::MAX), "--max-connections"),
    ];
    for (configure, flag) in cases {
        let config = configure(proxy::builtin_mock("http://127.0.0.1:9/v1").unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = proxy::serve(config, listener).await.expect_err(flag);
        assert!(
            matches!(error, proxy::ProxyError::TooLarge { setting, .. } if setting == flag),
            "{error}"
        );
        assert!(
            error.to_string().starts_with(&format!("{flag} ")),
            "{error}"
        );
    }
}
