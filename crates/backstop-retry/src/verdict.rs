//! Where the layer gets its verdicts when the classify layer did not supply one:
//! the same rules, applied to what the retry layer can see without reading a body.

use std::time::SystemTime;

use backstop_classify::{
    BoxError, Classification, ClassifiedError, Failure, Rules, classify_transport_error,
};
use http::Response;

/// The classification on the response (the classify layer's), or one made from its
/// status and headers with `rules` (the body is not read: it goes to the caller
/// untouched).
pub(crate) fn response_classification<B>(response: &Response<B>, rules: &Rules) -> Classification {
    if let Some(c) = response.extensions().get::<Classification>() {
        return c.clone();
    }
    if is_unclassified_success(response) {
        return Classification::Success;
    }
    rules.classify_response(
        response.status(),
        response.headers(),
        &[],
        SystemTime::now(),
    )
}

/// Whether a response no classify layer judged is a success: below 400 the rules are
/// not consulted.
pub(crate) fn is_unclassified_success<B>(response: &Response<B>) -> bool {
    response.status().as_u16() < 400
}

/// The inner service's error as a classified one: kept as is when it already is one,
/// otherwise classified by its source chain.
pub(crate) fn classified_error(error: BoxError) -> ClassifiedError {
    match error.downcast::<ClassifiedError>() {
        Ok(classified) => *classified,
        Err(other) => {
            let failure = classify_transport_error(&*other);
            ClassifiedError::new(failure, other)
        }
    }
}

/// The verdict on an SSE error event's data.
pub(crate) fn stream_failure(rules: &Rules, event_data: &[u8]) -> Failure {
    rules.classify_stream_error(event_data)
}
