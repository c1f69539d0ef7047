//! The sidecar proxy's request handling, end to end: `backstop_cli::proxy::serve` on
//! a loopback port in front of the in-process mock provider (`backstop-mock`, every
//! model answering 200), started once per fuzzing process.
//!
//! Why the real server and not a pure function: the proxy's request handling
//! (routing, the body cap, the model lookup, credential and hop-by-hop stripping) is
//! private to `backstop-cli`; what it exposes is the server. Loopback costs a few
//! hundred microseconds per input, which still gives hundreds of thousands of
//! requests in a few minutes, and it fuzzes what callers actually reach, hyper's
//! HTTP/1.1 parser included.
//!
//! Input, first byte:
//! - `% 4 == 0` (raw): the rest is written as-is to a new connection, which is then
//!   half-closed. Whatever comes back must be an HTTP/1.x answer, HTTP/2 frames starting
//!   with SETTINGS after the h2c preface, or nothing; and
//!   the proxy must still answer `GET /healthz` with `200 ok` afterwards;
//! - otherwise (request): a second byte picks the route (`POST /v1/chat/completions`
//!   five times out of eight, else `GET /v1/chat/completions`, `GET /v1/models`,
//!   `POST /unknown`), then `name: value` header lines up to a blank line (`\n\n`),
//!   then the body, sent as one well-framed HTTP/1.1 request (the harness sets
//!   `host` and `content-length`; fuzzed framing headers are dropped).
//!
//! Properties of a request:
//! - an answer always arrives (within 5 s);
//! - a head of more than 100 fields is an empty 431 from hyper, never forwarded;
//! - a chat body over `max_request_body` (2048 bytes) is a 413, one `read_model`
//!   refuses a 400 `invalid_body`, a model that is not configured a 404
//!   `model_not_found`: each with `x-should-retry: false`, an OpenAI-style JSON error,
//!   and no upstream attempt;
//! - a configured model is a 200 from exactly one upstream attempt, reported in
//!   `x-backstop-model` and `x-backstop-attempts: 1`, with no fallback;
//! - that upstream attempt carries the configured key and none of the caller's
//!   credentials (`authorization`, `api-key`, `x-api-key`, `x-goog-api-key`) nor
//!   hop-by-hop headers (`te`, `trailer`, `upgrade`, `keep-alive`,
//!   `proxy-authorization`, `proxy-connection`);
//! - the other routes answer as documented (`405` with `allow: POST`, the model list,
//!   `404 unknown_url`) and never reach the upstream.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use backstop_cli::proxy::{
    self, ATTEMPTS_HEADER, FALLBACK_HEADER, MODEL_HEADER, ProxyConfig, ProxyHandle,
    SHOULD_RETRY_HEADER,
};
use backstop_fallback::read_model;
use backstop_mock::{MockServer, Scenario};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const MAX_REQUEST_BODY: usize = 2048;
const CONFIGURED_KEY: &str = "sk-fuzz-configured-key";
const MODELS: [&str; 2] = ["gpt-4o", "claude-sonnet"];
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

struct World {
    runtime: Runtime,
    addr: SocketAddr,
    mock: MockServer,
    _proxy: ProxyHandle,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (mock, proxy) = runtime.block_on(async {
            let mock = MockServer::start(Scenario::new(9), "127.0.0.1:0".parse().unwrap())
                .await
                .expect("mock provider starts");
            mock.provider().set_record_limit(8);
            let config = ProxyConfig::from_toml_str(&format!(
                r#"
                max_request_body = {MAX_REQUEST_BODY}
                [models.gpt-4o]
                upstream = "mock"
                base_uri = "{url}"
                credential = {{ env = "FUZZ_KEY" }}
                [models.claude-sonnet]
                upstream = "mock"
                base_uri = "{url}"
                credential = {{ env = "FUZZ_KEY" }}
                [chains]
                models = {{ "gpt-4o" = ["claude-sonnet"] }}
                "#,
                url = mock.base_url()
            ))
            .expect("proxy configuration")
            .with_env(|name| (name == "FUZZ_KEY").then(|| CONFIGURED_KEY.to_owned()))
            // A body the harness framed wrongly must not stall the run for 60 s.
            .body_read_timeout(Duration::from_secs(1));
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let proxy = proxy::serve(config, listener).await.expect("proxy starts");
            (mock, proxy)
        });
        World {
            addr: proxy.local_addr(),
            runtime,
            mock,
            _proxy: proxy,
        }
    })
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Answer {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .expect("the proxy answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the answer's body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn header(answer: &Answer, name: impl http::header::AsHeaderName) -> Option<&str> {
    answer.headers.get(name).and_then(|v| v.to_str().ok())
}

/// An OpenAI-style error body with this `code`, refused before the stack.
fn assert_refused(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "body: {:?}", answer.body);
    let error: Value = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {:?}", answer.body));
    assert_eq!(error["error"]["code"], code, "{error}");
    assert!(error["error"]["message"].is_string(), "{error}");
    assert_eq!(header(answer, SHOULD_RETRY_HEADER), Some("false"));
}

fn parse_headers(text: &[u8]) -> HeaderMap {
    const FRAMING: [&str; 5] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "host",
        "expect",
    ];
    let mut headers = HeaderMap::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) && !FRAMING.contains(&name.as_str())
        {
            headers.append(name, value);
        }
    }
    headers
}

async fn raw(world: &World, bytes: &[u8]) {
    let mut stream = TcpStream::connect(world.addr)
        .await
        .expect("connect to the proxy");
    // The proxy may close before reading everything (a malformed head): a failed
    // write is an answer too.
    if stream.write_all(bytes).await.is_ok() {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    // The proxy speaks h2c with prior knowledge too: after the HTTP/2 preface its
    // answer is frames, the first one its SETTINGS (frame type 4).
    let h2 = bytes.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(
        answer.is_empty()
            || answer.starts_with(b"HTTP/1.1 ")
            || answer.starts_with(b"HTTP/1.0 ")
            || (h2 && answer.get(3) == Some(&4)),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    let health = send(
        world.addr,
        Request::get("/healthz")
            .header("host", "proxy")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK, "the proxy stopped answering");
    assert_eq!(&health.body[..], b"ok");
}

async fn request(world: &World, route: u8, rest: &[u8]) {
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest, &[][..]),
    };
    let caller_headers = parse_headers(head);
    let (method, path) = match route % 8 {
        0..=4 => (Method::POST, "/v1/chat/completions"),
        5 => (Method::GET, "/v1/chat/completions"),
        6 => (Method::GET, "/v1/models"),
        _ => (Method::POST, "/unknown"),
    };
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", "proxy");
    for (name, value) in &caller_headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("a request of valid parts");
    let provider = world.mock.provider();
    provider.reset_records();
    let answer = send(world.addr, request).await;

    // hyper's server refuses a head of more than 100 header fields with an empty 431
    // before the proxy sees it. The harness adds `host`, and hyper's client adds
    // `content-length` when the body is not empty or the method is not GET, hence
    // the range.
    let fields = caller_headers.len() + 2;
    if answer.status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
        assert!(fields > 99, "431 for a head of {fields} fields");
        assert_eq!(provider.attempt_count(), 0);
        return;
    }
    assert!(fields <= 101, "a head of {fields} fields was accepted");

    match (method, path) {
        (Method::POST, "/v1/chat/completions") => {}
        (Method::GET, "/v1/chat/completions") => {
            assert_refused_route(
                &answer,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            );
            assert_eq!(header(&answer, "allow"), Some("POST"));
            assert_eq!(provider.attempt_count(), 0);
            return;
        }
        (Method::GET, "/v1/models") => {
            assert_eq!(answer.status, StatusCode::OK);
            let list: Value = serde_json::from_slice(&answer.body).expect("model list is JSON");
            let ids: Vec<&str> = list["data"]
                .as_array()
                .expect("model list has data")
                .iter()
                .filter_map(|m| m["id"].as_str())
                .collect();
            assert_eq!(ids, ["claude-sonnet", "gpt-4o"]);
            assert_eq!(provider.attempt_count(), 0);
            return;
        }
        _ => {
            assert_refused_route(&answer, StatusCode::NOT_FOUND, "unknown_url");
            assert_eq!(provider.attempt_count(), 0);
            return;
        }
    }

    if body.len() > MAX_REQUEST_BODY {
        assert_refused(&answer, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
        assert_eq!(provider.attempt_count(), 0);
        return;
    }
    let model = match read_model(body) {
        Err(_) => {
            assert_refused(&answer, StatusCode::BAD_REQUEST, "invalid_body");
            assert_eq!(provider.attempt_count(), 0);
            return;
        }
        Ok(model) => model.into_owned(),
    };
    if !MODELS.contains(&model.as_str()) {
        assert_refused(&answer, StatusCode::NOT_FOUND, "model_not_found");
        assert_eq!(provider.attempt_count(), 0);
        return;
    }

    assert_eq!(
        answer.status,
        StatusCode::OK,
        "a configured model was not served: {:?}",
        answer.body
    );
    assert_eq!(header(&answer, MODEL_HEADER), Some(model.as_str()));
    assert_eq!(header(&answer, ATTEMPTS_HEADER), Some("1"));
    assert_ne!(header(&answer, FALLBACK_HEADER), Some("true"));
    assert_eq!(provider.attempt_count(), 1, "one upstream attempt");
    assert_eq!(provider.attempts_for(&model), 1);
    let attempts = provider.attempts();
    let upstream = &attempts[0].headers;
    let bearer = format!("Bearer {CONFIGURED_KEY}");
    assert_eq!(
        upstream.get_all("authorization").iter().collect::<Vec<_>>(),
        [bearer.as_str()],
        "the upstream must get exactly the configured key"
    );
    for name in ["api-key", "x-api-key", "x-goog-api-key"] {
        assert!(
            upstream.get(name).is_none(),
            "the caller's {name} was forwarded"
        );
    }
    for name in [
        "te",
        "trailer",
        "upgrade",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            upstream.get(name).is_none(),
            "hop-by-hop {name} was forwarded"
        );
    }
}

/// A route error: an OpenAI-style body, before any model lookup.
fn assert_refused_route(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "body: {:?}", answer.body);
    let error: Value = serde_json::from_slice(&answer.body).expect("route error is JSON");
    assert_eq!(error["error"]["code"], code, "{error}");
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let world = world();
    world.runtime.block_on(async {
        let run = async {
            if mode % 4 == 0 {
                raw(world, rest).await;
            } else if let Some((route, rest)) = rest.split_first() {
                request(world, *route, rest).await;
            }
        };
        tokio::time::timeout(ANSWER_WITHIN, run)
            .await
            .expect("the proxy did not answer within 5 s");
    });
});
