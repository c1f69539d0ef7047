//! The retry service: the attempt loop around the policy.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::{
    AttemptLog, AttemptRecord, BoxError, Classification, ClassifiedError, Deadline, Failure,
    FailureKind, Idempotent, ModelRoute, ReplayBody, RetryBudgetHandle, Rules, StopReason,
};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep, timeout_at};
use tower::ServiceExt;
use tower_service::Service;
use tracing::Instrument;

use crate::first_event::{FirstEvent, read_first_event};
use crate::future::Boxed;
use crate::{
    Decision, FailedAttempt, HoldFirstEvent, ResponseFuture, RetryBody, RetryConfig, RetryError,
    RetryPolicy, StreamRequest, stream_requested, verdict,
};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// What every [`Retry`] made by one layer shares.
pub(crate) struct Shared {
    pub(crate) config: RetryConfig,
    pub(crate) policy: Arc<dyn RetryPolicy>,
    pub(crate) rng: Mutex<SmallRng>,
}

impl Shared {
    /// A per-request random source drawn from the shared one: jitter within a
    /// request then needs no lock, and a seeded layer stays reproducible.
    fn request_rng(&self) -> SmallRng {
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
    type Future = ResponseFuture<RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClassifiedError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| verdict::classified_error(e.into()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service that was driven to ready goes into the future for the first
        // attempt; `self` keeps a fresh clone that its next `poll_ready` will drive.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let span = tracing::debug_span!(
            "backstop.retry",
            "gen_ai.request.model" = tracing::field::Empty,
        );
        if let Some(route) = request.extensions().get::<ModelRoute>() {
            span.record("gen_ai.request.model", &*route.model);
        }
        ResponseFuture {
            // Boxed first, then wrapped: the large state machine is moved once.
            inner: (Box::pin(run(inner, shared, request)) as Boxed<RB>).instrument(span),
        }
    }
}

/// How one attempt ended, before the policy looks at it.
type Outcome<RB> = Result<Response<RetryBody<RB>>, ClassifiedError>;

/// The synchronous set-up runs at once; the returned future holds only what the
/// attempts need (its size is one allocation per request: kept small on purpose).
fn run<S, B, RB>(
    mut inner: S,
    shared: Arc<Shared>,
    request: Request<B>,
) -> impl Future<Output = Outcome<RB>> + Send
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
    B: Clone + Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let config = &shared.config;
    let (mut parts, body) = request.into_parts();

    // The clock is read only when a deadline needs it (it is not free: a thread-local
    // lookup, and a lock under tokio's test clock).
    let deadline = earliest(
        config.deadline.map(|d| Instant::now() + d),
        parts.extensions.get::<Deadline>().map(|d| d.0),
    );
    if let Some(deadline) = deadline {
        // The layers inside (attempt timeout, transport) see the same deadline.
        parts.extensions.insert(Deadline(deadline));
    }

    let mut rng: Option<SmallRng> = None;
    if config.idempotency_key && !parts.headers.contains_key(IDEMPOTENCY_KEY) {
        let key = rng
            .get_or_insert_with(|| shared.request_rng())
            .random::<u128>();
        if let Ok(value) = HeaderValue::try_from(format!("backstop-{key:032x}")) {
            parts.headers.insert(IDEMPOTENCY_KEY, value);
        }
    }
    let budget = parts.extensions.get::<RetryBudgetHandle>().cloned();
    let mut hold = match config.hold_first_event {
        HoldFirstEvent::Never => HoldChoice::Decided(false),
        HoldFirstEvent::Always => HoldChoice::Decided(true),
        HoldFirstEvent::Auto if parts.extensions.get::<StreamRequest>().is_some() => {
            HoldChoice::Decided(true)
        }
        // The body scan costs a pass over the body: done only if a stream answers.
        HoldFirstEvent::Auto => HoldChoice::ScanBody(body.clone()),
    };

    async move {
        let config = &shared.config;
        let mut log = AttemptLog {
            // Sized for the common case, a first attempt that succeeds.
            attempts: Vec::with_capacity(1),
            stop: None,
        };
        let mut waited = Duration::ZERO;
        let mut hint_used = None;
        let mut previous_wait = None;
        let mut last_failure: Option<Failure> = None;
        let mut number: u32 = 0;

        loop {
            number += 1;
            if number > 1 {
                // Readiness is checked before every retry on the service we own: no
                // stale readiness from a clone, and backpressure bounds the wait.
                let ready = match deadline {
                    Some(at) => Box::pin(timeout_at(at, inner.ready())).await.ok(),
                    None => Some(inner.ready().await),
                };
                match ready {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        log.stop = Some(StopReason::NotRetryable);
                        return Err(verdict::classified_error(e.into()).with_attempt_log(log));
                    }
                    None => {
                        log.stop = Some(StopReason::Deadline);
                        let failure =
                            last_failure.unwrap_or_else(|| Failure::new(FailureKind::TimedOut));
                        return Err(ClassifiedError::new(
                            failure,
                            RetryError::NotReadyBeforeDeadline,
                        )
                        .with_attempt_log(log));
                    }
                }
            }

            // Each step is a block, so its locals (the attempt's request, the
            // outcome, the verdict) are not stored in the future across the wait.
            let (call, attempt_start) = {
                let mut attempt = Request::from_parts(parts.clone(), body.clone());
                if let Some(name) = &config.attempt_header {
                    attempt
                        .headers_mut()
                        .insert(name.clone(), HeaderValue::from(number));
                }
                let attempt_start =
                    (config.attempt_timeout.is_some() || deadline.is_some()).then(Instant::now);
                (inner.call(attempt), attempt_start)
            };
            let attempt_deadline = earliest(
                config
                    .attempt_timeout
                    .zip(attempt_start)
                    .map(|(t, start)| start + t),
                deadline,
            );
            let (wait, hint) = {
                let (outcome, first_event_failed) =
                    match attempt_once(call, attempt_start, attempt_deadline, &mut hold, config)
                        .await
                    {
                        AfterHead::Done(outcome) => (outcome, None),
                        // Boxed: only held streams pay for this state.
                        AfterHead::Hold(held) => {
                            Box::pin(held.first_event(attempt_start, attempt_deadline, config))
                                .await
                        }
                    };

                let (classification, status, request_id) = match &outcome {
                    Ok(response) => (
                        response
                            .extensions()
                            .get::<Classification>()
                            .cloned()
                            .unwrap_or(Classification::Success),
                        Some(response.status()),
                        provider_request_id(response.headers()),
                    ),
                    Err(error) => (
                        Classification::Failure(error.failure().clone()),
                        error.failure().status,
                        first_event_failed
                            .as_ref()
                            .and_then(|f| f.request_id.clone()),
                    ),
                };
                tracing::debug!(
                    attempt = number,
                    "http.response.status_code" = status.map(|s| s.as_u16()),
                    "error.type" = classification.failure().map(|f| f.kind.as_str()),
                    waited_ms = waited.as_millis() as u64,
                    "attempt finished"
                );
                let mut record = AttemptRecord::new(number, classification);
                record.status = status;
                record.provider_request_id = request_id;
                record.waited = waited;
                record.hint_used = hint_used;
                log.attempts.push(record);
                let failure = match log.attempts.last().map(|r| &r.classification) {
                    Some(Classification::Failure(failure)) => failure,
                    _ => {
                        log.stop = Some(StopReason::Succeeded);
                        return finish(outcome, log);
                    }
                };

                let time_left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let rng = rng.get_or_insert_with(|| shared.request_rng());
                let mut decision = shared.policy.decide(
                    &FailedAttempt {
                        failure,
                        attempts_made: number,
                        time_left,
                        // Looked up only when a failure needs it: a header lookup is
                        // not free on the success path.
                        idempotent: parts.extensions.get::<Idempotent>().is_some()
                            || parts.headers.contains_key(IDEMPOTENCY_KEY),
                        previous_wait,
                    },
                    rng,
                );
                // The layer's own limits hold whatever the policy said.
                if let Decision::RetryAfter(wait, hint) = decision {
                    // tokio's timer counts whole milliseconds: round up, so the wait
                    // that is checked against the deadline and recorded is the one
                    // that happens.
                    let wait = whole_millis(wait);
                    decision = Decision::RetryAfter(wait, hint);
                    if number >= config.max_attempts {
                        decision = Decision::Stop(StopReason::MaxAttempts);
                    } else if time_left.is_some_and(|left| wait >= left) {
                        decision = Decision::Stop(StopReason::Deadline);
                    } else if budget.as_ref().is_some_and(|b| !b.0.try_withdraw()) {
                        decision = Decision::Stop(StopReason::BudgetExhausted);
                    }
                }
                match decision {
                    Decision::Stop(reason) => {
                        let reason = match reason {
                            StopReason::NotRetryable if first_event_failed.is_some() => {
                                StopReason::StreamFailed
                            }
                            other => other,
                        };
                        log.stop = Some(reason);
                        return finish(outcome, log);
                    }
                    Decision::RetryAfter(wait, hint) => {
                        last_failure = Some(failure.clone());
                        // The failed response is dropped here, before the wait, so
                        // its connection goes back to the pool instead of idling.
                        drop(outcome);
                        (wait, hint)
                    }
                }
            };
            tracing::debug!(wait_ms = wait.as_millis() as u64, "waiting before retry");
            // Boxed, like every future only a retry needs: the success path's state
            // machine stays small.
            Box::pin(sleep(wait)).await;
            waited = wait;
            hint_used = hint;
            previous_wait = Some(wait);
        }
    }
}

/// Whether to hold a stream for its first event, decided when first needed.
enum HoldChoice<B> {
    Decided(bool),
    /// `HoldFirstEvent::Auto` without the marker: scan (a clone of) the body for
    /// `"stream": true` when a stream answers.
    ScanBody(B),
}

impl<B: 'static> HoldChoice<B> {
    fn resolve(&mut self) -> bool {
        match self {
            HoldChoice::Decided(hold) => *hold,
            HoldChoice::ScanBody(body) => {
                let hold = body_asks_for_stream(body);
                *self = HoldChoice::Decided(hold);
                hold
            }
        }
    }
}

/// A held stream whose first event was an error.
struct FirstEventFailed {
    request_id: Option<HeaderValue>,
}

/// How an attempt stands once its response head (or error) is in.
enum AfterHead<RB> {
    /// Decided: hand this on (or judge it).
    Done(Outcome<RB>),
    /// A successful stream to hold until its first event.
    Hold(HeldStream<RB>),
}

/// A successful `text/event-stream` response waiting for its first event.
struct HeldStream<RB> {
    parts: http::response::Parts,
    body: RB,
    watch: Option<(usize, Arc<Rules>)>,
}

/// Makes one attempt up to its response head, and classifies it.
///
/// Kept small on purpose: its state is stored inline in the request's future, so the
/// rarely needed steps (the held stream) are a separate, boxed future.
async fn attempt_once<F, E, B, RB>(
    call: F,
    started: Option<Instant>,
    until: Option<Instant>,
    hold: &mut HoldChoice<B>,
    config: &RetryConfig,
) -> AfterHead<RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    B: 'static,
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    let result = match until {
        Some(at) => Box::pin(timeout_at(at, call)).await.ok(),
        None => Some(call.await),
    };
    let response = match result {
        None => {
            let after = until
                .zip(started)
                .map_or(Duration::ZERO, |(at, started)| at - started);
            let failure = Failure::new(FailureKind::TimedOut);
            return AfterHead::Done(Err(ClassifiedError::new(
                failure,
                RetryError::AttemptTimedOut { after },
            )));
        }
        Some(Err(e)) => return AfterHead::Done(Err(verdict::classified_error(e.into()))),
        Some(Ok(response)) => response,
    };

    let classification = verdict::response_classification(&response, &config.rules);
    let (mut parts, body) = response.into_parts();
    let is_stream = is_event_stream(&parts.headers);
    if !classification.is_success() {
        if parts.extensions.get::<Classification>().is_none() {
            parts.extensions.insert(classification);
        }
        return AfterHead::Done(Ok(Response::from_parts(
            parts,
            RetryBody::passthrough(body),
        )));
    }
    // A success without a classification stays without one: every Backstop layer
    // reads a response below 400 without one as a success, and the insert would cost
    // an allocation on every request.
    let watch = is_stream.then(|| (config.first_event_cap, config.rules.clone()));
    if is_stream && hold.resolve() {
        return AfterHead::Hold(HeldStream { parts, body, watch });
    }
    AfterHead::Done(Ok(Response::from_parts(
        parts,
        RetryBody::new(body, VecDeque::new(), watch),
    )))
}

impl<RB> HeldStream<RB>
where
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    /// Reads until the first event (within `until`): content goes to the caller with
    /// the held bytes first; an error event fails the attempt.
    async fn first_event(
        self,
        started: Option<Instant>,
        until: Option<Instant>,
        config: &RetryConfig,
    ) -> (Outcome<RB>, Option<FirstEventFailed>) {
        let HeldStream {
            parts,
            mut body,
            watch,
        } = self;
        let first = read_first_event(&mut body, config.first_event_cap, &config.rules);
        let first = match until {
            Some(at) => timeout_at(at, first).await.ok(),
            None => Some(first.await),
        };
        match first {
            Some(FirstEvent::Deliver(held)) => (
                Ok(Response::from_parts(
                    parts,
                    RetryBody::new(body, held, watch),
                )),
                None,
            ),
            Some(FirstEvent::Error(mut failure)) => {
                // The provider answered 200, then its first event said it failed.
                failure.status.get_or_insert(parts.status);
                (
                    Err(ClassifiedError::new(
                        failure,
                        RetryError::FirstEventWasError,
                    )),
                    Some(FirstEventFailed {
                        request_id: provider_request_id(&parts.headers),
                    }),
                )
            }
            Some(FirstEvent::BodyFailed(e)) => (Err(verdict::classified_error(e)), None),
            None => {
                let after = until
                    .zip(started)
                    .map_or(Duration::ZERO, |(at, started)| at - started);
                (
                    Err(ClassifiedError::new(
                        Failure::new(FailureKind::TimedOut),
                        RetryError::FirstEventTimedOut { after },
                    )),
                    None,
                )
            }
        }
    }
}

/// Puts the attempt log on the outcome the caller gets.
fn finish<RB>(outcome: Outcome<RB>, log: AttemptLog) -> Outcome<RB> {
    match outcome {
        Ok(mut response) => {
            response.extensions_mut().insert(log);
            Ok(response)
        }
        Err(error) => Err(error.with_attempt_log(log)),
    }
}

fn whole_millis(wait: Duration) -> Duration {
    let millis = wait.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

fn provider_request_id(headers: &http::HeaderMap) -> Option<HeaderValue> {
    headers
        .get("x-request-id")
        .or_else(|| headers.get("request-id"))
        .cloned()
}

/// Scans the bodies whose bytes the layer can see without reading them.
fn body_asks_for_stream<B: 'static>(body: &B) -> bool {
    let any = body as &dyn Any;
    if let Some(b) = any.downcast_ref::<ReplayBody>() {
        return stream_requested(b.bytes());
    }
    if let Some(b) = any.downcast_ref::<Bytes>() {
        return stream_requested(b);
    }
    if let Some(b) = any.downcast_ref::<String>() {
        return stream_requested(b.as_bytes());
    }
    false
}

#[cfg(test)]
mod tests {
    use tower_layer::Layer;

    /// The whole per-request state is one allocation; it grows silently when a
    /// rarely used future (a wait, a held stream) is stored inline. Those are boxed.
    #[test]
    fn the_request_future_stays_under_one_and_a_quarter_kib() {
        let svc = tower::service_fn(|_r: http::Request<backstop_classify::ReplayBody>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Full::new(bytes::Bytes::new()),
            )))
        });
        let retry = crate::RetryLayer::new(crate::RetryConfig::interactive()).layer(svc);
        let future = super::run(
            *retry.get_ref(),
            retry.shared.clone(),
            http::Request::new(backstop_classify::ReplayBody::default()),
        );
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1280, "the request future is {size} bytes");
    }
}
