//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use backstop_classify::ClassifiedError;
use http::Response;
use tracing::instrument::Instrumented;

use crate::RetryBody;

pub(crate) type Boxed<RB> =
    Pin<Box<dyn Future<Output = Result<Response<RetryBody<RB>>, ClassifiedError>> + Send>>;

/// The future of one logical request: every attempt, wait and readiness check.
///
/// Dropping it cancels whatever is in progress (the attempt in flight or the wait)
/// and makes no further attempt. It is boxed: the attempt loop is an `async` state
/// machine whose size depends on the inner future; one allocation per logical
/// request (see the benchmark in the crate docs).
pub struct ResponseFuture<RB> {
    pub(crate) inner: Instrumented<Boxed<RB>>,
}

impl<RB> Future for ResponseFuture<RB> {
    type Output = Result<Response<RetryBody<RB>>, ClassifiedError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

impl<RB> std::fmt::Debug for ResponseFuture<RB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}
