//! Where the layer gets its verdicts when the classify layer did not supply one.
//!
//! PROVISIONAL: a minimal status mapping until `backstop_classify::classify_status`,
//! `classify_transport_error` and `Rules::classify_stream_error` are committed.

use backstop_classify::{BoxError, Classification, ClassifiedError, Failure, FailureKind};
use http::Response;

/// The classification on the response (the classify layer's), or one made from its
/// status and headers with the default rules.
pub(crate) fn response_classification<B>(response: &Response<B>) -> Classification {
    if let Some(c) = response.extensions().get::<Classification>() {
        return c.clone();
    }
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return Classification::Success;
    }
    let kind = match status.as_u16() {
        429 => FailureKind::RateLimited,
        503 | 529 => FailureKind::Overloaded,
        408 => FailureKind::RequestTimeout,
        409 => FailureKind::Conflict,
        401 | 403 => FailureKind::AuthFailed,
        404 => FailureKind::ModelNotFound,
        500..=599 => FailureKind::ServerError,
        _ => FailureKind::InvalidRequest,
    };
    Classification::Failure(Failure::new(kind).with_status(status))
}

/// The inner service's error as a classified one: kept as is when it already is one.
pub(crate) fn classified_error(error: BoxError) -> ClassifiedError {
    match error.downcast::<ClassifiedError>() {
        Ok(classified) => *classified,
        Err(other) => ClassifiedError::new(Failure::new(FailureKind::ConnectionLost), other),
    }
}

/// The verdict on an SSE error event's data.
pub(crate) fn stream_failure(_event_data: &[u8]) -> Failure {
    Failure::new(FailureKind::ServerError)
}
