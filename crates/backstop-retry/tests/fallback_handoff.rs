//! When the fallback layer says another model can take the request
//! (`FallbackAvailable`), a failure the provider asked to have waited out (a delay
//! hint) is handed over at once instead of waited out on this model; failures
//! without a hint are retried as usual. Over the classify layer and the mock
//! provider, in virtual time.

mod common;

use std::time::Duration;

use backstop_classify::{
    AttemptLog, ClassifyLayer, FallbackAvailable, ReplayBody, Rules, StopReason,
};
use backstop_mock::{Fault, MockProvider};
use backstop_retry::{HintJitter, Jitter, RetryConfig, RetryLayer};
use common::{mock_answering_first, mock_rate_limited};
use http::StatusCode;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

fn request(fallback_available: bool) -> http::Request<ReplayBody> {
    let mut request = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap();
    if fallback_available {
        request.extensions_mut().insert(FallbackAvailable);
    }
    request
}

async fn send(
    config: RetryConfig,
    mock: &MockProvider,
    fallback_available: bool,
) -> (http::Response<impl Sized>, Duration) {
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(config).with_rng_seed(3))
        .layer(ClassifyLayer::new(Rules::openai()))
        .service(mock.clone());
    let started = Instant::now();
    let response = service.oneshot(request(fallback_available)).await.unwrap();
    (response, started.elapsed())
}

fn stop<B>(response: &http::Response<B>) -> Option<StopReason> {
    response
        .extensions()
        .get::<AttemptLog>()
        .and_then(|l| l.stop)
}

#[tokio::test(start_paused = true)]
async fn a_hinted_429_goes_to_the_fallback_at_once_when_another_model_can_serve() {
    let mock = mock_answering_first(mock_rate_limited());
    let (response, waited) = send(RetryConfig::interactive(), &mock, true).await;
    // The provider's own response, untouched, with nothing waited and one attempt.
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(waited, Duration::ZERO);
    assert_eq!(mock.attempt_count(), 1);
    assert_eq!(stop(&response), Some(StopReason::HandedToFallback));
    let log = response.extensions().get::<AttemptLog>().unwrap();
    assert_eq!(log.attempts.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_another_model_the_same_429_is_waited_out_and_retried() {
    let mock = mock_answering_first(mock_rate_limited());
    let config = RetryConfig::interactive().with_hint_jitter(HintJitter::none());
    let (response, waited) = send(config, &mock, false).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(waited, Duration::from_secs(1));
    assert_eq!(mock.attempt_count(), 2);
    assert_eq!(stop(&response), Some(StopReason::Succeeded));
}

#[tokio::test(start_paused = true)]
async fn with_the_handoff_off_a_hinted_429_is_waited_out_even_with_a_fallback() {
    let mock = mock_answering_first(mock_rate_limited());
    let config = RetryConfig::interactive()
        .with_hint_jitter(HintJitter::none())
        .with_fallback_handoff(None);
    let (response, waited) = send(config, &mock, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(waited, Duration::from_secs(1));
    assert_eq!(mock.attempt_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_hint_of_a_few_milliseconds_is_waited_out_on_the_requested_model() {
    let mock = mock_answering_first(Fault::OpenAiRateLimit {
        retry_after: None,
        retry_after_ms: Some("20".into()),
    });
    let config = RetryConfig::interactive().with_hint_jitter(HintJitter::none());
    let (response, waited) = send(config, &mock, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(waited, Duration::from_millis(20));
    assert_eq!(mock.attempt_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_handoff_threshold_is_configurable() {
    let mock = mock_answering_first(mock_rate_limited());
    let config = RetryConfig::interactive()
        .with_hint_jitter(HintJitter::none())
        .with_fallback_handoff(Some(Duration::from_secs(2)));
    let (response, waited) = send(config, &mock, true).await;
    // A 1 s hint under a 2 s threshold: waited out here.
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(waited, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_500_without_a_hint_is_still_retried_here_when_a_fallback_exists() {
    let mock = mock_answering_first(Fault::OpenAiServerError);
    // Without the backoff's jitter (this test is about the handoff, not the jitter).
    let config = RetryConfig::interactive().with_jitter(Jitter::None);
    let (response, waited) = send(config, &mock, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(mock.attempt_count(), 2);
    // The interactive backoff's first wait: its 0.5 s base, exactly.
    assert_eq!(waited, Duration::from_millis(500));
    assert_eq!(stop(&response), Some(StopReason::Succeeded));
}
