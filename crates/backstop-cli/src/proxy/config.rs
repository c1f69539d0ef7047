//! What the proxy serves: the stack's TOML configuration (the same file as
//! [`StackConfig`]), where credentials are read from, and how long shutdown may
//! drain.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backstop::{
    BackstopBuilder, BackstopLayer, ConfigError, DEFAULT_MAX_REQUEST_BODY, StackConfig,
};

/// How long a graceful shutdown waits for in-flight requests by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request body may take to arrive by default.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

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
    extra_roots_pem: Vec<u8>,
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The stack configuration holds no secrets (credentials are env var names).
        f.debug_struct("ProxyConfig")
            .field("stack", &self.stack)
            .field("drain_timeout", &self.drain_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
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

    /// How long shutdown waits for in-flight requests before closing them.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long a request body may take to arrive (a 408 after that).
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
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

    /// Builds the stack, validating it as a whole.
    pub(crate) fn build_layer(&mut self) -> Result<BackstopLayer, ConfigError> {
        let env = self.env.clone();
        let mut builder = self.stack.clone().into_builder(move |name| env(name))?;
        if let Some(edit) = self.edit.take() {
            builder = edit(builder);
        }
        builder.build()
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
