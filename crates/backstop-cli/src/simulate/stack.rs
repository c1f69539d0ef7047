//! The Backstop stack as the simulator runs it: every layer, default configuration,
//! over the simulated upstream.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerLayer};
use backstop_budget::{RetryBudgetLayer, WindowedBudget};
use backstop_classify::{BoxError, ClassifiedError, ClassifyLayer, FailureKind, ReplayBody, Rules};
use backstop_fallback::{FallbackConfig, FallbackLayer, ServedBy, Target};
use backstop_retry::{RetryConfig, RetryLayer};
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use super::policies::{Outcome, chat_request};
use super::scenarios::{FALLBACK, PRIMARY};
use super::upstream::Upstream;

type Stack = BoxCloneSyncService<
    http::Request<ReplayBody>,
    http::Response<UnsyncBoxBody<Bytes, BoxError>>,
    BoxError,
>;

/// A client sending through the full Backstop stack.
#[derive(Clone)]
pub struct BackstopClient {
    stack: Stack,
}

impl BackstopClient {
    /// The stack over `upstream`; `seed` fixes the retry layer's jitter.
    pub fn new(upstream: Upstream, has_fallback: bool, seed: u64) -> Self {
        let mut fallback = FallbackConfig::builder()
            .target(
                PRIMARY,
                Target::new("openai", "http://mock.local/v1").model(PRIMARY),
            )
            .total_deadline(Duration::from_secs(60));
        if has_fallback {
            fallback = fallback
                .target(
                    FALLBACK,
                    Target::new("anthropic", "http://mock.local/v1").model(FALLBACK),
                )
                .chain(PRIMARY, [FALLBACK]);
        }
        let fallback = fallback
            .build()
            .expect("the simulator's fallback config is valid");
        let retry = RetryConfig::interactive();
        let stack = ServiceBuilder::new()
            .layer(FallbackLayer::new(fallback))
            .layer(
                BreakerLayer::new(BreakerConfig::default())
                    .expect("default breaker config is valid"),
            )
            .layer(RetryBudgetLayer::new(WindowedBudget::default()))
            .layer(RetryLayer::new(retry).with_rng_seed(seed))
            .layer(ClassifyLayer::new(Rules::default()))
            .service(upstream)
            .map_response(|r| r.map(|b| UnsyncBoxBody::new(b.map_err(Into::<BoxError>::into))))
            .map_err(Into::<BoxError>::into);
        BackstopClient {
            stack: BoxCloneSyncService::new(stack),
        }
    }

    /// Runs one logical request for the primary model.
    pub async fn run(&self) -> Outcome {
        match self.stack.clone().oneshot(chat_request(PRIMARY)).await {
            Ok(response) => {
                let served = response.extensions().get::<ServedBy>().cloned();
                let ok =
                    response.status().is_success() && response.into_body().collect().await.is_ok();
                let fell_back = served.as_ref().is_some_and(|s| s.fallback_fired);
                Outcome {
                    succeeded: ok,
                    served_by: ok.then(|| {
                        served.map_or_else(|| PRIMARY.to_string(), |s| s.model.to_string())
                    }),
                    fell_back,
                    rejected_locally: false,
                }
            }
            Err(error) => {
                let classified = error.downcast_ref::<ClassifiedError>();
                let served = classified.and_then(ServedBy::of_error);
                let fell_back = served.is_some_and(|s| s.fallback_fired);
                // Local when no hop reached the provider: every hop was refused by a
                // breaker or the throttle.
                let local = |kind: FailureKind| {
                    matches!(kind, FailureKind::BreakerOpen | FailureKind::Throttled)
                };
                let rejected_locally = match served {
                    Some(s) => s
                        .hops
                        .iter()
                        .all(|h| h.failure.as_ref().is_some_and(|f| local(f.kind))),
                    None => classified.is_some_and(|e| local(e.kind())),
                };
                Outcome {
                    succeeded: false,
                    served_by: None,
                    fell_back,
                    rejected_locally,
                }
            }
        }
    }
}
