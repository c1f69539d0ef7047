//! The response future: waits for the head, then, for an error status, reads the
//! start of the body to classify it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use http::Response;
use http::response::Parts;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::response_body::Replay;
use crate::service::classify_error;
use crate::{BoxError, Classification, ClassifiedBody, ClassifiedError, Rules};

pin_project! {
    /// The future of [`Classify`](crate::Classify).
    pub struct ResponseFuture<F, B>
    where
        B: Body,
    {
        #[pin]
        state: State<F, B>,
        rules: Arc<Rules>,
        clock: fn() -> SystemTime,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B>
    where
        B: Body,
    {
        Calling { #[pin] future: F },
        // Boxed so it can be moved into the caller's body afterwards: only error
        // responses pay for the allocation.
        Reading { head: Option<Parts>, body: Option<Pin<Box<B>>>, read: Option<ErrorBodyRead<B>> },
        Done,
    }
}

/// What has been read of an error body so far.
struct ErrorBodyRead<B: Body> {
    frames: VecDeque<Bytes>,
    len: usize,
    trailers: Option<http::HeaderMap>,
    error: Option<B::Error>,
    ended: bool,
}

impl<F, B> ResponseFuture<F, B>
where
    B: Body,
{
    pub(crate) fn new(future: F, rules: Arc<Rules>, clock: fn() -> SystemTime) -> Self {
        ResponseFuture {
            state: State::Calling { future },
            rules,
            clock,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body,
{
    type Output = Result<Response<ClassifiedBody<B>>, ClassifiedError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(classify_error(error)));
                        }
                    };
                    if response.status().as_u16() < 400 {
                        // A success is never buffered: its body (an SSE stream, maybe)
                        // goes to the caller frame by frame.
                        this.state.set(State::Done);
                        let (mut head, body) = response.into_parts();
                        head.extensions.insert(Classification::Success);
                        return Poll::Ready(Ok(Response::from_parts(
                            head,
                            ClassifiedBody::passthrough(body),
                        )));
                    }
                    let (head, body) = response.into_parts();
                    let read = ErrorBodyRead {
                        frames: VecDeque::new(),
                        len: 0,
                        trailers: None,
                        error: None,
                        ended: body.is_end_stream(),
                    };
                    this.state.set(State::Reading {
                        head: Some(head),
                        body: Some(Box::pin(body)),
                        read: Some(read),
                    });
                }
                StateProj::Reading { head, body, read } => {
                    let cap = this.rules.max_inspected_body();
                    if let (Some(body), Some(read)) = (body.as_mut(), read.as_mut()) {
                        ready!(read_up_to(body.as_mut(), read, cap, cx));
                    }
                    // Both are always there: the state becomes `Done` right after.
                    let (Some(mut head), Some(read)) = (head.take(), read.take()) else {
                        return Poll::Pending;
                    };
                    let rest = if read.error.is_some() || read.ended {
                        None
                    } else {
                        body.take()
                    };
                    // Trailers end the data, so a body followed by trailers is complete.
                    let complete = (read.ended || read.trailers.is_some())
                        && read.error.is_none()
                        && read.len <= cap;
                    let bytes = if complete {
                        joined(&read.frames)
                    } else {
                        Bytes::new()
                    };
                    let classification = this.rules.classify_response(
                        head.status,
                        &head.headers,
                        &bytes,
                        (this.clock)(),
                    );
                    head.extensions.insert(classification);
                    this.state.set(State::Done);
                    let body = ClassifiedBody::replayed(Replay {
                        frames: read.frames,
                        trailers: read.trailers,
                        error: read.error,
                        rest,
                    });
                    return Poll::Ready(Ok(Response::from_parts(head, body)));
                }
                // Polled after it completed: a contract violation by the caller.
                StateProj::Done => return Poll::Pending,
            }
        }
    }
}

/// Frames read in one poll before yielding to the executor: a body that is always
/// ready with empty frames must not spin forever inside one poll, where no attempt
/// timeout could interrupt it.
const FRAMES_PER_POLL: usize = 64;

/// Reads frames until the body ends, fails, sends trailers, or more than `cap` bytes
/// are held. Never holds more than `cap` plus one frame.
fn read_up_to<B: Body>(
    mut body: Pin<&mut B>,
    read: &mut ErrorBodyRead<B>,
    cap: usize,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut budget = FRAMES_PER_POLL;
    while !read.ended && read.error.is_none() && read.trailers.is_none() && read.len <= cap {
        if budget == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        budget -= 1;
        match ready!(body.as_mut().poll_frame(cx)) {
            None => read.ended = true,
            Some(Err(error)) => read.error = Some(error),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let bytes = data.copy_to_bytes(data.remaining());
                    read.len = read.len.saturating_add(bytes.len());
                    if !bytes.is_empty() {
                        read.frames.push_back(bytes);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        read.trailers = Some(trailers);
                    }
                    // Other frame kinds carry no bytes for the caller.
                }
            },
        }
    }
    Poll::Ready(())
}

/// The frames as one buffer: free for the usual single-frame error body.
fn joined(frames: &VecDeque<Bytes>) -> Bytes {
    match frames.len() {
        0 => Bytes::new(),
        1 => frames[0].clone(),
        _ => {
            let mut all = Vec::with_capacity(frames.iter().map(Bytes::len).sum());
            for frame in frames {
                all.extend_from_slice(frame);
            }
            Bytes::from(all)
        }
    }
}
