//! The service: throttle, deposit, hand the retry layer its handle, call, record.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use backstop_classify::{
    BoxError, ClassifiedError, Failure, FailureKind, RetryBudgetHandle, classify_transport_error,
};
use tower_service::Service;

use crate::adaptive::Admission;
use crate::future::ResponseFuture;
use crate::layer::RetryBudgetLayer;
use crate::model::BudgetModel;
use crate::scope::{RequestScope, Shared};

/// The service [`RetryBudgetLayer`] wraps around an inner service.
pub struct RetryBudgetService<S, M> {
    inner: S,
    shared: Arc<Shared<M>>,
}

impl<S, M> RetryBudgetService<S, M> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<M>>) -> Self {
        RetryBudgetService { inner, shared }
    }

    /// Wraps `inner`, sharing `layer`'s budget.
    pub fn new(inner: S, layer: &RetryBudgetLayer<M>) -> Self
    where
        M: BudgetModel,
    {
        tower_layer::Layer::layer(layer, inner)
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

impl<S: Clone, M> Clone for RetryBudgetService<S, M> {
    fn clone(&self) -> Self {
        RetryBudgetService {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for RetryBudgetService<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudgetService")
            .field("inner", &self.inner)
            .field("budget", &self.shared.observer.name())
            .finish()
    }
}

/// Keeps an inner layer's verdict; classifies anything else as the classify crate
/// classifies transport errors (connect failures, timeouts, resets; an unknown error
/// is a connection lost after the request may have been written, the conservative
/// reading).
pub(crate) fn into_classified(error: impl Into<BoxError>) -> ClassifiedError {
    match error.into().downcast::<ClassifiedError>() {
        Ok(classified) => *classified,
        Err(other) => ClassifiedError::new(classify_transport_error(&*other), other),
    }
}

/// The cause attached to a request the adaptive throttle rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct LocallyRejected {
    /// The rejection probability when the request was drawn.
    pub probability: f64,
}

impl fmt::Display for LocallyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rejected locally by adaptive throttling (rejection probability {:.3}): the \
             provider has been refusing most requests; another model may serve it",
            self.probability
        )
    }
}

impl std::error::Error for LocallyRejected {}

impl<S, M, B, ResBody> Service<http::Request<B>> for RetryBudgetService<S, M>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
    M: BudgetModel,
{
    type Response = http::Response<ResBody>;
    type Error = ClassifiedError;
    type Future = ResponseFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(into_classified)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let shared = &self.shared;
        if let Some(throttle) = &shared.throttle {
            match throttle.admit() {
                Admission::Reject { probability } => {
                    shared.observer.rejected_locally(probability);
                    let error = ClassifiedError::new(
                        Failure::new(FailureKind::Throttled),
                        LocallyRejected { probability },
                    );
                    return ResponseFuture::rejected(error);
                }
                Admission::Send => shared
                    .observer
                    .throttle_idle(|| throttle.snapshot().rejection_probability),
            }
        }
        shared.model.deposit();
        shared.observer.deposited();
        let scope = Arc::new(RequestScope::new(Arc::clone(shared)));
        // Replaces any handle from an outer budget layer: the innermost budget governs.
        request
            .extensions_mut()
            .insert(RetryBudgetHandle(scope.clone()));
        ResponseFuture::called(self.inner.call(request), scope)
    }
}
