//! The fallback layer's `info` line, in a test binary of its own.
//!
//! A thread-scoped tracing subscriber (`set_default`) misses events whose callsite
//! interest another test thread computes at the same time (tracing-core caches a
//! callsite's interest process-wide, and with a single scoped dispatcher it rebuilds
//! that cache with the *calling* thread's default): in a binary shared with other
//! tests this failed about one run in five. Alone in its process it cannot.

use std::sync::{Arc, Mutex};

use backstop_classify::{
    BoxError, Classification, ClassifiedError, Failure, FailureKind, ModelRoute, ReplayBody,
};
use backstop_fallback::{FallbackConfig, FallbackLayer, Target};
use http::{Request, Response};
use tower::{Layer, ServiceExt};

/// Everything the fmt subscriber writes, kept for inspection.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn config() -> FallbackConfig {
    FallbackConfig::builder()
        .target(
            "gpt-4o",
            Target::new("openai", "https://openai.test/v1")
                .credential("authorization", "Bearer sk-1")
                .credential_label("openai-main"),
        )
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1").model("claude-sonnet-4-5"),
        )
        .chain("gpt-4o", ["claude"])
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_fallback_is_logged_at_info_with_the_models_and_never_a_key() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // gpt-4o's quota is gone; claude serves.
    let upstream = tower::service_fn(|request: Request<ReplayBody>| async move {
        let model = request
            .extensions()
            .get::<ModelRoute>()
            .map(|r| r.model.to_string())
            .unwrap_or_default();
        if model == "gpt-4o" {
            let failure = Failure::new(FailureKind::QuotaExhausted);
            return Err::<Response<String>, BoxError>(Box::new(ClassifiedError::local(failure)));
        }
        let mut response = Response::new(format!("served by {model}"));
        response.extensions_mut().insert(Classification::Success);
        Ok(response)
    });
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let mut request = Request::post("http://proxy.local/v1/chat/completions")
        .body(ReplayBody::from(body))
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer sk-caller-SECRET".parse().unwrap());
    let response = FallbackLayer::new(config())
        .layer(upstream)
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.into_body(), "served by claude-sonnet-4-5");

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("fallback fired"))
        .unwrap_or_else(|| panic!("no fallback event in {log:?}"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains("backstop.fallback{gen_ai.request.model=\"gpt-4o\"}"),
        "{line}"
    );
    assert!(
        line.ends_with(
            "fallback fired from=gpt-4o to=claude upstream=anthropic reason=\"quota_exhausted\""
        ),
        "{line}"
    );
    assert!(!log.contains("sk-1") && !log.contains("SECRET"), "{log}");
}
