//! The service: reads the requested model, then hands the request to the future.

use std::sync::Arc;
use std::task::{Context, Poll};

use backstop_classify::{
    BoxError, ClassifiedError, Deadline, Failure, FailureKind, ReplayBody, is_idempotent,
};
use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use crate::config::{Compiled, FallbackConfig};
use crate::future::ResponseFuture;
use crate::hop::Original;
use crate::journey::{Journey, into_classified};
use crate::rewrite;

/// Sends a request to the next model in its chain when one cannot serve it. See the
/// [crate docs](crate) for the contract.
#[derive(Clone)]
pub struct Fallback<S> {
    inner: S,
    config: Arc<Compiled>,
    // Shared, not owned: the service is cloned for every call (tower's `oneshot`, the
    // fallback's own ready-clone), and a deep copy of the targets map cost more than
    // the rest of the layer.
    layer_config: Arc<FallbackConfig>,
}

impl<S> std::fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("config", &self.layer_config)
            .finish_non_exhaustive()
    }
}

impl<S> Fallback<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: FallbackConfig) -> Self {
        Fallback::shared(inner, Arc::new(config))
    }

    /// Wraps `inner` with a configuration shared with the layer and its other services.
    pub(crate) fn shared(inner: S, config: Arc<FallbackConfig>) -> Self {
        Fallback {
            inner,
            config: config.compiled.clone(),
            layer_config: config,
        }
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

impl<S, RB> Service<Request<ReplayBody>> for Fallback<S>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = ClassifiedError;
    type Future = ResponseFuture<S, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| into_classified(e.into()))
    }

    fn call(&mut self, request: Request<ReplayBody>) -> Self::Future {
        // The ready service serves the first hop; the clone left behind is driven to
        // ready by the next call's poll_ready, and the future's own clone is driven
        // to ready before every later hop.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        let (parts, body) = request.into_parts();
        let bytes = body.bytes().clone();
        if bytes.is_empty() {
            // No body, no model (GET /v1/models and the like): nothing to route.
            let span = tracing::info_span!("backstop.fallback");
            let request = Request::from_parts(parts, body);
            let future = {
                let _entered = span.enter();
                inner.call(request)
            };
            return ResponseFuture::calling(inner, future, None, span);
        }

        let span = tracing::info_span!(
            "backstop.fallback",
            "gen_ai.request.model" = tracing::field::Empty,
            "gen_ai.response.model" = tracing::field::Empty,
        );
        let refuse =
            |inner, error: ClassifiedError, span| ResponseFuture::refused(inner, error, span);
        let model_span = match rewrite::locate_model(&bytes) {
            Ok(s) => s,
            Err(e) => {
                // Refused before anything is sent; the caller's body is untouched.
                let error = ClassifiedError::new(Failure::new(FailureKind::InvalidRequest), e);
                return refuse(inner, error, span);
            }
        };
        let decoded = rewrite::decode_string(&bytes, model_span);
        // A configured model shares its name with the configuration: no allocation
        // per request, and the breaker's route comparison meets the same pointer.
        let (model, target) = match self.config.targets.get_key_value(&*decoded) {
            Some((name, target)) => (Arc::clone(name), Some(target)),
            None => (Arc::from(decoded), None),
        };
        span.record(
            "gen_ai.request.model",
            &*backstop_classify::printed_name(&model),
        );

        let caller_deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        // The clock is read only when there is a deadline to work out: most requests
        // have none, and a clock read (tens of nanoseconds) would be wasted on them.
        let deadline = if caller_deadline.is_some() || self.config.total_deadline.is_some() {
            let now = Instant::now();
            // A deadline too far away to represent is no deadline (and no overflow panic).
            let own_deadline = self.config.total_deadline.and_then(|d| now.checked_add(d));
            let deadline = match (caller_deadline, own_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if deadline.is_some_and(|d| d <= now) {
                let error = ClassifiedError::local(Failure::new(FailureKind::TimedOut));
                return refuse(inner, error, span);
            }
            deadline
        } else {
            None
        };

        // The shared definition of idempotent takes a request: lend it the head.
        let probe = Request::from_parts(parts, ());
        let idempotent = is_idempotent(&probe);
        let (parts, ()) = probe.into_parts();
        let original = Original {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            extensions: parts.extensions,
            body: bytes,
            model_span,
            model,
        };
        match Journey::start(
            self.config.clone(),
            original,
            target,
            idempotent,
            deadline,
            span.clone(),
        ) {
            Ok((journey, request)) => {
                let future = {
                    let _entered = span.enter();
                    inner.call(request)
                };
                ResponseFuture::calling(inner, future, Some(journey), span)
            }
            Err(error) => refuse(inner, error, span),
        }
    }
}
