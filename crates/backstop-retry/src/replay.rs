//! The request-body adapter: any [`http_body::Body`] in, a capped
//! [`ReplayBody`] out, so the retry layer (and fallback) can replay it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use backstop_classify::{BoxError, ClassifiedError, Failure, FailureKind, ReplayBody};
use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use http_body::Body;
use http_body_util::BodyExt;
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
    type Future = CollectFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClassifiedError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| verdict::classified_error(e.into()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.max_body_bytes;
        CollectFuture {
            inner: Box::pin(async move {
                let (parts, body) = request.into_parts();
                let bytes = collect(body, limit).await.map_err(|e| {
                    ClassifiedError::new(Failure::new(FailureKind::InvalidRequest), e)
                })?;
                let request = Request::from_parts(parts, ReplayBody::new(bytes));
                inner
                    .call(request)
                    .await
                    .map_err(|e| verdict::classified_error(e.into()))
            }),
        }
    }
}

/// The future of [`CollectBody`].
pub struct CollectFuture<R> {
    #[allow(clippy::type_complexity)]
    inner: Pin<Box<dyn Future<Output = Result<R, ClassifiedError>> + Send>>,
}

impl<R> Future for CollectFuture<R> {
    type Output = Result<R, ClassifiedError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for CollectFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CollectFuture")
    }
}

/// Reads `body` whole, refusing more than `limit` bytes. A one-frame body (the usual
/// case for `Full<Bytes>` and hyper's small requests) is kept without a copy.
pub async fn collect<B>(body: B, limit: usize) -> Result<Bytes, BodyLimitError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyLimitError::TooLarge { limit });
    }
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
                let mut joined = BytesMut::with_capacity(head.len() + chunk.len());
                joined.extend_from_slice(head);
                joined.extend_from_slice(&chunk);
                rest = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&chunk),
        }
    }
    Ok(match rest {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}
