//! # Backstop
//!
//! Tower layers that make calls to LLM chat-completions APIs survive rate limits,
//! quota exhaustion, overloaded and failing providers, timeouts and broken streams.
//!
//! The stack, outermost first:
//!
//! ```text
//! body cap → fallback → breaker → budget → retry (+ attempt timeout) → classify → transport
//! ```
//!
//! Each layer is its own crate, re-exported here ([`classify`], [`retry`], [`budget`],
//! [`breaker`], [`fallback`], and the fault-injecting [`mock`] provider). This crate
//! adds the recommended composition, [`BackstopLayer`], built in code with
//! [`BackstopLayer::builder`] or from TOML with [`StackConfig`], validated as a whole
//! (attempt timeout within the deadline, the retry deadline within the total deadline,
//! the breaker window spanning two attempt timeouts (a default window is widened to
//! fit, one you set is checked), the minimum times within their deadlines, chains
//! naming known models, credentials present), and [`ServiceBuilderExt`] to drop single layers into an
//! existing `ServiceBuilder`.
//!
//! ```
//! use backstop::{BackstopLayer, StackConfig};
//! use backstop::mock::{Fault, MockProvider, ModelPlan, Scenario};
//! use backstop::fallback::ServedBy;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let config = StackConfig::from_toml_str(r#"
//!     [models.gpt-4o]
//!     upstream = "openai"
//!     base_uri = "http://provider.local/v1"
//!
//!     [models.claude-sonnet]
//!     upstream = "anthropic"
//!     base_uri = "http://provider.local/v1"
//!
//!     [chains]
//!     models = { "gpt-4o" = ["claude-sonnet"] }
//! "#).unwrap();
//! let layer = config.into_layer().unwrap();
//!
//! // The primary has run out of quota; the fallback serves.
//! let mock = MockProvider::new(
//!     Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota)),
//! );
//! let client = ServiceBuilder::new().layer(layer).service(mock.clone());
//! let request = http::Request::post("http://provider.local/v1/chat/completions")
//!     .body(r#"{"model":"gpt-4o","messages":[]}"#.to_string())
//!     .unwrap();
//! let response = client.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! let served = response.extensions().get::<ServedBy>().unwrap();
//! assert_eq!(&*served.model, "claude-sonnet");
//! assert!(served.fallback_fired);
//! // Quota is never retried: one attempt on the primary, one on the fallback.
//! assert_eq!(mock.attempts_for("gpt-4o"), 1);
//! assert_eq!(mock.attempts_for("claude-sonnet"), 1);
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod builder_ext;
mod config;
mod stack;

pub use backstop_breaker as breaker;
pub use backstop_budget as budget;
pub use backstop_classify as classify;
pub use backstop_fallback as fallback;
pub use backstop_mock as mock;
pub use backstop_retry as retry;

pub use builder_ext::ServiceBuilderExt;
pub use config::{
    BreakerSection, BudgetSection, ConfigError, CredentialSection, ModelSection, PacingSection,
    PacingSetting, RetrySection, StackConfig, ThrottleSection,
};
pub use stack::{BackstopBuilder, BackstopLayer, BackstopService, DEFAULT_MAX_REQUEST_BODY};
