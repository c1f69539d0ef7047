//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use backstop_classify::{BoxError, ClassifiedError};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Timeout, timeout_at};
use tower_service::Service;

use crate::RetryBody;
use crate::attempts::{AfterHead, Attempts, Next, Outcome, Resume, Sent};

/// The retry loop after the first attempt, boxed: its size depends on the inner
/// future, and only a failure (or a held stream) needs it.
type Retrying<RB> = Pin<Box<dyn Future<Output = Outcome<RB>> + Send>>;

pin_project! {
    /// The future of one logical request: every attempt, wait and readiness check.
    ///
    /// The first attempt is polled in place; a request whose first attempt settles
    /// it (a success, or a failure that is not retried) allocates nothing for the
    /// retry machinery. A retry moves the rest of the request into one boxed future.
    ///
    /// Dropping it cancels whatever is in progress (the attempt in flight or the wait)
    /// and makes no further attempt.
    pub struct ResponseFuture<S, B, RB>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, Attempts<S, B>, RB>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, A, RB> {
        First {
            #[pin]
            call: F,
            // Taken when the first attempt leads to a retry or a held stream.
            attempts: Option<A>,
        },
        // The first attempt with a time limit: `tokio::time::timeout` (which keeps the
        // limit working when the attempt uses up the task's cooperative budget),
        // boxed so that only requests with a limit pay for its size.
        FirstTimed {
            call: Pin<Box<Timeout<F>>>,
            limit: TimeLimit,
            attempts: Option<A>,
        },
        Retrying { future: Retrying<RB> },
        Done,
    }
}

/// When the first attempt started, and until when it may run.
#[derive(Clone, Copy)]
struct TimeLimit {
    started: Instant,
    until: Instant,
}

/// `Option` only so the state can move into the retry loop.
const IN_PLACE: &str = "the first attempt's state is there until the first attempt settles";

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
{
    /// The first attempt, already handed to the inner service.
    // Always inlined: the request's state is then built where the future lies, not
    // moved into it (three copies of ~600 bytes on every request otherwise).
    #[inline(always)]
    pub(crate) fn first(
        sent: Sent<S::Future>,
        attempts: Attempts<S, B>,
        span: tracing::Span,
    ) -> Self {
        let Sent {
            call,
            started,
            until,
        } = sent;
        let attempts = Some(attempts);
        // Both are set together: a start time is read only for a time limit.
        let state = match started.zip(until) {
            Some((started, until)) => State::FirstTimed {
                call: Box::pin(timeout_at(until, call)),
                limit: TimeLimit { started, until },
                attempts,
            },
            None => State::First { call, attempts },
        };
        ResponseFuture { state, span }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
    B: Clone + Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<Response<RetryBody<RB>>, ClassifiedError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            let (result, limit, attempts) = match this.state.as_mut().project() {
                StateProj::First { call, attempts } => match ready!(call.poll(cx)) {
                    Ok(mut response) => {
                        let in_place = attempts.as_mut().expect(IN_PLACE);
                        if in_place.settle_plain_success(&mut response) {
                            let response = response.map(|body| in_place.body(body));
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                        (Some(Ok(response)), None, attempts)
                    }
                    Err(error) => (Some(Err(error)), None, attempts),
                },
                StateProj::FirstTimed {
                    call,
                    limit,
                    attempts,
                } => (ready!(call.as_mut().poll(cx)).ok(), Some(*limit), attempts),
                StateProj::Retrying { future } => {
                    let outcome = ready!(future.as_mut().poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(outcome);
                }
                StateProj::Done => panic!("retry ResponseFuture polled after completion"),
            };
            let started = limit.map(|l| l.started);
            let until = limit.map(|l| l.until);
            // Judged in place: a request settled by its first attempt never moves its
            // state out of this future.
            let in_place = attempts.as_mut().expect(IN_PLACE);
            let resume = match in_place.head(result, started, until) {
                AfterHead::Done {
                    outcome,
                    classification,
                } => match in_place.conclude(outcome, classification, None, None) {
                    Next::Return(outcome) => {
                        this.state.set(State::Done);
                        return Poll::Ready(outcome);
                    }
                    Next::Retry(planned) => Resume::Wait(planned),
                },
                AfterHead::Hold(held) => Resume::Held {
                    first_event: held.wait_for_first_event(started, until),
                    waited: None,
                },
            };
            // A retry or a held stream: the rest of the request moves into one boxed
            // future.
            let resume: Retrying<RB> = Box::pin(attempts.take().expect(IN_PLACE).resume(resume));
            this.state.set(State::Retrying { future: resume });
        }
    }
}

impl<S, B, RB> std::fmt::Debug for ResponseFuture<S, B, RB>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}
