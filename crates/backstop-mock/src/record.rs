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
/// `proxy-authorization` and the others a gateway uses) are kept but marked
/// sensitive, so `Debug` output shows `Sensitive` instead of the key. `Debug` prints
/// the URI's query with its parameters' names only (a key may ride in it, as
/// Gemini's `?key=`); the [`uri`](Attempt::uri) field holds it whole.
#[derive(Clone)]
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

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("seq", &self.seq)
            .field("model", &self.model)
            .field("at", &self.at)
            .field("since_start", &self.since_start)
            .field("method", &self.method)
            .field("uri", &QueryNamesOnly(&self.uri))
            .field("headers", &self.headers)
            .field("stream", &self.stream)
            .field("fault", &self.fault)
            .field("source", &self.source)
            .field("delivered", &self.delivered)
            .finish()
    }
}

/// A URI as `Debug` prints it in an [`Attempt`]: each query parameter's value
/// replaced by `[redacted]`, its name kept (to tell `?key=` from `?api-version=`).
struct QueryNamesOnly<'a>(&'a Uri);

impl std::fmt::Debug for QueryNamesOnly<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = self.0;
        if let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) {
            // The host and port only: never a `user:password@` before them.
            write!(f, "{scheme}://{host}")?;
            if let Some(port) = uri.port_u16() {
                write!(f, ":{port}")?;
            }
        }
        f.write_str(uri.path())?;
        let Some(query) = uri.query() else {
            return Ok(());
        };
        for (i, pair) in query.split('&').enumerate() {
            f.write_str(if i == 0 { "?" } else { "&" })?;
            match pair.split_once('=') {
                Some((name, _)) => write!(f, "{name}=[redacted]")?,
                // No name to keep: the whole parameter may be the key.
                None => f.write_str("[redacted]")?,
            }
        }
        Ok(())
    }
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

    fn shown(uri: &str) -> String {
        format!("{:?}", QueryNamesOnly(&uri.parse().unwrap()))
    }

    #[test]
    fn debug_output_keeps_query_names_and_hides_their_values() {
        assert_eq!(
            shown("https://api.test:8443/v1/models/m:generateContent?key=AIza-secret&alt=sse"),
            "https://api.test:8443/v1/models/m:generateContent?key=[redacted]&alt=[redacted]"
        );
        // A parameter with no name may be a key itself; user information never shows.
        assert_eq!(
            shown("http://user:pw-secret@host.test/v1/chat?sk-secret&api-version=1"),
            "http://host.test/v1/chat?[redacted]&api-version=[redacted]"
        );
        // A request's own URI is usually the path alone.
        assert_eq!(shown("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(
            shown("/v1/chat/completions?"),
            "/v1/chat/completions?[redacted]"
        );
    }

    #[test]
    fn an_attempt_debug_output_shows_no_key_from_its_uri_or_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-goog-api-key", "AIza-secret-1".parse().unwrap());
        let attempt = Attempt {
            seq: 7,
            model: Some("gemini-2.0-flash".into()),
            at: Instant::now(),
            since_start: Duration::from_millis(5),
            method: Method::POST,
            uri: "/v1beta/models/gemini-2.0-flash:generateContent?key=AIza-secret-2"
                .parse()
                .unwrap(),
            headers: redact(headers),
            stream: false,
            fault: Fault::Ok,
            source: AnswerSource::Plan,
            delivered: true,
        };
        let shown = format!("{attempt:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("uri: /v1beta/models/gemini-2.0-flash:generateContent?key=[redacted],"),
            "{shown}"
        );
        assert!(
            shown.contains("seq: 7,") && shown.contains("delivered: true"),
            "{shown}"
        );
        // The field itself keeps the query for assertions.
        assert_eq!(attempt.uri.query(), Some("key=AIza-secret-2"));
    }
}
