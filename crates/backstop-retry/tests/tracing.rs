//! What the layer traces: a span per logical request, an event per attempt, with
//! OpenTelemetry field names, and never a credential.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use backstop_classify::ModelRoute;
use backstop_retry::{RetryConfig, RetryLayer};
use common::{Fake, Step, request};
use tower::{Layer, ServiceExt};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn each_attempt_is_one_event_in_one_request_span_without_credentials() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let fake = Fake::new(vec![Step::status(503), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let mut req = request("{}");
    req.extensions_mut()
        .insert(ModelRoute::new("openai", "gpt-4o"));
    svc.oneshot(req).await.unwrap();

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let attempts: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("attempt finished"))
        .collect();
    assert_eq!(attempts.len(), 2, "{text}");
    assert!(attempts[0].contains("attempt=1"), "{text}");
    assert!(
        attempts[0].contains("http.response.status_code=503"),
        "{text}"
    );
    assert!(attempts[0].contains("error.type=\"overloaded\""), "{text}");
    assert!(attempts[1].contains("attempt=2"), "{text}");
    assert!(
        attempts[1].contains("http.response.status_code=200"),
        "{text}"
    );
    assert!(!attempts[1].contains("error.type"), "{text}");
    for line in &attempts {
        assert!(
            line.contains("backstop.retry{gen_ai.request.model=\"gpt-4o\""),
            "{line}"
        );
    }
    assert!(
        !text.contains("sk-secret"),
        "a credential reached the log: {text}"
    );
}
