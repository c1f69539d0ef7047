//! # backstop-classify
//!
//! The classification layer: it sits closest to the transport, in the stack
//! **fallback → breaker → budget → retry → attempt timeout → classify → transport**.
//!
//! For every outcome of the inner service it decides what kind of failure it is and
//! attaches one typed verdict, a [`Classification`], that the outer layers act on.
//!
//! (The rules, the delay-hint parsers and the tower layer are being built; this page
//! documents the shared vocabulary.)
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
mod classification;
mod context;
mod duration_text;
mod envelope;
mod error;
mod future;
mod hint;
mod layer;
mod response_body;
mod rules;
mod service;
mod trace;
mod transport;

pub use body::ReplayBody;
pub use classification::{
    Classification, Failure, FailureKind, FallbackRoute, ProviderError, Retryable,
};
pub use context::{
    AttemptLog, AttemptRecord, Deadline, Idempotent, ModelRoute, RetryBudget, RetryBudgetHandle,
    StopReason, is_idempotent,
};
pub use error::{BoxError, ClassifiedError};
pub use future::ResponseFuture;
pub use hint::{DelayHint, HintSource, parse_delay_hint};
pub use layer::ClassifyLayer;
pub use response_body::ClassifiedBody;
pub use rules::{
    DEFAULT_MAX_ERROR_BODY, DEFAULT_QUOTA_WAIT_THRESHOLD, Profile, Rule, Rules, classify_status,
};
pub use service::Classify;
pub use trace::BackstopClassifier;
pub use transport::classify_transport_error;
