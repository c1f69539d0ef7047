//! The client policies compared side by side, each modelled as such code behaves.
//!
//! - `no-retries`: one attempt, no fallback.
//! - `openai-python`: the official SDK's policy alone (peers.md): 3 attempts; retries
//!   408/409/429/5xx and connection errors, obeys `x-should-retry`; waits
//!   `0.5 s · 2^n` (max 8 s) times a factor in (0.75, 1]; honours `retry-after-ms` /
//!   `retry-after` when 0 < x ≤ 120 s and does not retry at all above that.
//! - `tenacity+sdk`: the pattern common in LLM retry guides: a tenacity decorator
//!   (retry on rate-limit and connection errors only, `wait_exponential(multiplier=1,
//!   min=2, max=30)` = waits 2, 2, 4 s, `stop_after_attempt(4) | stop_after_delay(60)`)
//!   around the SDK call above, so a rate-limited model sees up to 4 × 3 = 12 HTTP
//!   attempts; once that gives up, the same again against the fallback model.
//! - `tower-retry+tps-budget`: `tower::retry::Retry` with a policy retrying 429/5xx and
//!   transport errors up to 3 times behind tower's `TpsBudget` (its defaults: 10 s,
//!   10 retries/s floor, 20 %), exponential backoff 0.5 s doubling to 8 s, full jitter.
//! - `backstop`: the full Backstop stack (fallback → breaker → budget → retry → classify).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_classify::ReplayBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::ServiceExt;
use tower::retry::budget::{Budget, TpsBudget};

use super::scenarios::{FALLBACK, PRIMARY};
use super::stack::BackstopClient;
use super::upstream::Upstream;

/// Which client policy to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// One attempt, no fallback.
    NoRetries,
    /// tenacity around the SDK, then the same against the fallback model.
    TenacitySdk,
    /// openai-python's own retries.
    OpenAiPython,
    /// tower's retry behind its TpsBudget.
    TowerRetryTpsBudget,
    /// The Backstop stack.
    Backstop,
}

impl Policy {
    /// Every policy, in report order.
    pub const ALL: [Policy; 5] = [
        Policy::NoRetries,
        Policy::TenacitySdk,
        Policy::OpenAiPython,
        Policy::TowerRetryTpsBudget,
        Policy::Backstop,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::NoRetries => "no-retries",
            Policy::TenacitySdk => "tenacity+sdk",
            Policy::OpenAiPython => "openai-python",
            Policy::TowerRetryTpsBudget => "tower-retry+tps-budget",
            Policy::Backstop => "backstop",
        }
    }
}

/// How one logical request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// A complete successful response reached the client.
    pub succeeded: bool,
    /// The model that served it, on success.
    pub served_by: Option<String>,
    /// Whether a fallback to another model fired.
    pub fell_back: bool,
    /// Whether it was answered locally (breaker open, throttled) without any attempt
    /// reaching the provider.
    pub rejected_locally: bool,
}

/// What one HTTP attempt came back with, as an SDK sees it.
#[derive(Clone, Debug, PartialEq)]
enum Attempt {
    Success,
    Status {
        status: u16,
        retry_after: Option<f64>,
        should_retry: Option<bool>,
    },
    Connection,
}

/// A client running one policy. Cheap to clone; clones share policy state (budgets).
#[derive(Clone)]
pub struct Client {
    policy: Policy,
    upstream: Upstream,
    has_fallback: bool,
    rng: Arc<Mutex<SmallRng>>,
    tps_budget: Arc<TpsBudget>,
    backstop: Option<BackstopClient>,
}

impl Client {
    /// A client for `policy` sending to `upstream`; `seed` fixes its jitter.
    pub fn new(policy: Policy, upstream: Upstream, has_fallback: bool, seed: u64) -> Self {
        let backstop = (policy == Policy::Backstop)
            .then(|| BackstopClient::new(upstream.clone(), has_fallback, seed));
        Client {
            policy,
            upstream,
            has_fallback,
            rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(seed ^ 0x5eed))),
            tps_budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            backstop,
        }
    }

    /// Runs one logical request for the primary model.
    pub async fn run(&self) -> Outcome {
        match self.policy {
            Policy::NoRetries => outcome(self.attempt(PRIMARY).await, PRIMARY, false),
            Policy::OpenAiPython => outcome(self.openai_python(PRIMARY).await, PRIMARY, false),
            Policy::TenacitySdk => {
                let first = self.tenacity(PRIMARY).await;
                if first == Attempt::Success || !self.has_fallback {
                    return outcome(first, PRIMARY, false);
                }
                outcome(self.tenacity(FALLBACK).await, FALLBACK, true)
            }
            Policy::TowerRetryTpsBudget => self.tower_retry().await,
            Policy::Backstop => match &self.backstop {
                Some(client) => client.run().await,
                None => unreachable_outcome(),
            },
        }
    }

    fn uniform(&self) -> f64 {
        self.rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .random::<f64>()
    }

    async fn attempt(&self, model: &str) -> Attempt {
        let request = chat_request(model);
        let response = match self.upstream.clone().oneshot(request).await {
            Ok(r) => r,
            Err(_) => return Attempt::Connection,
        };
        let status = response.status().as_u16();
        let header_f64 = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite())
        };
        let retry_after = header_f64("retry-after-ms")
            .map(|ms| ms / 1000.0)
            .or_else(|| header_f64("retry-after"));
        let should_retry = response
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("true"));
        // The SDK reads the whole body; a body that fails mid-way is a connection error.
        if response.into_body().collect().await.is_err() {
            return Attempt::Connection;
        }
        if status < 400 {
            Attempt::Success
        } else {
            Attempt::Status {
                status,
                retry_after,
                should_retry,
            }
        }
    }

    async fn openai_python(&self, model: &str) -> Attempt {
        const MAX_RETRIES: u32 = 2;
        let mut retries_taken = 0;
        loop {
            let attempt = self.attempt(model).await;
            let should_retry = match &attempt {
                Attempt::Success => return attempt,
                Attempt::Connection => true,
                Attempt::Status {
                    should_retry: Some(explicit),
                    ..
                } => *explicit,
                Attempt::Status { status, .. } => {
                    matches!(status, 408 | 409 | 429) || *status >= 500
                }
            };
            if !should_retry || retries_taken == MAX_RETRIES {
                return attempt;
            }
            let hint = match &attempt {
                Attempt::Status {
                    retry_after: Some(s),
                    ..
                } if *s > 0.0 => Some(*s),
                _ => None,
            };
            let wait = match hint {
                Some(s) if s <= 120.0 => s,
                Some(_) => return attempt,
                None => {
                    let base = (0.5 * 2f64.powi(retries_taken as i32)).min(8.0);
                    base * (1.0 - 0.25 * self.uniform())
                }
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            retries_taken += 1;
        }
    }

    async fn tenacity(&self, model: &str) -> Attempt {
        let start = tokio::time::Instant::now();
        let mut attempt_number = 1u32;
        loop {
            let attempt = self.openai_python(model).await;
            let retry_on = matches!(
                attempt,
                Attempt::Connection | Attempt::Status { status: 429, .. }
            );
            if !retry_on || attempt_number == 4 || start.elapsed() >= Duration::from_secs(60) {
                return attempt;
            }
            let wait = 2f64.powi(attempt_number as i32 - 1).clamp(2.0, 30.0);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            attempt_number += 1;
        }
    }

    async fn tower_retry(&self) -> Outcome {
        self.tps_budget.deposit();
        let policy = TowerPolicy {
            budget: self.tps_budget.clone(),
            retries_left: 3,
            attempt: 0,
            rng: self.rng.clone(),
        };
        let service = tower::retry::Retry::new(policy, self.upstream.clone());
        let succeeded = match service.oneshot(chat_request(PRIMARY)).await {
            Ok(response) if response.status().is_success() => {
                response.into_body().collect().await.is_ok()
            }
            _ => false,
        };
        Outcome {
            succeeded,
            served_by: succeeded.then(|| PRIMARY.to_string()),
            fell_back: false,
            rejected_locally: false,
        }
    }
}

fn unreachable_outcome() -> Outcome {
    Outcome {
        succeeded: false,
        served_by: None,
        fell_back: false,
        rejected_locally: false,
    }
}

fn outcome(attempt: Attempt, model: &str, fell_back: bool) -> Outcome {
    let succeeded = attempt == Attempt::Success;
    Outcome {
        succeeded,
        served_by: succeeded.then(|| model.to_string()),
        fell_back,
        rejected_locally: false,
    }
}

/// A small chat-completions request for `model`.
pub fn chat_request(model: &str) -> http::Request<ReplayBody> {
    let body =
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say hello."}}]}}"#);
    let mut request = http::Request::new(ReplayBody::new(Bytes::from(body)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static("http://mock.local/v1/chat/completions");
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    request
}

/// The retry policy a tower user would write: 429, 5xx and transport errors, up to 3
/// retries, each withdrawn from the shared TpsBudget, exponential backoff with full jitter.
#[derive(Clone)]
struct TowerPolicy {
    budget: Arc<TpsBudget>,
    retries_left: u32,
    attempt: u32,
    rng: Arc<Mutex<SmallRng>>,
}

impl<E> tower::retry::Policy<http::Request<ReplayBody>, http::Response<backstop_mock::MockBody>, E>
    for TowerPolicy
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut http::Request<ReplayBody>,
        result: &mut Result<http::Response<backstop_mock::MockBody>, E>,
    ) -> Option<Self::Future> {
        let retryable = match result {
            Ok(response) => {
                let s = response.status().as_u16();
                s == 429 || s >= 500
            }
            Err(_) => true,
        };
        if !retryable || self.retries_left == 0 || !self.budget.withdraw() {
            return None;
        }
        self.retries_left -= 1;
        let cap = (0.5 * 2f64.powi(self.attempt as i32)).min(8.0);
        self.attempt += 1;
        let wait = cap
            * self
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .random::<f64>();
        Some(tokio::time::sleep(Duration::from_secs_f64(wait)))
    }

    fn clone_request(
        &mut self,
        req: &http::Request<ReplayBody>,
    ) -> Option<http::Request<ReplayBody>> {
        let mut clone = http::Request::new(req.body().replay());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}
