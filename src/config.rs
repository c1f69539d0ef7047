//! The stack's serde configuration (TOML), with durations in human form and every
//! setting validated with a message that says what to change.
//!
//! ```toml
//! provider = "openai"            # classification profile: generic, openai, azure, anthropic, gemini
//! total_deadline = "90s"         # across every attempt, wait and fallback hop
//! min_hop_time = "2s"            # a fallback hop needs this long before the deadline (default 0)
//! cooldown_waits = 16            # waits for a cooldown the provider directed (0: never)
//! max_request_body = 8388608     # bytes
//!
//! [retry]
//! preset = "interactive"         # or "batch"
//! max_attempts = 3
//! deadline = "60s"               # per model
//! attempt_timeout = "20s"        # time to the response head (or first SSE event)
//! stream_idle_timeout = "5m"     # longest silence in a response body (default none)
//! max_hint = "120s"              # longer Retry-After: give up now, let fallback act
//! jitter = "equal"               # none, full, equal, decorrelated
//! fallback_handoff = "500ms"     # a hint this long goes to the next model at once; "off"
//! min_attempt_time = "2s"        # a retry needs this long before the deadline (default 0)
//!
//! [budget]
//! window = "10s"
//! retry_ratio = 0.1
//! min_retries_per_sec = 1.0
//! # adaptive_throttle = { window = "2m", k = 2.0 }
//!
//! [breaker]
//! # window = "60s"               # default 30s, widened to two attempt timeouts
//! consecutive_failures = 5
//! open_duration = "5s"           # first open period, doubled per failed probe
//! max_open_duration = "60s"
//! hint_opens_at = "2s"           # a Retry-After this long opens a key by itself
//! pacing = true                  # or false, or { backoff = 0.95, growth = 0.03, recovery = 1.0, min_rate = 0.5 }
//!
//! [models.gpt-4o]
//! upstream = "openai"
//! base_uri = "https://api.openai.com/v1"
//! credential = { env = "OPENAI_API_KEY" }          # sent as `authorization: Bearer …`
//!
//! [models.claude-sonnet]
//! upstream = "anthropic"
//! base_uri = "https://api.anthropic.com/v1"
//! model = "claude-sonnet-4-5"
//! credential = { header = "x-api-key", env = "ANTHROPIC_API_KEY" }
//!
//! [chains]
//! models = { "gpt-4o" = ["claude-sonnet"] }
//! ```
//!
//! Credentials are never written in the file: each names an environment variable,
//! read when the layer is built.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use backstop_breaker::BreakerConfig;
use backstop_classify::{Profile, Rules, printed_name};
use backstop_fallback::{Chains, FallbackConfig, Target};
use backstop_retry::{Jitter, RetryConfig};
use serde::{Deserialize, Deserializer};

use crate::stack::{BackstopBuilder, BackstopLayer};

/// The whole stack's configuration, as read from TOML.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// The classification profile (`generic`, `openai`, `azure`, `anthropic`, `gemini`).
    #[serde(default)]
    pub provider: Option<String>,
    /// The total deadline across every attempt, wait and fallback hop.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub total_deadline: Option<Duration>,
    /// The least time before the deadline a fallback hop must have left to be
    /// started (default none).
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub min_hop_time: Option<Duration>,
    /// The cap on a request body, in bytes.
    #[serde(default)]
    pub max_request_body: Option<usize>,
    /// How many times one request may wait for a cooldown the provider directed
    /// when every model of its chain is cooling down (0: never wait).
    #[serde(default)]
    pub cooldown_waits: Option<u32>,
    /// The retry layer.
    #[serde(default)]
    pub retry: RetrySection,
    /// The retry budget.
    #[serde(default)]
    pub budget: BudgetSection,
    /// The circuit breaker.
    #[serde(default)]
    pub breaker: BreakerSection,
    /// Where each model is served.
    #[serde(default)]
    pub models: BTreeMap<String, ModelSection>,
    /// The fallback chains (see `backstop_fallback::Chains`).
    #[serde(default)]
    pub chains: Chains,
}

/// `[retry]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    /// `interactive` (default) or `batch`.
    pub preset: Option<String>,
    /// Attempts per model, the first included.
    pub max_attempts: Option<u32>,
    /// Total time for all attempts and waits on one model.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub deadline: Option<Duration>,
    /// Time one attempt may take to its response head (or first SSE event).
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub attempt_timeout: Option<Duration>,
    /// The longest the provider may leave a response body silent while the caller
    /// waits for its next bytes (default none).
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub stream_idle_timeout: Option<Duration>,
    /// The longest delay hint worth waiting on.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub max_hint: Option<Duration>,
    /// `none`, `full`, `equal` or `decorrelated`.
    pub jitter: Option<String>,
    /// Seed for the jitter (reproducible runs).
    pub seed: Option<u64>,
    /// A provider delay hint at least this long goes to the next model at once when
    /// the chain has one (default `"500ms"`); `"off"` always waits it out.
    pub fallback_handoff: Option<String>,
    /// The least time before the deadline a retry must have left to be started
    /// (default none): a retry that would most likely be cut off is not made.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub min_attempt_time: Option<Duration>,
}

/// `[budget]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    /// How long a deposit counts.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub window: Option<Duration>,
    /// Retries allowed per request, on average (0.1 = 10 %).
    pub retry_ratio: Option<f64>,
    /// Retries per second always allowed.
    pub min_retries_per_sec: Option<f64>,
    /// Google SRE adaptive throttling, off unless given.
    pub adaptive_throttle: Option<ThrottleSection>,
}

/// `[budget.adaptive_throttle]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSection {
    /// The sliding window of requests and accepts.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub window: Option<Duration>,
    /// The multiplier K (default 2).
    pub k: Option<f64>,
    /// Seed for the rejection draws.
    pub seed: Option<u64>,
}

/// `[breaker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSection {
    /// Consecutive failures that open a key.
    pub consecutive_failures: Option<u32>,
    /// Failure ratio over the window that opens a key.
    pub failure_ratio: Option<f64>,
    /// The sliding window.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub window: Option<Duration>,
    /// Calls in the window before the ratio counts.
    pub minimum_calls: Option<u32>,
    /// How long a key stays open the first time (doubled per failed probe).
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub open_duration: Option<Duration>,
    /// The longest open period the doubling reaches.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub max_open_duration: Option<Duration>,
    /// A 429/503 delay hint at least this long opens a key by itself.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub hint_opens_at: Option<Duration>,
    /// The longest cooldown a delay hint may set.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub max_hinted_cooldown: Option<Duration>,
    /// Pacing after the provider's slow-down signals: `true` (the default tuning),
    /// `false` (off), or `{ backoff, growth, recovery, min_rate }`.
    pub pacing: Option<PacingSetting>,
    /// Concurrent trial requests when half-open.
    pub half_open_probes: Option<u32>,
    /// How long a probe may take before it counts as failed.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub probe_timeout: Option<Duration>,
    /// How long a quota-exhausted key stays open.
    #[serde(default, deserialize_with = "human_duration_opt")]
    pub quota_cooldown: Option<Duration>,
}

/// `breaker.pacing`: on with the default tuning, off, or tuned.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
pub enum PacingSetting {
    /// `true`: the default tuning; `false`: no pacing.
    Enabled(bool),
    /// `{ backoff = 0.95, growth = 0.03, recovery = 1.0, min_rate = 0.5 }` (each
    /// optional).
    Tuned(PacingSection),
}

/// `breaker.pacing = { ... }`: see [`Pacing`](backstop_breaker::Pacing).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacingSection {
    /// What a slow-down signal multiplies the rate by, in (0, 1).
    pub backoff: Option<f64>,
    /// How much of itself the rate may grow per second while binding, in (0, 1].
    pub growth: Option<f64>,
    /// How fast the rate regains what the upstream last proved it takes, in [0, 1].
    pub recovery: Option<f64>,
    /// The slowest pace, in calls per second.
    pub min_rate: Option<f64>,
}

/// `[models.NAME]`: where a model is served.
///
/// Its `Debug` output prints the base URI without user information or query
/// ([`redact_uri`](backstop_fallback::secret::redact_uri): either may hold a key)
/// and the extra headers' names without their values.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The upstream's name (for records and breaker keys).
    pub upstream: String,
    /// Scheme, authority and path prefix, e.g. `https://api.openai.com/v1`.
    pub base_uri: String,
    /// The model as the upstream spells it (defaults to the section's name).
    pub model: Option<String>,
    /// The credential to send, read from the environment.
    pub credential: Option<CredentialSection>,
    /// Extra headers (`anthropic-version`, …).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl std::fmt::Debug for ModelSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use backstop_fallback::secret::{HeaderNamesOnly, redact_uri};
        f.debug_struct("ModelSection")
            .field("upstream", &self.upstream)
            .field("base_uri", &redact_uri(&self.base_uri))
            .field("model", &self.model)
            .field("credential", &self.credential)
            .field("headers", &HeaderNamesOnly(&self.headers))
            .finish()
    }
}

/// A credential read from an environment variable.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSection {
    /// The environment variable holding the key.
    pub env: String,
    /// The header (default `authorization`).
    pub header: Option<String>,
    /// Text before the key (default `Bearer ` for `authorization`, none otherwise).
    pub prefix: Option<String>,
    /// A non-secret label for records and breaker keys.
    pub label: Option<String>,
}

/// Why a configuration was refused. Every message names the setting to change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML did not parse or has an unknown key.
    Parse(String),
    /// `retry.attempt_timeout` is longer than `retry.deadline`.
    AttemptTimeoutExceedsDeadline {
        /// The attempt timeout.
        attempt_timeout: Duration,
        /// The retry deadline.
        deadline: Duration,
    },
    /// `retry.deadline` is longer than `total_deadline`.
    RetryDeadlineExceedsTotal {
        /// The retry deadline.
        retry_deadline: Duration,
        /// The total deadline.
        total: Duration,
    },
    /// `breaker.window` is shorter than two attempt timeouts.
    BreakerWindowTooShort {
        /// The breaker window.
        window: Duration,
        /// The attempt timeout.
        attempt_timeout: Duration,
    },
    /// `breaker.probe_timeout` is shorter than an attempt may take.
    ProbeTimeoutTooShort {
        /// The probe timeout.
        probe_timeout: Duration,
        /// The attempt timeout.
        attempt_timeout: Duration,
    },
    /// A model's credential names an environment variable that is not set (or empty).
    MissingCredential {
        /// The model.
        model: String,
        /// The variable.
        env: String,
    },
    /// An unknown name where one of a fixed set is expected.
    UnknownName {
        /// The setting.
        setting: &'static str,
        /// What was given.
        given: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A layer refused its part of the configuration.
    Invalid {
        /// The section.
        section: &'static str,
        /// The layer's message.
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            ConfigError::Parse(e) => write!(f, "invalid configuration: {e}"),
            ConfigError::AttemptTimeoutExceedsDeadline {
                attempt_timeout,
                deadline,
            } => write!(
                f,
                "retry.attempt_timeout ({}) is longer than retry.deadline ({}): one attempt could never finish inside the deadline; lower attempt_timeout or raise deadline",
                d(attempt_timeout),
                d(deadline)
            ),
            ConfigError::RetryDeadlineExceedsTotal {
                retry_deadline,
                total,
            } => write!(
                f,
                "retry.deadline ({}) is longer than total_deadline ({}): retries on the first model would leave no time for fallback; lower retry.deadline or raise total_deadline",
                d(retry_deadline),
                d(total)
            ),
            ConfigError::BreakerWindowTooShort {
                window,
                attempt_timeout,
            } => write!(
                f,
                "breaker.window ({}) must span at least two attempt timeouts (retry.attempt_timeout = {}): failures would slide out of the window before the attempts they belong to end; raise breaker.window",
                d(window),
                d(attempt_timeout)
            ),
            ConfigError::ProbeTimeoutTooShort {
                probe_timeout,
                attempt_timeout,
            } => write!(
                f,
                "breaker.probe_timeout ({}) is shorter than retry.attempt_timeout ({}): a healthy but slow probe would be counted as failed; raise breaker.probe_timeout",
                d(probe_timeout),
                d(attempt_timeout)
            ),
            ConfigError::MissingCredential { model, env } => write!(
                f,
                "models.{model}.credential: environment variable {env} is not set or is empty; export it or remove the credential"
            ),
            ConfigError::UnknownName {
                setting,
                given,
                expected,
            } => {
                write!(
                    f,
                    "{setting} = {given:?} is not known; expected one of: {expected}"
                )
            }
            ConfigError::Invalid { section, message } => write!(f, "[{section}]: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// `message` with every double-quoted string in it replaced by `"…"`: serde quotes
/// the value it could not use (`invalid type: string "sk-…", expected struct
/// CredentialSection`, when a key is pasted where `{ env = "…" }` belongs), while
/// names and expected values are quoted with backticks, which stay.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        // A quote inside the value is escaped by serde's Debug-style quoting.
        let mut close = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    close = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match close {
            Some(close) => {
                out.push_str("…\"");
                rest = &after[close + 1..];
            }
            None => {
                // No closing quote: nothing after the opening one is shown.
                out.push('…');
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// `error` as "line L, column C (`key = …`): reason", without the quoted source
/// line that `toml`'s own `Display` adds: the line's key (or table header) is
/// named, its value never is.
fn parse_error_without_source(text: &str, error: &toml::de::Error) -> String {
    let reason = without_quoted_values(error.message().trim_end());
    let reason = reason.as_str();
    let Some(span) = error.span() else {
        return reason.to_owned();
    };
    let bytes = text.as_bytes();
    let start = span.start.min(bytes.len());
    let line_start = bytes[..start]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line_end = bytes[line_start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| line_start + i);
    let number = bytes[..start].iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&bytes[line_start..start])
        .chars()
        .count()
        + 1;
    let source_line = String::from_utf8_lossy(&bytes[line_start..line_end]);
    let source_line = source_line.trim();
    let place = if source_line.starts_with('[') {
        format!(" (`{}`)", printed_name(source_line))
    } else if let Some((key, _)) = source_line.split_once('=') {
        format!(" (`{} = …`)", printed_name(key.trim()))
    } else {
        String::new()
    };
    format!("line {number}, column {column}{place}: {reason}")
}

impl StackConfig {
    /// Parses TOML (unknown keys are refused). The error gives the line, column and
    /// reason, but not the text of the line, which may hold a key (a base URI's
    /// `?key=…`, an extra header's value).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(parse_error_without_source(text, &e)))
    }

    /// Builds the layer, reading credentials from the process environment.
    pub fn into_layer(self) -> Result<BackstopLayer, ConfigError> {
        self.into_layer_with_env(|name| std::env::var(name).ok())
    }

    /// Builds the layer, reading credentials through `env` (tests pass a map).
    pub fn into_layer_with_env(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<BackstopLayer, ConfigError> {
        self.into_builder(env)?.build()
    }

    /// The builder this configuration describes, before the cross-layer checks.
    pub fn into_builder(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<BackstopBuilder, ConfigError> {
        let mut builder = BackstopLayer::builder();
        let profile = match self.provider.as_deref() {
            None | Some("generic") => Profile::Generic,
            Some("openai") => Profile::OpenAi,
            Some("azure") => Profile::Azure,
            Some("anthropic") => Profile::Anthropic,
            Some("gemini") => Profile::Gemini,
            Some(other) => {
                return Err(ConfigError::UnknownName {
                    setting: "provider",
                    given: other.into(),
                    expected: "generic, openai, azure, anthropic, gemini",
                });
            }
        };
        builder = builder.rules(Rules::new(profile));
        if let Some(bytes) = self.max_request_body {
            builder = builder.max_request_body(bytes);
        }
        let retry = retry_config(&self.retry)?;
        let attempt_timeout = retry.attempt_timeout();
        builder = builder.retry(retry);
        if let Some(seed) = self.retry.seed {
            builder = builder.retry_seed(seed);
        }
        let mut budget = backstop_budget::WindowedBudgetConfig::default();
        if let Some(w) = self.budget.window {
            budget.window = w;
        }
        if let Some(r) = self.budget.retry_ratio {
            budget.retry_ratio = r;
        }
        if let Some(m) = self.budget.min_retries_per_sec {
            budget.min_retries_per_sec = m;
        }
        builder = builder.budget(budget);
        if let Some(t) = &self.budget.adaptive_throttle {
            let mut config = backstop_budget::AdaptiveThrottleConfig::default();
            if let Some(w) = t.window {
                config.window = w;
            }
            if let Some(k) = t.k {
                config.k = k;
            }
            builder = builder.adaptive_throttle(config, t.seed);
        }
        builder = builder.breaker(breaker_config(&self.breaker, attempt_timeout));
        builder = builder.fallback(fallback_config(
            self.models,
            self.chains,
            self.total_deadline,
            self.min_hop_time,
            self.cooldown_waits,
            env,
        )?);
        Ok(builder)
    }
}

fn retry_config(section: &RetrySection) -> Result<RetryConfig, ConfigError> {
    let invalid = |e: backstop_retry::ConfigError| ConfigError::Invalid {
        section: "retry",
        message: e.to_string(),
    };
    let mut retry = match section.preset.as_deref() {
        None | Some("interactive") => RetryConfig::interactive(),
        Some("batch") => RetryConfig::batch(),
        Some(other) => {
            return Err(ConfigError::UnknownName {
                setting: "retry.preset",
                given: other.into(),
                expected: "interactive, batch",
            });
        }
    };
    if let Some(n) = section.max_attempts {
        retry = retry.with_max_attempts(n).map_err(invalid)?;
    }
    // Check the pair here, so the message names both settings as the file spells them.
    let deadline = section.deadline.or(retry.deadline());
    if let (Some(timeout), Some(deadline)) = (section.attempt_timeout, deadline)
        && timeout > deadline
    {
        return Err(ConfigError::AttemptTimeoutExceedsDeadline {
            attempt_timeout: timeout,
            deadline,
        });
    }
    if section.deadline.is_some() {
        retry = retry.with_deadline(section.deadline).map_err(invalid)?;
    }
    if section.attempt_timeout.is_some() {
        retry = retry
            .with_attempt_timeout(section.attempt_timeout)
            .map_err(invalid)?;
    }
    if section.stream_idle_timeout.is_some() {
        retry = retry
            .with_stream_idle_timeout(section.stream_idle_timeout)
            .map_err(invalid)?;
    }
    match section.fallback_handoff.as_deref().map(str::trim) {
        None => {}
        Some("off") => retry = retry.with_fallback_handoff(None),
        Some(text) => {
            let at_least = humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
                section: "retry",
                message: format!(
                    "fallback_handoff {text:?} is not a duration ({e}); write e.g. \"500ms\", or \"off\""
                ),
            })?;
            retry = retry.with_fallback_handoff(Some(at_least));
        }
    }
    if let Some(min_left) = section.min_attempt_time {
        retry = retry.with_min_attempt_time(min_left).map_err(invalid)?;
    }
    if let Some(max_hint) = section.max_hint {
        retry = retry.with_max_hint(max_hint);
    }
    if let Some(jitter) = section.jitter.as_deref() {
        let jitter = match jitter {
            "none" => Jitter::None,
            "full" => Jitter::Full,
            "equal" => Jitter::Equal,
            "decorrelated" => Jitter::Decorrelated,
            other => {
                return Err(ConfigError::UnknownName {
                    setting: "retry.jitter",
                    given: other.into(),
                    expected: "none, full, equal, decorrelated",
                });
            }
        };
        retry = retry.with_jitter(jitter);
    }
    Ok(retry)
}

/// The breaker's settings from its section. A window or probe timeout the file does
/// not set is widened to fit the attempt timeout (the window spans two attempts, a
/// probe gets at least one), so `attempt_timeout = "60s"` alone is a valid file; one
/// the file sets too short is refused by the stack's checks, naming both settings.
fn breaker_config(section: &BreakerSection, attempt_timeout: Option<Duration>) -> BreakerConfig {
    let mut c = crate::stack::fitted_breaker_defaults(attempt_timeout);
    macro_rules! set {
        ($($field:ident),*) => {$( if let Some(v) = section.$field { c.$field = v; } )*};
    }
    set!(
        consecutive_failures,
        failure_ratio,
        window,
        minimum_calls,
        open_duration,
        max_open_duration,
        hint_opens_at,
        max_hinted_cooldown,
        half_open_probes,
        probe_timeout,
        quota_cooldown
    );
    match section.pacing {
        None | Some(PacingSetting::Enabled(true)) => {}
        Some(PacingSetting::Enabled(false)) => c.pacing = None,
        Some(PacingSetting::Tuned(t)) => {
            let mut pacing = backstop_breaker::Pacing::default();
            if let Some(v) = t.backoff {
                pacing.backoff = v;
            }
            if let Some(v) = t.growth {
                pacing.growth = v;
            }
            if let Some(v) = t.recovery {
                pacing.recovery = v;
            }
            if let Some(v) = t.min_rate {
                pacing.min_rate = v;
            }
            c.pacing = Some(pacing);
        }
    }
    c
}

fn fallback_config(
    models: BTreeMap<String, ModelSection>,
    chains: Chains,
    total_deadline: Option<Duration>,
    min_hop_time: Option<Duration>,
    cooldown_waits: Option<u32>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<FallbackConfig, ConfigError> {
    let mut builder = FallbackConfig::builder();
    for (name, section) in models {
        let mut target = Target::new(section.upstream, section.base_uri);
        if let Some(model) = section.model {
            target = target.model(model);
        }
        if let Some(cred) = section.credential {
            let key = env(&cred.env)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| ConfigError::MissingCredential {
                    model: name.clone(),
                    env: cred.env.clone(),
                })?;
            let header = cred.header.unwrap_or_else(|| "authorization".into());
            let prefix = cred.prefix.unwrap_or_else(|| {
                if header.eq_ignore_ascii_case("authorization") {
                    "Bearer ".into()
                } else {
                    String::new()
                }
            });
            target = target.credential(header, format!("{prefix}{key}"));
            if let Some(label) = cred.label {
                target = target.credential_label(label);
            }
        }
        for (h, v) in section.headers {
            target = target.header(h, v);
        }
        builder = builder.target(name, target);
    }
    for (model, fallbacks) in chains.models {
        builder = builder.chain(model, fallbacks);
    }
    builder = builder
        .default_chain(chains.default)
        .context_chain(chains.context_length)
        .content_chain(chains.content_filter);
    if let Some(total) = total_deadline {
        builder = builder.total_deadline(total);
    }
    if let Some(waits) = cooldown_waits {
        builder = builder.cooldown_waits(waits);
    }
    if let Some(min_left) = min_hop_time {
        builder = builder.min_hop_time(min_left);
    }
    builder.build().map_err(|e| ConfigError::Invalid {
        section: match e {
            backstop_fallback::ConfigError::MinHopTimeNotBelowDeadline { .. } => "min_hop_time",
            _ => "models/chains",
        },
        message: e.to_string(),
    })
}

fn human_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::without_quoted_values;

    #[test]
    fn quoted_values_are_hidden_and_backticked_names_kept() {
        assert_eq!(
            without_quoted_values(
                r#"invalid type: string "sk-123", expected struct `CredentialSection`"#
            ),
            r#"invalid type: string "…", expected struct `CredentialSection`"#
        );
        // An escaped quote inside the value does not end it.
        assert_eq!(
            without_quoted_values(r#"bad "a\"b" and "c""#),
            r#"bad "…" and "…""#
        );
        // An unterminated quote hides everything after it.
        assert_eq!(without_quoted_values(r#"bad "sk-12"#), r#"bad "…"#);
        assert_eq!(without_quoted_values("no quotes"), "no quotes");
        assert_eq!(without_quoted_values(""), "");
    }
}
