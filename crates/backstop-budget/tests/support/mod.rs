//! Test doubles: a scripted provider that counts every attempt, and a minimal retry
//! loop that asks the budget before every retry (standing in for backstop-retry's
//! layer, which honours the same contract).
#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::{Classification, ClassifiedError, Failure, FailureKind, RetryBudgetHandle};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the provider does with one attempt: `(now, request id, attempt number for
/// that id starting at 1)` → status.
pub type Script = dyn Fn(Instant, u64, u64) -> u16 + Send + Sync;

/// A provider answering from a script, classifying its own answers as the classify
/// layer would, and counting attempts.
#[derive(Clone)]
pub struct Provider {
    script: Arc<Script>,
    attempts: Arc<AtomicU64>,
    per_request: Arc<Mutex<HashMap<u64, u64>>>,
}

impl Provider {
    pub fn new(script: impl Fn(Instant, u64, u64) -> u16 + Send + Sync + 'static) -> Self {
        Provider {
            script: Arc::new(script),
            attempts: Arc::new(AtomicU64::new(0)),
            per_request: Arc::default(),
        }
    }

    pub fn always(status: u16) -> Self {
        Provider::new(move |_, _, _| status)
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }
}

/// The request id the tests put in the body.
pub fn request(id: u64) -> http::Request<String> {
    http::Request::new(id.to_string())
}

fn classification(status: u16) -> Classification {
    match status {
        200..=299 => Classification::Success,
        429 => Classification::Failure(Failure::new(FailureKind::RateLimited)),
        503 => Classification::Failure(Failure::new(FailureKind::Overloaded)),
        500..=599 => Classification::Failure(Failure::new(FailureKind::ServerError)),
        _ => Classification::Failure(Failure::new(FailureKind::InvalidRequest)),
    }
}

impl Service<http::Request<String>> for Provider {
    type Response = http::Response<String>;
    type Error = ClassifiedError;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<String>) -> Self::Future {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let id: u64 = request.body().parse().unwrap_or(u64::MAX);
        let attempt = {
            let mut seen = self.per_request.lock().unwrap();
            let n = seen.entry(id).or_insert(0);
            *n += 1;
            *n
        };
        let status = (self.script)(Instant::now(), id, attempt);
        let mut response = http::Response::builder()
            .status(status)
            .body(String::new())
            .unwrap();
        response.extensions_mut().insert(classification(status));
        std::future::ready(Ok(response))
    }
}

/// A minimal retry loop: up to `retries` retries of 5xx/429 answers, a fixed
/// `backoff` between attempts, and, when the request carries a budget handle, no
/// retry the budget refuses.
#[derive(Clone)]
pub struct ScriptedRetry<S> {
    inner: S,
    retries: u32,
    backoff: Duration,
}

impl<S> ScriptedRetry<S> {
    pub fn new(inner: S, retries: u32, backoff: Duration) -> Self {
        ScriptedRetry {
            inner,
            retries,
            backoff,
        }
    }
}

impl<S> Service<http::Request<String>> for ScriptedRetry<S>
where
    S: Service<http::Request<String>, Response = http::Response<String>, Error = ClassifiedError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<String>;
    type Error = ClassifiedError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<String>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let handle = parts.extensions.get::<RetryBudgetHandle>().cloned();
        let inner = self.inner.clone();
        let (retries, backoff) = (self.retries, self.backoff);
        Box::pin(async move {
            let mut retried = 0;
            loop {
                let mut attempt = http::Request::new(body.clone());
                *attempt.extensions_mut() = parts.extensions.clone();
                let outcome = inner.clone().oneshot(attempt).await;
                let retryable = match &outcome {
                    Ok(r) => r.status().is_server_error() || r.status() == 429,
                    Err(e) => e.failure().retryable != backstop_classify::Retryable::No,
                };
                if !retryable || retried == retries {
                    return outcome;
                }
                if let Some(handle) = &handle
                    && !handle.0.try_withdraw()
                {
                    return outcome;
                }
                retried += 1;
                tokio::time::sleep(backoff).await;
            }
        })
    }
}
