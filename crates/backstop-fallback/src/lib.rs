//! backstop-fallback: not built yet (see the issue tracker).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
