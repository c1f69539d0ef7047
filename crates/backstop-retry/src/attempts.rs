//! One logical request's attempts: what is kept between them, how each one is sent,
//! judged and recorded, and the retry loop, which runs only after a failure.
//!
//! The steps are plain methods so that [`ResponseFuture`](crate::ResponseFuture) can
//! drive the first attempt in place: a request that succeeds at once never builds
//! the retry loop's future (nor allocates it).

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backstop_classify::{
    AttemptLog, AttemptRecord, BoxError, Classification, ClassifiedError, Deadline, DelayHint,
    Failure, FailureKind, FallbackAvailable, Idempotent, LatestStart, PaceHandle, ReplayBody,
    RetryBudgetHandle, Rules, StopReason, instant_after,
};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use rand::Rng;
use rand::rngs::SmallRng;
use tokio::time::{Instant, sleep, timeout_at};
use tower::ServiceExt;
use tower_service::Service;

use crate::first_event::{FirstEvent, read_first_event};
use crate::kept::KeptRequest;
use crate::policy::starts_in_time;
use crate::service::Shared;
use crate::{
    Decision, FailedAttempt, HoldFirstEvent, RetryBody, RetryError, StreamRequest,
    stream_requested, verdict,
};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
// Constants, not `&str` keys: a `&str` lookup parses the name on every call, even
// against an empty map.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// How one attempt ended, before the policy looks at it.
pub(crate) type Outcome<RB> = Result<Response<RetryBody<RB>>, ClassifiedError>;

/// Everything one logical request keeps between its attempts.
pub(crate) struct Attempts<S, B> {
    /// The service that makes the next attempt (driven to ready before each retry).
    inner: S,
    shared: Arc<Shared>,
    /// What a retry is built from: a copy of the request as the first attempt got it
    /// (the caller's request, plus the effective deadline and the idempotency key).
    kept: KeptRequest,
    body: B,
    /// Whether the request is idempotent, noted when an attempt takes what is kept.
    idempotent: Option<bool>,
    deadline: Option<Instant>,
    hold: HoldChoice,
    rng: Option<SmallRng>,
    /// The attempts so far, boxed when the first is recorded: a request that succeeds
    /// at once builds its log on the response instead, and the state every request
    /// carries stays small.
    log: Option<Box<AttemptLog>>,
    /// The attempt in progress, 1 for the first.
    number: u32,
}

/// The wait before a retry, and the delay hint that set it. (What only retries
/// need is kept by the retry loop, out of the first attempt's state.)
#[derive(Clone, Copy)]
pub(crate) struct Waited {
    pub(crate) wait: Duration,
    pub(crate) hint: Option<DelayHint>,
}

/// An attempt that has been handed to the inner service.
pub(crate) struct Sent<F> {
    pub(crate) call: F,
    /// When it started, read only when a time limit needs it.
    pub(crate) started: Option<Instant>,
    /// The sooner of its attempt timeout and the deadline.
    pub(crate) until: Option<Instant>,
}

/// What comes after an attempt has been judged and recorded.
pub(crate) enum Next<RB> {
    /// Hand this to the caller (the attempt log is on it).
    Return(Outcome<RB>),
    /// Wait, then make another attempt.
    Retry(Planned<RB>),
}

/// A retry the policy decided on, until it is sent.
pub(crate) struct Planned<RB> {
    /// The wait before it.
    pub(crate) waited: Waited,
    /// The failed outcome, kept only when the upstream's pace ([`PaceHandle`]) may
    /// still refuse the retry: it is then what the caller gets.
    kept: Option<Kept<RB>>,
    /// The budget's withdrawal for it, given back if it is not sent.
    drawn: Option<Drawn>,
}

impl<RB> Planned<RB> {
    /// A retry after `wait`, with nothing kept and nothing drawn.
    #[cfg(test)]
    pub(crate) fn after(wait: Duration) -> Self {
        Planned {
            waited: Waited { wait, hint: None },
            kept: None,
            drawn: None,
        }
    }
}

/// The budget's withdrawal for a retry that has not been sent yet. Dropped unsent
/// (the pace refused the retry after its wait, the inner service was not ready
/// before the deadline, the caller dropped the request during the wait), it gives
/// the withdrawal back ([`RetryBudget::refund`](backstop_classify::RetryBudget::refund)):
/// the budget caps the retries sent.
pub(crate) struct Drawn(Option<RetryBudgetHandle>);

impl Drawn {
    /// The retry has been handed to the inner service: the withdrawal stands.
    fn spend(mut self) {
        self.0 = None;
    }
}

impl Drop for Drawn {
    fn drop(&mut self) {
        if let Some(RetryBudgetHandle(budget)) = self.0.take() {
            budget.refund();
        }
    }
}

/// A failed outcome kept across the wait before a paced retry (boxed: only a paced
/// retry pays for it, and the retry loop's future stays small).
pub(crate) type Kept<RB> = Box<Outcome<RB>>;

/// A held stream's wait for its first event (boxed: only held streams pay for it).
pub(crate) type FirstEventFuture<RB> =
    Pin<Box<dyn Future<Output = (Outcome<RB>, Option<FirstEventFailed>)> + Send>>;

/// Where the retry loop takes over from the first attempt.
pub(crate) enum Resume<RB> {
    /// A successful stream held until its first event.
    Held {
        first_event: FirstEventFuture<RB>,
        /// The wait before this attempt (`None` for the first).
        waited: Option<Waited>,
    },
    /// A failure the policy said to retry.
    Wait(Planned<RB>),
}

/// How an attempt stands once its response head (or error) is in.
pub(crate) enum AfterHead<RB> {
    /// Decided: hand this on (or judge it).
    Done {
        outcome: Outcome<RB>,
        classification: Classification,
    },
    /// A successful stream to hold until its first event.
    Hold(HeldStream<RB>),
}

impl<S, B> Attempts<S, B> {
    /// The set-up before the first attempt: the effective deadline, the idempotency
    /// key, whether streams are held. The first attempt sends the caller's own
    /// `request` ([`send_first`](Self::send_first)), with those set on it; the state
    /// keeps a copy for retries.
    #[inline(always)]
    pub(crate) fn new(inner: S, shared: Arc<Shared>, request: &mut Request<B>) -> Self
    where
        B: Clone,
    {
        let config = &shared.config;

        // The clock is read only when a deadline needs it (it is not free: a
        // thread-local lookup, and a lock under tokio's test clock).
        let deadline = earliest(
            // Never overflowing: a deadline of centuries is a setting, not a panic.
            config.deadline.map(|d| instant_after(Instant::now(), d)),
            request.extensions().get::<Deadline>().map(|d| d.0),
        );
        if let Some(deadline) = deadline {
            // The layers inside (attempt timeout, transport) see the same deadline.
            request.extensions_mut().insert(Deadline(deadline));
        }

        let mut rng: Option<SmallRng> = None;
        if config.idempotency_key && !request.headers().contains_key(IDEMPOTENCY_KEY) {
            let key = rng
                .get_or_insert_with(|| shared.request_rng())
                .random::<u128>();
            if let Ok(value) = HeaderValue::try_from(format!("backstop-{key:032x}")) {
                request.headers_mut().insert(IDEMPOTENCY_KEY, value);
            }
        }
        let hold = match config.hold_first_event {
            HoldFirstEvent::Never => HoldChoice::Decided(false),
            HoldFirstEvent::Always => HoldChoice::Decided(true),
            HoldFirstEvent::Auto if request.extensions().get::<StreamRequest>().is_some() => {
                HoldChoice::Decided(true)
            }
            // The body scan costs a pass over the body: done only if a stream answers.
            HoldFirstEvent::Auto => HoldChoice::ScanBody,
        };
        let (kept, idempotent) = if config.max_attempts > 1 {
            (KeptRequest::copy_of(request), None)
        } else {
            // No retry follows: nothing is kept. The policy may still ask whether
            // the request was idempotent.
            let has_key = || request.headers().contains_key(IDEMPOTENCY_KEY);
            (
                KeptRequest::nothing(),
                Some(says_idempotent(request.extensions(), has_key)),
            )
        };

        Attempts {
            inner,
            shared,
            kept,
            body: request.body().clone(),
            idempotent,
            deadline,
            hold,
            rng,
            log: None,
            number: 0,
        }
    }

    /// Whether the request may be sent again after a failure that happened once it
    /// was written.
    fn idempotent(&self) -> bool {
        self.idempotent.unwrap_or_else(|| {
            says_idempotent(&self.kept.extensions, || {
                self.kept.has_header(&IDEMPOTENCY_KEY)
            })
        })
    }

    /// Hands the first attempt, the request [`new`](Self::new) prepared, to the
    /// inner service, which the caller has driven to ready.
    #[inline]
    pub(crate) fn send_first(&mut self, first: Request<B>) -> Sent<S::Future>
    where
        S: Service<Request<B>>,
    {
        self.dispatch(first)
    }

    /// Hands a retry to the inner service, which the caller has driven to ready.
    /// [`KeptRequest::prepare_replay`] said yes when the retry was decided.
    #[inline]
    pub(crate) fn send<RB>(&mut self) -> Sent<S::Future>
    where
        S: Service<Request<B>, Response = Response<RB>>,
        B: Clone,
    {
        let last = self.number + 1 >= self.shared.config.max_attempts;
        if last {
            // It takes what is kept instead of a copy.
            self.idempotent = Some(self.idempotent());
        }
        let parts = self.kept.replay(last);
        self.dispatch(Request::from_parts(parts, self.body.clone()))
    }

    #[inline]
    fn dispatch(&mut self, mut attempt: Request<B>) -> Sent<S::Future>
    where
        S: Service<Request<B>>,
    {
        self.number += 1;
        let config = &self.shared.config;
        if let Some(name) = &config.attempt_header {
            attempt
                .headers_mut()
                .insert(name.clone(), HeaderValue::from(self.number));
        }
        let started =
            (config.attempt_timeout.is_some() || self.deadline.is_some()).then(Instant::now);
        let until = earliest(
            config
                .attempt_timeout
                .zip(started)
                .map(|(t, start)| instant_after(start, t)),
            self.deadline,
        );
        Sent {
            call: self.inner.call(attempt),
            started,
            until,
        }
    }

    /// Judges an attempt by its response head or error; `None` means it ran out of
    /// time (`until`).
    #[inline]
    pub(crate) fn head<RB, E>(
        &mut self,
        result: Option<Result<Response<RB>, E>>,
        started: Option<Instant>,
        until: Option<Instant>,
    ) -> AfterHead<RB>
    where
        B: 'static,
        E: Into<BoxError>,
    {
        let config = &self.shared.config;
        let response = match result {
            None => {
                let after = until
                    .zip(started)
                    .map_or(Duration::ZERO, |(at, started)| at - started);
                return AfterHead::failed(ClassifiedError::new(
                    Failure::new(FailureKind::TimedOut),
                    RetryError::AttemptTimedOut { after },
                ));
            }
            Some(Err(e)) => return AfterHead::failed(verdict::classified_error(e.into())),
            Some(Ok(response)) => response,
        };

        let classification = verdict::response_classification(&response, &config.rules);
        if !classification.is_success() {
            let mut response = response.map(|body| self.body(body));
            if response.extensions().get::<Classification>().is_none() {
                response.extensions_mut().insert(classification.clone());
            }
            return AfterHead::Done {
                outcome: Ok(response),
                classification,
            };
        }
        // A success without a classification stays without one: every Backstop layer
        // reads a response below 400 without one as a success, and the insert would
        // cost an allocation on every request.
        let is_stream = is_event_stream(response.headers());
        if !is_stream {
            return AfterHead::Done {
                outcome: Ok(response.map(|body| self.body(body))),
                classification,
            };
        }
        let (parts, body) = response.into_parts();
        if self.hold.resolve(&self.body) {
            return AfterHead::Hold(HeldStream {
                parts,
                body,
                cap: config.first_event_cap,
                rules: config.rules.clone(),
                idle: config.stream_idle_timeout,
            });
        }
        let watch = Some((config.first_event_cap, config.rules.clone()));
        AfterHead::Done {
            outcome: Ok(Response::from_parts(
                parts,
                RetryBody::new(body, VecDeque::new(), watch).idle_limit(config.stream_idle_timeout),
            )),
            classification,
        }
    }

    /// Records the attempt (`waited` before it; `None` for the first) in the log and
    /// decides what follows: the outcome for the caller, or a wait and another
    /// attempt.
    #[inline]
    pub(crate) fn conclude<RB>(
        &mut self,
        outcome: Outcome<RB>,
        classification: Classification,
        first_event_failed: Option<FirstEventFailed>,
        waited: Option<Waited>,
    ) -> Next<RB> {
        let (status, request_id) = match &outcome {
            Ok(response) => (
                Some(response.status()),
                provider_request_id(response.headers()),
            ),
            Err(error) => (
                error.failure().status,
                first_event_failed
                    .as_ref()
                    .and_then(|f| f.request_id.clone()),
            ),
        };
        self.record(status, request_id, classification, waited);
        let last = self.log.as_deref().and_then(|log| log.attempts.last());
        let failure = match last.map(|r| &r.classification) {
            Some(Classification::Failure(failure)) => failure,
            _ => {
                self.log_mut().stop = Some(StopReason::Succeeded);
                return Next::Return(self.finish(outcome));
            }
        };

        // A paced upstream hears of its slow-downs at once, not when the whole
        // call finishes.
        if matches!(failure.kind, FailureKind::RateLimited)
            && let Some(PaceHandle(pace)) = self.kept.extensions.get::<PaceHandle>()
        {
            pace.slowed_down(Instant::now());
        }

        let config = &self.shared.config;
        let time_left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let idempotent = self.idempotent();
        let rng = self.rng.get_or_insert_with(|| self.shared.request_rng());
        let mut decision = self.shared.policy.decide(
            &FailedAttempt {
                failure,
                attempts_made: self.number,
                time_left,
                idempotent,
                previous_wait: waited.map(|w| w.wait),
            },
            rng,
        );
        let mut drawn = None;
        // The layer's own limits hold whatever the policy said.
        if let Decision::RetryAfter(wait, hint) = decision {
            // tokio's timer counts whole milliseconds: round up, so the wait that is
            // checked against the deadline and recorded is the one that happens.
            let wait = whole_millis(wait);
            decision = Decision::RetryAfter(wait, hint);
            if self.number >= config.max_attempts {
                decision = Decision::Stop(StopReason::MaxAttempts);
            } else if !starts_in_time(wait, time_left, config.min_attempt_time) {
                decision = Decision::Stop(StopReason::Deadline);
            } else if let Some(at_least) = config.fallback_handoff
                // The hint as the provider gave it (before the jitter), so the
                // threshold means what it says.
                && hint.is_some_and(|h| h.source.is_from_provider() && h.delay >= at_least)
                && self.kept.extensions.get::<FallbackAvailable>().is_some()
            {
                // The provider said "not now" and another model can answer now.
                decision = Decision::Stop(StopReason::HandedToFallback);
            } else if self.pace_refuses(wait, time_left) {
                // The upstream's pace has no slot for the retry before the deadline:
                // hand the failure on now rather than after a wait that ends in it.
                decision = Decision::Stop(StopReason::PaceRefused);
            } else if !self.kept.prepare_replay() {
                // The kept headers do not parse back (only a bug in `http` could do
                // that): the retry cannot send what the first attempt sent.
                decision = Decision::Stop(StopReason::NotRetryable);
            } else if let Some(budget) = self.kept.extensions.get::<RetryBudgetHandle>() {
                // Looked up here, not at the start: only a retry needs the budget.
                if budget.0.try_withdraw() {
                    drawn = Some(Drawn(Some(budget.clone())));
                } else {
                    decision = Decision::Stop(StopReason::BudgetExhausted);
                }
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
                self.log_mut().stop = Some(reason);
                Next::Return(self.finish(outcome))
            }
            Decision::RetryAfter(wait, hint) => {
                // The failed response is dropped here, before the wait, so its
                // connection goes back to the pool instead of idling; unless the
                // upstream's pace may refuse the retry, when it is what the caller
                // gets (its body is an error body the classify layer has read).
                let kept = self
                    .kept
                    .extensions
                    .get::<PaceHandle>()
                    .is_some()
                    .then(|| Box::new(outcome));
                Next::Retry(Planned {
                    waited: Waited { wait, hint },
                    kept,
                    drawn,
                })
            }
        }
    }

    /// The latest instant a retry may start: the deadline less
    /// [`RetryConfig::with_min_attempt_time`](crate::RetryConfig::with_min_attempt_time).
    fn latest_start(&self) -> Option<Instant> {
        let min = self.shared.config.min_attempt_time;
        self.deadline.map(|d| LatestStart::before(d, min).0)
    }

    /// Whether the upstream's pace ([`PaceHandle`]) has no slot for a retry after
    /// `wait` before the deadline, or none within `max_hint`: known before the wait,
    /// so the failure is handed on at once and the budget is not drawn.
    fn pace_refuses(&self, wait: Duration, time_left: Option<Duration>) -> bool {
        let Some(PaceHandle(pace)) = self.kept.extensions.get::<PaceHandle>() else {
            return false;
        };
        let config = &self.shared.config;
        let due = pace.retry_due_in(Instant::now());
        due > config.max_hint || !starts_in_time(wait.max(due), time_left, config.min_attempt_time)
    }

    /// Adds the attempt to the log, and emits its event.
    #[inline]
    fn record(
        &mut self,
        status: Option<http::StatusCode>,
        provider_request_id: Option<HeaderValue>,
        classification: Classification,
        waited: Option<Waited>,
    ) {
        let record = self.new_record(status, provider_request_id, classification, waited);
        self.log_mut().attempts.push(record);
    }

    /// The record of the attempt in progress; emits its event.
    #[inline]
    fn new_record(
        &self,
        status: Option<http::StatusCode>,
        provider_request_id: Option<HeaderValue>,
        classification: Classification,
        waited: Option<Waited>,
    ) -> AttemptRecord {
        tracing::debug!(
            attempt = self.number,
            "http.response.status_code" = status.map(|s| s.as_u16()),
            "error.type" = classification.failure().map(|f| f.kind.as_str()),
            waited_ms = waited.map_or(0, |w| w.wait.as_millis() as u64),
            "attempt finished"
        );
        let mut record = AttemptRecord::new(self.number, classification);
        record.status = status;
        record.provider_request_id = provider_request_id;
        if let Some(waited) = waited {
            record.waited = waited.wait;
            record.hint_used = waited.hint;
        }
        record
    }

    /// The body of a response the layer hands on, under the stream idle timeout.
    #[inline]
    pub(crate) fn body<RB>(&self, body: RB) -> RetryBody<RB> {
        RetryBody::passthrough(body).idle_limit(self.shared.config.stream_idle_timeout)
    }

    fn log_mut(&mut self) -> &mut AttemptLog {
        self.log.get_or_insert_with(Box::default)
    }

    fn take_log(&mut self) -> AttemptLog {
        self.log.take().map(|log| *log).unwrap_or_default()
    }

    /// The common case, settled where the response lies (no move of it, no verdict
    /// built): a first attempt that succeeded with a response that is not a stream.
    /// Records it and puts the log on it; `false` (nothing done) for anything else.
    #[inline]
    pub(crate) fn settle_plain_success<RB>(&mut self, response: &mut Response<RB>) -> bool {
        let success = match response.extensions().get::<Classification>() {
            Some(classification) => classification.is_success(),
            None => verdict::is_unclassified_success(response),
        };
        if !success || is_event_stream(response.headers()) {
            return false;
        }
        let request_id = provider_request_id(response.headers());
        let record = self.new_record(
            Some(response.status()),
            request_id,
            Classification::Success,
            None,
        );
        let mut log = AttemptLog {
            stop: Some(StopReason::Succeeded),
            ..AttemptLog::default()
        };
        log.attempts.push(record);
        self.put_on(response, log);
        true
    }

    /// Puts the attempt log on the outcome the caller gets. No attempt follows.
    #[inline]
    fn finish<RB>(&mut self, outcome: Outcome<RB>) -> Outcome<RB> {
        match outcome {
            Ok(mut response) => {
                self.put_log_on(&mut response);
                Ok(response)
            }
            Err(error) => Err(error.with_attempt_log(self.take_log())),
        }
    }

    #[inline]
    fn put_log_on<RB>(&mut self, response: &mut Response<RB>) {
        let log = self.take_log();
        self.put_on(response, log);
    }

    #[inline]
    fn put_on<RB>(&mut self, response: &mut Response<RB>, log: AttemptLog) {
        let spare = &mut self.kept.extensions;
        if response.extensions().is_empty() && !spare.is_empty() {
            // The request's extensions map is no longer needed: emptied, it carries
            // the log, which then costs no map of its own (a box, a table: two
            // allocations, and two frees when the copy is dropped).
            let mut extensions = std::mem::take(spare);
            extensions.clear();
            extensions.insert(log);
            *response.extensions_mut() = extensions;
        } else {
            response.extensions_mut().insert(log);
        }
    }

    /// Records a held stream's attempt once its first event is in.
    pub(crate) fn conclude_held<RB>(
        &mut self,
        (outcome, failed): (Outcome<RB>, Option<FirstEventFailed>),
        waited: Option<Waited>,
    ) -> Next<RB> {
        let classification = match &outcome {
            Ok(_) => Classification::Success,
            Err(error) => Classification::Failure(error.failure().clone()),
        };
        self.conclude(outcome, classification, failed, waited)
    }

    /// The rest of the request after the first attempt: the held stream's first
    /// event, or the wait, then every further attempt. Only a retry or a held stream
    /// gets here, so only they pay for this future (one allocation).
    pub(crate) async fn resume<RB>(mut self, from: Resume<RB>) -> Outcome<RB>
    where
        S: Service<Request<B>, Response = Response<RB>>,
        S::Error: Into<BoxError>,
        B: Clone + 'static,
        RB: Body<Data = Bytes> + Unpin + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let mut planned = match from {
            Resume::Held {
                first_event,
                waited,
            } => match self.conclude_held(first_event.await, waited) {
                Next::Return(outcome) => return outcome,
                Next::Retry(planned) => planned,
            },
            Resume::Wait(planned) => planned,
        };
        // Every return before the retry is sent drops `planned`, giving its budget
        // withdrawal back; so does dropping this future during the wait.
        loop {
            tracing::debug!(
                wait_ms = planned.waited.wait.as_millis() as u64,
                "waiting before retry"
            );
            // Boxed, like every future only a retry needs: this state machine stays
            // small.
            Box::pin(sleep(planned.waited.wait)).await;

            // A paced upstream: the retry takes a slot like a new call would.
            if let Some(last) = planned.kept.take() {
                let pace = self.kept.extensions.get::<PaceHandle>().cloned();
                let longest = self.shared.config.max_hint;
                let min_left = self.shared.config.min_attempt_time;
                match Box::pin(pace_slot(pace, self.deadline, min_left, longest)).await {
                    Some(extra) => planned.waited.wait = planned.waited.wait.saturating_add(extra),
                    None => {
                        self.log_mut().stop = Some(StopReason::PaceRefused);
                        return self.finish(*last);
                    }
                }
            }

            // Readiness is checked before every retry on the service we own: no stale
            // readiness from a clone, and backpressure bounds the wait.
            let ready = match self.latest_start() {
                Some(at) => Box::pin(timeout_at(at, self.inner.ready())).await.ok(),
                None => Some(self.inner.ready().await),
            };
            match ready {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.log_mut().stop = Some(StopReason::NotRetryable);
                    return Err(
                        verdict::classified_error(e.into()).with_attempt_log(self.take_log())
                    );
                }
                None => {
                    // The verdict on the attempt that led to this retry.
                    let failure = self
                        .log
                        .as_deref()
                        .and_then(|log| log.attempts.last())
                        .and_then(|r| r.classification.failure().cloned())
                        .unwrap_or_else(|| Failure::new(FailureKind::TimedOut));
                    self.log_mut().stop = Some(StopReason::Deadline);
                    return Err(
                        ClassifiedError::new(failure, RetryError::NotReadyBeforeDeadline)
                            .with_attempt_log(self.take_log()),
                    );
                }
            }

            if let Some(drawn) = planned.drawn.take() {
                drawn.spend();
            }
            // A block, so its locals (the attempt's future, the outcome) are not
            // stored in this future across the wait.
            let next = {
                let Sent {
                    call,
                    started,
                    until,
                } = self.send();
                let result = match until {
                    Some(at) => Box::pin(timeout_at(at, call)).await.ok(),
                    None => Some(call.await),
                };
                match self.head(result, started, until) {
                    AfterHead::Done {
                        outcome,
                        classification,
                    } => self.conclude(outcome, classification, None, Some(planned.waited)),
                    AfterHead::Hold(held) => {
                        let first = held.wait_for_first_event(started, until).await;
                        self.conclude_held(first, Some(planned.waited))
                    }
                }
            };
            match next {
                Next::Return(outcome) => return outcome,
                Next::Retry(next) => planned = next,
            }
        }
    }
}

/// Waits for a slot of the upstream's pace ([`PaceHandle`]) that leaves `min_left`
/// before `deadline` (see [`starts_in_time`]): `Some(how long)`, or `None` when no
/// such slot comes or none within `longest` (the layer's `max_hint`: a pace, like a
/// hint, is never waited on for days), or when the booked slots keep going to other
/// callers (after [`MAX_PACE_WAITS`] bookings the retry is not made).
async fn pace_slot(
    pace: Option<PaceHandle>,
    deadline: Option<Instant>,
    min_left: Duration,
    longest: Duration,
) -> Option<Duration> {
    let Some(PaceHandle(pace)) = pace else {
        return Some(Duration::ZERO);
    };
    // The pace books only slots before this instant; one exactly at the latest start
    // is not booked, but is waited for and asked for again when it is due.
    let book_before = deadline.map(|d| LatestStart::before(d, min_left).0);
    let mut waited = Duration::ZERO;
    for _ in 0..MAX_PACE_WAITS {
        let now = Instant::now();
        let wait = match pace.admit_retry(now, book_before) {
            Ok(()) => return Some(waited),
            Err(wait) => whole_millis(wait),
        };
        let time_left = deadline.map(|d| d.saturating_duration_since(now));
        // `starts_in_time` is checked arithmetic: a pace of another implementation
        // may answer any duration.
        if !starts_in_time(wait, time_left, min_left) || waited.saturating_add(wait) > longest {
            return None;
        }
        tracing::debug!(
            wait_ms = wait.as_millis() as u64,
            "waiting for a paced slot"
        );
        Box::pin(sleep(wait)).await;
        // `waited + wait` is at most `longest` (checked above, saturating), unless
        // `longest` is `Duration::MAX`.
        waited = waited.saturating_add(wait);
    }
    None
}

/// How many times a retry books a paced slot before it gives up. A booked slot is
/// taken by whoever asks first once it is due, so a retry that comes back on time
/// almost always gets it; the bound keeps an unlucky one from waiting forever.
const MAX_PACE_WAITS: u32 = 8;

impl<RB> AfterHead<RB> {
    fn failed(error: ClassifiedError) -> Self {
        AfterHead::Done {
            classification: Classification::Failure(error.failure().clone()),
            outcome: Err(error),
        }
    }
}

/// Whether the request may be sent again after a failure that happened once it was
/// written: it says so with the [`Idempotent`] marker or an `Idempotency-Key`
/// (`has_key`, asked only without the marker), in the caller's request or the copy kept.
fn says_idempotent(extensions: &http::Extensions, has_key: impl FnOnce() -> bool) -> bool {
    extensions.get::<Idempotent>().is_some() || has_key()
}

/// Whether to hold a stream for its first event, decided when first needed.
enum HoldChoice {
    Decided(bool),
    /// `HoldFirstEvent::Auto` without the marker: scan the request body for
    /// `"stream": true` when a stream answers.
    ScanBody,
}

impl HoldChoice {
    fn resolve<B: 'static>(&mut self, body: &B) -> bool {
        match self {
            HoldChoice::Decided(hold) => *hold,
            HoldChoice::ScanBody => {
                let hold = body_asks_for_stream(body);
                *self = HoldChoice::Decided(hold);
                hold
            }
        }
    }
}

/// A held stream whose first event was an error.
pub(crate) struct FirstEventFailed {
    request_id: Option<HeaderValue>,
}

/// A successful `text/event-stream` response waiting for its first event.
pub(crate) struct HeldStream<RB> {
    parts: http::response::Parts,
    body: RB,
    /// The first-event cap, and the rules for error events.
    cap: usize,
    rules: Arc<Rules>,
    /// The stream idle timeout, for the body once it is handed on.
    idle: Option<Duration>,
}

impl<RB> HeldStream<RB>
where
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    /// Reads until the first event (within `until`): content goes to the caller with
    /// the held bytes first; an error event fails the attempt.
    pub(crate) fn wait_for_first_event(
        self,
        started: Option<Instant>,
        until: Option<Instant>,
    ) -> FirstEventFuture<RB> {
        Box::pin(self.first_event(started, until))
    }

    async fn first_event(
        self,
        started: Option<Instant>,
        until: Option<Instant>,
    ) -> (Outcome<RB>, Option<FirstEventFailed>) {
        let HeldStream {
            parts,
            mut body,
            cap,
            rules,
            idle,
        } = self;
        let first = read_first_event(&mut body, cap, &rules);
        let first = match until {
            Some(at) => timeout_at(at, first).await.ok(),
            None => Some(first.await),
        };
        match first {
            Some(FirstEvent::Deliver(held)) => (
                Ok(Response::from_parts(
                    parts,
                    RetryBody::new(body, held, Some((cap, rules))).idle_limit(idle),
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

#[inline]
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

#[inline]
fn provider_request_id(headers: &http::HeaderMap) -> Option<HeaderValue> {
    headers
        .get(&X_REQUEST_ID)
        .or_else(|| headers.get(&REQUEST_ID))
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
