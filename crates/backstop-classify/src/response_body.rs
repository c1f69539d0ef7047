//! The body the caller receives: exactly the provider's bytes, in order.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`Classify`](crate::Classify).
    ///
    /// For a success it is the inner body, polled frame by frame and never buffered.
    /// For an error status it first yields the frames read to classify the response,
    /// then whatever followed them (the rest of an over-cap body, the trailers, or the
    /// inner body's error, at the place it happened). The bytes are exactly the
    /// provider's; data frames come out as [`Bytes`] (free for bodies that already
    /// use `Bytes`).
    pub struct ClassifiedBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        Passthrough { #[pin] inner: B },
        Replayed { replay: Replay<B> },
    }
}

/// An error body after classification: what was read, then what is left.
pub(crate) struct Replay<B: Body> {
    pub frames: VecDeque<Bytes>,
    pub trailers: Option<http::HeaderMap>,
    pub error: Option<B::Error>,
    pub rest: Option<Pin<Box<B>>>,
}

impl<B: Body> ClassifiedBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        ClassifiedBody {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn replayed(replay: Replay<B>) -> Self {
        ClassifiedBody {
            kind: Kind::Replayed { replay },
        }
    }
}

fn to_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

impl<B: Body> Body for ClassifiedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map(to_bytes))),
            KindProj::Replayed { replay } => {
                if let Some(bytes) = replay.frames.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                if let Some(trailers) = replay.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                if let Some(error) = replay.error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                match replay.rest.as_mut() {
                    Some(rest) => {
                        let polled = rest.as_mut().poll_frame(cx);
                        if let Poll::Ready(None) = polled {
                            replay.rest = None;
                        }
                        polled.map(|frame| frame.map(|result| result.map(to_bytes)))
                    }
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Replayed { replay } => {
                replay.frames.is_empty()
                    && replay.trailers.is_none()
                    && replay.error.is_none()
                    && replay.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            Kind::Replayed { replay } => {
                let held: u64 = replay.frames.iter().map(|b| b.len() as u64).sum();
                let rest = replay
                    .rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), |rest| rest.size_hint());
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(held));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint
            }
        }
    }
}

impl<B: Body> std::fmt::Debug for ClassifiedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Passthrough { .. } => f.write_str("ClassifiedBody::Passthrough"),
            Kind::Replayed { replay } => f
                .debug_struct("ClassifiedBody::Replayed")
                .field("held_frames", &replay.frames.len())
                .field("has_rest", &replay.rest.is_some())
                .finish(),
        }
    }
}
