//! The answers the proxy writes itself: plain text, OpenAI-style JSON errors, and
//! the model list.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::{ErrorEnvelope, ProxyBody, full};
use super::outcome::SHOULD_RETRY_HEADER;

/// `GET /v1/models`, in OpenAI's list format, from the configuration.
pub(crate) fn model_list<'a>(
    models: impl Iterator<Item = (&'a str, &'a str)>,
) -> Response<ProxyBody> {
    #[derive(serde::Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'a str,
    }
    #[derive(serde::Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let list = List {
        object: "list",
        data: models
            .map(|(id, upstream)| Model {
                id,
                object: "model",
                created: 0,
                owned_by: upstream,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&list).unwrap_or_default();
    text(StatusCode::OK, "application/json", Bytes::from(json))
}

/// A body with its status and content type.
pub(crate) fn text(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
pub(crate) fn openai_error(
    status: StatusCode,
    error_type: &str,
    code: &str,
    message: &str,
) -> Response<ProxyBody> {
    text(
        status,
        "application/json",
        ErrorEnvelope::new(message, error_type, code).to_bytes(),
    )
}

/// A request the proxy sheds before any provider saw it: 503 with the OpenAI-style
/// error `code`, `Retry-After: 1` and `x-should-retry: true` (a retry cannot bill or
/// answer twice, and the room frees as the requests ahead finish).
pub(crate) fn shed(code: &str, message: &str) -> Response<ProxyBody> {
    let mut response = openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        code,
        message,
    );
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("true"));
    response
}

/// Asserts that `response` is a [`shed`] answer with exactly `body`.
#[cfg(test)]
pub(crate) fn assert_shed(response: Response<ProxyBody>, body: &str) {
    use http_body_util::BodyExt;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["x-should-retry"], "true");
    assert_eq!(response.headers()["content-type"], "application/json");
    let got = futures_util::FutureExt::now_or_never(response.into_body().collect())
        .expect("a full body is ready")
        .expect("infallible")
        .to_bytes();
    assert_eq!(got, body);
}
