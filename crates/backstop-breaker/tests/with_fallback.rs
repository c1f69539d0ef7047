//! fallback → breaker → classify → mock providers, in virtual time: the breaker lets
//! the fallback layer skip a model that is down without spending a call on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer, BreakerState};
use backstop_classify::{
    ClassifiedError, ClassifyLayer, DelayHint, FailureKind, HintSource, ModelRoute, ReplayBody,
    Rules,
};
use backstop_fallback::{FallbackConfig, FallbackLayer, ServedBy, Target};
use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
use backstop_retry::{Jitter, RetryConfig, RetryLayer};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

/// Two providers told apart by the request URI's host, as a real connector would.
#[derive(Clone)]
struct Upstreams {
    by_host: Arc<HashMap<&'static str, MockProvider>>,
}

impl Upstreams {
    fn new(primary: ModelPlan, secondary: ModelPlan) -> Self {
        let mock = |model: &str, plan| MockProvider::new(Scenario::new(7).model(model, plan));
        let mut by_host = HashMap::new();
        by_host.insert("openai.test", mock("gpt-4o", primary));
        by_host.insert("anthropic.test", mock("claude-sonnet-4-5", secondary));
        Upstreams {
            by_host: Arc::new(by_host),
        }
    }

    fn primary(&self) -> &MockProvider {
        &self.by_host["openai.test"]
    }

    fn secondary(&self) -> &MockProvider {
        &self.by_host["anthropic.test"]
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
        let host = request.uri().host().unwrap_or_default();
        let mut mock = self
            .by_host
            .get(host)
            .expect("a request for one of the two hosts")
            .clone();
        mock.call(request)
    }
}

/// A fixed 30 s open period, hints from 1 s opening the key, and no pacing: the
/// timings of the tests that use it were written for those (the former defaults);
/// `open_period.rs` and `pacing.rs` cover the current ones.
fn fixed_open() -> BreakerConfig {
    BreakerConfig {
        open_duration: Duration::from_secs(30),
        max_open_duration: Duration::from_secs(30),
        hint_opens_at: Duration::from_secs(1),
        pacing: None,
        ..BreakerConfig::default()
    }
}

fn config() -> FallbackConfig {
    FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", "https://openai.test/v1"))
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1").model("claude-sonnet-4-5"),
        )
        .chain("gpt-4o", ["claude"])
        .build()
        .expect("valid fallback config")
}

fn chat() -> Request<ReplayBody> {
    Request::post("http://proxy.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .expect("valid request")
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

#[tokio::test(start_paused = true)]
async fn with_the_primary_down_60s_it_gets_only_probes_and_gets_traffic_back_within_one_open_period()
 {
    let upstreams = Upstreams::new(
        ModelPlan::ok().outage(
            Duration::ZERO,
            Duration::from_secs(60),
            Fault::OpenAiServerError,
        ),
        ModelPlan::ok(),
    );
    let breaker_layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = breaker_layer.breaker().clone();
    let mut stack = ServiceBuilder::new()
        .layer(FallbackLayer::new(config()))
        .layer(breaker_layer)
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(upstreams.clone());
    let primary = ModelRoute::new("openai", "gpt-4o");
    let start = Instant::now();

    // Steady load: 10 requests a second for 120 s.
    let mut served_by_primary_from = None;
    for tick in 0..1200u64 {
        tokio::time::sleep_until(start + ms(100 * tick)).await;
        let response = stack.ready().await.unwrap().call(chat()).await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "every request is served (tick {tick})"
        );
        // The caller never waits on the breaker: no time passes inside a request.
        assert_eq!(start.elapsed(), ms(100 * tick));
        let served = response.extensions().get::<ServedBy>().unwrap();
        if &*served.model == "gpt-4o" {
            served_by_primary_from.get_or_insert(ms(100 * tick));
        } else {
            assert_eq!(&*served.model, "claude");
            assert!(
                served_by_primary_from.is_none(),
                "flapped back at tick {tick}"
            );
        }
    }

    // The primary: five failures open it at 0.4 s for the base 5 s; each failed probe
    // doubles the open period (5.4 s → 10 s, 15.4 s → 20 s, 35.4 s → 40 s), and the
    // probe at 75.4 s finds it recovered and closes it.
    let primary_attempts: Vec<Duration> = upstreams
        .primary()
        .attempts()
        .iter()
        .map(|a| a.since_start)
        .collect();
    assert_eq!(
        primary_attempts[..9],
        [
            ms(0),
            ms(100),
            ms(200),
            ms(300),
            ms(400),
            ms(5_400),
            ms(15_400),
            ms(35_400),
            ms(75_400)
        ]
    );
    assert_eq!(primary_attempts.len(), 8 + 446);
    // Recovered at 60 s, back on the primary at 75.4 s: within the open period then
    // in force (40 s).
    assert_eq!(served_by_primary_from, Some(ms(75_400)));
    // The fallback served everything before that: 754 requests, one call each.
    assert_eq!(upstreams.secondary().attempts_for("claude-sonnet-4-5"), 754);
    assert_eq!(breaker.state(&primary), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn when_every_model_is_cooling_down_the_caller_gets_the_earliest_time_to_retry() {
    let rate_limited = |seconds: &str| Fault::OpenAiRateLimit {
        retry_after: Some(seconds.into()),
        retry_after_ms: None,
    };
    let upstreams = Upstreams::new(
        ModelPlan::always(rate_limited("20")),
        ModelPlan::always(rate_limited("45")),
    );
    let mut stack = ServiceBuilder::new()
        .layer(FallbackLayer::new(config()))
        .layer(BreakerLayer::new(BreakerConfig::default()).unwrap())
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(upstreams.clone());

    // The first request meets both 429s; each opens its model's key until its hint.
    // The fallback layer hands back the last model's 429 as it was.
    let first = stack.ready().await.unwrap().call(chat()).await.unwrap();
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["retry-after"], "45");

    tokio::time::advance(Duration::from_secs(1)).await;
    let error: ClassifiedError = stack.ready().await.unwrap().call(chat()).await.unwrap_err();
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    assert_eq!(
        error.failure().hint,
        Some(DelayHint::new(Duration::from_secs(19), HintSource::Breaker))
    );
    // Neither provider was called again.
    assert_eq!(upstreams.primary().attempt_count(), 1);
    assert_eq!(upstreams.secondary().attempt_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn with_retries_inside_the_breaker_counts_logical_calls_not_attempts() {
    let upstreams = Upstreams::new(
        ModelPlan::ok().outage(
            Duration::ZERO,
            Duration::from_secs(60),
            Fault::OpenAiServerError,
        ),
        ModelPlan::ok(),
    );
    let breaker_layer = BreakerLayer::new(fixed_open()).unwrap();
    let breaker = breaker_layer.breaker().clone();
    // fallback → breaker → retry (3 attempts, 0.5 s then 1 s, no jitter) → classify.
    let mut stack = ServiceBuilder::new()
        .layer(FallbackLayer::new(config()))
        .layer(breaker_layer)
        .layer(RetryLayer::new(
            RetryConfig::interactive().with_jitter(Jitter::None),
        ))
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(upstreams.clone());
    let primary = ModelRoute::new("openai", "gpt-4o");
    let start = Instant::now();

    let mut served_by_primary_from = None;
    for tick in 0..1200u64 {
        tokio::time::sleep_until(start + ms(100 * tick)).await;
        let response = stack.ready().await.unwrap().call(chat()).await.unwrap();
        assert_eq!(response.status(), 200);
        let served = response.extensions().get::<ServedBy>().unwrap();
        if &*served.model == "gpt-4o" {
            served_by_primary_from.get_or_insert(start.elapsed());
        }
    }
    let attempts: Vec<Duration> = upstreams
        .primary()
        .attempts()
        .iter()
        .map(|a| a.since_start)
        .collect();
    let secs = |s: f64| Duration::from_secs_f64(s);
    // Five logical calls of three attempts each (waits 0.5 s and 1 s) open the key at
    // 7.5 s; the probe at 37.5 s makes its three attempts and reopens it at 39 s
    // until 69 s; the probe at 69 s finds the primary recovered.
    assert_eq!(
        attempts[..19],
        [
            secs(0.0),
            secs(0.5),
            secs(1.5),
            secs(1.5),
            secs(2.0),
            secs(3.0),
            secs(3.0),
            secs(3.5),
            secs(4.5),
            secs(4.5),
            secs(5.0),
            secs(6.0),
            secs(6.0),
            secs(6.5),
            secs(7.5),
            secs(37.5),
            secs(38.0),
            secs(39.0),
            secs(69.0),
        ]
    );
    // Recovered at 60 s, traffic back at 69 s: within one open period.
    assert_eq!(served_by_primary_from, Some(secs(69.0)));
    // Everything before that was served by the fallback, one call per request.
    let primary_served = attempts.len() - 18;
    assert_eq!(upstreams.secondary().attempt_count() + primary_served, 1200);
    assert_eq!(breaker.state(&primary), BreakerState::Closed);
}
