//! Targets, chains and limits: the serde form, the code builder, and validation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use crate::policy::ChainWalk;
use crate::secret::{HeaderNamesOnly, REDACTED, Secret, redact_uri};

/// The default cap on a request body the layer will rewrite (Anthropic's edge
/// refuses bodies over 32 MB, so no provider accepts more).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// How many times one request may wait for a cooldown to end by default: enough to
/// wait for an open key, look in on its probe at doubling intervals from 50 ms (about
/// ten looks for a probe that takes a minute) and take a paced slot, with room to
/// spare; bounded because each wait adds the refused hops to the request's record.
pub const DEFAULT_COOLDOWN_WAITS: u32 = 16;

/// The path prefix a caller's request is assumed to carry by default (OpenAI's
/// `/v1/chat/completions` shape); see [`FallbackConfig`] for how paths map.
pub const DEFAULT_CALLER_PATH_PREFIX: &str = "/v1";

/// Header names that carry credentials, or tie a request to the account of the
/// provider it was first meant for, always removed before a request goes to a
/// configured target (which gets its own credential and extra headers instead):
///
/// - the providers' keys: `authorization` (OpenAI, Groq, Mistral, most
///   OpenAI-compatible APIs), `api-key` (Azure OpenAI), `x-api-key` (Anthropic),
///   `x-goog-api-key` (Gemini), `ocp-apim-subscription-key` (Azure API Management);
/// - the account a key bills to: `openai-organization`, `openai-project`,
///   `x-goog-user-project`;
/// - gateways' keys in front of a provider: `cf-aig-authorization` (Cloudflare AI
///   Gateway), `helicone-auth`;
/// - the caller's own session and proxy credentials: `cookie`,
///   `proxy-authorization`.
///
/// A target that needs one of these sets it as its credential or in its extra
/// headers. The query-string form of a key is [`CREDENTIAL_QUERY_PARAMS`].
pub const CREDENTIAL_HEADERS: [&str; 12] = [
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "openai-organization",
    "openai-project",
    "x-goog-user-project",
    "cf-aig-authorization",
    "helicone-auth",
    "cookie",
    "proxy-authorization",
];

/// Query parameters that carry a key (Gemini's `?key=`, and the spellings
/// gateways and Azure Functions accept), removed from the caller's query before
/// it goes to a configured target. Names are compared ignoring ASCII case, after
/// decoding `%XX` escapes and `+`. The rest of the caller's query is kept, unless
/// the target's base URI has a query of its own, which replaces it.
pub const CREDENTIAL_QUERY_PARAMS: [&str; 8] = [
    "key",
    "api-key",
    "api_key",
    "apikey",
    "access_token",
    "token",
    "code",
    "sig",
];

/// Where one model is served: the upstream, its base URI, how it spells the model,
/// and the credential to send.
///
/// Its `Debug` output prints the base URI without user information or query (see
/// [`redact_uri`]) and the extra headers' names without their values. Serialising
/// it writes both as configured; only the credential is written redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A name for the upstream (`"openai"`, `"azure-eu"`); it goes into
    /// [`ModelRoute::upstream`](backstop_classify::ModelRoute) and the records.
    pub upstream: String,
    /// Scheme, authority and path prefix, e.g. `https://api.groq.com/openai/v1`. A
    /// query (Azure's `?api-version=…`) replaces the caller's query.
    pub base_uri: String,
    /// The model name as this upstream spells it (an Azure deployment name, a
    /// provider's versioned id). Defaults to the name the target is configured under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The credential header to send; `None` for upstreams that need none (a local
    /// server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Credential>,
    /// Headers this upstream needs besides the credential (`anthropic-version`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_headers: BTreeMap<String, String>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("upstream", &self.upstream)
            .field("base_uri", &redact_uri(&self.base_uri))
            .field("model", &self.model)
            .field("credential", &self.credential)
            .field("extra_headers", &HeaderNamesOnly(&self.extra_headers))
            .finish()
    }
}

impl Target {
    /// A target at `upstream`, served from `base_uri`, with no credential.
    pub fn new(upstream: impl Into<String>, base_uri: impl Into<String>) -> Self {
        Target {
            upstream: upstream.into(),
            base_uri: base_uri.into(),
            model: None,
            credential: None,
            extra_headers: BTreeMap::new(),
        }
    }

    /// Sets how this upstream spells the model.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets the credential header (e.g. `authorization` with `Bearer sk-…`, or
    /// `api-key`, or `x-api-key`).
    pub fn credential(mut self, header: impl Into<String>, value: impl Into<Secret>) -> Self {
        self.credential = Some(Credential {
            header: header.into(),
            value: value.into(),
            label: None,
        });
        self
    }

    /// Sets the non-secret label of the credential (for [`ModelRoute::credential`](backstop_classify::ModelRoute)).
    /// Call after [`Target::credential`]; without a credential it does nothing.
    pub fn credential_label(mut self, label: impl Into<String>) -> Self {
        if let Some(c) = &mut self.credential {
            c.label = Some(label.into());
        }
        self
    }

    /// Adds a header this upstream needs.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_headers.insert(name.into(), value.into());
        self
    }
}

/// A credential: the header that carries it, its (secret) value and a label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The header name (`authorization`, `api-key`, `x-api-key`, …).
    pub header: String,
    /// The whole header value, e.g. `Bearer sk-…`. Redacted in every printout.
    pub value: Secret,
    /// A non-secret name for this credential, used in records and breaker keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// The fallback chains.
///
/// Chains are not transitive: a request walks the chain of the model it asked for
/// (or the default chain), switching to the context-length or content-filter chain
/// when a failure calls for it; the chain of a fallback model is never followed. So
/// chains that name each other cannot loop, and every model is tried at most once
/// per request whatever the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chains {
    /// Per requested model, the models to try after it, in order.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, Vec<String>>,
    /// The chain for requested models that have none of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<String>,
    /// Larger-context models, tried after a context-length failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_length: Vec<String>,
    /// Models tried after a content-policy refusal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_filter: Vec<String>,
}

/// Which chain a configuration error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainName {
    /// The chain of one requested model.
    Model(String),
    /// The default chain.
    Default,
    /// The context-length chain.
    ContextLength,
    /// The content-filter chain.
    ContentFilter,
}

impl fmt::Display for ChainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainName::Model(m) => write!(f, "chains.models.\"{m}\""),
            ChainName::Default => f.write_str("chains.default"),
            ChainName::ContextLength => f.write_str("chains.context_length"),
            ChainName::ContentFilter => f.write_str("chains.content_filter"),
        }
    }
}

/// Why a configuration was refused. Messages name the offending entry and never
/// include a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A chain names a model that has no target.
    UnknownModel {
        /// The chain.
        chain: ChainName,
        /// The model it names.
        model: String,
    },
    /// A chain names a model twice, or names the model it is the chain of.
    RepeatedModel {
        /// The chain.
        chain: ChainName,
        /// The repeated model.
        model: String,
    },
    /// A target's credential value is empty.
    EmptyCredential {
        /// The target's model.
        model: String,
    },
    /// A credential value cannot be sent as a header value (e.g. it has a newline).
    InvalidCredential {
        /// The target's model.
        model: String,
    },
    /// A header name or an extra header value is not valid HTTP.
    InvalidHeader {
        /// The target's model.
        model: String,
        /// The header name as configured.
        header: String,
    },
    /// A base URI is not absolute (scheme and authority) or cannot be parsed.
    InvalidBaseUri {
        /// The target's model.
        model: String,
        /// The URI as configured, with its user information and query redacted
        /// ([`redact_uri`]): either may hold a key.
        uri: String,
    },
    /// A model name, upstream name or provider spelling is empty.
    EmptyName {
        /// The target's model (possibly the empty string).
        model: String,
    },
    /// A duration in the serde form could not be parsed.
    InvalidDuration {
        /// The text as configured.
        text: String,
    },
    /// `max_body_bytes` is zero.
    ZeroBodyLimit,
    /// `min_hop_time` in the serde form could not be parsed.
    InvalidMinHopTime {
        /// The text as configured.
        text: String,
    },
    /// `min_hop_time` is not shorter than `total_deadline`: no fallback hop could
    /// ever start.
    MinHopTimeNotBelowDeadline {
        /// The minimum time left given.
        min_hop_time: Duration,
        /// The total deadline.
        total_deadline: Duration,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownModel { chain, model } => write!(
                f,
                "{chain} names model \"{model}\", which has no target; add targets.\"{model}\" or remove it from the chain"
            ),
            ConfigError::RepeatedModel { chain, model } => write!(
                f,
                "{chain} names model \"{model}\" more than once (a model's own chain must not name it); each model is tried at most once, so list it once"
            ),
            ConfigError::EmptyCredential { model } => write!(
                f,
                "targets.\"{model}\".credential.value is empty; set the key or remove the credential"
            ),
            ConfigError::InvalidCredential { model } => write!(
                f,
                "targets.\"{model}\".credential.value is not a valid HTTP header value (control characters or newlines?); check the key"
            ),
            ConfigError::InvalidHeader { model, header } => write!(
                f,
                "targets.\"{model}\" has header \"{header}\" whose name or value is not valid HTTP; fix or remove it"
            ),
            ConfigError::InvalidBaseUri { model, uri } => write!(
                f,
                "targets.\"{model}\".base_uri \"{uri}\" is not an absolute URI like https://api.example.com/v1; give scheme, host and path prefix"
            ),
            ConfigError::EmptyName { model } => write!(
                f,
                "target \"{model}\" has an empty model, upstream or provider model name; every name must be non-empty"
            ),
            ConfigError::InvalidDuration { text } => write!(
                f,
                "total_deadline \"{text}\" is not a duration; write it like \"30s\" or \"2m\""
            ),
            ConfigError::ZeroBodyLimit => {
                f.write_str("max_body_bytes is 0; set it to the largest request body to rewrite")
            }
            ConfigError::InvalidMinHopTime { text } => write!(
                f,
                "min_hop_time \"{text}\" is not a duration; write it like \"2s\" or \"500ms\""
            ),
            ConfigError::MinHopTimeNotBelowDeadline {
                min_hop_time,
                total_deadline,
            } => write!(
                f,
                "min_hop_time ({}) must be shorter than total_deadline ({}), or no fallback hop could ever start; lower it or raise total_deadline",
                humantime::format_duration(*min_hop_time),
                humantime::format_duration(*total_deadline)
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration of the fallback layer.
///
/// Build it in code with [`FallbackConfig::builder`] or deserialize it (TOML, JSON,
/// …); both validate, so a `FallbackConfig` that exists is usable. Serializing it
/// redacts every credential.
///
/// **Paths.** A hop to a target sends to the target's scheme and authority, at the
/// target's path prefix followed by the endpoint the caller asked for: the caller's
/// path with `caller_path_prefix` (default `/v1`) removed when it starts with it.
/// So a caller's `/v1/chat/completions` goes to `https://api.groq.com/openai/v1`
/// as `/openai/v1/chat/completions`. A target's query, when it has one, replaces
/// the caller's (Azure's `api-version`); otherwise the caller's query is kept.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "RawConfig", into = "RawConfig")]
pub struct FallbackConfig {
    targets: BTreeMap<String, Target>,
    chains: Chains,
    total_deadline: Option<Duration>,
    max_body_bytes: usize,
    caller_path_prefix: String,
    cooldown_waits: u32,
    min_hop_time: Duration,
    pub(crate) compiled: Arc<Compiled>,
}

impl fmt::Debug for FallbackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Target's derived Debug goes through Secret's, which redacts.
        f.debug_struct("FallbackConfig")
            .field("targets", &self.targets)
            .field("chains", &self.chains)
            .field("total_deadline", &self.total_deadline)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("caller_path_prefix", &self.caller_path_prefix)
            .field("cooldown_waits", &self.cooldown_waits)
            .field("min_hop_time", &self.min_hop_time)
            .finish()
    }
}

impl FallbackConfig {
    /// A builder with no targets, empty chains, no total deadline and the default
    /// limits.
    pub fn builder() -> FallbackConfigBuilder {
        FallbackConfigBuilder {
            raw: RawConfig::default(),
            total_deadline: None,
            min_hop_time: Duration::ZERO,
        }
    }

    /// The targets, by model name.
    pub fn targets(&self) -> &BTreeMap<String, Target> {
        &self.targets
    }

    /// The chains.
    pub fn chains(&self) -> &Chains {
        &self.chains
    }

    /// The total deadline across all hops of a request, if one is set.
    pub fn total_deadline(&self) -> Option<Duration> {
        self.total_deadline
    }

    /// The largest body the layer will rewrite.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// How many times one request may wait for a cooldown to end (see the crate
    /// docs, *When every model is cooling down*); 0 never waits.
    pub fn cooldown_waits(&self) -> u32 {
        self.cooldown_waits
    }

    /// The least time before the total deadline a fallback hop must have left to be
    /// started ([`FallbackConfigBuilder::min_hop_time`]; zero by default).
    pub fn min_hop_time(&self) -> Duration {
        self.min_hop_time
    }

    /// The ordered list of models a request for `requested` may be tried on through
    /// its ordinary chain (the requested model first), without the special chains.
    pub fn chain_for<'a>(&'a self, requested: &'a str) -> Vec<&'a str> {
        let mut out = vec![requested];
        out.extend(self.compiled.chain(requested).iter().map(|m| &**m));
        out
    }
}

/// Builds a [`FallbackConfig`] in code.
#[derive(Debug)]
pub struct FallbackConfigBuilder {
    raw: RawConfig,
    total_deadline: Option<Duration>,
    min_hop_time: Duration,
}

impl FallbackConfigBuilder {
    /// Adds (or replaces) the target serving `model`.
    pub fn target(mut self, model: impl Into<String>, target: Target) -> Self {
        self.raw.targets.insert(model.into(), target);
        self
    }

    /// Sets the chain of `model`: the models tried after it, in order.
    pub fn chain<I, M>(mut self, model: impl Into<String>, fallbacks: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.raw.chains.models.insert(
            model.into(),
            fallbacks.into_iter().map(Into::into).collect(),
        );
        self
    }

    /// Sets the default chain.
    pub fn default_chain<I: IntoIterator<Item = M>, M: Into<String>>(mut self, models: I) -> Self {
        self.raw.chains.default = models.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the context-length chain.
    pub fn context_chain<I: IntoIterator<Item = M>, M: Into<String>>(mut self, models: I) -> Self {
        self.raw.chains.context_length = models.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the content-filter chain.
    pub fn content_chain<I: IntoIterator<Item = M>, M: Into<String>>(mut self, models: I) -> Self {
        self.raw.chains.content_filter = models.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the total deadline across all hops of a request.
    pub fn total_deadline(mut self, deadline: Duration) -> Self {
        self.total_deadline = Some(deadline);
        self
    }

    /// Sets the largest body the layer will rewrite.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.raw.max_body_bytes = Some(limit);
        self
    }

    /// Sets the caller path prefix removed before a target's prefix is put in front.
    pub fn caller_path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.raw.caller_path_prefix = Some(prefix.into());
        self
    }

    /// Sets how many times one request may wait for a cooldown to end when every
    /// model of its chain is cooling down (default
    /// [`DEFAULT_COOLDOWN_WAITS`]); 0 fails at once instead, as a gateway without
    /// waiting would.
    pub fn cooldown_waits(mut self, waits: u32) -> Self {
        self.raw.cooldown_waits = Some(waits);
        self
    }

    /// Sets the least time before the total deadline (or the request's own
    /// [`Deadline`](backstop_classify::Deadline), whichever is sooner) that a hop to
    /// another model, or a new round after a cooldown wait, must have left to be
    /// started. A hop that would start later is not made: the caller gets the last
    /// provider answer (or the failure) at once, with
    /// [`ChainStop::DeadlineReached`](crate::ChainStop::DeadlineReached), instead of a
    /// call that the deadline would most likely cut off after the provider has served
    /// (and billed) it. Default zero: any time before the deadline will do; a value
    /// near the slow end of your providers' time to a response head avoids nearly all
    /// of those calls (in the chaos soak, whose answers take 20–900 ms, 1 s here and
    /// 500 ms for retries: 834 → 13
    /// answers thrown away, and 8 % more requests served; see `RELIABILITY.md`). The
    /// first hop (the caller's own request) is sent at once whatever the time left;
    /// only waiting for it (a cooldown round) keeps to the minimum. With a total deadline it
    /// must be shorter than it. The hop's request carries its latest useful start
    /// ([`LatestStart`](backstop_classify::LatestStart)), so a breaker books no paced
    /// slot for a hop that would not be made.
    pub fn min_hop_time(mut self, min_left: Duration) -> Self {
        self.min_hop_time = min_left;
        self
    }

    /// Validates and builds the configuration.
    pub fn build(self) -> Result<FallbackConfig, ConfigError> {
        FallbackConfig::validate(self.raw, self.total_deadline, self.min_hop_time)
    }
}

/// The serde form.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    targets: BTreeMap<String, Target>,
    #[serde(default)]
    chains: Chains,
    /// A duration such as "60s" (humantime syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    caller_path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cooldown_waits: Option<u32>,
    /// A duration such as "2s" (humantime syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_hop_time: Option<String>,
}

impl TryFrom<RawConfig> for FallbackConfig {
    type Error = ConfigError;

    fn try_from(mut raw: RawConfig) -> Result<Self, ConfigError> {
        let deadline = match raw.total_deadline.take() {
            None => None,
            Some(text) => Some(
                humantime::parse_duration(text.trim())
                    .map_err(|_| ConfigError::InvalidDuration { text })?,
            ),
        };
        let min_hop_time = match raw.min_hop_time.take() {
            None => Duration::ZERO,
            Some(text) => humantime::parse_duration(text.trim())
                .map_err(|_| ConfigError::InvalidMinHopTime { text })?,
        };
        FallbackConfig::validate(raw, deadline, min_hop_time)
    }
}

impl From<FallbackConfig> for RawConfig {
    fn from(c: FallbackConfig) -> Self {
        RawConfig {
            targets: c.targets,
            chains: c.chains,
            total_deadline: c
                .total_deadline
                .map(|d| humantime::format_duration(d).to_string()),
            max_body_bytes: Some(c.max_body_bytes),
            caller_path_prefix: Some(c.caller_path_prefix),
            cooldown_waits: Some(c.cooldown_waits),
            min_hop_time: (!c.min_hop_time.is_zero())
                .then(|| humantime::format_duration(c.min_hop_time).to_string()),
        }
    }
}

impl FallbackConfig {
    fn validate(
        raw: RawConfig,
        total_deadline: Option<Duration>,
        min_hop_time: Duration,
    ) -> Result<Self, ConfigError> {
        if let Some(total_deadline) = total_deadline
            && !min_hop_time.is_zero()
            && min_hop_time >= total_deadline
        {
            return Err(ConfigError::MinHopTimeNotBelowDeadline {
                min_hop_time,
                total_deadline,
            });
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        let cooldown_waits = raw.cooldown_waits.unwrap_or(DEFAULT_COOLDOWN_WAITS);
        if max_body_bytes == 0 {
            return Err(ConfigError::ZeroBodyLimit);
        }
        let caller_path_prefix = trim_prefix(
            raw.caller_path_prefix
                .as_deref()
                .unwrap_or(DEFAULT_CALLER_PATH_PREFIX),
        )
        .to_owned();

        let mut targets = HashMap::new();
        let mut removed_headers = RemovedHeaders::default();
        for name in CREDENTIAL_HEADERS {
            removed_headers.add(&HeaderName::from_static(name));
        }
        for (model, target) in &raw.targets {
            let compiled = CompiledTarget::compile(model, target)?;
            if let Some((name, _)) = &compiled.credential {
                removed_headers.add(name);
            }
            for (name, _) in &compiled.extra_headers {
                removed_headers.add(name);
            }
            targets.insert(Arc::<str>::from(model.as_str()), compiled);
        }

        let check = |chain: ChainName, own: Option<&str>, list: &[String]| {
            let mut seen: HashSet<&str> = own.into_iter().collect();
            for model in list {
                if !raw.targets.contains_key(model) {
                    return Err(ConfigError::UnknownModel {
                        chain: chain.clone(),
                        model: model.clone(),
                    });
                }
                if !seen.insert(model) {
                    return Err(ConfigError::RepeatedModel {
                        chain: chain.clone(),
                        model: model.clone(),
                    });
                }
            }
            Ok(list
                .iter()
                .map(|m| Arc::<str>::from(m.as_str()))
                .collect::<Vec<_>>())
        };
        let mut chains = HashMap::new();
        for (model, list) in &raw.chains.models {
            if model.is_empty() {
                return Err(ConfigError::EmptyName {
                    model: model.clone(),
                });
            }
            let compiled = check(ChainName::Model(model.clone()), Some(model), list)?;
            chains.insert(Arc::<str>::from(model.as_str()), compiled);
        }
        let default_chain = check(ChainName::Default, None, &raw.chains.default)?;
        let context_chain = check(ChainName::ContextLength, None, &raw.chains.context_length)?;
        let content_chain = check(ChainName::ContentFilter, None, &raw.chains.content_filter)?;

        let mut compiled = Compiled {
            targets,
            chains,
            default_chain,
            context_chain,
            content_chain,
            removed_headers,
            total_deadline,
            max_body_bytes,
            caller_path_prefix: caller_path_prefix.clone(),
            cooldown_waits,
            min_hop_time,
        };
        // Whether each target's model has a chain, asked of the same walk the layer
        // uses per request, once here.
        let chained: Vec<Arc<str>> = compiled
            .targets
            .keys()
            .filter(|model| ChainWalk::new(Arc::clone(model)).has_next(&compiled))
            .cloned()
            .collect();
        for model in chained {
            if let Some(target) = compiled.targets.get_mut(&model) {
                target.has_chain = true;
            }
        }
        Ok(FallbackConfig {
            targets: raw.targets,
            chains: raw.chains,
            total_deadline,
            max_body_bytes,
            caller_path_prefix,
            cooldown_waits,
            min_hop_time,
            compiled: Arc::new(compiled),
        })
    }
}

/// A path prefix without its trailing slash (`/` becomes empty).
fn trim_prefix(p: &str) -> &str {
    p.trim_end_matches('/')
}

/// The runtime form: parsed URIs and header values, chains as shared names.
pub(crate) struct Compiled {
    pub(crate) targets: HashMap<Arc<str>, CompiledTarget>,
    pub(crate) chains: HashMap<Arc<str>, Vec<Arc<str>>>,
    pub(crate) default_chain: Vec<Arc<str>>,
    pub(crate) context_chain: Vec<Arc<str>>,
    pub(crate) content_chain: Vec<Arc<str>>,
    /// Removed from the caller's headers before any hop to a configured target:
    /// every header that carries a credential anywhere (so one provider's key never
    /// reaches another), and every extra header any target sets (provider-specific).
    pub(crate) removed_headers: RemovedHeaders,
    pub(crate) total_deadline: Option<Duration>,
    pub(crate) max_body_bytes: usize,
    pub(crate) caller_path_prefix: String,
    pub(crate) cooldown_waits: u32,
    pub(crate) min_hop_time: Duration,
}

/// A small set of header names, asked about every header of every hop: most of a
/// request's headers have a length no listed name has, and are passed over
/// without a comparison.
#[derive(Default)]
pub(crate) struct RemovedHeaders {
    names: Vec<HeaderName>,
    /// Bit `n` is set when a listed name is `n` bytes long (bit 63: 63 or more).
    lengths: u64,
}

impl RemovedHeaders {
    fn length_bit(name: &HeaderName) -> u64 {
        1 << name.as_str().len().min(63)
    }

    fn add(&mut self, name: &HeaderName) {
        if !self.names.contains(name) {
            self.lengths |= Self::length_bit(name);
            self.names.push(name.clone());
        }
    }

    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        self.lengths & Self::length_bit(name) != 0 && self.names.contains(name)
    }
}

impl Compiled {
    /// The ordinary chain of a requested model.
    pub(crate) fn chain(&self, requested: &str) -> &[Arc<str>] {
        self.chains
            .get(requested)
            .map(Vec::as_slice)
            .unwrap_or(&self.default_chain)
    }
}

/// One target, ready to apply to a request.
pub(crate) struct CompiledTarget {
    pub(crate) upstream: Arc<str>,
    pub(crate) provider_model: Arc<str>,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// Without a trailing slash; empty for the root.
    pub(crate) path_prefix: String,
    pub(crate) query: Option<String>,
    /// The header value is marked sensitive (HPACK never indexes it; `Debug`
    /// prints `Sensitive`).
    pub(crate) credential: Option<(HeaderName, HeaderValue)>,
    pub(crate) credential_label: Option<Arc<str>>,
    pub(crate) extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether a request for this model has another model to fall back to (its
    /// ordinary chain, or the default chain): worked out once here, so a hop's
    /// `FallbackAvailable` costs no chain lookup per request.
    pub(crate) has_chain: bool,
}

impl fmt::Debug for CompiledTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledTarget")
            .field("upstream", &self.upstream)
            .field("provider_model", &self.provider_model)
            .field("authority", &redact_uri(self.authority.as_str()))
            .field(
                "credential",
                &self.credential.as_ref().map(|(n, _)| (n, REDACTED)),
            )
            .finish_non_exhaustive()
    }
}

impl CompiledTarget {
    fn compile(model: &str, t: &Target) -> Result<Self, ConfigError> {
        let provider_model = t.model.as_deref().unwrap_or(model);
        if model.is_empty() || t.upstream.is_empty() || provider_model.is_empty() {
            return Err(ConfigError::EmptyName {
                model: model.to_owned(),
            });
        }
        let bad_uri = || ConfigError::InvalidBaseUri {
            model: model.to_owned(),
            uri: redact_uri(&t.base_uri),
        };
        let uri: Uri = t.base_uri.parse().map_err(|_| bad_uri())?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(bad_uri());
        };
        let (path_prefix, query) = match &parts.path_and_query {
            Some(pq) => (
                trim_prefix(pq.path()).to_owned(),
                pq.query().map(str::to_owned),
            ),
            None => (String::new(), None),
        };
        let credential = match &t.credential {
            None => None,
            Some(c) => {
                if c.value.is_blank() {
                    return Err(ConfigError::EmptyCredential {
                        model: model.to_owned(),
                    });
                }
                let name = HeaderName::try_from(c.header.trim()).map_err(|_| {
                    ConfigError::InvalidHeader {
                        model: model.to_owned(),
                        header: c.header.clone(),
                    }
                })?;
                let mut value = HeaderValue::try_from(c.value.expose()).map_err(|_| {
                    ConfigError::InvalidCredential {
                        model: model.to_owned(),
                    }
                })?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        let mut extra_headers = Vec::new();
        for (name, value) in &t.extra_headers {
            let invalid = || ConfigError::InvalidHeader {
                model: model.to_owned(),
                header: name.clone(),
            };
            let n = HeaderName::try_from(name.trim()).map_err(|_| invalid())?;
            let mut v = HeaderValue::try_from(value.as_str()).map_err(|_| invalid())?;
            // A gateway's key may ride in any header: HPACK never indexes these
            // values, and `Debug` does not print them.
            v.set_sensitive(true);
            extra_headers.push((n, v));
        }
        Ok(CompiledTarget {
            // Set once the chains are compiled.
            has_chain: false,
            upstream: Arc::from(t.upstream.as_str()),
            provider_model: Arc::from(provider_model),
            scheme,
            authority,
            path_prefix,
            query,
            credential,
            credential_label: t
                .credential
                .as_ref()
                .and_then(|c| c.label.as_deref())
                .map(Arc::from),
            extra_headers,
        })
    }

    /// The URI of a hop to this target for a caller's `original` URI.
    pub(crate) fn uri_for(&self, original: &Uri, caller_prefix: &str) -> Result<Uri, http::Error> {
        let path = original.path();
        let suffix = match path.strip_prefix(caller_prefix) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ if path == "/" => "",
            _ => path,
        };
        let caller_query = original.query().and_then(without_credentials);
        let query = self.query.as_deref().or(caller_query.as_deref());
        // The usual case: the target's path prefix is the caller's, so the hop's path
        // and query are the caller's own. Reusing them skips an allocation and a
        // re-parse on every request.
        let same_path = if self.path_prefix.is_empty() && suffix.is_empty() {
            path == "/"
        } else {
            path.len() == self.path_prefix.len() + suffix.len()
                && path.starts_with(&self.path_prefix)
                && path.ends_with(suffix)
        };
        if same_path
            && query == original.query()
            && let Some(pq) = original.path_and_query()
        {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(pq.clone());
            return Ok(Uri::from_parts(parts)?);
        }
        let mut pq = String::with_capacity(self.path_prefix.len() + suffix.len() + 1);
        pq.push_str(&self.path_prefix);
        pq.push_str(suffix);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(pq)?)
            .build()
    }
}

/// `query` without its [`CREDENTIAL_QUERY_PARAMS`]; borrowed when it has none (the
/// usual case costs one pass over the query and no allocation), `None` when
/// nothing else is left.
fn without_credentials(query: &str) -> Option<std::borrow::Cow<'_, str>> {
    let is_credential = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        is_credential_param(name)
    };
    if !query.split('&').any(is_credential) {
        return Some(std::borrow::Cow::Borrowed(query));
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && !is_credential(pair))
        .collect();
    (!kept.is_empty()).then(|| std::borrow::Cow::Owned(kept.join("&")))
}

/// Whether a query parameter's (still encoded) name is one of
/// [`CREDENTIAL_QUERY_PARAMS`].
fn is_credential_param(encoded: &str) -> bool {
    // The longest listed name is 12 bytes, and an escape encodes one byte in
    // three: a longer encoded name cannot be one of them.
    const LONGEST: usize = 12;
    if encoded.len() > 3 * LONGEST {
        return false;
    }
    let mut name = [0u8; 3 * LONGEST];
    let mut len = 0;
    let bytes = encoded.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let byte = match bytes[i] {
            b'%' => match (
                bytes.get(i + 1).and_then(|h| (*h as char).to_digit(16)),
                bytes.get(i + 2).and_then(|l| (*l as char).to_digit(16)),
            ) {
                (Some(high), Some(low)) => {
                    i += 2;
                    (high * 16 + low) as u8
                }
                _ => b'%',
            },
            b'+' => b' ',
            other => other,
        };
        name[len] = byte.to_ascii_lowercase();
        len += 1;
        i += 1;
    }
    CREDENTIAL_QUERY_PARAMS
        .iter()
        .any(|listed| listed.as_bytes() == &name[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai() -> Target {
        Target::new("openai", "https://api.openai.com/v1")
            .credential("authorization", "Bearer sk-A")
    }

    #[test]
    fn chain_naming_an_unknown_model_is_refused() {
        let err = FallbackConfig::builder()
            .target("a", openai())
            .chain("a", ["b"])
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownModel {
                chain: ChainName::Model("a".into()),
                model: "b".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "chains.models.\"a\" names model \"b\", which has no target; add targets.\"b\" or remove it from the chain"
        );
    }

    #[test]
    fn chain_naming_a_model_twice_or_itself_is_refused() {
        let twice = FallbackConfig::builder()
            .target("a", openai())
            .target("b", openai())
            .default_chain(["b", "a", "b"])
            .build()
            .unwrap_err();
        assert_eq!(
            twice,
            ConfigError::RepeatedModel {
                chain: ChainName::Default,
                model: "b".into()
            }
        );
        let itself = FallbackConfig::builder()
            .target("a", openai())
            .chain("a", ["a"])
            .build()
            .unwrap_err();
        assert!(matches!(itself, ConfigError::RepeatedModel { .. }));
    }

    #[test]
    fn chains_that_name_each_other_are_accepted_because_chains_are_not_followed() {
        let config = FallbackConfig::builder()
            .target("a", openai())
            .target("b", openai())
            .chain("a", ["b"])
            .chain("b", ["a"])
            .build()
            .unwrap();
        assert_eq!(config.chain_for("a"), ["a", "b"]);
        assert_eq!(config.chain_for("b"), ["b", "a"]);
    }

    #[test]
    fn blank_credential_is_refused() {
        let err = FallbackConfig::builder()
            .target(
                "a",
                Target::new("x", "https://x.example").credential("api-key", " "),
            )
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::EmptyCredential { model: "a".into() });
    }

    #[test]
    fn credential_with_newline_is_refused_without_echoing_it() {
        let err = FallbackConfig::builder()
            .target(
                "a",
                Target::new("x", "https://x.example").credential("api-key", "sk-\nSECRET"),
            )
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::InvalidCredential { model: "a".into() });
        assert!(!err.to_string().contains("SECRET"));
        assert!(!format!("{err:?}").contains("SECRET"));
    }

    #[test]
    fn relative_base_uri_is_refused() {
        let err = FallbackConfig::builder()
            .target("a", Target::new("x", "/v1"))
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::InvalidBaseUri { .. }));
    }

    #[test]
    fn path_maps_prefix_plus_endpoint_and_target_query_wins() {
        let groq =
            CompiledTarget::compile("m", &Target::new("groq", "https://api.groq.com/openai/v1/"))
                .unwrap();
        let azure = CompiledTarget::compile(
            "m",
            &Target::new(
                "azure",
                "https://x.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21",
            ),
        )
        .unwrap();
        let original: Uri = "http://proxy.local/v1/chat/completions?trace=1"
            .parse()
            .unwrap();
        assert_eq!(
            groq.uri_for(&original, "/v1").unwrap().to_string(),
            "https://api.groq.com/openai/v1/chat/completions?trace=1"
        );
        assert_eq!(
            azure.uri_for(&original, "/v1").unwrap().to_string(),
            "https://x.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
        );
        // A path that does not start with the caller prefix is kept whole; "/v10" is
        // not under "/v1".
        let other: Uri = "/v10/chat".parse().unwrap();
        assert_eq!(
            groq.uri_for(&other, "/v1").unwrap().to_string(),
            "https://api.groq.com/openai/v1/v10/chat"
        );
    }

    #[test]
    fn a_key_in_the_callers_query_never_reaches_a_target() {
        let groq =
            CompiledTarget::compile("m", &Target::new("groq", "https://api.groq.com/openai/v1"))
                .unwrap();
        let hop = |uri: &str| {
            let original: Uri = uri.parse().unwrap();
            groq.uri_for(&original, "/v1").unwrap().to_string()
        };
        let target = "https://api.groq.com/openai/v1/chat/completions";
        assert_eq!(hop("/v1/chat/completions?key=AIzaS3CRET"), target);
        assert_eq!(
            hop("/v1/chat/completions?trace=1&key=AIzaS3CRET&alt=sse"),
            format!("{target}?trace=1&alt=sse")
        );
        // Every listed spelling, in any case, escaped or not, with or without a value.
        for pair in [
            "KEY=s",
            "api-key=s",
            "api_key=s",
            "apikey=s",
            "Access_Token=s",
            "token=s",
            "code=s",
            "sig=s",
            "%6Bey=s",
            "%6b%65%79=s",
            "api%2Dkey=s",
            "key",
            "key=",
        ] {
            assert_eq!(
                hop(&format!("/v1/chat/completions?{pair}&n=2")),
                format!("{target}?n=2"),
                "{pair}"
            );
        }
        // Names that only look alike stay, and so does an empty pair's neighbour.
        assert_eq!(
            hop("/v1/chat/completions?keys=1&monkey=2&key_id=3&&n=4"),
            format!("{target}?keys=1&monkey=2&key_id=3&&n=4")
        );
        assert_eq!(
            hop("/v1/chat/completions?n=1&&key=s"),
            format!("{target}?n=1")
        );
        // A broken escape is not decoded, and an overlong name is not a listed one.
        assert_eq!(hop("/v1/chat/completions?%4=1"), format!("{target}?%4=1"));
        let long = "k".repeat(100);
        assert_eq!(
            hop(&format!("/v1/chat/completions?{long}=1")),
            format!("{target}?{long}=1")
        );
    }

    proptest::proptest! {
        /// Against an oracle that knows by construction which names are keys: every
        /// key pair goes, every other pair stays in order, and a query without a key
        /// is handed on unchanged.
        #[test]
        fn a_query_keeps_exactly_its_pairs_that_are_not_keys(
            pairs in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        ("key", true), ("KEY", true), ("Key", true), ("%6Bey", true),
                        ("%6b%65%79", true), ("api-key", true), ("api%2Dkey", true),
                        ("api_key", true), ("apikey", true), ("APIKEY", true),
                        ("access_token", true), ("token", true), ("code", true),
                        ("sig", true), ("keys", false), ("monkey", false), ("k", false),
                        ("ke", false), ("key_id", false), ("%4", false), ("%zz", false),
                        ("+key", false), ("key+", false), ("trace", false), ("alt", false),
                        ("", false),
                    ]),
                    proptest::sample::select(vec!["", "=", "=1", "=a=b", "=%26", "=key"]),
                ),
                0..8,
            )
        ) {
            let query = pairs
                .iter()
                .map(|((name, _), value)| format!("{name}{value}"))
                .collect::<Vec<_>>()
                .join("&");
            let any_key = pairs.iter().any(|((_, is_key), _)| *is_key);
            let kept: Vec<String> = pairs
                .iter()
                .filter(|((name, is_key), value)| !(*is_key || (name.is_empty() && value.is_empty())))
                .map(|((name, _), value)| format!("{name}{value}"))
                .collect();
            let got = without_credentials(&query);
            if !any_key {
                proptest::prop_assert_eq!(got.as_deref(), Some(query.as_str()));
                proptest::prop_assert!(matches!(got, Some(std::borrow::Cow::Borrowed(_))));
            } else if kept.is_empty() {
                proptest::prop_assert_eq!(got, None);
            } else {
                let expected = kept.join("&");
                proptest::prop_assert_eq!(got.as_deref(), Some(expected.as_str()));
            }
        }
    }

    #[test]
    fn path_already_under_the_target_prefix_is_reused_with_the_target_authority() {
        let openai =
            CompiledTarget::compile("m", &Target::new("openai", "https://api.openai.com/v1"))
                .unwrap();
        let root = CompiledTarget::compile("m", &Target::new("root", "https://root.test")).unwrap();
        let pinned = CompiledTarget::compile(
            "m",
            &Target::new("pinned", "https://api.openai.com/v1?api-version=2"),
        )
        .unwrap();
        let original: Uri = "http://proxy.local/v1/chat/completions?trace=1"
            .parse()
            .unwrap();
        let uri = openai.uri_for(&original, "/v1").unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.openai.com/v1/chat/completions?trace=1"
        );
        assert_eq!(uri.authority().map(|a| a.as_str()), Some("api.openai.com"));
        // The target's own query replaces the caller's even when the paths agree.
        assert_eq!(
            pinned.uri_for(&original, "/v1").unwrap().to_string(),
            "https://api.openai.com/v1/chat/completions?api-version=2"
        );
        // The caller's root maps to the target's root, and a target without a prefix
        // keeps a path it does not know whole.
        let slash: Uri = "http://proxy.local/".parse().unwrap();
        assert_eq!(
            root.uri_for(&slash, "/v1").unwrap().to_string(),
            "https://root.test/"
        );
        assert_eq!(
            openai.uri_for(&slash, "/v1").unwrap().to_string(),
            "https://api.openai.com/v1"
        );
        let bare_host: Uri = "http://proxy.local".parse().unwrap();
        assert_eq!(
            root.uri_for(&bare_host, "/v1").unwrap().to_string(),
            "https://root.test/"
        );
    }

    #[test]
    fn toml_config_round_trips_with_credentials_redacted() {
        let text = r#"
            total_deadline = "90s"
            [targets.gpt-4o]
            upstream = "openai"
            base_uri = "https://api.openai.com/v1"
            credential = { header = "authorization", value = "Bearer sk-TOPSECRET", label = "openai-main" }
            [targets.claude]
            upstream = "anthropic"
            base_uri = "https://api.anthropic.com/v1"
            model = "claude-sonnet-4-5"
            credential = { header = "x-api-key", value = "sk-ant-TOPSECRET" }
            extra_headers = { "anthropic-version" = "2023-06-01" }
            [chains]
            default = ["claude"]
            context_length = ["claude"]
            [chains.models]
            gpt-4o = ["claude"]
        "#;
        let config: FallbackConfig = toml::from_str(text).unwrap();
        assert_eq!(config.total_deadline(), Some(Duration::from_secs(90)));
        assert_eq!(config.chain_for("gpt-4o"), ["gpt-4o", "claude"]);
        assert_eq!(config.chain_for("other"), ["other", "claude"]);
        let debug = format!("{config:?}");
        assert!(!debug.contains("TOPSECRET"), "{debug}");
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains("TOPSECRET"), "{json}");
        assert!(json.contains("[redacted]"));
    }

    #[test]
    fn bad_duration_is_refused_with_its_text() {
        let err = toml::from_str::<FallbackConfig>("total_deadline = \"soon\"").unwrap_err();
        assert!(
            err.to_string()
                .contains("total_deadline \"soon\" is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn the_crate_docs_toml_example_is_a_valid_config() {
        let docs = include_str!("lib.rs");
        let start = docs
            .find("//! ```toml\n")
            .expect("toml example in the crate docs");
        let text: String = docs[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let config: FallbackConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.chain_for("gpt-4o"), ["gpt-4o", "claude", "gemini"]);
        assert_eq!(config.total_deadline(), Some(Duration::from_secs(90)));
        assert_eq!(config.min_hop_time(), Duration::from_secs(2));
    }
}
