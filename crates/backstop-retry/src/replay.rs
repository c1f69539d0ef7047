//! The request-body adapter: any [`http_body::Body`] in, a capped
//! [`ReplayBody`] out, so the retry layer (and fallback) can replay it.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use backstop_classify::{BoxError, ClassifiedError, Failure, FailureKind, ReplayBody};
use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use http_body::Body;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::verdict;

/// The default cap on a request body held for replay: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Why a request body could not be made replayable. The inner service was not called.
#[derive(Debug)]
#[non_exhaustive]
pub enum BodyLimitError {
    /// The body is longer than the cap.
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// Reading the request body failed (the caller's stream broke).
    Read(BoxError),
}

impl fmt::Display for BodyLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyLimitError::TooLarge { limit } => write!(
                f,
                "request body exceeds the {limit}-byte replay limit; raise `max_body_bytes` \
                 on ReplayBodyLayer or send smaller requests"
            ),
            BodyLimitError::Read(e) => write!(f, "reading the request body failed: {e}"),
        }
    }
}

impl std::error::Error for BodyLimitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyLimitError::TooLarge { .. } => None,
            BodyLimitError::Read(e) => Some(&**e),
        }
    }
}

/// Collects request bodies into [`ReplayBody`] up to `max_body_bytes`. Put it outside
/// the retry layer.
#[derive(Clone, Copy, Debug)]
pub struct ReplayBodyLayer {
    max_body_bytes: usize,
}

impl ReplayBodyLayer {
    /// Holds at most `max_body_bytes` per request.
    pub fn new(max_body_bytes: usize) -> Self {
        ReplayBodyLayer { max_body_bytes }
    }
}

impl Default for ReplayBodyLayer {
    /// [`DEFAULT_MAX_BODY_BYTES`].
    fn default() -> Self {
        ReplayBodyLayer::new(DEFAULT_MAX_BODY_BYTES)
    }
}

impl<S> Layer<S> for ReplayBodyLayer {
    type Service = CollectBody<S>;

    fn layer(&self, inner: S) -> CollectBody<S> {
        CollectBody {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

/// The service [`ReplayBodyLayer`] makes.
///
/// An oversized body is answered with a [`ClassifiedError`] of kind
/// [`FailureKind::InvalidRequest`] whose cause is [`BodyLimitError::TooLarge`]; the
/// inner service is not called, and reading stops at the first frame that crosses the
/// cap (a declared length above the cap is refused before reading anything).
#[derive(Clone, Debug)]
pub struct CollectBody<S> {
    inner: S,
    max_body_bytes: usize,
}

impl<S> CollectBody<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for CollectBody<S>
where
    S: Service<Request<ReplayBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = ClassifiedError;
    type Future = CollectFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClassifiedError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| verdict::classified_error(e.into()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.max_body_bytes;
        let (parts, mut body) = request.into_parts();

        // A body that is replayable already is used as it is: no read, no copy.
        if let Some(replay) = (&mut body as &mut dyn Any).downcast_mut::<ReplayBody>() {
            let replay = std::mem::take(replay);
            if replay.bytes().len() > limit {
                return CollectFuture::failed(BodyLimitError::TooLarge { limit });
            }
            return CollectFuture::calling(inner.call(Request::from_parts(parts, replay)));
        }

        // Any other body is read, now as far as it can be: an in-memory body (`Full`,
        // `String`, ...) is read whole at once and the request goes straight on,
        // without a boxed future around the inner one. A body still arriving (hyper's
        // `Incoming`) is read by the future, which then calls the inner service
        // (driven to ready already: it was swapped out above).
        let mut collecting: Collecting = Box::pin(collect(body, limit));
        match collecting
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(Ok(bytes)) => CollectFuture::calling(
                inner.call(Request::from_parts(parts, ReplayBody::new(bytes))),
            ),
            Poll::Ready(Err(e)) => CollectFuture::failed(e),
            Poll::Pending => CollectFuture {
                state: CollectState::Collecting {
                    collecting,
                    rest: Some((parts, inner)),
                },
            },
        }
    }
}

/// A body being read, boxed: its type depends on the caller's body, and only a body
/// that is still arriving needs it kept.
type Collecting = Pin<Box<dyn Future<Output = Result<Bytes, BodyLimitError>> + Send>>;

pin_project! {
    /// The future of [`CollectBody`]: the body's reading (when it was not read at
    /// once), then the inner service's future.
    pub struct CollectFuture<S>
    where
        S: Service<Request<ReplayBody>>,
    {
        #[pin]
        state: CollectState<S, S::Future>,
    }
}

pin_project! {
    #[project = CollectStateProj]
    enum CollectState<S, F> {
        Collecting {
            collecting: Collecting,
            // The request's head and the ready service, until the body is in.
            rest: Option<(http::request::Parts, S)>,
        },
        Calling { #[pin] future: F },
        Failed { error: Option<BodyLimitError> },
    }
}

impl<S> CollectFuture<S>
where
    S: Service<Request<ReplayBody>>,
{
    fn calling(future: S::Future) -> Self {
        CollectFuture {
            state: CollectState::Calling { future },
        }
    }

    fn failed(error: BodyLimitError) -> Self {
        CollectFuture {
            state: CollectState::Failed { error: Some(error) },
        }
    }
}

fn invalid_body(error: BodyLimitError) -> ClassifiedError {
    ClassifiedError::new(Failure::new(FailureKind::InvalidRequest), error)
}

impl<S> Future for CollectFuture<S>
where
    S: Service<Request<ReplayBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, ClassifiedError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                CollectStateProj::Calling { future } => {
                    return future
                        .poll(cx)
                        .map_err(|e| verdict::classified_error(e.into()));
                }
                CollectStateProj::Failed { error } => {
                    return match error.take() {
                        Some(error) => Poll::Ready(Err(invalid_body(error))),
                        None => panic!("CollectFuture polled after completion"),
                    };
                }
                CollectStateProj::Collecting { collecting, rest } => {
                    let read = ready!(collecting.as_mut().poll(cx));
                    let Some((parts, mut inner)) = rest.take() else {
                        panic!("CollectFuture polled after completion");
                    };
                    match read {
                        Ok(bytes) => {
                            let request = Request::from_parts(parts, ReplayBody::new(bytes));
                            let future = inner.call(request);
                            this.state.set(CollectState::Calling { future });
                        }
                        Err(error) => {
                            return Poll::Ready(Err(invalid_body(error)));
                        }
                    }
                }
            }
        }
    }
}

impl<S> fmt::Debug for CollectFuture<S>
where
    S: Service<Request<ReplayBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CollectFuture")
    }
}

/// The most [`collect`] reserves for a body before its bytes arrive: the default
/// cap, which every ordinary body fits. A longer declared body grows past it as it is
/// read.
const MAX_UP_FRONT: usize = DEFAULT_MAX_BODY_BYTES;

/// Reads `body` whole, refusing more than `limit` bytes. A one-frame body (the usual
/// case for `Full<Bytes>` and hyper's small requests) is kept without a copy.
///
/// A body of several frames is joined into one buffer, which the request then holds
/// for all its attempts, so its size is kept close to the body's:
///
/// - a body that declares its length (`Content-Length`, seen through
///   [`Body::size_hint`]; at most `limit`) is read into one buffer of that length,
///   allocated once, when that is at most [`DEFAULT_MAX_BODY_BYTES`]; a longer one
///   starts in a buffer of that size, which grows as the bytes arrive;
/// - a body that does not is read into a growing buffer;
/// - a grown buffer is copied to one of the exact length at the end when more than
///   an eighth of it is unused (doubling can leave up to half).
///
/// Either way the buffer kept is at most 9/8 of the body's length.
pub async fn collect<B>(body: B, limit: usize) -> Result<Bytes, BodyLimitError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let declared = body.size_hint();
    if declared.lower() > limit as u64 {
        return Err(BodyLimitError::TooLarge { limit });
    }
    // What the joined buffer is sized for: the declared length, never above the cap
    // (a body that declares more than it sends fails in its transport, not here),
    // nor above `MAX_UP_FRONT`: a client's `Content-Length` under a cap of a
    // terabyte would otherwise be reserved in full before its bytes arrive, and an
    // allocation that fails aborts the process.
    let expected = usize::try_from(declared.exact().unwrap_or(declared.lower()))
        .unwrap_or(usize::MAX)
        .min(limit)
        .min(MAX_UP_FRONT);
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyLimitError::Read(e.into()))?;
        let Ok(mut data) = frame.into_data() else {
            // Trailers on a request body: nothing to replay for chat completions.
            continue;
        };
        total = total.saturating_add(data.remaining());
        if total > limit {
            return Err(BodyLimitError::TooLarge { limit });
        }
        let chunk = data.copy_to_bytes(data.remaining());
        match (&mut first, &mut rest) {
            (None, _) => first = Some(chunk),
            (Some(head), None) => {
                let mut joined = BytesMut::with_capacity(expected.max(head.len() + chunk.len()));
                joined.extend_from_slice(head);
                joined.extend_from_slice(&chunk);
                rest = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&chunk),
        }
    }
    Ok(match rest {
        Some(joined) if joined.capacity() - joined.len() > joined.len() / 8 => {
            Bytes::copy_from_slice(&joined)
        }
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}
