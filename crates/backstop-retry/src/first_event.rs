//! Holding a streamed response until its first SSE event.

use std::collections::VecDeque;

use backstop_classify::{BoxError, Failure, Rules};
use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;

use crate::sse::SseReader;
use crate::verdict;

/// What the first event of a held stream turned out to be.
pub(crate) enum FirstEvent {
    /// Content (or the stream ended, or the cap was reached before an event): hand
    /// the caller these frames, then the rest of the body.
    Deliver(VecDeque<Frame<Bytes>>),
    /// An error event: nothing reached the caller.
    Error(Failure),
    /// The body failed before the first event.
    BodyFailed(BoxError),
}

/// Reads `body` until its first event that is not a keep-alive, holding at most `cap`
/// bytes. The caller bounds the time.
pub(crate) async fn read_first_event<B>(body: &mut B, cap: usize, rules: &Rules) -> FirstEvent
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut reader = SseReader::new(cap);
    let mut held = VecDeque::new();
    let mut held_bytes = 0usize;
    loop {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return FirstEvent::BodyFailed(e.into()),
            None => return FirstEvent::Deliver(held),
        };
        let Some(data) = frame.data_ref() else {
            held.push_back(frame);
            return FirstEvent::Deliver(held);
        };
        let mut rest: &[u8] = data;
        let mut decided = false;
        while !rest.is_empty() {
            let fed = reader.feed(rest);
            rest = &rest[fed.consumed..];
            match fed.event {
                Some(event) if event.is_error() => {
                    return FirstEvent::Error(verdict::stream_failure(rules, &event.data));
                }
                Some(event) if event.is_keepalive() => {}
                Some(_) => {
                    decided = true;
                    break;
                }
                None => {}
            }
        }
        held_bytes += data.len();
        held.push_back(frame);
        if decided || held_bytes >= cap {
            return FirstEvent::Deliver(held);
        }
    }
}
