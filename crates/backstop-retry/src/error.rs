//! The causes the retry layer puts inside a [`ClassifiedError`](backstop_classify::ClassifiedError)
//! when the failure is its own finding rather than the inner service's error.

use std::fmt;
use std::time::Duration;

/// Why the retry layer itself ended an attempt or a stream. Read it with
/// `ClassifiedError::cause()` and `downcast_ref::<RetryError>()`; the verdict (kind,
/// retryable, hint) is on the `ClassifiedError`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryError {
    /// No response head within the attempt timeout.
    AttemptTimedOut {
        /// The time allowed (the attempt timeout, or less when the deadline was nearer).
        after: Duration,
    },
    /// A held stream sent no first event within the attempt timeout.
    FirstEventTimedOut {
        /// The time allowed for head and first event together.
        after: Duration,
    },
    /// A held stream's first event was an error event, so nothing reached the caller.
    FirstEventWasError,
    /// The provider sent an error event after part of the stream had been delivered
    /// to the caller. The request is committed and is never replayed.
    StreamInterrupted {
        /// Bytes of the stream the caller had been handed before the error event.
        delivered: u64,
    },
    /// The response body sent nothing for the stream idle timeout
    /// ([`RetryConfig::with_stream_idle_timeout`](crate::RetryConfig::with_stream_idle_timeout))
    /// while the caller waited for it. The request is committed and is never
    /// replayed.
    StreamStalled {
        /// The silence allowed.
        after: Duration,
        /// Bytes of the body the caller had been handed before it stalled.
        delivered: u64,
    },
    /// The inner service could not be made ready for a retry before the deadline
    /// (less [`RetryConfig::with_min_attempt_time`](crate::RetryConfig::with_min_attempt_time)).
    NotReadyBeforeDeadline,
}

impl fmt::Display for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryError::AttemptTimedOut { after } => write!(
                f,
                "no response head within {after:?}; raise `attempt_timeout` (or the deadline) \
                 if the provider is slow to start answering"
            ),
            RetryError::FirstEventTimedOut { after } => write!(
                f,
                "the stream sent no first event within {after:?}; raise `attempt_timeout` \
                 or turn off `hold_first_event`"
            ),
            RetryError::FirstEventWasError => {
                f.write_str("the stream's first event was an error event")
            }
            RetryError::StreamInterrupted { delivered } => write!(
                f,
                "the provider sent an error event after {delivered} bytes of the stream \
                 were delivered; a started stream is never replayed"
            ),
            RetryError::StreamStalled { after, delivered } => write!(
                f,
                "the provider sent nothing for {after:?} after {delivered} bytes of the \
                 body; raise `stream_idle_timeout` if its pauses are longer; a started \
                 body is never replayed"
            ),
            RetryError::NotReadyBeforeDeadline => {
                f.write_str("the inner service did not become ready before the deadline")
            }
        }
    }
}

impl std::error::Error for RetryError {}
