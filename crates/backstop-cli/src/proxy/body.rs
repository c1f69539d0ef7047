//! The proxy's response body: the upstream's bytes frame by frame, or a small body
//! the proxy wrote itself.
//!
//! A stream that fails after content has reached the caller cannot be replayed (the
//! retry layer ends it with an error). Cutting the connection would leave an SDK
//! with a bare network error, so for an SSE response the failure becomes one final
//! OpenAI-style event, `data: {"error": {...}}`, the way OpenAI itself reports a
//! mid-stream error; every byte before it passes unchanged.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use backstop::classify::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;

/// The body of every response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pin_project! {
    /// An SSE body whose mid-stream error becomes a final `data: {"error": …}` event.
    pub struct SseErrorAsEvent<B> {
        #[pin]
        inner: B,
        ended: bool,
    }
}

impl<B> SseErrorAsEvent<B> {
    /// Wraps an SSE response body.
    pub fn new(inner: B) -> Self {
        SseErrorAsEvent {
            inner,
            ended: false,
        }
    }
}

impl<B> Body for SseErrorAsEvent<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(error)) => {
                *this.ended = true;
                tracing::warn!(target: "backstop::proxy", error = %error, "stream failed after content reached the caller");
                Poll::Ready(Some(Ok(Frame::data(error_event(&error.to_string())))))
            }
            None => {
                *this.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // An error event may be added: only the lower bound holds.
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower());
        hint
    }
}

/// The SSE event OpenAI sends for an error in a stream. The leading blank line ends
/// any event the upstream had started but not finished, so the error is never glued
/// onto a half-written `data:` line.
pub fn error_event(message: &str) -> Bytes {
    let envelope = ErrorEnvelope::new(message, "server_error", "stream_interrupted");
    let json = serde_json::to_string(&envelope).unwrap_or_default();
    Bytes::from(format!("\ndata: {json}\n\n"))
}

/// OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, in
/// that field order.
#[derive(serde::Serialize)]
pub struct ErrorEnvelope<'a> {
    error: ErrorFields<'a>,
}

#[derive(serde::Serialize)]
struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl<'a> ErrorEnvelope<'a> {
    /// An envelope with no `param`.
    pub fn new(message: &'a str, error_type: &'a str, code: &'a str) -> Self {
        ErrorEnvelope {
            error: ErrorFields {
                message,
                error_type,
                param: None,
                code,
            },
        }
    }

    /// The JSON bytes.
    pub fn to_bytes(&self) -> Bytes {
        // Serialising plain strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    #[tokio::test]
    async fn frames_pass_unchanged_then_an_error_becomes_one_final_event() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"data: {\"a\":1}\n\n"))),
            Ok(Frame::data(Bytes::from_static(b"data: {\"a\":2}\n\n"))),
            Err(std::io::Error::other("upstream reset")),
            Ok(Frame::data(Bytes::from_static(b"never sent"))),
        ];
        let body = SseErrorAsEvent::new(StreamBody::new(futures_util::stream::iter(frames)));
        let mut body = std::pin::pin!(body);
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], "data: {\"a\":1}\n\n");
        assert_eq!(got[1], "data: {\"a\":2}\n\n");
        assert_eq!(
            got[2],
            "\ndata: {\"error\":{\"message\":\"upstream reset\",\"type\":\"server_error\",\"param\":null,\"code\":\"stream_interrupted\"}}\n\n"
        );
        assert!(body.is_end_stream());
    }
}
