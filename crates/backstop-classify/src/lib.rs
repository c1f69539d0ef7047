//! # backstop-classify
//!
//! The classification layer, and the typed vocabulary every Backstop layer shares.
//!
//! ## Where it sits
//!
//! Closest to the transport, in the stack
//! **fallback → breaker → budget → retry → attempt timeout → classify → transport**.
//! For every outcome of the inner service it decides what kind of failure it is and
//! attaches one typed verdict, a [`Classification`], that the outer layers act on
//! without ever re-parsing headers or bodies.
//!
//! ## What it reads
//!
//! - The response status and headers: `x-should-retry`, and the delay hints
//!   (`retry-after-ms`, `x-ms-retry-after-ms`, `retry-after`, the rate-limit reset
//!   headers; see [`parse_delay_hint`]).
//! - For a status >= 400 only, the start of the body (up to 64 KiB by default,
//!   [`ClassifyLayer::with_max_error_body`]): the provider's error type, code and
//!   message, Gemini's `RetryInfo` and `QuotaFailure`. A body that is not JSON, is
//!   truncated, over the cap or fails mid-read is classified by status and headers.
//! - Errors of the inner service, by walking their source chain
//!   ([`classify_transport_error`]).
//!
//! ## What it adds
//!
//! - To every response's extensions: a [`Classification`] (`Success` below 400, else a
//!   [`Failure`] with its [`FailureKind`], [`Retryable`] verdict, [`DelayHint`],
//!   status, provider error code and `x-should-retry`).
//! - Every error becomes a [`ClassifiedError`] carrying its [`Failure`] (an inner
//!   error that already is one keeps its verdict). A timeout or reset after the request
//!   was sent is [`Retryable::IfIdempotent`]: the retry layer resolves it with
//!   [`is_idempotent`].
//!
//! ## What it never does
//!
//! - Never alters a body: the caller receives exactly the provider's bytes, in order,
//!   with a mid-read error re-delivered where it happened ([`ClassifiedBody`]).
//! - Never buffers a success: a 200 SSE stream passes through frame by frame. (An
//!   error *inside* such a stream is classified by whoever reads the stream, with
//!   [`Rules::classify_stream_error`]; a 200 whose `finish_reason` is
//!   `content_filter`, with [`Rules::classify_completion`].)
//! - Never retries, waits, caps a hint or times out: reading an error body that never
//!   ends is bounded by the attempt timeout outside it.
//!
//! ## Example
//!
//! ```
//! use backstop_classify::{Classification, ClassifyLayer, FailureKind, Retryable, Rules};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! const BODY: &str = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
//!
//! // Stands in for a hyper client talking to the provider.
//! let provider = tower::service_fn(|_request: http::Request<String>| async {
//!     let response = http::Response::builder()
//!         .status(429)
//!         .header("retry-after", "20")
//!         .body(Full::new(Bytes::from_static(BODY.as_bytes())))?;
//!     Ok::<_, http::Error>(response)
//! });
//!
//! let service = ServiceBuilder::new()
//!     .layer(ClassifyLayer::new(Rules::openai()))
//!     .service(provider);
//!
//! let response = service.oneshot(http::Request::new(String::new())).await?;
//! let failure = response
//!     .extensions()
//!     .get::<Classification>()
//!     .and_then(Classification::failure)
//!     .cloned()
//!     .expect("a 429 is a failure");
//! // A 429 that says "quota" is never retried, whatever the status alone suggests.
//! assert_eq!(failure.kind, FailureKind::QuotaExhausted);
//! assert_eq!(failure.retryable, Retryable::No);
//! assert_eq!(failure.hint.map(|h| h.delay), Some(std::time::Duration::from_secs(20)));
//! // The caller still receives the provider's body, byte for byte.
//! let bytes = response.into_body().collect().await?.to_bytes();
//! assert_eq!(bytes, BODY.as_bytes());
//! # Ok(())
//! # }
//! ```
//!
//! ## Built-in rules
//!
//! Each row is checked in order; the first that matches decides the kind. Every
//! [`Profile`] understands every envelope below (gateways pass other providers'
//! bodies through); the profile column names where a rule comes from.
//!
//! | provider | evidence | kind | retried |
//! |---|---|---|---|
//! | OpenAI | code/type `insufficient_quota`, `billing_hard_limit_reached`, `credit_balance_exhausted`, `organization_spend_limit_exceeded`, `project_spend_limit_exceeded`, `organization_usage_limit_exceeded` | `QuotaExhausted` | no |
//! | Anthropic | type `billing_error` (402); `error.details.error_code` `enforced_spend_limit_reached` | `QuotaExhausted` | no |
//! | Gemini | `QuotaFailure.quotaId` containing `PerDay` | `QuotaExhausted` | no |
//! | OpenAI | 429 / `rate_limit_exceeded` with "Request too large … Limit N, Requested M", M > N (or numbers absent) | `QuotaExhausted` | no |
//! | OpenAI, any | code `context_length_exceeded`; message "maximum context length", "exceed context limit", "is longer than the model's context length", "exceeds the available context size" (llama.cpp), "exceeds the maximum number of tokens allowed" (Gemini), "prompt is too long" (Anthropic) | `ContextLengthExceeded` | no |
//! | OpenAI, Azure, any | code `content_policy_violation`, `content_filter`, inner code `ResponsibleAIPolicyViolation`; message "content_filter", "content management policy", "your request was rejected as a result of our safety system" | `ContentFiltered` | no |
//! | OpenAI, Anthropic, any | code `model_not_found`; Anthropic `not_found_error` "model: …"; a 404 whose message names a model "not found" / "does not exist" | `ModelNotFound` | no |
//! | Gemini | message "API key not valid" (a 400 `INVALID_ARGUMENT`) | `AuthFailed` | no |
//! | OpenAI, Anthropic, Gemini | code `slow_down`, `server_is_overloaded`, type `service_unavailable_error`, `overloaded_error` (529), status `UNAVAILABLE` | `Overloaded` | yes |
//! | Anthropic, Gemini, OpenAI | type `rate_limit_error`, `requests`, `tokens`, code `rate_limit_exceeded`, status `RESOURCE_EXHAUSTED` | `RateLimited` | yes |
//! | Anthropic, Gemini, OpenAI | type `api_error`, `server_error`, `timeout_error`, status `INTERNAL`, `DEADLINE_EXCEEDED` | `ServerError` | yes |
//! | Anthropic, Gemini, OpenAI | type `authentication_error`, `permission_error`, code `invalid_api_key`, status `UNAUTHENTICATED`, `PERMISSION_DENIED` | `AuthFailed` | no |
//! | Anthropic | type `request_too_large` (413) | `InvalidRequest` | no |
//! | status | 408 / 409 / 429 / 503, 529 / 401, 403 | `RequestTimeout` / `Conflict` / `RateLimited` / `Overloaded` / `AuthFailed` | yes / yes / yes / yes / no |
//! | status | 500, 502, 504 and any other status >= 500 | `ServerError` | yes |
//! | status | 404 without a model named, and every other 4xx | `InvalidRequest` | no |
//!
//! Then, in order:
//!
//! 1. A `RateLimited` failure whose retry instruction (`retry-after*`, Gemini's
//!    `retryDelay`, Azure's message) is at least one hour becomes `QuotaExhausted`
//!    (Azure's daily quota says "retry after 86400 seconds");
//!    [`Rules::with_quota_wait_threshold`] changes or disables this.
//! 2. `x-should-retry: false` makes any failure not retryable; `x-should-retry: true`
//!    makes it retryable unless the body proved a retry useless (quota, context
//!    length, content, model not found): Anthropic sends `true` on spend-limit 429s.
//! 3. The first matching user [`Rule`] sets the kind and/or the retry verdict.
//!
//! Delay hints: the header instruction (see [`parse_delay_hint`]), else Gemini's
//! `RetryInfo.retryDelay`, else (Azure profile only) "retry after N seconds" /
//! "try again in N seconds" in the message, else, for `RateLimited` only, the
//! rate-limit bucket reset headers.
//!
//! An error inside a 200 stream ([`Rules::classify_stream_error`]) has no status: the
//! same body rules apply, with Azure's and Gemini's numeric `error.code` standing in
//! for the status, and an unreadable payload is a `ServerError`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
mod builtin;
mod classification;
mod context;
mod duration_text;
mod envelope;
mod error;
mod future;
mod hint;
mod instant;
mod layer;
mod profile;
mod response_body;
mod rule;
mod rules;
mod service;
mod trace;
mod transport;

pub use body::ReplayBody;
pub use classification::{
    Classification, Failure, FailureKind, FallbackRoute, ProviderError, Retryable,
};
pub use context::{
    AttemptLog, AttemptRecord, AttemptRecords, Deadline, FallbackAvailable, Idempotent,
    LatestStart, MAX_PRINTED_NAME, ModelRoute, PaceHandle, RetryBudget, RetryBudgetHandle,
    StopReason, UpstreamPace, is_idempotent, printed_name,
};
pub use error::{BoxError, ClassifiedError};
pub use future::ResponseFuture;
pub use hint::{DelayHint, HintSource, parse_delay_hint};
/// `now + delay` for any delay, capped at a century instead of overflowing: how
/// every layer turns a configured or provider-sent delay into a deadline.
pub use instant::{MAX_INSTANT_DELAY, instant_after};
pub use layer::ClassifyLayer;
pub use profile::{Profile, UnknownProfile};
pub use response_body::ClassifiedBody;
pub use rule::Rule;
pub use rules::{DEFAULT_MAX_ERROR_BODY, DEFAULT_QUOTA_WAIT_THRESHOLD, Rules, classify_status};
pub use service::Classify;
pub use trace::BackstopClassifier;
pub use transport::classify_transport_error;
