//! The answers the proxy writes itself: plain text, OpenAI-style JSON errors, and
//! the model list.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use super::body::{ErrorEnvelope, ProxyBody, full};

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
