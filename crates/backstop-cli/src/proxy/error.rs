//! Why the proxy could not start.

use std::fmt;
use std::io;

use backstop::ConfigError;

/// Why the proxy could not start. Messages say what to change and never include a
/// credential (configuration errors name the environment variable, not its value).
#[derive(Debug)]
#[non_exhaustive]
pub enum ProxyError {
    /// The stack's configuration was refused.
    Config(ConfigError),
    /// A target is reached over HTTPS but no usable root certificate was found, or
    /// the configured extra roots could not be read.
    RootCertificates(String),
    /// The listening socket's address could not be read.
    Listener(io::Error),
    /// The built-in mock provider could not start.
    Mock(io::Error),
    /// A listening-side setting is larger than the proxy can run with: a timeout
    /// over a year, more connections than a semaphore counts.
    TooLarge {
        /// The setting, as its `backstop proxy` flag names it (`--write-timeout`);
        /// the [`ProxyConfig`](super::ProxyConfig) setter has the same name.
        setting: &'static str,
        /// The value given, as the flag would take it.
        value: String,
        /// The largest value accepted, written the same way.
        max: String,
        /// A usual value, for the message (the default).
        usual: String,
    },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Config(e) => write!(f, "{e}"),
            ProxyError::RootCertificates(e) => write!(
                f,
                "TLS root certificates: {e}; install the system's CA certificates (e.g. the ca-certificates package), set SSL_CERT_FILE, or give --ca-file a PEM file"
            ),
            ProxyError::Listener(e) => write!(f, "cannot read the listening address: {e}"),
            ProxyError::Mock(e) => write!(
                f,
                "cannot start the built-in mock provider on 127.0.0.1: {e}"
            ),
            ProxyError::TooLarge {
                setting,
                value,
                max,
                usual,
            } => write!(
                f,
                "{setting} {value} is over the largest the proxy accepts, {max}; use e.g. {usual}"
            ),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Config(e) => Some(e),
            ProxyError::RootCertificates(_) | ProxyError::TooLarge { .. } => None,
            ProxyError::Listener(e) | ProxyError::Mock(e) => Some(e),
        }
    }
}

impl From<ConfigError> for ProxyError {
    fn from(e: ConfigError) -> Self {
        ProxyError::Config(e)
    }
}
