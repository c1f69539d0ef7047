//! What the proxy serves: the stack's TOML configuration (the same file as
//! [`StackConfig`]), where credentials are read from, and how long shutdown may
//! drain.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backstop::{
    BackstopBuilder, BackstopLayer, ConfigError, DEFAULT_MAX_REQUEST_BODY, StackConfig,
};

use super::ProxyError;

/// How long a graceful shutdown waits for in-flight requests by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request body may take to arrive by default.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How many chat requests may be in flight at once by default (streams count until
/// their last byte); beyond it requests are shed with a 503.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// How many client connections may be open at once by default; beyond it a new
/// connection gets an immediate 503 and is closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How long a client may take to send a request head by default (HTTP/1.1, and the
/// connection preface that chooses the protocol); an idle keep-alive connection, and
/// an HTTP/2 connection with no open stream, is closed after the same time.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write to a client may wait by default before the connection is
/// closed: the client took no byte of its response for that long.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The cap on a request head by default (request line and headers, HTTP/1.1; the
/// header list, HTTP/2): 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// How many streams one HTTP/2 connection may have open at once by default.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// The request-body bytes all chat requests may hold at once by default: 256 MiB,
/// room for 32 bodies at the largest default size, or thousands of usual ones.
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: usize = 256 * 1024 * 1024;

/// The smallest head cap accepted: hyper's HTTP/1.1 read buffer cannot be smaller.
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// The longest any of the proxy's timeouts (drain, body read, header read, write)
/// may be: a year (365.25 days, as `--write-timeout 1y` reads). Longer is a unit
/// mistake rather than a policy, and hyper adds the header read timeout to its
/// clock's `now` unchecked, so one of `10000000000000000000s` would panic on the
/// first connection. A setting over it is refused when the proxy starts
/// ([`ProxyError::TooLarge`]).
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(31_557_600);

/// The most connections [`ProxyConfig::max_connections`] accepts: what a tokio
/// semaphore, which holds the connection slots, can count (`usize::MAX >> 3`).
pub(crate) const MAX_CONNECTIONS: usize = tokio::sync::Semaphore::MAX_PERMITS;

type EnvReader = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;
type BuilderEdit = Box<dyn FnOnce(BackstopBuilder) -> BackstopBuilder + Send>;

/// The proxy's configuration.
///
/// Built from a [`StackConfig`] (usually its TOML file): every `[models.NAME]` is a
/// model the proxy serves, under that name; requests naming any other model are
/// refused with a 404 `model_not_found` (they would otherwise go nowhere). Credentials
/// are read from the environment variables the file names, when the proxy starts.
pub struct ProxyConfig {
    stack: StackConfig,
    env: EnvReader,
    edit: Option<BuilderEdit>,
    drain_timeout: Duration,
    body_read_timeout: Duration,
    limits: Limits,
    extra_roots_pem: Vec<u8>,
}

/// The bounds the listening side keeps, whatever clients do: each has a
/// `ProxyConfig` setter and a `backstop proxy` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Chat requests in flight at once (a stream until its last byte).
    pub max_in_flight: usize,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Time to send the connection preface and each HTTP/1.1 request head; also how
    /// long a connection may stay idle (HTTP/2: with no open stream).
    pub header_read_timeout: Duration,
    /// Time one write to a client may wait (the client taking no bytes) before
    /// its connection is closed.
    pub write_timeout: Duration,
    /// Bytes in a request head (HTTP/1.1) or header list (HTTP/2).
    pub max_header_bytes: usize,
    /// Streams open at once on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Request-body bytes all chat requests hold at once.
    pub max_buffered_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_buffered_body_bytes: DEFAULT_MAX_BUFFERED_BODY_BYTES,
        }
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The stack configuration holds no secrets (credentials are env var names).
        f.debug_struct("ProxyConfig")
            .field("stack", &self.stack)
            .field("drain_timeout", &self.drain_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ProxyConfig {
    /// Serves `stack`, reading credentials from the process environment.
    pub fn new(stack: StackConfig) -> Self {
        ProxyConfig {
            stack,
            env: Arc::new(|name| std::env::var(name).ok()),
            edit: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            limits: Limits::default(),
            extra_roots_pem: Vec::new(),
        }
    }

    /// Parses the stack's TOML (see [`StackConfig`] for the format).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        StackConfig::from_toml_str(text).map(ProxyConfig::new)
    }

    /// Reads credentials through `env` instead of the process environment (tests).
    pub fn with_env(
        mut self,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.env = Arc::new(env);
        self
    }

    /// Adjusts the stack's builder after the file's settings are applied, for what
    /// the file cannot say (a custom backoff, classification rules). Successive
    /// calls apply in order.
    pub fn map_stack(
        mut self,
        edit: impl FnOnce(BackstopBuilder) -> BackstopBuilder + Send + 'static,
    ) -> Self {
        self.edit = Some(match self.edit.take() {
            None => Box::new(edit),
            Some(earlier) => Box::new(move |builder| edit(earlier(builder))),
        });
        self
    }

    /// How long shutdown waits for in-flight requests before closing them. At most a
    /// year: the proxy refuses to start with more ([`ProxyError::TooLarge`]).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long a request body may take to arrive (a 408 after that). At most a
    /// year: the proxy refuses to start with more ([`ProxyError::TooLarge`]).
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// How many chat requests may be in flight at once (a stream counts until its
    /// last byte reaches the caller or the caller leaves). Beyond it a request is
    /// answered at once, before its body is read, with a 503 `proxy_overloaded`,
    /// `Retry-After: 1` and `x-should-retry: true`. At least 1.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.limits.max_in_flight = max.max(1);
        self
    }

    /// How many client connections may be open at once. A connection over it is
    /// answered at once, its request unread, with an HTTP/1.1 503
    /// `proxy_connection_limit` (`Retry-After: 1`, `x-should-retry: true`) and
    /// closed, instead of waiting in the kernel's listen backlog, where a client may
    /// sit through SYN retries for a minute. At least 1, at most `usize::MAX >> 3`
    /// (what the semaphore holding the slots counts): the proxy refuses to start
    /// with more ([`ProxyError::TooLarge`]).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.limits.max_connections = max.max(1);
        self
    }

    /// How long a client may take to send the connection preface and each HTTP/1.1
    /// request head; the connection is closed after that (an HTTP/1.1 keep-alive
    /// connection idle this long too). An HTTP/2 connection with no stream open for
    /// this long is sent GOAWAY and closed (its client answering keep-alive pings
    /// does not keep it). A slow-loris client cannot pin connections. At most a
    /// year: the proxy refuses to start with more ([`ProxyError::TooLarge`]).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.limits.header_read_timeout = timeout;
        self
    }

    /// How long one write to a client may wait before the connection is closed: a
    /// client that takes no byte of its response for this long (a frozen process, an
    /// SDK that abandoned a stream without closing it) loses its connection, and the
    /// upstream request behind it is cancelled. The clock runs only while a write
    /// waits and restarts at every write that completes, so a slow reader, or a
    /// stream whose provider is silent for minutes, is never cut. On HTTP/2 a
    /// connection is also closed when every stream open on it has waited this long
    /// for the client's flow-control window (its application stopped reading while
    /// its HTTP/2 stack still reads the socket); one stream that has, beside streams
    /// the client reads, loses its upstream request alone. Raised to 1 ms if zero (the
    /// timer's resolution). At most a year: the proxy refuses to start with more
    /// ([`ProxyError::TooLarge`]).
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.limits.write_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The cap on a request head: an HTTP/1.1 request line and headers over it are
    /// answered 431 and the connection closed; on HTTP/2 it is the advertised
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`. At least 8 KiB (hyper's minimum read buffer).
    pub fn max_header_bytes(mut self, max: usize) -> Self {
        self.limits.max_header_bytes = max.max(MIN_HEADER_BYTES);
        self
    }

    /// How many streams one HTTP/2 connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`). At least 1.
    pub fn max_concurrent_streams(mut self, max: u32) -> Self {
        self.limits.max_concurrent_streams = max.max(1);
        self
    }

    /// How many bytes of request body all chat requests may hold at once (each is
    /// kept until the stack has answered, for retries and fallback hops). A request
    /// reserves its declared `Content-Length` before its body is read and every
    /// further byte as it arrives; one the budget has no room for is answered with a
    /// 503 `proxy_body_budget`, `Retry-After: 1` and `x-should-retry: true`. Never
    /// less than [`max_request_body`](Self::max_request_body) in effect, so a body
    /// under the per-request cap always fits an idle proxy.
    pub fn max_buffered_body_bytes(mut self, max: usize) -> Self {
        self.limits.max_buffered_body_bytes = max;
        self
    }

    /// The body budget in effect: the configured one, raised to
    /// [`max_request_body`](Self::max_request_body) if it is smaller.
    pub fn body_budget(&self) -> usize {
        self.limits
            .max_buffered_body_bytes
            .max(self.max_request_body())
    }

    /// The listening side's bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Trusts these PEM certificates too, besides the system's roots: for upstreams
    /// behind a private CA (a self-hosted model server, a corporate gateway).
    pub fn with_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_roots_pem = pem.into();
        self
    }

    /// The stack configuration.
    pub fn stack(&self) -> &StackConfig {
        &self.stack
    }

    /// The cap on a request body (`max_request_body`, 8 MiB by default).
    pub fn max_request_body(&self) -> usize {
        self.stack
            .max_request_body
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY)
    }

    pub(crate) fn extra_roots_pem(&self) -> &[u8] {
        &self.extra_roots_pem
    }

    pub(crate) fn body_read(&self) -> Duration {
        self.body_read_timeout
    }

    pub(crate) fn drain(&self) -> Duration {
        self.drain_timeout
    }

    /// The served models (name → upstream), sorted by name.
    pub(crate) fn models(&self) -> Vec<(String, String)> {
        self.stack
            .models
            .iter()
            .map(|(name, section)| (name.clone(), section.upstream.clone()))
            .collect()
    }

    /// Whether any model is reached over HTTPS (so root certificates are needed).
    pub(crate) fn needs_tls(&self) -> bool {
        self.stack.models.values().any(|m| {
            m.base_uri
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("https:")
        })
    }

    /// Builds the stack, validating it as a whole, after checking the proxy's own
    /// settings.
    pub(crate) fn build_layer(&mut self) -> Result<BackstopLayer, ProxyError> {
        self.check_limits()?;
        let env = self.env.clone();
        let mut builder = self.stack.clone().into_builder(move |name| env(name))?;
        if let Some(edit) = self.edit.take() {
            builder = edit(builder);
        }
        Ok(builder.build()?)
    }

    /// Refuses a setting the proxy cannot run with, naming it and its limit: any
    /// timeout over [`MAX_TIMEOUT`] (a year), more connections than
    /// [`MAX_CONNECTIONS`]. The setters clamp what is too small; what is too large
    /// is an error, since no clamp could say what was meant.
    fn check_limits(&self) -> Result<(), ProxyError> {
        let timeouts = [
            ("--drain-timeout", self.drain_timeout, DEFAULT_DRAIN_TIMEOUT),
            (
                "--body-read-timeout",
                self.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
            ),
            (
                "--header-read-timeout",
                self.limits.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            (
                "--write-timeout",
                self.limits.write_timeout,
                DEFAULT_WRITE_TIMEOUT,
            ),
        ];
        for (setting, value, usual) in timeouts {
            if value > MAX_TIMEOUT {
                return Err(ProxyError::TooLarge {
                    setting,
                    value: humantime::format_duration(value).to_string(),
                    max: humantime::format_duration(MAX_TIMEOUT).to_string(),
                    usual: humantime::format_duration(usual).to_string(),
                });
            }
        }
        if self.limits.max_connections > MAX_CONNECTIONS {
            return Err(ProxyError::TooLarge {
                setting: "--max-connections",
                value: self.limits.max_connections.to_string(),
                max: MAX_CONNECTIONS.to_string(),
                usual: DEFAULT_MAX_CONNECTIONS.to_string(),
            });
        }
        Ok(())
    }
}

/// The configuration `backstop proxy` uses without a file: two models served by the
/// built-in mock provider at `base_url`, `gpt-4o` falling back to `claude-sonnet`,
/// with deadlines a sidecar should have.
pub fn builtin_mock(base_url: &str) -> Result<ProxyConfig, ConfigError> {
    let text = format!(
        r#"
        provider = "openai"
        total_deadline = "60s"

        [retry]
        max_attempts = 3
        deadline = "30s"
        attempt_timeout = "10s"

        [models.gpt-4o]
        upstream = "mock"
        base_uri = "{base_url}"

        [models.claude-sonnet]
        upstream = "mock"
        base_uri = "{base_url}"

        [chains]
        models = {{ "gpt-4o" = ["claude-sonnet"] }}
        "#
    );
    ProxyConfig::from_toml_str(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_mock_configuration_is_valid_and_serves_two_models() {
        let mut config = builtin_mock("http://127.0.0.1:9/v1").unwrap();
        assert_eq!(
            config.models(),
            [
                ("claude-sonnet".to_string(), "mock".to_string()),
                ("gpt-4o".to_string(), "mock".to_string())
            ]
        );
        assert!(!config.needs_tls());
        assert_eq!(config.max_request_body(), 8 * 1024 * 1024);
        config.build_layer().expect("valid");
    }

    #[test]
    fn limits_default_to_the_documented_values_and_are_clamped_to_workable_ones() {
        let config = builtin_mock("http://127.0.0.1:9/v1").unwrap();
        assert_eq!(
            config.limits(),
            Limits {
                max_in_flight: 1024,
                max_connections: 4096,
                header_read_timeout: Duration::from_secs(30),
                write_timeout: Duration::from_secs(60),
                max_header_bytes: 64 * 1024,
                max_concurrent_streams: 256,
                max_buffered_body_bytes: 256 * 1024 * 1024,
            }
        );
        assert_eq!(config.body_budget(), 256 * 1024 * 1024);
        // Zero would refuse everything; below 8 KiB hyper's HTTP/1.1 reader panics.
        let config = config
            .max_in_flight(0)
            .max_connections(0)
            .max_header_bytes(100)
            .max_concurrent_streams(0)
            .max_buffered_body_bytes(1)
            .header_read_timeout(Duration::from_millis(250))
            .write_timeout(Duration::ZERO);
        assert_eq!(
            config.limits(),
            Limits {
                max_in_flight: 1,
                max_connections: 1,
                header_read_timeout: Duration::from_millis(250),
                write_timeout: Duration::from_millis(1),
                max_header_bytes: 8 * 1024,
                max_concurrent_streams: 1,
                max_buffered_body_bytes: 1,
            }
        );
        // A budget below the per-request cap would refuse, for ever, bodies the cap
        // allows: in effect it is never smaller.
        assert_eq!(config.body_budget(), 8 * 1024 * 1024);
    }

    #[test]
    fn a_timeout_over_a_year_is_refused_by_name_and_a_year_is_not() {
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let year = humantime::parse_duration("1y").unwrap();
        type Set = fn(ProxyConfig, Duration) -> ProxyConfig;
        let settings: [(&str, Set, &str); 4] = [
            ("--drain-timeout", ProxyConfig::drain_timeout, "30s"),
            ("--body-read-timeout", ProxyConfig::body_read_timeout, "1m"),
            (
                "--header-read-timeout",
                ProxyConfig::header_read_timeout,
                "30s",
            ),
            ("--write-timeout", ProxyConfig::write_timeout, "1m"),
        ];
        for (setting, set, usual) in settings {
            let mut config = set(builtin_mock("http://127.0.0.1:9/v1").unwrap(), huge);
            let err = config.build_layer().expect_err(setting);
            assert_eq!(
                err.to_string(),
                format!(
                    "{setting} 316880878140years 3months 14days 10h 5m 52s is over the largest the proxy accepts, 1year; use e.g. {usual}"
                )
            );
            let mut config = set(builtin_mock("http://127.0.0.1:9/v1").unwrap(), year);
            config.build_layer().expect("a year is accepted");
        }
    }

    #[test]
    fn more_connections_than_a_semaphore_counts_are_refused_by_name() {
        let mut config = builtin_mock("http://127.0.0.1:9/v1")
            .unwrap()
            .max_connections(usize::MAX);
        let err = config.build_layer().expect_err("too many");
        assert_eq!(
            err.to_string(),
            format!(
                "--max-connections {} is over the largest the proxy accepts, {}; use e.g. 4096",
                usize::MAX,
                usize::MAX >> 3
            )
        );
        let mut config = builtin_mock("http://127.0.0.1:9/v1")
            .unwrap()
            .max_connections(usize::MAX >> 3);
        config.build_layer().expect("the semaphore's most");
    }

    #[test]
    fn https_targets_need_tls_and_missing_credentials_are_refused_by_name() {
        let mut config = ProxyConfig::from_toml_str(
            r#"
            [models.gpt-4o]
            upstream = "openai"
            base_uri = "https://api.openai.com/v1"
            credential = { env = "PROXY_TEST_KEY" }
            "#,
        )
        .unwrap()
        .with_env(|_| None);
        assert!(config.needs_tls());
        let err = config.build_layer().expect_err("no key");
        assert_eq!(
            err.to_string(),
            "models.gpt-4o.credential: environment variable PROXY_TEST_KEY is not set or is empty; export it or remove the credential"
        );
    }
}
