//! The mock's response body: all at once, or SSE one frame at a time in tokio time.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::decision::InFlight;
use crate::wire::{SseEnd, WireBody};

/// The body of every mock response.
///
/// A full body is one frame. A stream yields one SSE event per frame; frame *i*
/// (from 0) becomes available `i × chunk_delay` after the head, in tokio time.
/// A stream may end cleanly or with an `io::ErrorKind::ConnectionReset` error
/// (which also arrives `chunk_delay` after the last frame). While a
/// [`StreamsHeld`](crate::StreamsHeld) guard is alive, a stream that has sent its
/// first frame sends nothing more (no frame, no end) until every guard is dropped,
/// then goes on at its pace (the next frame `chunk_delay` after the release).
/// The attempt counts as in flight (for the capacity model) until the body ends or
/// is dropped.
pub struct MockBody {
    kind: Kind,
    _in_flight: Option<InFlight>,
}

enum Kind {
    Full(Option<Bytes>),
    Sse {
        frames: VecDeque<Bytes>,
        end: Option<SseEnd>,
        delay: Duration,
        sent_any: bool,
        yielded_before_reset: bool,
        sleep: Option<Pin<Box<Sleep>>>,
        /// How many [`StreamsHeld`](crate::StreamsHeld) guards are alive.
        holds: watch::Receiver<usize>,
        /// Waiting for the last guard to go, once one was seen alive.
        released: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    },
}

impl MockBody {
    pub(crate) fn new(
        body: WireBody,
        chunk_delay: Duration,
        in_flight: Option<InFlight>,
        holds: watch::Receiver<usize>,
    ) -> Self {
        let kind = match body {
            WireBody::Full(bytes) => Kind::Full(Some(bytes)),
            WireBody::Sse { frames, end } => Kind::Sse {
                frames: frames.into(),
                end: Some(end),
                delay: chunk_delay,
                sent_any: false,
                yielded_before_reset: false,
                sleep: None,
                holds,
                released: None,
            },
        };
        MockBody {
            kind,
            _in_flight: in_flight,
        }
    }

    /// A complete body with these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        MockBody {
            kind: Kind::Full(Some(bytes.into())),
            _in_flight: None,
        }
    }

    fn release(&mut self) {
        self._in_flight = None;
    }
}

impl fmt::Debug for MockBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(bytes) => f
                .debug_struct("MockBody::Full")
                .field("len", &bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Sse {
                frames, end, delay, ..
            } => f
                .debug_struct("MockBody::Sse")
                .field("frames_left", &frames.len())
                .field("end", end)
                .field("delay", delay)
                .finish(),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let out = match &mut this.kind {
            Kind::Full(bytes) => bytes
                .take()
                .filter(|b| !b.is_empty())
                .map(|b| Ok(Frame::data(b))),
            Kind::Sse {
                frames,
                end,
                delay,
                sent_any,
                yielded_before_reset,
                sleep,
                holds,
                released,
            } => {
                if *sent_any && (released.is_some() || *holds.borrow() > 0) {
                    let wait = released.get_or_insert_with(|| {
                        let mut holds = holds.clone();
                        Box::pin(async move {
                            // The sender lives in the provider, which outlives
                            // no body's use of it: an error only means no guard.
                            let _released = holds.wait_for(|holds| *holds == 0).await;
                        })
                    });
                    ready!(wait.as_mut().poll(cx));
                    *released = None;
                }
                // A clean end follows the last frame at once; only a reset is an
                // event of its own, `chunk_delay` after the last frame.
                if frames.is_empty() && *end != Some(SseEnd::Reset) {
                    *end = None;
                    None
                } else {
                    if *sent_any && !delay.is_zero() {
                        let timer =
                            sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(*delay)));
                        ready!(timer.as_mut().poll(cx));
                        *sleep = None;
                    }
                    if frames.is_empty() && !*yielded_before_reset {
                        // Give an HTTP server one turn to flush the head and the
                        // frames already sent, so the reset really comes after them
                        // on the wire (hyper drops unflushed output on a body error).
                        *yielded_before_reset = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    *sent_any = true;
                    match frames.pop_front() {
                        Some(frame) => Some(Ok(Frame::data(frame))),
                        None => match end.take() {
                            Some(SseEnd::Reset) => Some(Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                "backstop-mock: connection reset by the provider mid-response",
                            ))),
                            _ => None,
                        },
                    }
                }
            }
        };
        if out.is_none() || matches!(out, Some(Err(_))) {
            this.release();
        }
        Poll::Ready(out)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            // Telling hyper the stream is over lets HTTP/2 set END_STREAM on the
            // last frame instead of sending an extra empty DATA frame.
            Kind::Sse { frames, end, .. } => frames.is_empty() && *end != Some(SseEnd::Reset),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Sse { .. } => SizeHint::default(),
        }
    }
}
