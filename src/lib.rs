//! # Backstop
//!
//! Tower layers that make calls to LLM chat-completions APIs survive rate limits,
//! quota exhaustion, overloaded and failing providers, timeouts and broken streams.
//!
//! The stack, outermost first:
//! **fallback → breaker → budget → retry → attempt timeout → classify → transport**.
//! Each layer is its own crate, re-exported here.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use backstop_breaker as breaker;
pub use backstop_budget as budget;
pub use backstop_classify as classify;
pub use backstop_fallback as fallback;
pub use backstop_mock as mock;
pub use backstop_retry as retry;
