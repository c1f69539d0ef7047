//! The fallback layer over small scripted fakes: readiness, deadlines, breaker
//! hints, transport errors, and what each hop's request carries.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::{
    BoxError, Classification, ClassifiedError, Deadline, DelayHint, Failure, FailureKind,
    HintSource, LatestStart, ModelRoute, ReplayBody,
};
use backstop_fallback::{ChainStop, FallbackConfig, FallbackLayer, ServedBy, Target};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// What a fake upstream saw of one hop.
#[derive(Clone, Debug)]
struct Seen {
    route: Option<ModelRoute>,
    deadline: Option<Deadline>,
    latest_start: Option<LatestStart>,
    body: bytes::Bytes,
    content_length: Option<String>,
    at: Instant,
}

type Outcome = Result<Response<String>, BoxError>;
type Script = Arc<dyn Fn(&str) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

/// A fake inner stack: answers per provider model with `script`, records every hop,
/// and insists on being driven to ready before every call (a clone starts unready).
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Script,
    ready: bool,
    polls_before_ready: u32,
}

impl Clone for Fake {
    fn clone(&self) -> Self {
        Fake {
            seen: self.seen.clone(),
            script: self.script.clone(),
            ready: false,
            polls_before_ready: 1,
        }
    }
}

impl Fake {
    fn new(
        script: impl Fn(&str) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync + 'static,
    ) -> Self {
        Fake {
            seen: Arc::default(),
            script: Arc::new(script),
            ready: false,
            polls_before_ready: 1,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Service<Request<ReplayBody>> for Fake {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Not ready on the first poll: a layer that skips poll_ready, or polls once
        // and calls anyway, trips the assertion in call.
        if self.polls_before_ready > 0 {
            self.polls_before_ready -= 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReplayBody>) -> Self::Future {
        assert!(self.ready, "called without being driven to ready");
        self.ready = false;
        self.polls_before_ready = 1;
        let route = request.extensions().get::<ModelRoute>().cloned();
        self.seen.lock().unwrap().push(Seen {
            route: route.clone(),
            deadline: request.extensions().get::<Deadline>().copied(),
            latest_start: request.extensions().get::<LatestStart>().copied(),
            body: request.body().bytes().clone(),
            content_length: request
                .headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap().to_owned()),
            at: Instant::now(),
        });
        let model = route.map(|r| r.model.to_string()).unwrap_or_default();
        (self.script)(&model)
    }
}

fn ok(model: &str) -> Outcome {
    let mut response = Response::new(format!("served by {model}"));
    response.extensions_mut().insert(Classification::Success);
    Ok(response)
}

fn failed(kind: FailureKind, hint: Option<Duration>) -> Outcome {
    let failure =
        Failure::new(kind).with_hint(hint.map(|d| DelayHint::new(d, HintSource::Breaker)));
    Err(Box::new(ClassifiedError::local(failure)))
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
        .target(
            "gemini",
            Target::new("google", "https://google.test/v1beta/openai"),
        )
        .chain("gpt-4o", ["claude", "gemini"])
        .build()
        .unwrap()
}

fn chat(model: &str) -> Request<ReplayBody> {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    Request::post("http://proxy.local/v1/chat/completions")
        .header("content-length", body.len())
        .body(ReplayBody::from(body))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_hop_is_driven_to_ready_before_it_is_called() {
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move {
            match model.as_str() {
                "gemini" => ok(&model),
                _ => failed(FailureKind::Overloaded, None),
            }
        })
    });
    let response = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();
    assert_eq!(response.body(), "served by gemini");
    assert_eq!(fake.seen().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn each_hop_carries_its_route_the_rewritten_body_and_a_matching_content_length() {
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move {
            match model.as_str() {
                "claude-sonnet-4-5" => ok(&model),
                _ => failed(FailureKind::QuotaExhausted, None),
            }
        })
    });
    let response = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();
    assert_eq!(response.body(), "served by claude-sonnet-4-5");
    let seen = fake.seen();
    let routes: Vec<String> = seen
        .iter()
        .map(|s| s.route.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(
        routes,
        ["openai/gpt-4o#openai-main", "anthropic/claude-sonnet-4-5"]
    );
    let second = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(&seen[1].body[..], second.as_bytes());
    assert_eq!(seen[1].content_length, Some(second.len().to_string()));
    // The first hop's target spells the model as requested: the body is the
    // caller's own bytes.
    assert_eq!(seen[0].content_length, Some(seen[0].body.len().to_string()));
}

#[tokio::test(start_paused = true)]
async fn breaker_open_everywhere_gives_the_earliest_reopening_as_the_hint() {
    let fake = Fake::new(|model| {
        let reopen = match model {
            "gpt-4o" => 30,
            "claude-sonnet-4-5" => 10,
            _ => 20,
        };
        Box::pin(async move { failed(FailureKind::BreakerOpen, Some(Duration::from_secs(reopen))) })
    });
    let start = Instant::now();
    let Err(error) = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(chat("gpt-4o"))
        .await
    else {
        panic!("every breaker is open");
    };
    assert_eq!(error.kind(), FailureKind::BreakerOpen);
    assert_eq!(
        error.failure().hint,
        Some(DelayHint::new(Duration::from_secs(10), HintSource::Breaker))
    );
    let record = ServedBy::of_error(&error).unwrap();
    assert_eq!(record.retry_at, Some(start + Duration::from_secs(10)));
    assert_eq!(record.stop, Some(ChainStop::ChainExhausted));
    assert_eq!(record.hops.len(), 3);
    assert_eq!(
        error.to_string(),
        "breaker_open, retry after 10s (circuit breaker): no model served the request \
         (tried gpt-4o: breaker_open → claude: breaker_open → gemini: breaker_open); \
         every model in the chain was tried"
    );
}

#[tokio::test(start_paused = true)]
async fn one_model_without_a_hint_means_no_earliest_reopening() {
    let fake = Fake::new(|model| {
        let kind = if model == "gpt-4o" {
            FailureKind::ServerError
        } else {
            FailureKind::BreakerOpen
        };
        Box::pin(async move {
            failed(
                kind,
                (kind == FailureKind::BreakerOpen).then_some(Duration::from_secs(5)),
            )
        })
    });
    let Err(error) = FallbackLayer::new(config())
        .layer(fake)
        .oneshot(chat("gpt-4o"))
        .await
    else {
        panic!("every model fails");
    };
    assert_eq!(ServedBy::of_error(&error).unwrap().retry_at, None);
    // The last model's own hint is kept as it was.
    assert_eq!(
        error.failure().hint,
        Some(DelayHint::new(Duration::from_secs(5), HintSource::Breaker))
    );
}

#[tokio::test(start_paused = true)]
async fn each_hop_gets_the_time_left_and_the_layer_enforces_it() {
    // gpt-4o fails after 2 s; claude ignores its deadline and would take 60 s.
    let fake = fails_after_two_seconds(Duration::from_secs(60));
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
    let Err(error) = FallbackLayer::new(config)
        .layer(fake.clone())
        .oneshot(chat("gpt-4o"))
        .await
    else {
        panic!("the deadline must fire");
    };
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(error.kind(), FailureKind::TimedOut);
    let seen = fake.seen();
    let deadline = start + Duration::from_secs(5);
    assert_eq!(seen[0].deadline, Some(Deadline(deadline)));
    assert_eq!(seen[1].deadline, Some(Deadline(deadline)));
    // The second hop started 2 s in: 3 s were left for it.
    assert_eq!(deadline - seen[1].at, Duration::from_secs(3));
    let record = ServedBy::of_error(&error).unwrap();
    assert_eq!(record.stop, Some(ChainStop::DeadlineReached));
    assert_eq!(&*record.model, "claude");
}

#[tokio::test(start_paused = true)]
async fn a_callers_earlier_deadline_wins() {
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move { ok(&model) })
    });
    let config = FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", "https://openai.test/v1"))
        .total_deadline(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut request = chat("gpt-4o");
    let callers = Deadline(Instant::now() + Duration::from_secs(7));
    request.extensions_mut().insert(callers);
    FallbackLayer::new(config)
        .layer(fake.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(fake.seen()[0].deadline, Some(callers));
}

#[tokio::test(start_paused = true)]
async fn connection_refused_from_a_plain_transport_falls_back() {
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move {
            if model == "gpt-4o" {
                Err(
                    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                        as BoxError,
                )
            } else {
                ok(&model)
            }
        })
    });
    let response = FallbackLayer::new(config())
        .layer(fake)
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();
    let record = response.extensions().get::<ServedBy>().unwrap();
    assert_eq!(
        record.hops[0].failure.as_ref().unwrap().kind,
        FailureKind::ConnectFailed
    );
    assert!(record.served);
}

#[tokio::test(start_paused = true)]
async fn reset_after_send_falls_back_only_with_an_idempotency_key() {
    let script = |model: &str| {
        let model = model.to_owned();
        Box::pin(async move {
            if model == "gpt-4o" {
                Err(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)) as BoxError)
            } else {
                ok(&model)
            }
        }) as Pin<Box<dyn Future<Output = Outcome> + Send>>
    };
    let fake = Fake::new(script);
    let Err(error) = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(chat("gpt-4o"))
        .await
    else {
        panic!("a reset non-idempotent request must not be resent elsewhere");
    };
    assert_eq!(error.kind(), FailureKind::ConnectionLost);
    assert_eq!(fake.seen().len(), 1);
    assert_eq!(
        ServedBy::of_error(&error).unwrap().stop,
        Some(ChainStop::NotFallbackable)
    );
    // The transport's own error is still reachable through the record's error.
    let chain = error
        .cause()
        .unwrap()
        .downcast_ref::<backstop_fallback::ChainFailed>()
        .unwrap();
    assert!(chain.last_error().unwrap().is::<std::io::Error>());

    let fake = Fake::new(script);
    let mut request = chat("gpt-4o");
    request
        .headers_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    let response = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.body(), "served by claude-sonnet-4-5");
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_body_passes_through_untouched() {
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move { ok(&model) })
    });
    let request = Request::get("http://proxy.local/v1/models")
        .body(ReplayBody::default())
        .unwrap();
    let response = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert!(response.extensions().get::<ServedBy>().is_none());
    assert_eq!(fake.seen()[0].route, None);
}

#[tokio::test(start_paused = true)]
async fn last_response_carries_the_earliest_retry_time_when_every_model_is_cooling_down() {
    let fake = Fake::new(|model| {
        let secs = if model == "gpt-4o" { 40 } else { 25 };
        Box::pin(async move {
            let mut response = Response::new("slow down".to_owned());
            response.extensions_mut().insert(Classification::Failure(
                Failure::new(FailureKind::RateLimited).with_hint(Some(DelayHint::new(
                    Duration::from_secs(secs),
                    HintSource::RetryAfterSeconds,
                ))),
            ));
            Ok(response)
        })
    });
    let start = Instant::now();
    let response = FallbackLayer::new(config())
        .layer(fake)
        .oneshot(chat("gpt-4o"))
        .await
        .unwrap();
    let record = response.extensions().get::<ServedBy>().unwrap();
    assert!(!record.served);
    assert_eq!(record.stop, Some(ChainStop::ChainExhausted));
    assert_eq!(record.retry_at, Some(start + Duration::from_secs(25)));
    // The response itself is the last provider's, untouched.
    assert_eq!(response.body(), "slow down");
}

#[tokio::test(start_paused = true)]
async fn the_layers_future_is_send_when_the_inner_one_is() {
    fn assert_send<T: Send>(_: &T) {}
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move { ok(&model) })
    });
    let mut service = FallbackLayer::new(config()).layer(fake);
    service.ready().await.unwrap();
    let future = service.call(chat("gpt-4o"));
    assert_send(&future);
    assert_eq!(future.await.unwrap().body(), "served by gpt-4o");
}

#[tokio::test(start_paused = true)]
async fn an_absurd_delay_hint_is_recorded_without_overflowing() {
    let fake = Fake::new(|_| {
        Box::pin(async move {
            failed(
                FailureKind::BreakerOpen,
                Some(Duration::from_secs(u64::MAX)),
            )
        })
    });
    let start = Instant::now();
    let Err(error) = FallbackLayer::new(config())
        .layer(fake)
        .oneshot(chat("gpt-4o"))
        .await
    else {
        panic!("every model refuses");
    };
    // No wait for a reopening that far away: the chain ends at once.
    assert_eq!(start.elapsed(), Duration::ZERO);
    let record = ServedBy::of_error(&error).unwrap();
    assert_eq!(record.hops.len(), 3);
    // Each hop's reopening is capped at `MAX_INSTANT_DELAY` from now (instead of
    // overflowing `Instant`), and now has not moved.
    assert_eq!(
        record.retry_at,
        Some(start + backstop_classify::MAX_INSTANT_DELAY)
    );
}

/// A provider's failure response, classified as the classify layer would.
fn failed_response(status: u16, kind: FailureKind, body: &str) -> Outcome {
    let mut response = Response::new(body.to_owned());
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    let failure = Failure::new(kind).with_status(response.status());
    response
        .extensions_mut()
        .insert(Classification::Failure(failure));
    Ok(response)
}

#[tokio::test(start_paused = true)]
async fn when_later_hops_get_no_response_the_caller_gets_the_last_providers_response() {
    // gpt-4o answers 503; claude's breaker is open; gemini times out. The caller gets
    // gpt-4o's own answer byte-for-byte (the most informative failure), with the
    // whole record, naming the model that sent it.
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move {
            match model.as_str() {
                "gpt-4o" => failed_response(503, FailureKind::Overloaded, "overloaded: gpt-4o"),
                "claude-sonnet-4-5" => {
                    failed(FailureKind::BreakerOpen, Some(Duration::from_secs(10)))
                }
                _ => failed(FailureKind::TimedOut, None),
            }
        })
    });
    let response = FallbackLayer::new(config())
        .layer(fake.clone())
        .oneshot(chat("gpt-4o"))
        .await
        .expect("the provider's response, not a local refusal");
    assert_eq!(response.status(), 503);
    let record = response.extensions().get::<ServedBy>().unwrap().clone();
    assert_eq!(response.into_body(), "overloaded: gpt-4o");
    assert!(!record.served);
    assert!(record.fallback_fired);
    assert_eq!(&*record.model, "gpt-4o");
    assert_eq!(&*record.route.upstream, "openai");
    // The last hop's timeout, on a request without an idempotency key, is what stopped
    // the chain.
    assert_eq!(record.stop, Some(ChainStop::NotFallbackable));
    let kinds: Vec<_> = record
        .hops
        .iter()
        .map(|h| h.failure.as_ref().map(|f| f.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(FailureKind::Overloaded),
            Some(FailureKind::BreakerOpen),
            Some(FailureKind::TimedOut)
        ]
    );
    assert_eq!(fake.seen().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_later_provider_response_replaces_an_earlier_one() {
    // gpt-4o answers 503, claude answers 429, gemini's breaker is open: claude's
    // answer is the last a provider sent.
    let fake = Fake::new(|model| {
        let model = model.to_owned();
        Box::pin(async move {
            match model.as_str() {
                "gpt-4o" => failed_response(503, FailureKind::Overloaded, "overloaded: gpt-4o"),
                "claude-sonnet-4-5" => {
                    failed_response(429, FailureKind::RateLimited, "rate limited: claude")
                }
                _ => failed(FailureKind::BreakerOpen, Some(Duration::from_secs(5))),
            }
        })
    });
    let response = FallbackLayer::new(config())
        .layer(fake)
        .oneshot(chat("gpt-4o"))
        .await
        .expect("a provider's response");
    assert_eq!(response.status(), 429);
    let record = response.extensions().get::<ServedBy>().unwrap().clone();
    assert_eq!(response.into_body(), "rate limited: claude");
    assert_eq!(&*record.model, "claude");
    assert_eq!(record.hops.len(), 3);
}

/// gpt-4o fails (rate limited) after 2 s; every other model serves after `then`.
fn fails_after_two_seconds(then: Duration) -> Fake {
    Fake::new(move |model| {
        let model = model.to_owned();
        Box::pin(async move {
            if model == "gpt-4o" {
                tokio::time::sleep(Duration::from_secs(2)).await;
                failed(FailureKind::RateLimited, None)
            } else {
                tokio::time::sleep(then).await;
                ok(&model)
            }
        })
    })
}

fn two_models_with_minimum(min_hop_time: Duration) -> FallbackConfig {
    FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", "https://openai.test/v1"))
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1"),
        )
        .chain("gpt-4o", ["claude"])
        .total_deadline(Duration::from_secs(5))
        .min_hop_time(min_hop_time)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_hop_with_less_than_the_minimum_time_left_is_not_started() {
    // 3 s left at the hop: enough for a 3 s minimum (the boundary), not for 3.5 s.
    for (min_left, hops) in [(3.0, 2), (3.5, 1)] {
        let fake = fails_after_two_seconds(Duration::ZERO);
        let start = Instant::now();
        let result = FallbackLayer::new(two_models_with_minimum(Duration::from_secs_f64(min_left)))
            .layer(fake.clone())
            .oneshot(chat("gpt-4o"))
            .await;
        assert_eq!(fake.seen().len(), hops, "min {min_left}");
        assert_eq!(start.elapsed(), Duration::from_secs(2), "min {min_left}");
        // Every hop tells the layers inside when it stops being worth starting, so a
        // breaker books no paced slot the journey would not use.
        let latest = start + Duration::from_secs(5) - Duration::from_secs_f64(min_left);
        for seen in fake.seen() {
            assert_eq!(seen.latest_start, Some(LatestStart(latest)));
        }
        if hops == 2 {
            let served = result.unwrap();
            assert_eq!(served.into_body(), "served by claude");
        } else {
            // At once, with gpt-4o's own failure and the reason.
            let error = result.unwrap_err();
            assert_eq!(error.kind(), FailureKind::RateLimited);
            let record = ServedBy::of_error(&error).unwrap();
            assert_eq!(record.stop, Some(ChainStop::DeadlineReached));
            assert_eq!(&*record.model, "gpt-4o");
            assert_eq!(record.hops.len(), 1);
        }
    }
}

/// Ready at once for the first call; after each call, not before `delay` has passed.
#[derive(Clone)]
struct SlowToReady {
    inner: Fake,
    delay: Duration,
    ready_at: Arc<Mutex<Option<Instant>>>,
}

impl Service<Request<ReplayBody>> for SlowToReady {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let at = *self.ready_at.lock().unwrap();
        if let Some(at) = at
            && Instant::now() < at
        {
            // Woken when it is time (a timer task, so the test stays in virtual time).
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                waker.wake();
            });
            return Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReplayBody>) -> Self::Future {
        *self.ready_at.lock().unwrap() = Some(Instant::now() + self.delay);
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hop_ready_too_late_for_the_minimum_is_not_sent() {
    // gpt-4o fails at 2 s; the service is ready again only at 4 s. With 1 s left
    // required claude goes at 4 s; with 1.5 s (latest start 3.5 s) it is not sent.
    for (min_left, hops) in [(1.0, 2), (1.5, 1)] {
        let fake = fails_after_two_seconds(Duration::ZERO);
        let slow = SlowToReady {
            inner: fake.clone(),
            delay: Duration::from_secs(4),
            ready_at: Arc::default(),
        };
        let start = Instant::now();
        let result = FallbackLayer::new(two_models_with_minimum(Duration::from_secs_f64(min_left)))
            .layer(slow)
            .oneshot(chat("gpt-4o"))
            .await;
        assert_eq!(fake.seen().len(), hops, "min {min_left}");
        assert_eq!(start.elapsed(), Duration::from_secs(4), "min {min_left}");
        if hops == 2 {
            assert_eq!(fake.seen()[1].at - start, Duration::from_secs(4));
            assert_eq!(result.unwrap().into_body(), "served by claude");
        } else {
            let error = result.unwrap_err();
            let record = ServedBy::of_error(&error).unwrap();
            assert_eq!(record.stop, Some(ChainStop::DeadlineReached));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_absurd_minimum_hop_time_never_panics_and_sends_only_the_first_hop() {
    // No total deadline, so `Duration::MAX` is a valid setting; the caller's own
    // deadline makes it apply: the first hop goes, no later one, no booking after now.
    let config = FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", "https://openai.test/v1"))
        .target(
            "claude",
            Target::new("anthropic", "https://anthropic.test/v1"),
        )
        .chain("gpt-4o", ["claude"])
        .min_hop_time(Duration::MAX)
        .build()
        .unwrap();
    let fake = fails_after_two_seconds(Duration::ZERO);
    let start = Instant::now();
    let mut request = chat("gpt-4o");
    request
        .extensions_mut()
        .insert(Deadline(start + Duration::from_secs(30)));
    let error = FallbackLayer::new(config)
        .layer(fake.clone())
        .oneshot(request)
        .await
        .unwrap_err();
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].latest_start, Some(LatestStart(start)));
    let record = ServedBy::of_error(&error).unwrap();
    assert_eq!(record.stop, Some(ChainStop::DeadlineReached));
}

#[test]
fn the_minimum_hop_time_is_validated_and_survives_serde() {
    use backstop_fallback::ConfigError;
    let build = |min: u64| {
        FallbackConfig::builder()
            .target("gpt-4o", Target::new("openai", "https://openai.test/v1"))
            .total_deadline(Duration::from_secs(5))
            .min_hop_time(Duration::from_secs(min))
            .build()
    };
    for min in [5, 6] {
        let error = build(min).unwrap_err();
        assert!(matches!(
            error,
            ConfigError::MinHopTimeNotBelowDeadline { .. }
        ));
        assert!(
            error.to_string().starts_with(&format!(
                "min_hop_time ({min}s) must be shorter than total_deadline (5s)"
            )),
            "{error}"
        );
    }
    let config = build(4).unwrap();
    assert_eq!(config.min_hop_time(), Duration::from_secs(4));
    let json = serde_json::to_string(&config).unwrap();
    let back: FallbackConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.min_hop_time(), Duration::from_secs(4));
    assert_eq!(
        FallbackConfig::builder().build().unwrap().min_hop_time(),
        Duration::ZERO
    );
    let bad: Result<FallbackConfig, _> = serde_json::from_str(r#"{"min_hop_time":"soon"}"#);
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("min_hop_time \"soon\" is not a duration")
    );
}
