//! User rules: add or override a verdict without forking the crate.

use http::StatusCode;

use crate::envelope::ErrorEnvelope;
use crate::{FailureKind, Retryable};

/// A user rule: conditions on the response, and the verdict to use when all of them
/// hold. Built with [`Rule::new`] and the `when_*` / `then_*` methods.
///
/// A rule with no condition matches every failure; a rule with no `then_*` changes
/// nothing. Strings match ASCII case-insensitively.
///
/// ```
/// use backstop_classify::{FailureKind, Retryable, Rule, Rules};
///
/// // A gateway that says "budget_exceeded" means a spent key, not a passing limit.
/// let rules = Rules::openai()
///     .with_rule(Rule::new().when_code("budget_exceeded").then_kind(FailureKind::QuotaExhausted))
///     // This upstream's 404s are transient routing errors.
///     .with_rule(Rule::new().when_status(http::StatusCode::NOT_FOUND).then_retryable(Retryable::Yes));
/// # let _ = rules;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    status: Option<StatusCode>,
    error_type: Option<String>,
    code: Option<String>,
    message_contains: Option<String>,
    pub(crate) kind: Option<FailureKind>,
    pub(crate) retryable: Option<Retryable>,
}

impl Rule {
    /// A rule that matches every failure and changes nothing yet.
    pub fn new() -> Self {
        Rule::default()
    }

    /// Only when the HTTP status is `status` (never matches a stream error, which has none).
    pub fn when_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Only when `error.type` (or Gemini's `error.status`) is `error_type`.
    pub fn when_error_type(mut self, error_type: impl Into<String>) -> Self {
        self.error_type = Some(error_type.into());
        self
    }

    /// Only when `error.code`, Anthropic's `error.details.error_code` or Azure's
    /// `error.innererror.code` is `code`.
    pub fn when_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Only when the error message contains `text`.
    pub fn when_message_contains(mut self, text: impl Into<String>) -> Self {
        self.message_contains = Some(text.into().to_lowercase());
        self
    }

    /// Classify as `kind` (its default retry verdict applies unless
    /// [`Rule::then_retryable`] is set too).
    pub fn then_kind(mut self, kind: FailureKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// Use this retry verdict, whatever the kind and `x-should-retry` say.
    pub fn then_retryable(mut self, retryable: Retryable) -> Self {
        self.retryable = Some(retryable);
        self
    }

    pub(crate) fn matches(
        &self,
        status: Option<StatusCode>,
        envelope: Option<&ErrorEnvelope>,
    ) -> bool {
        if self.status.is_some() && status != self.status {
            return false;
        }
        if let Some(want) = &self.error_type {
            let found = envelope.is_some_and(|e| {
                [e.error_type.as_deref(), e.rpc_status.as_deref()]
                    .into_iter()
                    .flatten()
                    .any(|t| t.eq_ignore_ascii_case(want))
            });
            if !found {
                return false;
            }
        }
        if let Some(want) = &self.code {
            let found = envelope.is_some_and(|e| {
                [
                    e.code.as_deref(),
                    e.detail_code.as_deref(),
                    e.inner_code.as_deref(),
                ]
                .into_iter()
                .flatten()
                .any(|c| c.eq_ignore_ascii_case(want))
            });
            if !found {
                return false;
            }
        }
        if let Some(want) = &self.message_contains {
            let found = envelope
                .and_then(ErrorEnvelope::message_lowercase)
                .is_some_and(|m| m.contains(want.as_str()));
            if !found {
                return false;
            }
        }
        true
    }
}
