//! The response future: drives one hop at a time, the inner service to ready before
//! every hop after the first, and the total deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use backstop_classify::{BoxError, ClassifiedError, ReplayBody};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::journey::{Journey, Step};

pin_project! {
    /// The future of [`Fallback`](crate::Fallback).
    pub struct ResponseFuture<S, RB>
    where
        S: Service<Request<ReplayBody>, Response = Response<RB>>,
    {
        #[pin]
        state: State<S::Future>,
        inner: S,
        journey: Option<Journey<RB>>,
        // Boxed because most requests have no total deadline: only those pay for it.
        deadline: Option<Pin<Box<Sleep>>>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Waiting for the inner service to be ready for the next hop's request.
        Readying { request: Option<Request<ReplayBody>> },
        Calling { #[pin] future: F },
        // Every model is cooling down: waiting for the earliest reopening.
        Waiting { #[pin] sleep: Sleep, request: Option<Request<ReplayBody>> },
        // Refused before anything was sent.
        Refused { error: Option<ClassifiedError> },
        Done,
    }
}

impl<S, RB> ResponseFuture<S, RB>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>>,
{
    /// The first hop, already called on a ready service.
    // Always inlined: the future is then built where it lies, not moved into it.
    #[inline(always)]
    pub(crate) fn calling(
        inner: S,
        future: S::Future,
        journey: Option<Journey<RB>>,
        span: tracing::Span,
    ) -> Self {
        let deadline = journey
            .as_ref()
            .and_then(|j| j.deadline())
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
        ResponseFuture {
            state: State::Calling { future },
            inner,
            journey,
            deadline,
            span,
        }
    }

    /// Refused before anything was sent.
    pub(crate) fn refused(inner: S, error: ClassifiedError, span: tracing::Span) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
            inner,
            journey: None,
            deadline: None,
            span,
        }
    }
}

impl<S, RB> Future for ResponseFuture<S, RB>
where
    S: Service<Request<ReplayBody>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<RB>, ClassifiedError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            let step = match this.state.as_mut().project() {
                StateProj::Refused { error } => {
                    let error = error.take();
                    this.state.set(State::Done);
                    match error {
                        Some(e) => return Poll::Ready(Err(e)),
                        None => panic!("fallback ResponseFuture polled after completion"),
                    }
                }
                StateProj::Done => panic!("fallback ResponseFuture polled after completion"),
                StateProj::Readying { request } => {
                    if let Poll::Ready(()) = poll_deadline(this.deadline, cx) {
                        deadline_step(this.journey)
                    } else {
                        match ready!(this.inner.poll_ready(cx)) {
                            // Ready too late to leave the hop the time it needs (the
                            // configured minimum before the deadline): not sent.
                            Ok(())
                                if this
                                    .journey
                                    .as_ref()
                                    .is_some_and(|j| !j.may_start_hop(Instant::now())) =>
                            {
                                deadline_step(this.journey)
                            }
                            Ok(()) => match request.take() {
                                Some(request) => {
                                    let future = this.inner.call(request);
                                    this.state.set(State::Calling { future });
                                    continue;
                                }
                                None => panic!("fallback ResponseFuture lost its request"),
                            },
                            // A service that cannot become ready for this model is
                            // this hop's failure.
                            Err(e) => outcome_step(this.journey, Err(e.into())),
                        }
                    }
                }
                StateProj::Waiting { sleep, request } => {
                    if let Poll::Ready(()) = poll_deadline(this.deadline, cx) {
                        deadline_step(this.journey)
                    } else {
                        ready!(sleep.poll(cx));
                        let request = request.take();
                        this.state.set(State::Readying { request });
                        continue;
                    }
                }
                StateProj::Calling { future } => match future.poll(cx) {
                    Poll::Ready(result) => outcome_step(this.journey, result.map_err(Into::into)),
                    Poll::Pending => {
                        ready!(poll_deadline(this.deadline, cx));
                        deadline_step(this.journey)
                    }
                },
            };
            match step {
                Step::Return(result) => {
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                Step::Next(request) => this.state.set(State::Readying {
                    request: Some(request),
                }),
                Step::Wait(until, request) => this.state.set(State::Waiting {
                    sleep: tokio::time::sleep_until(until),
                    request: Some(request),
                }),
            }
        }
    }
}

fn poll_deadline(deadline: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match deadline {
        Some(sleep) => sleep.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

fn outcome_step<RB>(
    journey: &mut Option<Journey<RB>>,
    result: Result<Response<RB>, BoxError>,
) -> Step<RB> {
    match (journey, result) {
        (Some(j), Ok(response)) => j.on_response(response),
        (Some(j), Err(error)) => j.on_error(error),
        // A request with no model to route (an empty body) passes straight through.
        (None, Ok(response)) => Step::Return(Ok(response)),
        (None, Err(error)) => Step::Return(Err(crate::journey::into_classified(error))),
    }
}

fn deadline_step<RB>(journey: &mut Option<Journey<RB>>) -> Step<RB> {
    match journey {
        Some(j) => j.on_deadline(),
        // Without a journey there is no deadline timer, so this is not reached; a
        // plain timeout verdict keeps it panic-free all the same.
        None => Step::Return(Err(ClassifiedError::local(
            backstop_classify::Failure::new(backstop_classify::FailureKind::TimedOut),
        ))),
    }
}
