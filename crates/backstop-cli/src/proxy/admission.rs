//! Load shedding: a bound on the chat requests in flight, and the 503 a request
//! over it gets at once.
//!
//! Without a bound, a proxy in front of a slow provider accumulates requests (each
//! with its body buffer, its upstream connection, its task) until memory runs out:
//! the queue is the outage. With it, the excess is refused in microseconds, before
//! its body is read, with an answer every OpenAI-compatible client understands.
//!
//! Shedding is retryable (`x-should-retry: true`, `Retry-After: 1`): nothing was
//! sent to any provider, so a client's retry cannot double-bill or answer twice,
//! and the condition is transient. The official SDKs then wait one second and try
//! again at most twice, which is the bounded back-off an overloaded server wants.
//!
//! [`InFlightLimit`] is plain atomics: no runtime, testable on its own.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::body::{ErrorEnvelope, ProxyBody};
use super::reply::shed;

/// The error `code` of a shed request.
pub const OVERLOADED_CODE: &str = "proxy_overloaded";

/// The error `code` of a connection refused at the connection limit.
pub const CONNECTION_LIMIT_CODE: &str = "proxy_connection_limit";

/// A count that never passes `max`: what the in-flight bound and the body budget
/// both are (in requests, in bytes).
#[derive(Debug)]
pub(crate) struct Bounded {
    held: AtomicUsize,
    max: usize,
}

impl Bounded {
    pub(crate) fn new(max: usize) -> Self {
        Bounded {
            held: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes `n` if the count stays within `max`; all or nothing.
    pub(crate) fn try_take(&self, n: usize) -> bool {
        // A compare-and-swap loop rather than add-then-undo: a refused take never
        // inflates the count, so nothing is refused while there is room for it.
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= self.max)
            })
            .is_ok()
    }

    /// Gives back `n` taken earlier.
    pub(crate) fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// A bound on requests in flight, shared by every connection.
#[derive(Debug)]
pub struct InFlightLimit {
    in_flight: Bounded,
}

/// A request is over the bound: shed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overloaded {
    /// The bound that was reached.
    pub max: usize,
}

impl InFlightLimit {
    /// At most `max` requests in flight.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(InFlightLimit {
            in_flight: Bounded::new(max),
        })
    }

    /// Admits one request while fewer than `max` are in flight. The request counts
    /// until the returned guard is dropped.
    pub fn try_admit(self: &Arc<Self>) -> Result<InFlightGuard, Overloaded> {
        if self.in_flight.try_take(1) {
            Ok(InFlightGuard {
                limit: Arc::clone(self),
            })
        } else {
            Err(Overloaded { max: self.max() })
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.held()
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.in_flight.max()
    }
}

/// One admitted request; dropping it frees the slot.
#[derive(Debug)]
pub struct InFlightGuard {
    limit: Arc<InFlightLimit>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.limit.in_flight.give_back(1);
    }
}

/// The answer to a shed request: 503, an OpenAI-style body that names the bound and
/// how to raise it, `Retry-After: 1` and `x-should-retry: true`.
pub fn overloaded_response(overloaded: Overloaded) -> Response<ProxyBody> {
    shed(
        OVERLOADED_CODE,
        &format!(
            "backstop proxy is at its limit of {} requests in flight; retry after 1 s, or raise --max-in-flight",
            overloaded.max
        ),
    )
}

/// The whole HTTP/1.1 answer written on a connection over the connection limit,
/// before its request is read: 503, the OpenAI-style error, `Retry-After: 1`,
/// `x-should-retry: true`, `Connection: close`. Written raw because hyper is never
/// given the connection (an h2c client sees a protocol error, and retries).
pub fn connection_limit_answer(max_connections: usize) -> Bytes {
    let body = ErrorEnvelope::new(
        &format!(
            "backstop proxy is at its limit of {max_connections} open connections; retry after 1 s, reuse connections, or raise --max-connections"
        ),
        "server_error",
        CONNECTION_LIMIT_CODE,
    )
    .to_bytes();
    let mut answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nx-should-retry: true\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    Bytes::from(answer)
}

pin_project! {
    /// A response body that keeps its request's in-flight slot until the body ends
    /// or the caller leaves (hyper drops the body then): a stream is in flight
    /// until its last byte.
    pub struct Admitted<B> {
        #[pin]
        inner: B,
        guard: Option<InFlightGuard>,
    }
}

impl<B> Admitted<B> {
    /// Ties `guard` to `inner`'s lifetime.
    pub fn new(inner: B, guard: InFlightGuard) -> Self {
        Admitted {
            inner,
            guard: Some(guard),
        }
    }
}

impl Admitted<ProxyBody> {
    /// Ties `guard` to the body of `response`.
    pub fn response(response: Response<ProxyBody>, guard: InFlightGuard) -> Response<ProxyBody> {
        use http_body_util::BodyExt;
        response.map(|body| Admitted::new(body, guard).boxed_unsync())
    }
}

impl<B> Body for Admitted<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            // The end: free the slot now rather than when hyper gets round to
            // dropping the body.
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::reply::assert_shed;
    use http_body_util::BodyExt;

    #[test]
    fn admits_up_to_the_bound_then_refuses_until_a_slot_frees() {
        let limit = InFlightLimit::new(2);
        let first = limit.try_admit().expect("1 of 2");
        let second = limit.try_admit().expect("2 of 2");
        assert_eq!(limit.try_admit().unwrap_err(), Overloaded { max: 2 });
        assert_eq!(limit.try_admit().unwrap_err(), Overloaded { max: 2 });
        assert_eq!(limit.in_flight(), 2, "refusals do not count");
        drop(first);
        assert_eq!(limit.in_flight(), 1);
        let third = limit.try_admit().expect("the freed slot");
        assert_eq!(limit.in_flight(), 2);
        drop((second, third));
        assert_eq!(limit.in_flight(), 0);
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_bound() {
        // Eight threads race for three slots; the count itself (not only the number
        // admitted) must never pass the bound, or a refused request inflated it.
        let limit = InFlightLimit::new(3);
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limit = limit.clone();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    let (mut admitted, mut refused) = (0usize, 0usize);
                    for _ in 0..10_000 {
                        peak.fetch_max(limit.in_flight(), Ordering::AcqRel);
                        match limit.try_admit() {
                            Ok(guard) => {
                                admitted += 1;
                                peak.fetch_max(limit.in_flight(), Ordering::AcqRel);
                                drop(guard);
                            }
                            Err(Overloaded { max }) => {
                                assert_eq!(max, 3);
                                refused += 1;
                            }
                        }
                    }
                    (admitted, refused)
                })
            })
            .collect();
        let (admitted, refused) = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |(a, r), (a2, r2)| (a + a2, r + r2));
        assert_eq!(admitted + refused, 80_000);
        assert!(admitted > 0);
        assert!(peak.load(Ordering::Acquire) <= 3, "peak {peak:?}");
        assert_eq!(limit.in_flight(), 0);
    }

    #[test]
    fn shed_answer_is_a_retryable_503_naming_the_bound() {
        assert_shed(
            overloaded_response(Overloaded { max: 1024 }),
            "{\"error\":{\"message\":\"backstop proxy is at its limit of 1024 requests in flight; retry after 1 s, or raise --max-in-flight\",\"type\":\"server_error\",\"param\":null,\"code\":\"proxy_overloaded\"}}",
        );
    }

    #[test]
    fn connection_limit_answer_is_a_complete_http1_503_that_closes() {
        let answer = connection_limit_answer(4096);
        let body = "{\"error\":{\"message\":\"backstop proxy is at its limit of 4096 open connections; retry after 1 s, reuse connections, or raise --max-connections\",\"type\":\"server_error\",\"param\":null,\"code\":\"proxy_connection_limit\"}}";
        assert_eq!(
            answer,
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nx-should-retry: true\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[tokio::test]
    async fn the_slot_is_held_until_the_body_ends() {
        let limit = InFlightLimit::new(1);
        let guard = limit.try_admit().unwrap();
        let body = Admitted::new(
            http_body_util::Full::new(Bytes::from_static(b"data: x\n\n")),
            guard,
        );
        let mut body = std::pin::pin!(body);
        assert_eq!(limit.in_flight(), 1);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "data: x\n\n");
        assert_eq!(limit.in_flight(), 1, "not yet ended");
        assert!(body.frame().await.is_none());
        assert_eq!(limit.in_flight(), 0, "freed at the end, before the drop");
    }

    #[test]
    fn a_dropped_body_frees_its_slot() {
        let limit = InFlightLimit::new(1);
        let body = Admitted::new(
            http_body_util::Empty::<Bytes>::new(),
            limit.try_admit().unwrap(),
        );
        assert!(limit.try_admit().is_err());
        drop(body);
        assert!(limit.try_admit().is_ok());
    }
}
