//! The proxy's logs, captured at TRACE level (every layer's events included): one
//! line per request with the models, status, attempts and fallback, and never a
//! credential, neither the caller's nor a target's.
//!
//! Its own test binary, because it installs the process-wide tracing subscriber
//! (the server's tasks run on other threads than the test).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use backstop::mock::{Fault, MockServer, ModelPlan, Scenario};
use backstop_cli::proxy::{self, ProxyConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const OPENAI_KEY: &str = "sk-target-openai-LOGCHECK";
const ANTHROPIC_KEY: &str = "sk-ant-target-LOGCHECK";
const CLIENT_KEY: &str = "sk-client-LOGCHECK";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_log_lines_name_models_and_counts_but_never_a_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let scenario = Scenario::new(1)
        .model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota))
        .model("claude-sonnet", ModelPlan::ok());
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let config = ProxyConfig::from_toml_str(&format!(
        r#"
        [models.gpt-4o]
        upstream = "openai"
        base_uri = "{url}"
        credential = {{ env = "OPENAI_KEY" }}
        [models.claude-sonnet]
        upstream = "anthropic"
        base_uri = "{url}"
        credential = {{ header = "x-api-key", env = "ANTHROPIC_KEY" }}
        [chains]
        models = {{ "gpt-4o" = ["claude-sonnet"] }}
        "#,
        url = mock.base_url()
    ))
    .unwrap()
    .with_env(|name| match name {
        "OPENAI_KEY" => Some(OPENAI_KEY.into()),
        "ANTHROPIC_KEY" => Some(ANTHROPIC_KEY.into()),
        _ => None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(config, listener).await.unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for (model, stream) in [("gpt-4o", false), ("gpt-4o", true), ("unknown", false)] {
        let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(Full::new(Bytes::from(format!(
                r#"{{"model":"{model}","messages":[],"stream":{stream}}}"#
            ))))
            .unwrap();
        let response = client.request(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    proxy.shutdown().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for key in [OPENAI_KEY, ANTHROPIC_KEY, CLIENT_KEY] {
        assert!(!logs.contains(key), "{key} was logged:\n{logs}");
    }
    let request_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("backstop::proxy") && l.contains("requested_model="))
        .collect();
    assert_eq!(request_lines.len(), 3, "one line per request:\n{logs}");
    // The quota opened gpt-4o's breaker: the second request goes to claude-sonnet
    // without an attempt on gpt-4o.
    for (line, attempts) in request_lines[..2].iter().zip(["attempts=2", "attempts=1"]) {
        for field in [
            "requested_model=\"gpt-4o\"",
            "served_model=\"claude-sonnet\"",
            "status=200",
            attempts,
            "fallback=true",
            "outcome=\"served_by_fallback\"",
            "latency_ms=",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
    assert!(
        request_lines[2].contains("status=404"),
        "{}",
        request_lines[2]
    );
}
