//! The record of every attempt the mock received.

use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, Method, Uri};
use tokio::time::Instant;

use crate::decision::AnswerSource;
use crate::fault::Fault;

/// One request the mock received, in arrival order.
///
/// Credentials (`authorization`, `x-api-key`, `api-key`, `x-goog-api-key`,
/// `proxy-authorization`) are kept but marked sensitive, so `Debug` output shows
/// `Sensitive` instead of the key.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Arrival number, from 0 for the mock's first request (not reset by
    /// [`reset_records`](crate::MockProvider::reset_records)); also in `x-request-id`.
    pub seq: u64,
    /// The request's top-level JSON `model`, if it had one.
    pub model: Option<String>,
    /// When the request had been fully read (tokio time).
    pub at: Instant,
    /// `at` minus the mock's creation time.
    pub since_start: Duration,
    /// Request method.
    pub method: Method,
    /// Request URI.
    pub uri: Uri,
    /// Request headers (credentials marked sensitive).
    pub headers: HeaderMap,
    /// Whether the request asked for `"stream": true`.
    pub stream: bool,
    /// What the mock answered. The mock's own protocol answers (413 for a body
    /// over 16 MiB, 400 for a body without a model, 404 for an unknown path) are
    /// recorded as [`Fault::Status`] with the exact status and body sent.
    pub fault: Fault,
    /// Which rule of the plan chose `fault`.
    pub source: AnswerSource,
    /// False when the request provably never reached the provider
    /// ([`Fault::ConnectRefused`]).
    pub delivered: bool,
}

impl Attempt {
    /// The value of request header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The headers that carry a key or a session at a provider or a gateway in front
/// of one (the secret ones of `backstop-fallback`'s `CREDENTIAL_HEADERS`; the mock
/// does not depend on it).
const CREDENTIAL_HEADERS: [&str; 9] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "cf-aig-authorization",
    "helicone-auth",
    "cookie",
];

/// Marks credential headers sensitive so no `Debug` output shows them.
pub(crate) fn redact(mut headers: HeaderMap) -> HeaderMap {
    for name in CREDENTIAL_HEADERS {
        let name = HeaderName::from_static(name);
        if let http::header::Entry::Occupied(mut entry) = headers.entry(name) {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_headers_never_show_in_debug_output() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer sk-secret-123".parse().unwrap());
        headers.insert("x-api-key", "sk-ant-secret-456".parse().unwrap());
        headers.append("cookie", "a=secret-1".parse().unwrap());
        headers.append("cookie", "b=secret-2".parse().unwrap());
        headers.insert("helicone-auth", "Bearer secret-789".parse().unwrap());
        headers.insert("x-attempt", "2".parse().unwrap());
        let shown = format!("{:?}", redact(headers));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("Sensitive"));
        assert!(shown.contains("\"2\""));
    }
}
