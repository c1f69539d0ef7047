//! The library behind the `backstop` command.
//!
//! - [`simulate`]: resilience policies side by side in virtual time against the
//!   in-memory mock provider (`backstop simulate`).
//! - [`proxy`]: the OpenAI-compatible sidecar that applies the whole stack to real
//!   upstreams (`backstop proxy`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod proxy;
pub mod simulate;
