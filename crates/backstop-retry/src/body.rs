//! The response body the retry layer hands the caller.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;
use std::time::Duration;

use backstop_classify::{BoxError, ClassifiedError, Failure, FailureKind, Rules, instant_after};
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep};

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
    ///
    /// With a stream idle timeout
    /// ([`RetryConfig::with_stream_idle_timeout`](crate::RetryConfig::with_stream_idle_timeout)),
    /// a provider that sends nothing for that long while the caller waits ends the
    /// body: every byte before, then one `Err(ClassifiedError)` whose cause is
    /// [`RetryError::StreamStalled`] and whose failure is
    /// [`FailureKind::TimedOut`](backstop_classify::FailureKind), then the end.
    pub struct RetryBody<B> {
        #[pin]
        inner: B,
        // Boxed: a plain pass-through (every non-stream response) stays small.
        state: Option<Box<Watched>>,
        delivered: u64,
        // Boxed, with its timer: only bodies with a limit pay for it.
        idle: Option<Pin<Box<IdleLimit>>>,
    }
}

pin_project! {
    /// The stream idle timeout of one body.
    struct IdleLimit {
        limit: Duration,
        #[pin]
        timer: Sleep,
        // Whether `timer` runs: from a poll that found no frame to the next frame.
        armed: bool,
        // The body was ended for its silence: nothing more comes from it.
        stalled: bool,
    }
}

impl IdleLimit {
    /// Judges one poll of the inner body: `true` when the silence has
    /// outlasted the limit (the body is then stalled).
    fn judge(mut self: Pin<&mut Self>, frame_ready: bool, cx: &mut Context<'_>) -> bool {
        let mut this = self.as_mut().project();
        if frame_ready {
            *this.armed = false;
            return false;
        }
        if !*this.armed {
            // The silence the caller waits through starts now.
            // Never overflowing: any limit is a setting, however long.
            this.timer
                .as_mut()
                .reset(instant_after(Instant::now(), *this.limit));
            *this.armed = true;
        }
        let elapsed = this.timer.poll(cx).is_ready();
        if elapsed {
            *this.stalled = true;
        }
        elapsed
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
            idle: None,
        }
    }

    /// Ends the body with [`RetryError::StreamStalled`] when the provider leaves it
    /// silent for `limit` while the caller waits (no limit: `None`).
    pub(crate) fn idle_limit(mut self, limit: Option<Duration>) -> Self {
        self.idle = limit.map(|limit| {
            Box::pin(IdleLimit {
                limit,
                // Reset to the right instant when it is armed.
                timer: sleep(limit),
                armed: false,
                stalled: false,
            })
        });
        self
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
            idle: None,
        }
    }

    /// The inner body, as the provider sent it (bytes already handed on or held are
    /// not in it).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

/// Polls the inner body under its idle limit, if it has one: a silence past the
/// limit is a [`RetryError::StreamStalled`] error (inner errors are classified as
/// they are without a limit), and after it the body has ended.
fn poll_inner<B>(
    inner: Pin<&mut B>,
    idle: &mut Option<Pin<Box<IdleLimit>>>,
    delivered: u64,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, ClassifiedError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let Some(idle) = idle.as_mut() else {
        return inner
            .poll_frame(cx)
            .map_err(|e| verdict::classified_error(e.into()));
    };
    if idle.stalled {
        return Poll::Ready(None);
    }
    let polled = inner.poll_frame(cx);
    if !idle.as_mut().judge(polled.is_ready(), cx) {
        return polled.map_err(|e| verdict::classified_error(e.into()));
    }
    Poll::Ready(Some(Err(stalled(idle.limit, delivered))))
}

/// The error that ends a body silent for `after`, `delivered` bytes in.
fn stalled(after: Duration, delivered: u64) -> ClassifiedError {
    ClassifiedError::new(
        Failure::new(FailureKind::TimedOut),
        RetryError::StreamStalled { after, delivered },
    )
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
            return match ready!(poll_inner(this.inner, this.idle, *this.delivered, cx)) {
                Some(Ok(frame)) => {
                    if let Some(bytes) = frame.data_ref() {
                        *this.delivered += bytes.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(e))),
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
                None => match ready!(poll_inner(
                    this.inner.as_mut(),
                    this.idle,
                    *this.delivered,
                    cx
                )) {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        state.done = true;
                        if let Some(stream) = state.stream.as_mut() {
                            stream.flush(&mut state.ready);
                        }
                        state.error = Some(match this.idle.as_ref() {
                            // The partial event just flushed reaches the caller first.
                            Some(idle) if idle.stalled => {
                                let queued: u64 = state.ready.iter().map(|b| b.len() as u64).sum();
                                stalled(idle.limit, *this.delivered + queued)
                            }
                            _ => e,
                        });
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
