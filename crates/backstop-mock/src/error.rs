//! Errors from reading or validating a scenario.

use std::fmt;

/// A scenario could not be read or would not behave as written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The TOML text did not parse into a scenario.
    Toml(String),
    /// The JSON text did not parse into a scenario.
    Json(String),
    /// A model's plan is invalid.
    Invalid {
        /// The model (or `(default)`).
        model: String,
        /// What is wrong.
        problem: String,
    },
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScenarioError::Toml(e) => write!(f, "scenario TOML is not valid: {e}"),
            ScenarioError::Json(e) => write!(f, "scenario JSON is not valid: {e}"),
            ScenarioError::Invalid { model, problem } => {
                write!(f, "scenario plan for model {model:?} is invalid: {problem}")
            }
        }
    }
}

impl std::error::Error for ScenarioError {}
