//! The library behind the `backstop` command.
//!
//! - [`simulate`]: resilience policies side by side in virtual time against the
//!   in-memory mock provider (`backstop simulate`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod simulate;
