//! The retry service: the attempt loop around the policy.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use backstop_classify::{BoxError, ClassifiedError, ModelRoute};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tower_service::Service;

use crate::attempts::Attempts;
use crate::{ResponseFuture, RetryBody, RetryConfig, RetryPolicy, verdict};

/// What every [`Retry`] made by one layer shares.
pub(crate) struct Shared {
    pub(crate) config: RetryConfig,
    pub(crate) policy: Arc<dyn RetryPolicy>,
    pub(crate) rng: Mutex<SmallRng>,
}

impl Shared {
    /// A per-request random source drawn from the shared one: jitter within a
    /// request then needs no lock, and a seeded layer stays reproducible.
    pub(crate) fn request_rng(&self) -> SmallRng {
        let mut shared = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        SmallRng::from_rng(&mut *shared)
    }

    pub(crate) fn duplicate(&self) -> Shared {
        Shared {
            config: self.config.clone(),
            policy: self.policy.clone(),
            rng: Mutex::new(self.request_rng()),
        }
    }
}

/// Retries failed attempts of a request against the inner service. Made by
/// [`RetryLayer`](crate::RetryLayer); see the crate docs for the contract.
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Retry<S> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S> Retry<S> {
    /// Wraps `inner` with `config` and the standard policy.
    pub fn new(inner: S, config: RetryConfig) -> Self {
        use tower_layer::Layer;
        crate::RetryLayer::new(config).layer(inner)
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Retry { inner, shared }
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

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
    B: Clone + Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<RetryBody<RB>>;
    type Error = ClassifiedError;
    type Future = ResponseFuture<S, B, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClassifiedError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| verdict::classified_error(e.into()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The service that was driven to ready makes the first attempt, now; `self`
        // keeps a fresh clone that its next `poll_ready` will drive.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!(
            "backstop.retry",
            "gen_ai.request.model" = tracing::field::Empty,
        );
        if !span.is_disabled()
            && let Some(route) = request.extensions().get::<ModelRoute>()
        {
            span.record(
                "gen_ai.request.model",
                &*backstop_classify::printed_name(&route.model),
            );
        }
        let mut attempts = Attempts::new(inner, self.shared.clone(), &mut request);
        let first = {
            let _entered = span.enter();
            attempts.send_first(request)
        };
        ResponseFuture::first(first, attempts, span)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower_layer::Layer;
    use tower_service::Service;

    use crate::attempts::{Attempts, Planned, Resume};

    fn provider() -> impl tower_service::Service<
        http::Request<backstop_classify::ReplayBody>,
        Response = http::Response<http_body_util::Full<bytes::Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|_r: http::Request<backstop_classify::ReplayBody>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Full::new(bytes::Bytes::new()),
            )))
        })
    }

    /// The retry loop's state is one allocation, made on a request's first retry;
    /// it grows silently when a rarely used future (a wait, a held stream) is stored
    /// inline. Those are boxed.
    #[test]
    fn the_request_future_stays_under_one_and_a_quarter_kib() {
        let retry = crate::RetryLayer::new(crate::RetryConfig::interactive()).layer(provider());
        let attempts = Attempts::new(
            retry.get_ref().clone(),
            retry.shared.clone(),
            &mut http::Request::new(backstop_classify::ReplayBody::default()),
        );
        let future = attempts.resume(Resume::Wait(Planned::after(Duration::from_millis(1))));
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1280, "the retry loop's future is {size} bytes");
    }

    /// The future every request gets (not boxed: the caller holds it) is the
    /// request's state and the first attempt's future, plus the span and an
    /// optional timer: nothing a retry alone needs is stored in it.
    #[tokio::test]
    async fn the_response_future_holds_only_the_request_and_the_first_attempt() {
        let mut retry = crate::RetryLayer::new(crate::RetryConfig::interactive()).layer(provider());
        let mut request = http::Request::new(backstop_classify::ReplayBody::default());
        let future = retry.call(request.clone());
        let attempts = Attempts::new(retry.get_ref().clone(), retry.shared.clone(), &mut request);
        let first_attempt = retry.get_mut().call(http::Request::default());
        let size = std::mem::size_of_val(&future);
        let parts = size_of_val(&attempts) + size_of_val(&first_attempt);
        assert!(
            size <= parts + 80,
            "the response future is {size} bytes for {parts} bytes of request and attempt"
        );
    }

    /// What a request keeps between attempts is its copy of the request's head (the
    /// headers packed), its body, the inner service and a few words (deadline, log,
    /// random source).
    #[test]
    fn the_request_state_is_the_request_plus_a_few_words() {
        let retry = crate::RetryLayer::new(crate::RetryConfig::interactive()).layer(provider());
        let mut request = http::Request::new(backstop_classify::ReplayBody::default());
        let request_size = size_of_val(&request);
        let attempts = Attempts::new(retry.get_ref().clone(), retry.shared.clone(), &mut request);
        let size = size_of_val(&attempts);
        assert!(
            size <= request_size + 160,
            "the request state is {size} bytes for a {request_size}-byte request"
        );
    }
}
