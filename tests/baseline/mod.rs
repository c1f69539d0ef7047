//! What the root package's benchmarks and measurement tests compare: the tower
//! composition a tower user writes instead of Backstop, and the Backstop stack as the
//! benchmarks configure it. One definition, so every figure in BENCHMARKS.md measures
//! the same two things.
//!
//! Used by `tests/allocations.rs`, `tests/memory_per_request.rs` and (through
//! `#[path]`) `benches/stack_overhead.rs` and `benches/scaling.rs`.

#![allow(dead_code)] // each target uses a different part of this module

use std::sync::Arc;
use std::time::Duration;

use backstop::BackstopLayer;
use backstop::classify::ReplayBody;
use backstop::fallback::{FallbackConfig, Target};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::retry::budget::{Budget, TpsBudget};
use tower_http::classify::{ClassifiedResponse, ClassifyResponse, StatusInRangeAsFailures};

/// The request every variant is sent.
pub type Req = Request<ReplayBody>;
/// The response the in-memory provider stand-ins answer with.
pub type Res = Response<Full<Bytes>>;

/// What a tower user writes: up to `retries` retries on 429/5xx (tower-http's
/// classifier), each withdrawn from a shared `TpsBudget`, which every request
/// deposits into.
#[derive(Clone)]
pub struct TowerPolicy {
    budget: Arc<TpsBudget>,
    retries_left: u8,
}

/// `tower::retry::Retry` with [`TowerPolicy`] and a fresh `TpsBudget` (tower's
/// defaults), shared by every clone of the service it makes.
pub fn tower_composition(retries: u8) -> tower::retry::RetryLayer<TowerPolicy> {
    tower::retry::RetryLayer::new(TowerPolicy {
        budget: Arc::new(TpsBudget::default()),
        retries_left: retries,
    })
}

impl<E> tower::retry::Policy<Req, Res, E> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => {
                let classifier = StatusInRangeAsFailures::new(429..=599);
                matches!(
                    classifier.classify_response(response),
                    ClassifiedResponse::Ready(Err(_))
                )
            }
            Err(_) => true,
        };
        if !failed {
            self.budget.deposit();
            return None;
        }
        if self.retries_left == 0 || !self.budget.withdraw() {
            return None;
        }
        self.retries_left -= 1;
        Some(tokio::time::sleep(Duration::from_millis(500)))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let mut clone = Request::new(req.body().replay());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

/// The benchmarks' Backstop stack: every layer at its default, two targets at one
/// host, one chain, a seeded retry layer.
pub fn benchmark_stack() -> BackstopLayer {
    let fallback = FallbackConfig::builder()
        .target(
            "gpt-4o",
            Target::new("openai", "https://api.provider.test/v1"),
        )
        .target(
            "claude-sonnet",
            Target::new("anthropic", "https://api.provider.test/v1"),
        )
        .chain("gpt-4o", ["claude-sonnet"])
        .build()
        .expect("valid fallback config");
    BackstopLayer::builder()
        .fallback(fallback)
        .retry_seed(1)
        .build()
        .expect("valid stack")
}
