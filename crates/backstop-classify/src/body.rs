//! The replayable request body.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A request body held in memory as [`Bytes`], so a retry or a fallback hop replays it
/// for the cost of a reference-count bump.
///
/// Cloning never copies the bytes. Polling a clone yields the whole body as one frame.
/// The retry crate's body adapter turns any [`http_body::Body`] into one of these,
/// under a size cap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayBody {
    bytes: Bytes,
    sent: bool,
}

impl ReplayBody {
    /// A body of `bytes`.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        ReplayBody {
            bytes: bytes.into(),
            sent: false,
        }
    }

    /// The whole body (a cheap handle, not a copy).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// A fresh, unpolled body over the same bytes.
    pub fn replay(&self) -> Self {
        ReplayBody::new(self.bytes.clone())
    }
}

impl From<Bytes> for ReplayBody {
    fn from(bytes: Bytes) -> Self {
        ReplayBody::new(bytes)
    }
}

impl From<&'static str> for ReplayBody {
    fn from(s: &'static str) -> Self {
        ReplayBody::new(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for ReplayBody {
    fn from(s: String) -> Self {
        ReplayBody::new(Bytes::from(s))
    }
}

impl From<Vec<u8>> for ReplayBody {
    fn from(v: Vec<u8>) -> Self {
        ReplayBody::new(Bytes::from(v))
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.sent || this.bytes.is_empty() {
            this.sent = true;
            return Poll::Ready(None);
        }
        this.sent = true;
        Poll::Ready(Some(Ok(Frame::data(this.bytes.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent || self.bytes.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.sent {
            SizeHint::with_exact(0)
        } else {
            SizeHint::with_exact(self.bytes.len() as u64)
        }
    }
}
