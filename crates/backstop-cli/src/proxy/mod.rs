//! `backstop proxy`: the sidecar. An OpenAI-compatible HTTP server that puts the
//! whole Backstop stack in front of real providers, so any client (the official
//! Python and Node SDKs, curl, LangChain) gets it without code changes.
//!
//! ## Where it sits
//!
//! ```text
//! client ──► proxy ──► fallback → breaker → budget → retry → attempt timeout → classify ──► hyper-util client ──► providers
//! ```
//!
//! The proxy is the outermost piece: it reads the caller's request, hands it to
//! [`BackstopLayer`](backstop::BackstopLayer) over a pooled hyper-util client
//! (HTTP/1.1 and HTTP/2 over rustls, plain HTTP for `http://` targets), and turns
//! the stack's typed records ([`ServedBy`](backstop::fallback::ServedBy), the
//! [`AttemptLog`](backstop::classify::AttemptLog)s, the
//! [`ClassifiedError`](backstop::classify::ClassifiedError)) into headers and status
//! codes the caller can read. It serves HTTP/1.1 and h2c (HTTP/2 with prior
//! knowledge), chosen per connection.
//!
//! ## Routes
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | through the stack, to the model the body names (JSON or SSE) |
//! | `GET /v1/models` | the configured models, from the configuration (no upstream call) |
//! | `GET /healthz` | `200 ok` |
//! | `GET /metrics` | Prometheus text: requests by outcome (`shed` included), requests in flight and the bound, connections open, refused at the limit and closed at the write timeout, HTTP/2 streams cut alone at the write timeout, upstream attempts, fallbacks, breaker state per key, the retry budget |
//!
//! ## What it reads
//!
//! The body's top-level `"model"`: it must name a `[models.NAME]` of the
//! configuration, or the answer is a 404 `model_not_found` listing the served
//! models. The body is read up to `max_request_body` (8 MiB by default): a
//! `Content-Length` over it is answered 413 before a byte is read, a longer body
//! without one as soon as it crosses the cap. A body that has not arrived within
//! 60 s ([`ProxyConfig::body_read_timeout`]) is answered 408. Refusals made before
//! the stack carry `x-should-retry: false` too: they would fail the same way again.
//!
//! ## Limits: what no client can make it hold
//!
//! | bound | default | beyond it |
//! |---|---|---|
//! | chat requests in flight ([`ProxyConfig::max_in_flight`], `--max-in-flight`) | 1024 | answered at once, body unread: 503 `proxy_overloaded`, `Retry-After: 1`, `x-should-retry: true` |
//! | open connections ([`ProxyConfig::max_connections`], `--max-connections`) | 4096 | answered at once, request unread: HTTP/1.1 503 `proxy_connection_limit`, `Retry-After: 1`, `x-should-retry: true`, then closed (64 such answers at a time, each within 500 ms; beyond, closed at once) |
//! | time to send the preface and each HTTP/1.1 head; time a connection stays idle ([`ProxyConfig::header_read_timeout`]) | 30 s | connection closed (an idle HTTP/1.1 keep-alive connection too); an HTTP/2 connection with no stream open for that long is sent GOAWAY and closed |
//! | time one write to the client may wait: the client taking no bytes of its response ([`ProxyConfig::write_timeout`], `--write-timeout`) | 60 s | connection closed; its streams, and the upstream requests behind them, are dropped (`backstop_proxy_write_timeouts_total`). The clock runs only while a write waits and restarts at every write that completes. On HTTP/2 also when every open stream has waited that long for the client's flow-control window (a stream waiting for its provider is not waiting for the client); one stream that has, beside streams the client reads, is cut alone: its upstream request is dropped, and the stream is reset if the client asks for more of it (`backstop_proxy_unread_streams_cut_total`) |
//! | request head size ([`ProxyConfig::max_header_bytes`]) | 64 KiB | HTTP/1.1: 431 and close; HTTP/2: the advertised header list size |
//! | HTTP/1.1 headers per request | 100 (hyper's) | 431 and close |
//! | streams per HTTP/2 connection ([`ProxyConfig::max_concurrent_streams`]) | 256 | refused by HTTP/2 flow control (the client waits) |
//! | request body size (`max_request_body`) / time ([`ProxyConfig::body_read_timeout`]) | 8 MiB / 60 s | 413 / 408 |
//! | request-body bytes all chat requests hold at once ([`ProxyConfig::max_buffered_body_bytes`], `--max-buffered-body-bytes`) | 256 MiB (never less than `max_request_body`) | a declared `Content-Length` that does not fit: answered at once, body unread; a body that outgrows it while arriving: as soon as it does. 503 `proxy_body_budget`, `Retry-After: 1`, `x-should-retry: true` |
//!
//! Settings too large to run with are refused at start, by name
//! ([`ProxyError::TooLarge`]): any of the four timeouts over a year, and more
//! connections than a `tokio` semaphore counts.
//!
//! A stream counts as in flight until its last byte reaches the caller, or the
//! caller leaves. Shedding is retryable by design: the shed request reached no
//! provider, so a retry cannot bill or answer twice, and the official SDKs' retry
//! (twice, after the `Retry-After` second) is the bounded back-off an overloaded
//! proxy wants. `/healthz` and `/metrics` are never shed. Malformed HTTP/1.1 (bad
//! request line, invalid header bytes, conflicting lengths) gets hyper's 400 and a
//! closed connection; a broken chunked body a 400 `body_read_failed`. The memory a
//! client can hold is therefore bounded by these figures: at most `max_in_flight`
//! buffered bodies of at most `max_request_body` each and
//! `max_buffered_body_bytes` in all (each body is held until the stack has answered;
//! the bytes counted are the body's; the buffer a body sent in many chunks is
//! joined in is at most 9/8 of its length, since one with more than an eighth unused
//! at the end is copied to the exact length; a body that arrives in one chunk is kept
//! as hyper read it, a slice of the connection's read buffer), and per connection one
//! read buffer of at most `max(max_header_bytes, 16 KiB)`.
//!
//! ## What it adds to every answer from the stack
//!
//! | header | value |
//! |---|---|
//! | `x-backstop-model` | the configured model whose answer this is (the fallback's, when one served) |
//! | `x-backstop-attempts` | upstream attempts on every model tried |
//! | `x-backstop-fallback` | `true` when another model than the requested one was tried |
//! | `x-should-retry: false` | on every final failure, so SDKs do not retry on top of Backstop (their 2 retries would triple every attempt, peers.md complaint 3) |
//! | `Retry-After` | on a final failure when every model tried is cooling down (breakers open, rate limited): whole seconds, rounded up, until the first may serve again |
//!
//! Errors Backstop raises itself become OpenAI-style bodies
//! (`{"error": {"message", "type", "param", "code"}}`): 413 for a body over the cap,
//! 503 when breakers, the budget or the throttle refuse, 504 for timeouts, 502 for
//! transport failures. A provider's own failure, passed on after Backstop gave up,
//! keeps its status, headers and bytes.
//!
//! ## What it never does
//!
//! - Never forwards the caller's credentials: every header in
//!   `backstop::fallback::config::CREDENTIAL_HEADERS` (`Authorization`, `api-key`,
//!   `x-api-key`, `x-goog-api-key`, `cookie`, the account and gateway-key headers)
//!   is removed before the stack sees the request, and the key parameters of
//!   `CREDENTIAL_QUERY_PARAMS` (Gemini's `?key=`) leave the query before it goes
//!   to an upstream: each upstream gets the key its configuration names, read from
//!   an environment variable at start-up.
//! - Never logs a header, a body or a key: one `info` line per request with the
//!   models, status, attempts, fallback and latency (`tracing`, to stderr).
//! - Never alters a stream: SSE passes frame by frame; when a stream breaks after
//!   content reached the caller (it cannot be replayed), one final OpenAI-style
//!   `data: {"error": …}` event says so instead of a cut connection.
//! - Never keeps an upstream request running for a caller who left: a dropped
//!   connection drops the response body, which drops the upstream request.
//!
//! ## Configuration
//!
//! The file is the stack's own TOML ([`StackConfig`](backstop::StackConfig)); each
//! `[models.NAME]` is served under `NAME`:
//!
//! ```toml
//! provider = "openai"
//! total_deadline = "60s"
//! max_request_body = 8388608
//!
//! [retry]
//! max_attempts = 3
//! deadline = "30s"
//! attempt_timeout = "20s"
//!
//! [models.gpt-4o]
//! upstream = "openai"
//! base_uri = "https://api.openai.com/v1"
//! credential = { env = "OPENAI_API_KEY" }
//!
//! [models.claude-sonnet]
//! upstream = "anthropic"
//! base_uri = "https://api.anthropic.com/v1"
//! model = "claude-sonnet-4-5"
//! credential = { header = "x-api-key", env = "ANTHROPIC_API_KEY" }
//! headers = { "anthropic-version" = "2023-06-01" }
//!
//! [chains]
//! models = { "gpt-4o" = ["claude-sonnet"] }
//! ```
//!
//! HTTPS upstreams are verified against the system's root certificates
//! (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured) plus any PEM file given with
//! `--ca-file` ([`ProxyConfig::with_root_certificates_pem`]), for a private CA.
//!
//! Without a file, `backstop proxy` starts the built-in mock provider on a free
//! loopback port and serves `gpt-4o` (falling back to `claude-sonnet`) from it, so
//! it runs out of the box ([`serve_builtin_mock`]).
//!
//! ## Example
//!
//! The proxy in-process, in front of a mock provider whose `gpt-4o` is out of
//! quota:
//!
//! ```
//! use backstop::mock::{Fault, MockServer, ModelPlan, Scenario};
//! use backstop_cli::proxy::{self, ProxyConfig};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let scenario = Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota));
//! let mock = MockServer::start(scenario, "127.0.0.1:0".parse()?).await?;
//! let config = ProxyConfig::from_toml_str(&format!(r#"
//!     [models.gpt-4o]
//!     upstream = "mock"
//!     base_uri = "{url}"
//!     [models.claude-sonnet]
//!     upstream = "mock"
//!     base_uri = "{url}"
//!     [chains]
//!     models = {{ "gpt-4o" = ["claude-sonnet"] }}
//! "#, url = mock.base_url()))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let handle = proxy::serve(config, listener).await?;
//! // Point any OpenAI client at handle.base_url(); here, a bare hyper request.
//! # use http_body_util::{BodyExt, Full};
//! # let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
//! #     .build_http::<Full<bytes::Bytes>>();
//! let request = http::Request::post(format!("{}/chat/completions", handle.base_url()))
//!     .header("authorization", "Bearer caller-key-never-forwarded")
//!     .body(Full::from(r#"{"model":"gpt-4o","messages":[]}"#))?;
//! let response = client.request(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()["x-backstop-model"], "claude-sonnet");
//! assert_eq!(response.headers()["x-backstop-fallback"], "true");
//! assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
//! handle.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod admission;
mod body;
mod body_budget;
mod config;
mod error;
mod h2_streams;
mod handshake;
mod metrics;
mod outcome;
mod reply;
mod server;
mod service;
mod upstream;
mod write_timeout;

use std::sync::Arc;

use backstop::mock::{MockServer, Scenario};
use tokio::net::TcpListener;
use tower::Layer;

pub use admission::{
    CONNECTION_LIMIT_CODE, InFlightGuard, InFlightLimit, OVERLOADED_CODE, Overloaded,
    connection_limit_answer,
};
pub use body::{ProxyBody, error_event};
pub use body_budget::{BODY_BUDGET_CODE, BodyBudget, BodyBudgetSpent, BodyReservation, Budgeted};
pub use config::{
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_MAX_BUFFERED_BODY_BYTES, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_IN_FLIGHT, DEFAULT_WRITE_TIMEOUT, Limits, ProxyConfig,
    builtin_mock,
};
pub use error::ProxyError;
pub use metrics::{CounterValues, Outcome, render as render_metrics};
pub use outcome::{
    ATTEMPTS_HEADER, ErrorStatus, FALLBACK_HEADER, MODEL_HEADER, Report, SHOULD_RETRY_HEADER,
    error_status,
};
pub use server::ProxyHandle;
pub use upstream::Upstream;

use metrics::Counters;
use service::Shared;

/// Starts the proxy on `listener` (bind it first, e.g. to `127.0.0.1:0` in tests)
/// and returns once it is accepting. Builds and validates the stack, reading
/// credentials from the environment (or [`ProxyConfig::with_env`]).
pub async fn serve(
    mut config: ProxyConfig,
    listener: TcpListener,
) -> Result<ProxyHandle, ProxyError> {
    let layer = config.build_layer()?;
    let client = upstream::client(config.needs_tls(), config.extra_roots_pem())?;
    let local_addr = listener.local_addr().map_err(ProxyError::Listener)?;
    let shared = Arc::new(Shared {
        stack: layer.layer(client),
        layer,
        models: config.models(),
        max_request_body: config.max_request_body(),
        body_read_timeout: config.body_read(),
        counters: Counters::default(),
        in_flight: InFlightLimit::new(config.limits().max_in_flight),
        body_budget: BodyBudget::new(config.body_budget()),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server::accept_loop(
        listener,
        shared,
        stopped,
        config.drain(),
        config.limits(),
    ));
    tracing::info!(target: "backstop::proxy", %local_addr, models = ?config.models().iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), "proxy listening");
    Ok(ProxyHandle {
        local_addr,
        stop: Some(stop),
        task,
        mock: None,
    })
}

/// Starts the built-in mock provider (answering `scenario`) on a free loopback port
/// and the proxy in front of it with [`builtin_mock`]'s configuration, shutting down
/// within `drain_timeout`. The mock stops with the proxy.
pub async fn serve_builtin_mock(
    scenario: Scenario,
    listener: TcpListener,
    drain_timeout: std::time::Duration,
) -> Result<ProxyHandle, ProxyError> {
    serve_builtin_mock_with(scenario, listener, |config| {
        config.drain_timeout(drain_timeout)
    })
    .await
}

/// [`serve_builtin_mock`], with `configure` applied to [`builtin_mock`]'s
/// configuration first (limits, timeouts, stack edits).
pub async fn serve_builtin_mock_with(
    scenario: Scenario,
    listener: TcpListener,
    configure: impl FnOnce(ProxyConfig) -> ProxyConfig,
) -> Result<ProxyHandle, ProxyError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mock = MockServer::start(scenario, addr)
        .await
        .map_err(ProxyError::Mock)?;
    let config = configure(builtin_mock(&mock.base_url())?);
    let mut handle = serve(config, listener).await?;
    handle.mock = Some(mock);
    Ok(handle)
}
