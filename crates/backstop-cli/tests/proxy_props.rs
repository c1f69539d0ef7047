//! The proxy's request handling as property tests in the normal suite: the same
//! properties the `proxy_request` cargo-fuzz target (fuzz/README.md) checks over
//! hundreds of thousands of inputs, here over a few dozen per run.
//!
//! One proxy, in front of the built-in mock provider on loopback, serves every case.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use backstop_cli::proxy::{self, ProxyHandle};
use backstop_mock::Scenario;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const CALLER_KEY: &str = "sk-caller-PROPTEST-9f3k";

struct Fixture {
    runtime: Runtime,
    proxy: ProxyHandle,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let proxy = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            proxy::serve_builtin_mock_with(Scenario::new(0), listener, |config| {
                config.header_read_timeout(Duration::from_secs(2))
            })
            .await
            .expect("proxy starts")
        });
        Fixture { runtime, proxy }
    })
}

async fn healthz(addr: SocketAddr) -> (u16, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri: http::Uri = format!("http://{addr}/healthz").parse().expect("uri");
    let response = client.get(uri).await.expect("healthz answers");
    let status = response.status().as_u16();
    (
        status,
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn any_bytes_get_an_http_answer_or_a_close_and_the_proxy_keeps_serving(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        prefix in prop_oneof![Just(&b""[..]), Just(&b"POST /v1/chat/completions HTTP/1.1\r\n"[..]), Just(&b"GET / HTTP/1.1\r\nhost: x\r\n"[..])],
    ) {
        let f = fixture();
        let addr = f.proxy.local_addr();
        let (answer, health) = f.runtime.block_on(async {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let mut sent = prefix.to_vec();
            sent.extend_from_slice(&bytes);
            // The peer may close before reading everything: a write error is an answer too.
            let _ = stream.write_all(&sent).await;
            let _ = stream.shutdown().await;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
            prop_assert!(read.is_ok(), "no answer and no close within 10 s");
            Ok((answer, healthz(addr).await))
        })?;
        prop_assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.") || answer.starts_with(&[0, 0]),
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)])
        );
        prop_assert_eq!(health, (200, Bytes::from_static(b"ok")));
    }

    #[test]
    fn any_chat_request_gets_a_clear_answer_and_never_forwards_the_callers_key(
        model in prop_oneof![Just("gpt-4o".to_string()), Just("claude-sonnet".to_string()), "[a-z0-9.-]{1,12}"],
        shape in 0u8..4,
        extra in proptest::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,24}"), 0..6),
        credential_header in prop_oneof![Just("authorization"), Just("api-key"), Just("x-api-key"), Just("x-goog-api-key")],
    ) {
        let f = fixture();
        let addr = f.proxy.local_addr();
        let mock = f.proxy.mock().expect("the built-in mock");
        let body = match shape {
            0 => format!(r#"{{"model":{},"messages":[{{"role":"user","content":"hi"}}]}}"#, serde_json::Value::from(model.clone())),
            1 => format!(r#"{{"messages":[],"model":{} ,"stream":false}}"#, serde_json::Value::from(model.clone())),
            2 => "[1,2,3]".to_string(),
            _ => format!("not json {model}"),
        };
        let configured = model == "gpt-4o" || model == "claude-sonnet";
        let (status, headers) = f.runtime.block_on(async {
            let before = mock.provider().attempt_count();
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let mut request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .header(credential_header, format!("Bearer {CALLER_KEY}"));
            for (name, value) in &extra {
                request = request.header(name.as_str(), value.as_str());
            }
            let request = request.body(Full::new(Bytes::from(body))).expect("request");
            let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
                .await
                .expect("an answer within 10 s")
                .expect("an HTTP answer");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            response.into_body().collect().await.expect("body");
            let attempts: Vec<_> = mock.provider().attempts().into_iter().skip(before).collect();
            for attempt in &attempts {
                assert!(
                    !format!("{:?}", attempt.headers).contains("PROPTEST"),
                    "the caller's key reached the provider"
                );
            }
            (status, (headers, attempts.len()))
        });
        let (headers, attempts) = headers;
        match shape {
            0 | 1 if configured => {
                prop_assert_eq!(status, 200);
                prop_assert_eq!(attempts, 1);
                prop_assert_eq!(headers.get("x-backstop-attempts").and_then(|v| v.to_str().ok()), Some("1"));
            }
            0 | 1 => {
                prop_assert_eq!(status, 404);
                prop_assert_eq!(attempts, 0);
            }
            _ => {
                prop_assert_eq!(status, 400);
                prop_assert_eq!(attempts, 0);
            }
        }
        if status != 200 {
            prop_assert_eq!(headers.get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
        }
    }
}
