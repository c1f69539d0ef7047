//! backstop-fallback (docs being written).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
mod future;
mod hop;
mod journey;
mod layer;
pub mod policy;
pub mod rewrite;
pub mod secret;
mod served;
mod service;

pub use config::{Chains, ConfigError, Credential, FallbackConfig, FallbackConfigBuilder, Target};
pub use future::ResponseFuture;
pub use layer::FallbackLayer;
pub use policy::{ChainKind, Verdict};
pub use rewrite::{RewriteError, read_model, rewrite_model};
pub use secret::Secret;
pub use served::{ChainFailed, ChainStop, Hop, ServedBy};
pub use service::Fallback;
