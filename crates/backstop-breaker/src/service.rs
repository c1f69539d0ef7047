//! The tower service: check, call, record.

use std::task::{Context, Poll};

use backstop_classify::{
    BoxError, ClassifiedError, Deadline, LatestStart, ModelRoute, classify_transport_error,
};
use http::{Request, Response};
use tower_service::Service;

use crate::{Breaker, BreakerStore, InProcessStore, ResponseFuture};

/// The breaker around an inner service. See the crate docs for the contract.
pub struct BreakerService<S, St = InProcessStore> {
    inner: S,
    breaker: Breaker<St>,
}

impl<S: Clone, St> Clone for BreakerService<S, St> {
    fn clone(&self) -> Self {
        BreakerService {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
        }
    }
}

impl<S: std::fmt::Debug, St: std::fmt::Debug> std::fmt::Debug for BreakerService<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl<S, St> BreakerService<S, St> {
    /// `inner` guarded by `breaker`.
    pub fn from_parts(inner: S, breaker: Breaker<St>) -> Self {
        BreakerService { inner, breaker }
    }

    /// The breaker, to query its state.
    pub fn breaker(&self) -> &Breaker<St> {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for BreakerService<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    St: BreakerStore,
{
    type Response = Response<ResBody>;
    type Error = ClassifiedError;
    type Future = ResponseFuture<S::Future, St>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(into_classified)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // A paced slot is booked only before the request's latest useful start (or
        // its deadline): one it would not use is lost to every other request.
        let deadline = request.extensions().get::<Deadline>().map(|d| d.0);
        let deadline = match request.extensions().get::<LatestStart>() {
            Some(LatestStart(at)) => Some(deadline.map_or(*at, |d| d.min(*at))),
            None => deadline,
        };
        let admitted = match request.extensions().get::<ModelRoute>() {
            Some(route) => self.breaker.admit_before(route, deadline),
            None => self
                .breaker
                .admit_before(&route_from_uri(&request), deadline),
        };
        match admitted {
            Ok(permit) => {
                if let Some(pace) = permit.pace() {
                    request.extensions_mut().insert(pace);
                }
                ResponseFuture::called(self.inner.call(request), permit)
            }
            Err(rejection) => ResponseFuture::rejected(rejection.into()),
        }
    }
}

/// The key of a request that carries no [`ModelRoute`]: its URI's host and port
/// (never user information) and an empty model (so every model behind one host
/// shares a key).
fn route_from_uri<B>(request: &Request<B>) -> ModelRoute {
    match request.uri().authority() {
        Some(authority) => ModelRoute::at_authority(authority, ""),
        None => ModelRoute::new("", ""),
    }
}

/// An inner error as a [`ClassifiedError`]: kept when it already is one (the classify
/// layer's), otherwise classified by
/// [`classify_transport_error`](backstop_classify::classify_transport_error) (refused
/// connection: connect failed; reset: connection lost; elapsed timer: timed out;
/// anything unknown: connection lost, the cautious reading).
pub(crate) fn into_classified(error: impl Into<BoxError>) -> ClassifiedError {
    let error: BoxError = error.into();
    match error.downcast::<ClassifiedError>() {
        Ok(classified) => *classified,
        Err(other) => ClassifiedError::new(classify_transport_error(other.as_ref()), other),
    }
}
