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
        held: VecDeque<Frame<Bytes>>,
        watch: Option<Box<StreamWatch>>,
        ready: VecDeque<Bytes>,
        trailers: Option<Frame<Bytes>>,
        error: Option<ClassifiedError>,
        delivered: u64,
        done: bool,
    }
}

impl<B> RetryBody<B> {
    /// Passes `inner` through untouched.
    pub(crate) fn passthrough(inner: B) -> Self {
        Self::new(inner, VecDeque::new(), None)
    }

    /// Replays `held` first, then `inner`, watching the events when `watch_cap` is set.
    pub(crate) fn new(
        inner: B,
        held: VecDeque<Frame<Bytes>>,
        watch: Option<(usize, Arc<Rules>)>,
    ) -> Self {
        RetryBody {
            inner,
            held,
            watch: watch.map(|(cap, rules)| Box::new(StreamWatch::new(cap, rules))),
            ready: VecDeque::new(),
            trailers: None,
            error: None,
            delivered: 0,
            done: false,
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
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                *this.delivered += bytes.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            if let Some(error) = this.error.take() {
                return Poll::Ready(Some(Err(error)));
            }
            if *this.done {
                return Poll::Ready(None);
            }
            let frame = match this.held.pop_front() {
                Some(frame) => frame,
                None => match ready!(this.inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        *this.done = true;
                        if let Some(watch) = this.watch.as_mut() {
                            watch.flush(this.ready);
                        }
                        *this.error = Some(verdict::classified_error(e.into()));
                        continue;
                    }
                    None => {
                        *this.done = true;
                        if let Some(watch) = this.watch.as_mut() {
                            watch.flush(this.ready);
                        }
                        continue;
                    }
                },
            };
            let Some(watch) = this.watch.as_mut() else {
                if let Some(bytes) = frame.data_ref() {
                    *this.delivered += bytes.len() as u64;
                }
                return Poll::Ready(Some(Ok(frame)));
            };
            match frame.into_data() {
                Ok(bytes) => {
                    if let Some(failure) = watch.process(bytes, this.ready) {
                        *this.done = true;
                        let queued: u64 = this.ready.iter().map(|b| b.len() as u64).sum();
                        *this.error = Some(ClassifiedError::new(
                            failure,
                            RetryError::StreamInterrupted {
                                delivered: *this.delivered + queued,
                            },
                        ));
                    }
                }
                Err(trailers) => {
                    watch.flush(this.ready);
                    *this.trailers = Some(trailers);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.ready.is_empty() && self.trailers.is_none() && self.error.is_none()
            || (self.watch.is_none() && self.held.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.watch.is_some() || self.done {
            return SizeHint::default();
        }
        let held: u64 = self
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
}

impl<B> std::fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBody")
            .field("watching", &self.watch.is_some())
            .field("delivered", &self.delivered)
            .field("done", &self.done)
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
