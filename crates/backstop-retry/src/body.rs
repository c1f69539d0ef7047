//! The response body the retry layer hands the caller.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;

use backstop_classify::{BoxError, ClassifiedError, Rules};
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::RetryError;
use crate::sse::SseReader;
use crate::verdict;

pin_project! {
    /// The inner response body, passed through; for a successful `text/event-stream`
    /// response it also watches the events.
    ///
    /// Watching a stream: bytes are handed on event by event (a partial event is held
    /// until its blank line, at most the first-event cap, 64 KiB by default, then
    /// handed on as it is). When the provider sends an error event after the stream
    /// has started, the caller gets every byte before that event, then one
    /// `Err(ClassifiedError)` whose cause is [`RetryError::StreamInterrupted`] and
    /// whose failure is the event's verdict, then the end of the body. The request is
    /// never replayed.
    ///
    /// Bytes the layer read while holding a stream for its first event come first,
    /// exactly once.
    pub struct RetryBody<B> {
        #[pin]
        inner: B,
        // Boxed: a plain pass-through (every non-stream response) stays small.
        state: Option<Box<Watched>>,
        delivered: u64,
    }
}

/// What a body that is replaying held frames or watching a stream keeps.
struct Watched {
    held: VecDeque<Frame<Bytes>>,
    stream: Option<StreamWatch>,
    ready: VecDeque<Bytes>,
    trailers: Option<Frame<Bytes>>,
    error: Option<ClassifiedError>,
    done: bool,
}

impl<B> RetryBody<B> {
    /// Passes `inner` through untouched.
    pub(crate) fn passthrough(inner: B) -> Self {
        RetryBody {
            inner,
            state: None,
            delivered: 0,
        }
    }

    /// Replays `held` first, then `inner`, watching the events when `watch` is set.
    pub(crate) fn new(
        inner: B,
        held: VecDeque<Frame<Bytes>>,
        watch: Option<(usize, Arc<Rules>)>,
    ) -> Self {
        if held.is_empty() && watch.is_none() {
            return Self::passthrough(inner);
        }
        RetryBody {
            inner,
            state: Some(Box::new(Watched {
                held,
                stream: watch.map(|(cap, rules)| StreamWatch::new(cap, rules)),
                ready: VecDeque::new(),
                trailers: None,
                error: None,
                done: false,
            })),
            delivered: 0,
        }
    }

    /// The inner body, as the provider sent it (bytes already handed on or held are
    /// not in it).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for RetryBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ClassifiedError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClassifiedError>>> {
        let mut this = self.project();
        let Some(state) = this.state.as_mut() else {
            return match ready!(this.inner.poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(bytes) = frame.data_ref() {
                        *this.delivered += bytes.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(verdict::classified_error(e.into())))),
                None => Poll::Ready(None),
            };
        };
        loop {
            if let Some(bytes) = state.ready.pop_front() {
                *this.delivered += bytes.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if let Some(trailers) = state.trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            if let Some(error) = state.error.take() {
                return Poll::Ready(Some(Err(error)));
            }
            if state.done {
                return Poll::Ready(None);
            }
            let frame = match state.held.pop_front() {
                Some(frame) => frame,
                None => match ready!(this.inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        state.done = true;
                        if let Some(stream) = state.stream.as_mut() {
                            stream.flush(&mut state.ready);
                        }
                        state.error = Some(verdict::classified_error(e.into()));
                        continue;
                    }
                    None => {
                        state.done = true;
                        if let Some(stream) = state.stream.as_mut() {
                            stream.flush(&mut state.ready);
                        }
                        continue;
                    }
                },
            };
            let Some(stream) = state.stream.as_mut() else {
                if let Some(bytes) = frame.data_ref() {
                    *this.delivered += bytes.len() as u64;
                }
                return Poll::Ready(Some(Ok(frame)));
            };
            match frame.into_data() {
                Ok(bytes) => {
                    if let Some(failure) = stream.process(bytes, &mut state.ready) {
                        state.done = true;
                        let queued: u64 = state.ready.iter().map(|b| b.len() as u64).sum();
                        state.error = Some(ClassifiedError::new(
                            failure,
                            RetryError::StreamInterrupted {
                                delivered: *this.delivered + queued,
                            },
                        ));
                    }
                }
                Err(trailers) => {
                    stream.flush(&mut state.ready);
                    state.trailers = Some(trailers);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            None => self.inner.is_end_stream(),
            Some(state) => {
                state.done
                    && state.ready.is_empty()
                    && state.trailers.is_none()
                    && state.error.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            None => self.inner.size_hint(),
            Some(state) if state.stream.is_none() && !state.done => {
                let held: u64 = state
                    .held
                    .iter()
                    .filter_map(|f| f.data_ref().map(|b| b.len() as u64))
                    .sum();
                let inner = self.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(held));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint
            }
            Some(_) => SizeHint::default(),
        }
    }
}

impl<B> std::fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBody")
            .field(
                "watching",
                &self.state.as_ref().is_some_and(|s| s.stream.is_some()),
            )
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

/// Finds event boundaries in a stream and stops it at an error event.
#[derive(Debug)]
struct StreamWatch {
    reader: SseReader,
    /// Bytes of the event in progress, not yet handed on.
    pending: BytesMut,
    cap: usize,
    rules: Arc<Rules>,
}

impl StreamWatch {
    fn new(cap: usize, rules: Arc<Rules>) -> Self {
        StreamWatch {
            reader: SseReader::new(cap),
            pending: BytesMut::new(),
            cap,
            rules,
        }
    }

    /// Queues the complete events of `chunk` (after what was pending) on `out`; on an
    /// error event, queues only what came before it and returns its verdict.
    fn process(
        &mut self,
        chunk: Bytes,
        out: &mut VecDeque<Bytes>,
    ) -> Option<backstop_classify::Failure> {
        let mut pos = 0;
        let mut boundary = 0;
        loop {
            let fed = self.reader.feed(&chunk[pos..]);
            pos += fed.consumed;
            match fed.event {
                Some(event) if event.is_error() => {
                    self.hand_on(&chunk, boundary, out);
                    // The error event's own bytes are dropped: the caller gets the
                    // typed error instead.
                    self.pending.clear();
                    return Some(verdict::stream_failure(&self.rules, &event.data));
                }
                Some(_) => boundary = pos,
                None => break,
            }
        }
        self.hand_on(&chunk, boundary, out);
        let tail = &chunk[boundary..];
        if self.pending.len() + tail.len() > self.cap {
            // An event longer than the cap: hand it on unchecked rather than buffer
            // without bound.
            if !self.pending.is_empty() {
                out.push_back(self.pending.split().freeze());
            }
            if !tail.is_empty() {
                out.push_back(chunk.slice(boundary..));
            }
        } else {
            self.pending.extend_from_slice(tail);
        }
        None
    }

    /// Queues what was pending plus `chunk[..end]` (complete events), without a copy
    /// when nothing was pending.
    fn hand_on(&mut self, chunk: &Bytes, end: usize, out: &mut VecDeque<Bytes>) {
        if end == 0 {
            return;
        }
        if self.pending.is_empty() {
            out.push_back(chunk.slice(..end));
        } else {
            self.pending.extend_from_slice(&chunk[..end]);
            out.push_back(self.pending.split().freeze());
        }
    }

    /// The stream ended (or failed): hand on whatever partial event is pending.
    fn flush(&mut self, out: &mut VecDeque<Bytes>) {
        if !self.pending.is_empty() {
            out.push_back(self.pending.split().freeze());
        }
    }
}
