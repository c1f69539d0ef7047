//! The simulated network edge: every attempt a policy sends passes through here on its
//! way to the mock provider, so the simulator counts what reaches the provider the same
//! way for every policy.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use backstop_classify::ReplayBody;
use backstop_mock::{MockBody, MockProvider};
use futures_util::future::BoxFuture;
use tokio::time::Instant;

/// What reached the provider, per attempt.
#[derive(Debug, Default)]
pub struct UpstreamLog {
    /// (seconds since the run started, status or 0 for a transport failure)
    pub attempts: Vec<(f64, u16)>,
}

/// A `tower::Service` in front of the mock provider that logs every attempt.
#[derive(Clone)]
pub struct Upstream {
    mock: MockProvider,
    start: Instant,
    log: Arc<Mutex<UpstreamLog>>,
}

impl Upstream {
    /// Wraps `mock`, timing attempts from `start`.
    pub fn new(mock: MockProvider, start: Instant) -> Self {
        Upstream {
            mock,
            start,
            log: Arc::default(),
        }
    }

    /// The log so far.
    pub fn take_log(&self) -> UpstreamLog {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl tower::Service<http::Request<ReplayBody>> for Upstream {
    type Response = http::Response<MockBody>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<http::Response<MockBody>, std::io::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<ReplayBody>>::poll_ready(&mut self.mock, cx)
    }

    fn call(&mut self, request: http::Request<ReplayBody>) -> Self::Future {
        let at = self.start.elapsed().as_secs_f64();
        let log = self.log.clone();
        let future = self.mock.call(request);
        Box::pin(async move {
            let result = future.await;
            let status = result.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .attempts
                .push((at, status));
            result
        })
    }
}
