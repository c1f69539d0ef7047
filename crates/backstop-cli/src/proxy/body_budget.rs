//! A cap on the request-body bytes all chat requests hold at once.
//!
//! Each body is capped (`max_request_body`) and so is the number of requests in
//! flight, but their product is large (8 GiB with the defaults): a burst of large
//! requests could take a sidecar's memory long before either bound is reached. The
//! budget bounds the sum. A request reserves its declared `Content-Length` before a
//! byte of its body is read, and every byte beyond that as it arrives; it keeps the
//! reservation until the stack has answered (the body is replayed for retries and
//! fallback hops until then) and frees it when the stack returns.
//!
//! A request that finds the budget spent is answered like a shed one: 503
//! `proxy_body_budget`, `Retry-After: 1`, `x-should-retry: true`. Nothing reached
//! a provider, and the budget frees as the requests ahead finish, so the retry is
//! safe and likely to succeed.
//!
//! [`BodyBudget`] is plain atomics: no runtime, testable on its own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use backstop::classify::BoxError;
use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::admission::Bounded;
use super::body::ProxyBody;
use super::reply::shed;

/// The error `code` of a request refused because the body budget is spent.
pub const BODY_BUDGET_CODE: &str = "proxy_body_budget";

/// The bytes of request body all chat requests may hold at once, shared by every
/// connection.
#[derive(Debug)]
pub struct BodyBudget {
    bytes: Bounded,
}

/// The budget has no room for a request's body: shed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyBudgetSpent {
    /// The budget, in bytes.
    pub max: usize,
}

impl std::fmt::Display for BodyBudgetSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backstop proxy holds its limit of {} bytes of request bodies; retry after 1 s, or raise --max-buffered-body-bytes",
            self.max
        )
    }
}

impl std::error::Error for BodyBudgetSpent {}

impl BodyBudget {
    /// At most `max` bytes held at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(BodyBudget {
            bytes: Bounded::new(max),
        })
    }

    /// An empty reservation, to grow as the body arrives.
    pub fn reservation(self: &Arc<Self>) -> BodyReservation {
        BodyReservation {
            budget: Arc::clone(self),
            reserved: 0,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.bytes.held()
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.bytes.max()
    }
}

/// The bytes one request holds; dropping it gives them back.
#[derive(Debug)]
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    reserved: usize,
}

impl BodyReservation {
    /// Makes the reservation at least `bytes` (a declared length, or the bytes
    /// read so far); all or nothing.
    pub fn cover(&mut self, bytes: usize) -> Result<(), BodyBudgetSpent> {
        if bytes > self.reserved {
            if !self.budget.bytes.try_take(bytes - self.reserved) {
                return Err(BodyBudgetSpent {
                    max: self.budget.max(),
                });
            }
            self.reserved = bytes;
        }
        Ok(())
    }

    /// Gives back what the body turned out not to need (a declared length larger
    /// than what arrived).
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.reserved {
            self.budget.bytes.give_back(self.reserved - bytes);
            self.reserved = bytes;
        }
    }

    /// The bytes reserved.
    pub fn reserved(&self) -> usize {
        self.reserved
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

pin_project! {
    /// A request body that reserves each byte from the budget as it arrives, and
    /// ends in a [`BodyBudgetSpent`] error when there is no room.
    pub struct Budgeted<'r, B> {
        #[pin]
        inner: B,
        reservation: &'r mut BodyReservation,
        read: usize,
    }
}

impl<'r, B> Budgeted<'r, B> {
    /// Reads `inner` under `reservation`.
    pub fn new(inner: B, reservation: &'r mut BodyReservation) -> Self {
        Budgeted {
            inner,
            reservation,
            read: 0,
        }
    }
}

impl<B> Body for Budgeted<'_, B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.read = this.read.saturating_add(data.len());
                    if let Err(spent) = this.reservation.cover(*this.read) {
                        return Poll::Ready(Some(Err(Box::new(spent))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request the budget has no room for: 503, an OpenAI-style body
/// that names the budget and how to raise it, `Retry-After: 1` and
/// `x-should-retry: true`.
pub fn budget_spent_response(spent: BodyBudgetSpent) -> Response<ProxyBody> {
    shed(BODY_BUDGET_CODE, &spent.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::reply::assert_shed;
    use backstop::retry::{BodyLimitError, collect};
    use http_body_util::StreamBody;

    fn chunks(sizes: &[usize]) -> impl Body<Data = Bytes, Error = std::io::Error> {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![b'x'; n]))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[test]
    fn reservations_share_the_budget_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        a.cover(60).unwrap();
        assert_eq!(b.cover(41), Err(BodyBudgetSpent { max: 100 }));
        assert_eq!(b.reserved(), 0, "all or nothing");
        assert_eq!(budget.held(), 60, "a refusal takes nothing");
        b.cover(40).unwrap();
        assert_eq!(budget.held(), 100);
        a.shrink_to(10);
        assert_eq!(budget.held(), 50);
        a.cover(5).unwrap();
        assert_eq!(a.reserved(), 10, "covering less than held keeps it");
        drop(a);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn no_overflow_at_the_top_of_the_range() {
        let budget = BodyBudget::new(usize::MAX);
        let mut a = budget.reservation();
        a.cover(usize::MAX).unwrap();
        let mut b = budget.reservation();
        assert!(b.cover(1).is_err());
        drop(a);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_body_reserves_as_it_arrives_and_stops_at_the_budget() {
        let budget = BodyBudget::new(100);
        let mut other = budget.reservation();
        other.cover(30).unwrap();

        let mut fits = budget.reservation();
        let bytes = collect(Budgeted::new(chunks(&[20, 20, 30]), &mut fits), 1000)
            .await
            .unwrap();
        assert_eq!(bytes.len(), 70);
        assert_eq!(fits.reserved(), 70);
        assert_eq!(budget.held(), 100);
        drop(fits);

        // 30 held by `other`: the third chunk (to 80 of 70 free) does not fit.
        let mut too_much = budget.reservation();
        let error = collect(Budgeted::new(chunks(&[40, 30, 10]), &mut too_much), 1000)
            .await
            .unwrap_err();
        let BodyLimitError::Read(error) = error else {
            panic!("expected the budget's error, got {error:?}")
        };
        assert_eq!(
            error.downcast_ref::<BodyBudgetSpent>(),
            Some(&BodyBudgetSpent { max: 100 })
        );
        assert_eq!(too_much.reserved(), 70, "what arrived before the refusal");
        drop(too_much);
        assert_eq!(budget.held(), 30);
    }

    #[test]
    fn the_spent_answer_is_a_retryable_503_naming_the_budget() {
        assert_shed(
            budget_spent_response(BodyBudgetSpent { max: 1024 }),
            "{\"error\":{\"message\":\"backstop proxy holds its limit of 1024 bytes of request bodies; retry after 1 s, or raise --max-buffered-body-bytes\",\"type\":\"server_error\",\"param\":null,\"code\":\"proxy_body_budget\"}}",
        );
    }
}
