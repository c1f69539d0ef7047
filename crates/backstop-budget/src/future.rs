//! The response future: records the outcome of the logical request when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use backstop_classify::{BoxError, ClassifiedError};
use pin_project_lite::pin_project;

use crate::model::BudgetModel;
use crate::outcome::Outcome;
use crate::scope::RequestScope;
use crate::service::into_classified;

pin_project! {
    /// The future [`RetryBudgetService`](crate::RetryBudgetService) returns.
    ///
    /// Dropping it before it completes records nothing: a cancelled request is
    /// neither a success nor a failure of the provider.
    pub struct ResponseFuture<F, M> {
        #[pin]
        state: State<F, M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, M> {
        Rejected { error: Option<ClassifiedError> },
        Called {
            #[pin]
            inner: F,
            scope: Arc<RequestScope<M>>,
        },
    }
}

impl<F, M> ResponseFuture<F, M> {
    pub(crate) fn rejected(error: ClassifiedError) -> Self {
        ResponseFuture {
            state: State::Rejected { error: Some(error) },
        }
    }

    pub(crate) fn called(inner: F, scope: Arc<RequestScope<M>>) -> Self {
        ResponseFuture {
            state: State::Called { inner, scope },
        }
    }
}

impl<F, M, ResBody, E> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    E: Into<BoxError>,
    M: BudgetModel,
{
    type Output = Result<http::Response<ResBody>, ClassifiedError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => panic!("ResponseFuture polled after completion"),
            },
            StateProj::Called { inner, scope } => {
                let result = std::task::ready!(inner.poll(cx));
                let result = result.map_err(into_classified);
                let outcome = match &result {
                    Ok(response) => Outcome::of_response(response),
                    Err(error) => Outcome::of_error(error),
                };
                scope.finish(outcome);
                Poll::Ready(result)
            }
        }
    }
}

impl<F, M> std::fmt::Debug for ResponseFuture<F, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
