//! The future returned by the in-memory face.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use crate::body::MockBody;

type Inner = Pin<Box<dyn Future<Output = Result<Response<MockBody>, io::Error>> + Send + 'static>>;

/// Resolves to the mock's response, after the plan's latency (tokio time), or never
/// for [`Fault::Hang`](crate::Fault::Hang).
pub struct ResponseFuture {
    inner: Inner,
}

impl ResponseFuture {
    pub(crate) fn new(
        future: impl Future<Output = Result<Response<MockBody>, io::Error>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            inner: Box::pin(future),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<MockBody>, io::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
