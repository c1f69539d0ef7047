//! Steady load against the mock provider (through the classify layer), in virtual
//! time: a primary that is hard down for 60 s.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer, BreakerState, TransitionReason};
use backstop_classify::{ClassifyLayer, FailureKind, HintSource, ModelRoute, Rules};
use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
use bytes::Bytes;
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

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

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

type Req = http::Request<Full<Bytes>>;

fn request(model: &str) -> Req {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let mut request = http::Request::post("http://mock.local/v1/chat/completions")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    request
        .extensions_mut()
        .insert(ModelRoute::new("mock", model));
    request
}

#[tokio::test(start_paused = true)]
async fn a_primary_down_for_60s_gets_only_probes_and_traffic_returns_within_one_open_period() {
    let mock = MockProvider::new(Scenario::new(7).model(
        "primary",
        ModelPlan::ok().outage(
            Duration::ZERO,
            Duration::from_secs(60),
            Fault::OpenAiServerError,
        ),
    ));
    let layer = BreakerLayer::new(fixed_open()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(mock.clone());
    let route = ModelRoute::new("mock", "primary");
    let start = Instant::now();

    // 10 requests a second for 120 s, one at a time.
    let (mut served, mut failed, mut refused) = (0u32, 0u32, 0u32);
    let mut first_served = None;
    for tick in 0..1200u64 {
        tokio::time::sleep_until(start + ms(100 * tick)).await;
        match ServiceExt::<Req>::ready(&mut service)
            .await
            .unwrap()
            .call(request("primary"))
            .await
        {
            Ok(response) if response.status() == 200 => {
                served += 1;
                first_served.get_or_insert(ms(100 * tick));
            }
            Ok(response) => {
                assert_eq!(response.status(), 500);
                failed += 1;
            }
            Err(error) => {
                assert_eq!(error.kind(), FailureKind::BreakerOpen);
                assert_eq!(
                    error.failure().hint.map(|h| h.source),
                    Some(HintSource::Breaker)
                );
                refused += 1;
            }
        }
    }

    // Five failures open the key at 0.4 s; the probe at 30.4 s fails (still down) and
    // reopens it until 60.4 s; the probe at 60.4 s succeeds and closes it.
    let during_outage: Vec<Duration> = mock
        .attempts()
        .iter()
        .map(|a| a.since_start)
        .filter(|t| *t < Duration::from_secs(60))
        .collect();
    assert_eq!(
        during_outage,
        [ms(0), ms(100), ms(200), ms(300), ms(400), ms(30_400)]
    );
    assert_eq!(failed, 6);
    assert_eq!(first_served, Some(ms(60_400)));
    // Traffic is back within one open period (30 s) of the recovery at 60 s.
    assert!(first_served.unwrap() - Duration::from_secs(60) <= Duration::from_secs(30));
    assert_eq!(served, 1200 - 604);
    assert_eq!(refused, 604 - 6);
    assert_eq!(mock.attempts_for("primary"), 6 + 596);
    assert_eq!(breaker.state(&route), BreakerState::Closed);
    assert_eq!(
        breaker.key(&route).unwrap().last_reason,
        Some(TransitionReason::ProbesSucceeded)
    );
}

#[tokio::test(start_paused = true)]
async fn a_real_retry_after_from_the_mock_opens_the_key_until_then() {
    let limited = Fault::OpenAiRateLimit {
        retry_after: Some("20".into()),
        retry_after_ms: None,
    };
    let mock = MockProvider::new(Scenario::new(7).model("primary", ModelPlan::script([limited])));
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(mock.clone());
    let route = ModelRoute::new("mock", "primary");

    let response = ServiceExt::<Req>::ready(&mut service)
        .await
        .unwrap()
        .call(request("primary"))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(breaker.retry_in(&route), Some(Duration::from_secs(20)));
    tokio::time::advance(Duration::from_secs(19)).await;
    let refused = ServiceExt::<Req>::ready(&mut service)
        .await
        .unwrap()
        .call(request("primary"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.failure().hint.map(|h| h.delay),
        Some(Duration::from_secs(1))
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let response = ServiceExt::<Req>::ready(&mut service)
        .await
        .unwrap()
        .call(request("primary"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(mock.attempts_for("primary"), 2);
}

#[tokio::test(start_paused = true)]
async fn an_insufficient_quota_429_from_the_mock_opens_the_key_for_ten_minutes() {
    let mock = MockProvider::new(Scenario::new(7).model(
        "primary",
        ModelPlan::script([Fault::OpenAiInsufficientQuota]),
    ));
    let layer = BreakerLayer::new(BreakerConfig::default()).unwrap();
    let breaker = layer.breaker().clone();
    let mut service = ServiceBuilder::new()
        .layer(layer)
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(mock.clone());
    let route = ModelRoute::new("mock", "primary");
    let response = ServiceExt::<Req>::ready(&mut service)
        .await
        .unwrap()
        .call(request("primary"))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(breaker.retry_in(&route), Some(Duration::from_secs(600)));
    assert_eq!(
        breaker.key(&route).unwrap().last_reason,
        Some(TransitionReason::QuotaExhausted)
    );
}
