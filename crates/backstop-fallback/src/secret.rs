//! A credential that never prints.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The text every redacted credential prints as.
pub const REDACTED: &str = "[redacted]";

/// A credential value (an API key, or a whole `Bearer …` header value).
///
/// `Debug`, `Display` and `Serialize` all print [`REDACTED`], so a config can be logged
/// or dumped without leaking keys; only [`Secret::expose`] gives the value, and the
/// layer calls it once, to build a header value marked sensitive.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into().into_boxed_str())
    }

    /// The credential itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `true` when the credential is empty or only whitespace.
    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

/// `uri` fit to print: a user name and password before the host, and the whole
/// query, are replaced by [`REDACTED`]. A base URI may carry a key in either
/// (`https://user:key@host/…`, Gemini's `?key=…`), and configuration errors and
/// `Debug` output print the URI. Works on text that is not a valid URI too (an
/// error names the URI that failed to parse).
pub fn redact_uri(uri: &str) -> String {
    // The authority runs from after `scheme://` to the next `/`; user information
    // ends at its last `@` (a password may hold a `?`, so this comes first).
    let authority_start = uri.find("://").map_or(0, |i| i + 3);
    let authority_end = uri[authority_start..]
        .find('/')
        .map_or(uri.len(), |i| authority_start + i);
    let mut out = String::with_capacity(uri.len() + REDACTED.len());
    out.push_str(&uri[..authority_start]);
    let rest = match uri[authority_start..authority_end].rfind('@') {
        Some(at) => {
            out.push_str(REDACTED);
            &uri[authority_start + at..]
        }
        None => &uri[authority_start..],
    };
    match rest.split_once('?') {
        Some((before, _)) => {
            out.push_str(before);
            out.push('?');
            out.push_str(REDACTED);
        }
        None => out.push_str(rest),
    }
    out
}

/// Extra headers as `Debug` prints them: each name with [`REDACTED`] for its value,
/// since a gateway's key may ride in any header. Used by every configuration type
/// that holds extra headers.
pub struct HeaderNamesOnly<'a>(pub &'a std::collections::BTreeMap<String, String>);

impl fmt::Debug for HeaderNamesOnly<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.keys().map(|name| (name, REDACTED)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_prints_without_its_user_information_or_query() {
        assert_eq!(
            redact_uri("https://generativelanguage.googleapis.com/v1beta/openai?key=AIzaSECRET"),
            "https://generativelanguage.googleapis.com/v1beta/openai?[redacted]"
        );
        assert_eq!(
            redact_uri("https://user:pa@ss@proxy.local:8443/v1"),
            "https://[redacted]@proxy.local:8443/v1"
        );
        assert_eq!(
            redact_uri("https://api.openai.com/v1"),
            "https://api.openai.com/v1"
        );
        assert_eq!(
            redact_uri("https://api.openai.com"),
            "https://api.openai.com"
        );
        // Not a URI at all: still nothing after a `?` or before an `@` prints.
        assert_eq!(redact_uri("key@host?k=v"), "[redacted]@host?[redacted]");
        assert_eq!(redact_uri(""), "");
        assert_eq!(redact_uri("://@?"), "://[redacted]@?[redacted]");
        // A password with a `?` in it (not valid, so it is in a parse error).
        assert_eq!(
            redact_uri("https://u:p?w@host/v1"),
            "https://[redacted]@host/v1"
        );
        assert_eq!(
            redact_uri("https://host?next=/v1"),
            "https://host?[redacted]"
        );
    }

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(s.to_string(), "[redacted]");
        assert_eq!(s.expose(), "sk-live-123");
    }
}
