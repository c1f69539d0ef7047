//! The service: calls the inner service and hands its outcome to [`ResponseFuture`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use http::{Request, Response};
use tower_service::Service;

use crate::{BoxError, ClassifiedBody, ClassifiedError, ClassifyLayer, ResponseFuture, Rules};

/// Classifies every outcome of the inner service; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Classify<S> {
    inner: S,
    rules: Arc<Rules>,
    clock: fn() -> SystemTime,
}

impl<S> Classify<S> {
    /// Wraps `inner`, applying `rules`.
    pub fn new(inner: S, rules: Rules) -> Self {
        Classify::from_parts(inner, Arc::new(rules), SystemTime::now)
    }

    pub(crate) fn from_parts(inner: S, rules: Arc<Rules>, clock: fn() -> SystemTime) -> Self {
        Classify {
            inner,
            rules,
            clock,
        }
    }

    /// A [`ClassifyLayer`] applying `rules`.
    pub fn layer(rules: Rules) -> ClassifyLayer {
        ClassifyLayer::new(rules)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for Classify<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body,
{
    type Response = Response<ClassifiedBody<RB>>;
    type Error = ClassifiedError;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(classify_error)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        ResponseFuture::new(
            self.inner.call(request),
            Arc::clone(&self.rules),
            self.clock,
        )
    }
}

/// An inner error as a [`ClassifiedError`]; one that already is (from an inner
/// Backstop layer) keeps its verdict.
pub(crate) fn classify_error(error: impl Into<BoxError>) -> ClassifiedError {
    match error.into().downcast::<ClassifiedError>() {
        Ok(classified) => *classified,
        Err(error) => {
            let failure = crate::classify_transport_error(&*error);
            ClassifiedError::new(failure, error)
        }
    }
}
