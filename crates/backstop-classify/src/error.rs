//! Errors that carry their classification.

use std::fmt;

use crate::{AttemptLog, Failure, FailureKind};

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from an attempt (transport failure, timeout, or a local refusal by a
/// Backstop layer) together with its classification.
///
/// Every Backstop layer returns this as its error type, so the layers outside can read
/// the verdict without downcasting guesswork. Its `Display` never includes request
/// headers, so credentials cannot leak through it.
pub struct ClassifiedError {
    failure: Failure,
    source: Option<BoxError>,
    attempts: Option<Box<AttemptLog>>,
}

impl ClassifiedError {
    /// An error with the given verdict, caused by `source`.
    pub fn new(failure: Failure, source: impl Into<BoxError>) -> Self {
        ClassifiedError {
            failure,
            source: Some(source.into()),
            attempts: None,
        }
    }

    /// An error raised by a Backstop layer itself (budget, throttle, breaker), with no
    /// underlying cause.
    pub fn local(failure: Failure) -> Self {
        ClassifiedError {
            failure,
            source: None,
            attempts: None,
        }
    }

    /// The verdict.
    pub fn failure(&self) -> &Failure {
        &self.failure
    }

    /// The verdict, mutably (a layer may refine it, e.g. mark a retry refused).
    pub fn failure_mut(&mut self) -> &mut Failure {
        &mut self.failure
    }

    /// Attaches the retry layer's record of the attempts that led to this error.
    pub fn with_attempt_log(mut self, log: AttemptLog) -> Self {
        self.attempts = Some(Box::new(log));
        self
    }

    /// The retry layer's record of the attempts, when one was attached.
    pub fn attempt_log(&self) -> Option<&AttemptLog> {
        self.attempts.as_deref()
    }

    /// Takes the attempt record out (the fallback layer collects them per model).
    pub fn take_attempt_log(&mut self) -> Option<AttemptLog> {
        self.attempts.take().map(|b| *b)
    }

    /// The failure kind.
    pub fn kind(&self) -> FailureKind {
        self.failure.kind
    }

    /// The underlying error, if any.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// Splits into the verdict and the underlying error.
    pub fn into_parts(self) -> (Failure, Option<BoxError>) {
        (self.failure, self.source)
    }
}

impl fmt::Debug for ClassifiedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifiedError")
            .field("failure", &self.failure)
            .field("source", &self.source)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl fmt::Display for ClassifiedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.failure)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ClassifiedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
