//! The fallback layer over the real retry and classify layers, against the mock
//! provider, in virtual time.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::{
    ClassifyLayer, DelayHint, FailureKind, HintSource, ReplayBody, Rules, StopReason,
};
use backstop_fallback::{ChainStop, FallbackConfig, FallbackLayer, ServedBy, Target};
use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
use backstop_retry::{Jitter, RetryConfig, RetryLayer};
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

const OPENAI_KEY: &str = "Bearer sk-openai-PRIMARY-0001";
const ANTHROPIC_KEY: &str = "sk-ant-SECOND-0002";
const GOOGLE_KEY: &str = "AIza-THIRD-0003";
const CALLER_KEY: &str = "Bearer sk-caller-OWN-0004";

/// Three providers, told apart by the authority of the request URI (as a real
/// connector would), each a mock that records what it received.
#[derive(Clone)]
struct Upstreams {
    by_host: Arc<HashMap<&'static str, MockProvider>>,
}

impl Upstreams {
    fn new(openai: ModelPlan, anthropic: ModelPlan, google: ModelPlan) -> Self {
        let mock = |model: &str, plan| MockProvider::new(Scenario::new(7).model(model, plan));
        let mut by_host = HashMap::new();
        by_host.insert("openai.test", mock("gpt-4o", openai));
        by_host.insert("anthropic.test", mock("claude-sonnet-4-5", anthropic));
        by_host.insert("google.test", mock("gemini-2.5-pro", google));
        Upstreams {
            by_host: Arc::new(by_host),
        }
    }

    fn host(&self, host: &str) -> &MockProvider {
        &self.by_host[host]
    }
}

impl Service<Request<ReplayBody>> for Upstreams {
    type Response = Response<backstop_mock::MockBody>;
    type Error = std::io::Error;
    type Future = backstop_mock::ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReplayBody>) -> Self::Future {
        let host = request.uri().host().unwrap_or("openai.test");
        let mut mock = self
            .by_host
            .get(host)
            .unwrap_or(&self.by_host["openai.test"])
            .clone();
        mock.call(request)
    }
}

fn config() -> FallbackConfig {
    FallbackConfig::builder()
        .target(
            "gpt-4o",
            Target::new("openai", "https://openai.test/v1")
                .credential("authorization", OPENAI_KEY)
                .credential_label("openai-main"),
        )
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1")
                .model("claude-sonnet-4-5")
                .credential("x-api-key", ANTHROPIC_KEY)
                .header("anthropic-version", "2023-06-01"),
        )
        .target(
            "gemini",
            Target::new("google", "https://google.test/v1beta/openai")
                .model("gemini-2.5-pro")
                .credential("x-goog-api-key", GOOGLE_KEY),
        )
        .chain("gpt-4o", ["claude"])
        .context_chain(["gemini"])
        .content_chain(["gemini"])
        .build()
        .unwrap()
}

/// fallback → retry (3 attempts, 0.5 s doubling, no jitter) → classify → upstreams.
fn stack(
    config: FallbackConfig,
    upstreams: Upstreams,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<impl http_body::Body<Data = bytes::Bytes, Error: std::fmt::Debug>>,
    Error = backstop_classify::ClassifiedError,
> + Clone {
    ServiceBuilder::new()
        .layer(FallbackLayer::new(config))
        .layer(
            RetryLayer::new(RetryConfig::interactive().with_jitter(Jitter::None)).with_rng_seed(1),
        )
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(upstreams)
}

fn chat(model: &str) -> Request<ReplayBody> {
    Request::post("http://proxy.local/v1/chat/completions")
        .header("authorization", CALLER_KEY)
        .header("content-type", "application/json")
        .body(ReplayBody::from(format!(
            r#"{{"messages":[{{"role":"user","content":"hi","model":"nested"}}],"model":"{model}"}}"#
        )))
        .unwrap()
}

fn served(response: &Response<impl Sized>) -> &ServedBy {
    response
        .extensions()
        .get::<ServedBy>()
        .expect("ServedBy on every response")
}

#[tokio::test(start_paused = true)]
async fn primary_down_is_served_by_the_fallback_after_its_retries() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiServerError),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let start = Instant::now();
    let response = stack(config(), upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 3);
    assert_eq!(
        upstreams
            .host("anthropic.test")
            .attempts_for("claude-sonnet-4-5"),
        1
    );
    assert_eq!(upstreams.host("google.test").attempt_count(), 0);
    // The retries' waits on the primary (0.5 s, 1 s) and nothing more.
    assert_eq!(start.elapsed(), Duration::from_millis(1500));

    let record = served(&response);
    assert!(record.served && record.fallback_fired);
    assert_eq!(&*record.requested_model, "gpt-4o");
    assert_eq!(&*record.model, "claude");
    assert_eq!(&*record.route.upstream, "anthropic");
    assert_eq!(&*record.route.model, "claude-sonnet-4-5");
    assert_eq!(record.hops.len(), 2);
    let primary = &record.hops[0];
    assert_eq!(
        primary.failure.as_ref().unwrap().kind,
        FailureKind::ServerError
    );
    let log = primary.attempts.as_ref().expect("retry layer's log");
    assert_eq!(log.attempts.len(), 3);
    assert_eq!(log.stop, Some(StopReason::MaxAttempts));
    assert_eq!(primary.route.credential.as_deref(), Some("openai-main"));
    assert!(record.hops[1].failure.is_none());
}

#[tokio::test(start_paused = true)]
async fn quota_429_on_primary_falls_back_at_once_with_zero_retries() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiInsufficientQuota),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let start = Instant::now();
    let response = stack(config(), upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    assert_eq!(
        upstreams
            .host("anthropic.test")
            .attempts_for("claude-sonnet-4-5"),
        1
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
    let record = served(&response);
    assert_eq!(
        record.hops[0].failure.as_ref().unwrap().kind,
        FailureKind::QuotaExhausted
    );
}

#[tokio::test(start_paused = true)]
async fn context_length_400_goes_to_the_context_chain() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiContextLength),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let response = stack(config(), upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    // The ordinary chain's claude is skipped: it is not a larger-context model.
    assert_eq!(upstreams.host("anthropic.test").attempt_count(), 0);
    assert_eq!(
        upstreams.host("google.test").attempts_for("gemini-2.5-pro"),
        1
    );
    let record = served(&response);
    assert_eq!(&*record.model, "gemini");
    assert_eq!(
        record.hops[1].chain,
        backstop_fallback::ChainKind::ContextLength
    );
}

#[tokio::test(start_paused = true)]
async fn content_filter_goes_to_the_content_chain() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiContentPolicy),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let response = stack(config(), upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    assert_eq!(upstreams.host("anthropic.test").attempt_count(), 0);
    assert_eq!(
        upstreams.host("google.test").attempts_for("gemini-2.5-pro"),
        1
    );
    assert_eq!(
        served(&response).hops[1].chain,
        backstop_fallback::ChainKind::ContentFilter
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_request_never_falls_back() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::InvalidRequest),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let response = stack(config(), upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();

    assert_eq!(response.status(), 400);
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    assert_eq!(upstreams.host("anthropic.test").attempt_count(), 0);
    let record = served(&response);
    assert!(!record.served && !record.fallback_fired);
    assert_eq!(record.stop, Some(ChainStop::NotFallbackable));
}

#[tokio::test(start_paused = true)]
async fn whole_chain_down_returns_the_last_response_byte_for_byte() {
    let last_body = r#"{"error":{"message":"You exceeded your current quota (mock 3).","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let quota = |body: &str| Fault::Status {
        status: 429,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into(),
    };
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiInsufficientQuota),
        ModelPlan::always(Fault::OpenAiInsufficientQuota),
        ModelPlan::always(quota(last_body)),
    );
    let config = FallbackConfig::builder()
        .target(
            "gpt-4o",
            Target::new("openai", "https://openai.test/v1").credential("authorization", OPENAI_KEY),
        )
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1").model("claude-sonnet-4-5"),
        )
        .target(
            "gemini",
            Target::new("google", "https://google.test/v1beta/openai").model("gemini-2.5-pro"),
        )
        .chain("gpt-4o", ["claude", "gemini"])
        .build()
        .unwrap();
    let response = stack(config, upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();

    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    assert_eq!(
        upstreams
            .host("anthropic.test")
            .attempts_for("claude-sonnet-4-5"),
        1
    );
    assert_eq!(
        upstreams.host("google.test").attempts_for("gemini-2.5-pro"),
        1
    );
    assert_eq!(response.status(), 429);
    let record = served(&response).clone();
    assert!(!record.served && record.fallback_fired);
    assert_eq!(record.stop, Some(ChainStop::ChainExhausted));
    assert_eq!(
        record.hops.iter().map(|h| &*h.model).collect::<Vec<_>>(),
        ["gpt-4o", "claude", "gemini"]
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], last_body.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn fallback_provider_never_sees_the_primary_or_caller_key() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiInsufficientQuota),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let config = config();
    let response = stack(config.clone(), upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let primary = &upstreams.host("openai.test").attempts()[0];
    assert_eq!(primary.header("authorization"), Some(OPENAI_KEY));
    assert_eq!(
        primary.uri.to_string(),
        "https://openai.test/v1/chat/completions"
    );

    let second = &upstreams.host("anthropic.test").attempts()[0];
    assert_eq!(second.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(second.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(second.header("authorization"), None);
    for (name, value) in &second.headers {
        let value = value.to_str().unwrap_or("");
        assert!(
            !value.contains("PRIMARY") && !value.contains("caller-OWN"),
            "{name} leaked a key"
        );
    }
    assert_eq!(
        second.uri.to_string(),
        "https://anthropic.test/v1/chat/completions"
    );
    assert_eq!(second.model.as_deref(), Some("claude-sonnet-4-5"));

    for printed in [
        format!("{config:?}"),
        format!("{:?}", FallbackLayer::new(config.clone())),
        format!("{:?}", served(&response)),
    ] {
        for key in [OPENAI_KEY, ANTHROPIC_KEY, GOOGLE_KEY] {
            assert!(!printed.contains(key), "key in {printed}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn model_without_target_passes_through_and_its_fallback_drops_the_caller_key() {
    // "gpt-4o-mini" has no target: the caller's URI and key are used for it.
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiInsufficientQuota),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let openai_mock = MockProvider::new(
        Scenario::new(1).model("gpt-4o-mini", ModelPlan::always(Fault::OpenAiModelNotFound)),
    );
    let mut by_host: HashMap<&'static str, MockProvider> = (*upstreams.by_host).clone();
    by_host.insert("openai.test", openai_mock.clone());
    let upstreams = Upstreams {
        by_host: Arc::new(by_host),
    };
    let config = FallbackConfig::builder()
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1")
                .model("claude-sonnet-4-5")
                .credential("x-api-key", ANTHROPIC_KEY),
        )
        .default_chain(["claude"])
        .build()
        .unwrap();
    let mut request = chat("gpt-4o-mini");
    *request.uri_mut() = "https://openai.test/v1/chat/completions?x=1"
        .parse()
        .unwrap();
    let response = stack(config, upstreams.clone())
        .oneshot(request)
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let first = &openai_mock.attempts()[0];
    assert_eq!(
        first.uri.to_string(),
        "https://openai.test/v1/chat/completions?x=1"
    );
    assert_eq!(first.header("authorization"), Some(CALLER_KEY));
    assert_eq!(first.model.as_deref(), Some("gpt-4o-mini"));
    let second = &upstreams.host("anthropic.test").attempts()[0];
    assert_eq!(second.header("authorization"), None);
    assert_eq!(second.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(
        second.uri.to_string(),
        "https://anthropic.test/v1/chat/completions?x=1"
    );
    assert_eq!(&*served(&response).route.upstream, "anthropic");
    assert_eq!(&*served(&response).hops[0].route.upstream, "openai.test");
}

#[tokio::test(start_paused = true)]
async fn failure_after_the_stream_started_is_never_a_fallback() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::ResetAfterChunks { chunks: 2 }),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let request = Request::post("http://proxy.local/v1/chat/completions")
        .body(ReplayBody::from(body))
        .unwrap();
    let response = stack(config(), upstreams.clone())
        .oneshot(request)
        .await
        .unwrap();

    // The head (and the first event, which the retry layer holds for) reached the
    // caller: the stream is committed, its failure shows in the body only.
    assert_eq!(response.status(), 200);
    assert!(served(&response).served);
    assert!(response.into_body().collect().await.is_err());
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    assert_eq!(upstreams.host("anthropic.test").attempt_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn total_deadline_stops_a_hanging_primary_and_bounds_every_hop() {
    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::Hang),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    let config = FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", "https://openai.test/v1"))
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1").model("claude-sonnet-4-5"),
        )
        .chain("gpt-4o", ["claude"])
        .total_deadline(Duration::from_secs(5))
        .build()
        .unwrap();
    let start = Instant::now();
    let Err(error) = stack(config, upstreams.clone())
        .oneshot(chat("gpt-4o"))
        .await
    else {
        panic!("expected the deadline error");
    };

    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(error.kind(), FailureKind::TimedOut);
    let record = ServedBy::of_error(&error).expect("record in the error");
    assert_eq!(record.stop, Some(ChainStop::DeadlineReached));
    assert_eq!(upstreams.host("anthropic.test").attempt_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn malformed_body_is_refused_before_anything_is_sent() {
    let upstreams = Upstreams::new(ModelPlan::ok(), ModelPlan::ok(), ModelPlan::ok());
    let request = Request::post("http://proxy.local/v1/chat/completions")
        .body(ReplayBody::from(r#"{"model":"gpt-4o","messages":[}"#))
        .unwrap();
    let Err(error) = stack(config(), upstreams.clone()).oneshot(request).await else {
        panic!("expected a refusal");
    };

    assert_eq!(error.kind(), FailureKind::InvalidRequest);
    assert_eq!(
        error.to_string(),
        "invalid_request: request body is not valid JSON (error at byte 30); send a JSON chat request"
    );
    assert!(ServedBy::of_error(&error).is_none());
    assert_eq!(upstreams.host("openai.test").attempt_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn open_breaker_on_the_primary_sends_later_requests_straight_to_the_fallback() {
    use backstop_breaker::{BreakerConfig, BreakerLayer};

    let upstreams = Upstreams::new(
        ModelPlan::always(Fault::OpenAiInsufficientQuota),
        ModelPlan::ok(),
        ModelPlan::ok(),
    );
    // fallback → breaker → retry → classify → upstreams, the documented order.
    let service = ServiceBuilder::new()
        .layer(FallbackLayer::new(config()))
        .layer(BreakerLayer::new(BreakerConfig::default()).unwrap())
        .layer(
            RetryLayer::new(RetryConfig::interactive().with_jitter(Jitter::None)).with_rng_seed(1),
        )
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(upstreams.clone());

    let first = service.clone().oneshot(chat("gpt-4o")).await.unwrap();
    assert_eq!(
        served(&first).hops[0].failure.as_ref().unwrap().kind,
        FailureKind::QuotaExhausted
    );
    // Quota opens the primary's key: the second request never reaches OpenAI.
    let second = service.clone().oneshot(chat("gpt-4o")).await.unwrap();
    assert_eq!(second.status(), 200);
    let record = served(&second);
    let refusal = record.hops[0].failure.as_ref().unwrap();
    assert_eq!(refusal.kind, FailureKind::BreakerOpen);
    // The breaker's hint: the whole quota cooldown (10 min by default), since no
    // virtual time has passed since the quota failure opened the key.
    assert_eq!(
        refusal.hint,
        Some(DelayHint::new(
            BreakerConfig::default().quota_cooldown,
            HintSource::Breaker
        ))
    );
    assert_eq!(
        BreakerConfig::default().quota_cooldown,
        Duration::from_secs(600)
    );
    assert_eq!(&*record.model, "claude");
    assert_eq!(upstreams.host("openai.test").attempts_for("gpt-4o"), 1);
    assert_eq!(
        upstreams
            .host("anthropic.test")
            .attempts_for("claude-sonnet-4-5"),
        2
    );
}
