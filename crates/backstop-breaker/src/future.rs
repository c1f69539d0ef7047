//! The response future: records the outcome when the inner call finishes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use backstop_classify::{BoxError, ClassifiedError};
use http::Response;
use pin_project_lite::pin_project;

use crate::service::into_classified;
use crate::{BreakerPermit, BreakerStore, InProcessStore, Outcome};

pin_project! {
    /// The future of a [`BreakerService`](crate::BreakerService) call.
    ///
    /// Dropping it before the inner call finishes records nothing and frees a
    /// half-open probe slot.
    pub struct ResponseFuture<F, St: BreakerStore = InProcessStore> {
        #[pin]
        kind: Kind<F, St>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, St: BreakerStore> {
        Rejected { error: Option<ClassifiedError> },
        Called {
            #[pin]
            future: F,
            permit: Option<BreakerPermit<St>>,
        },
    }
}

impl<F, St: BreakerStore> ResponseFuture<F, St> {
    pub(crate) fn called(future: F, permit: BreakerPermit<St>) -> Self {
        ResponseFuture {
            kind: Kind::Called {
                future,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn rejected(error: ClassifiedError) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { error: Some(error) },
        }
    }
}

impl<F, St, B, E> Future for ResponseFuture<F, St>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    St: BreakerStore,
{
    type Output = Result<Response<B>, ClassifiedError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Rejected { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("breaker ResponseFuture polled after completion"),
            },
            KindProj::Called { future, permit } => {
                let result = std::task::ready!(future.poll(cx));
                let result = result.map_err(into_classified);
                let outcome = match &result {
                    Ok(response) => Outcome::from_response(response),
                    Err(error) => Outcome::from_failure(error.failure()),
                };
                if let Some(permit) = permit.take() {
                    permit.record(outcome);
                }
                Poll::Ready(result)
            }
        }
    }
}
