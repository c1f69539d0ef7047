//! # backstop-retry
//! (docs being written)
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backoff;
mod body;
mod config;
mod error;
mod first_event;
mod future;
mod layer;
mod policy;
mod replay;
mod service;
pub mod sse;
mod stream_request;
mod verdict;

pub use backoff::{Backoff, Jitter};
pub use body::RetryBody;
pub use config::{
    ConfigError, DEFAULT_FIRST_EVENT_CAP, DEFAULT_MAX_HINT, HintJitter, HoldFirstEvent, RetryConfig,
};
pub use error::RetryError;
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use policy::{Decision, FailedAttempt, RetryPolicy, StandardPolicy};
pub use replay::{
    BodyLimitError, CollectBody, CollectFuture, DEFAULT_MAX_BODY_BYTES, ReplayBodyLayer, collect,
};
pub use service::Retry;
pub use stream_request::{StreamRequest, stream_requested};
