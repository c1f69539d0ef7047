//! # backstop-retry
//!
//! The retry layer: it repeats a failed attempt when, and only when, the
//! classification says a retry can help, waits the right amount of time, and gives up
//! early enough that the layers outside it still have time to act.
//!
//! ## Where it sits
//!
//! **fallback → breaker → budget → retry → attempt timeout → classify → transport.**
//! Put [`ReplayBodyLayer`] just outside it when request bodies are not already
//! bytes-backed: the retry layer needs a body it can replay for the cost of a
//! reference-count bump (`B: Clone`, such as [`ReplayBody`](backstop_classify::ReplayBody)).
//!
//! ## What it reads
//!
//! - The [`Classification`](backstop_classify::Classification) the classify layer put
//!   on the response, or the [`Failure`](backstop_classify::Failure) inside a
//!   [`ClassifiedError`](backstop_classify::ClassifiedError). Without a classify layer
//!   inside it, it classifies the status and headers itself with the same rules
//!   ([`RetryConfig::with_rules`]; transport errors by their source chain) rather than
//!   fail.
//! - From the request's extensions: a [`Deadline`](backstop_classify::Deadline) (the
//!   sooner of it and the layer's own deadline applies), a
//!   [`RetryBudgetHandle`](backstop_classify::RetryBudgetHandle) (asked before every
//!   retry; a withdrawal whose retry is then not sent is given back), a [`PaceHandle`](backstop_classify::PaceHandle) (the breaker's, on a
//!   call admitted while its key is paced: see below),
//!   [`Idempotent`](backstop_classify::Idempotent), [`StreamRequest`],
//!   [`ModelRoute`](backstop_classify::ModelRoute) (for the trace's
//!   `gen_ai.request.model`). From its headers: `Idempotency-Key`.
//!
//! ## What it adds
//!
//! - To every response and every error: an [`AttemptLog`](backstop_classify::AttemptLog)
//!   (each attempt's number, classification, status, provider request id, the wait
//!   before it and the delay hint that set it; and the [`StopReason`](backstop_classify::StopReason)).
//!   A failure response it classified itself also gets that `Classification` (a
//!   success without one stays without: every Backstop layer reads that as success).
//! - To every attempt's request: the effective `Deadline`; optionally one stable
//!   `Idempotency-Key` ([`RetryConfig::with_idempotency_key`]) and an attempt-number
//!   header ([`RetryConfig::with_attempt_header`]).
//! - A `backstop.retry` tracing span per logical request and a `debug` event per
//!   attempt with OpenTelemetry field names (`gen_ai.request.model`,
//!   `http.response.status_code`, `error.type` = the failure kind). Headers, and so
//!   credentials, are never logged.
//!
//! ## What it never does
//!
//! - Never retries what the classification marks non-retryable (quota, context length,
//!   content filter, model not found, auth, invalid request): one attempt, no wait.
//! - Never sleeps past the deadline, nor starts an attempt at or after it: when the next
//!   wait would cross it, it returns the last outcome at once, so the fallback layer
//!   gets the remaining time. With [`RetryConfig::with_min_attempt_time`] (default
//!   zero) a retry must also have that much time left when it would start: one that
//!   would most likely be cut off by the deadline (a call the provider serves and
//!   bills, and nobody receives) is not made. The waits for a paced slot and for the
//!   inner service's readiness end at that latest start too.
//! - Never waits on a delay hint longer than `max_hint` (120 s) or than the time left:
//!   it returns the provider's response at once, hint preserved.
//! - Never waits out a provider's delay hint of 500 ms or more on this model when
//!   another model can serve the request (the fallback layer marks the request
//!   [`FallbackAvailable`](backstop_classify::FallbackAvailable)): the provider's
//!   response goes to the fallback layer at once, with
//!   [`StopReason::HandedToFallback`](backstop_classify::StopReason). The threshold is
//!   [`RetryConfig::with_fallback_handoff`]; shorter hints and failures without a hint
//!   are retried here as usual.
//! - Never sends a retry on top of the upstream's pace. When the request carries a
//!   [`PaceHandle`](backstop_classify::PaceHandle), each retry takes a paced slot
//!   after its wait, and waits for it when none is free (the record's `waited`
//!   includes that); when the pace has no slot before the deadline (or within
//!   `max_hint`, as for a hint), the last failure is handed on untouched with
//!   [`StopReason::PaceRefused`](backstop_classify::StopReason): at once when that is
//!   known at the failure (the budget is then not drawn), or after the wait (the
//!   budget's withdrawal is then given back). Each 429
//!   an attempt gets is reported to the pace as it arrives, so the pace slows down
//!   within one response time rather than when the call finishes; 503s are left to
//!   the call's outcome (see `backstop-breaker`'s pacing for why).
//! - Never replays a stream that has reached the caller, and never copies the request
//!   body (a test with a counting allocator checks it).
//! - Never calls the inner service without driving it to ready first.
//! - Never allocates for the retry machinery when the first attempt settles the
//!   request: that attempt is polled inside the [`ResponseFuture`], and the retry
//!   loop is boxed only when a retry (or a stream held for its first event) needs
//!   it. A success allocates the copy of the request kept for a retry (its headers
//!   packed in one buffer, a clone of its extensions if it has any) and the
//!   [`AttemptLog`](backstop_classify::AttemptLog), nothing else (a counting-allocator
//!   test checks the exact count); with `max_attempts` 1 there is no copy.
//! - Never sends a retry that differs from the first attempt: the same method, URI,
//!   version, extensions and body, and the same headers in the same order with the
//!   same bytes and sensitivity (tested, for packed and cloned headers, and against
//!   `http`'s own rule for which values can be packed). If the packed headers could
//!   not be read back (only a bug in `http` could cause it), the request is not
//!   retried: the caller gets the failed attempt.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use backstop_classify::{AttemptLog, ClassifyLayer, Rules, StopReason};
//! use backstop_retry::{ReplayBodyLayer, RetryConfig, RetryLayer};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Stands in for the HTTP client: overloaded once, then fine.
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = calls.clone();
//! let provider = tower::service_fn(move |_req: http::Request<backstop_classify::ReplayBody>| {
//!     let n = counter.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n == 0 { 503 } else { 200 };
//!         http::Response::builder()
//!             .status(status)
//!             .body(Full::new(Bytes::from_static(b"{}")))
//!     }
//! });
//!
//! let config = RetryConfig::interactive()
//!     .with_deadline(Some(Duration::from_secs(30)))?
//!     .with_attempt_timeout(Some(Duration::from_secs(10)))?;
//! let service = ServiceBuilder::new()
//!     .layer(ReplayBodyLayer::default())
//!     .layer(RetryLayer::new(config))
//!     .layer(ClassifyLayer::new(Rules::openai()))
//!     .service(provider);
//!
//! let request = http::Request::post("https://api.openai.com/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o","messages":[]}"#)))?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! let log = response.extensions().get::<AttemptLog>().expect("always there");
//! assert_eq!(log.attempts.len(), 2);
//! assert_eq!(log.stop, Some(StopReason::Succeeded));
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```
//!
//! ## Defaults
//!
//! | setting | [`interactive`](RetryConfig::interactive) (the default) | [`batch`](RetryConfig::batch) |
//! |---|---|---|
//! | attempts (first included) | 3 | 4 |
//! | backoff | 0.5 s doubling, cap 8 s | 2 s doubling, cap 30 s: waits 2, 4, 8 s |
//! | jitter | [`Jitter::Equal`]: each wait in `[t/2, t]` | [`Jitter::None`] (tenacity's schedule) |
//! | total deadline | none of its own | 60 s |
//! | attempt timeout | none of its own | none of its own |
//! | longest silence in a response body ([`RetryConfig::with_stream_idle_timeout`]) | none | none |
//! | least time left for a retry to start ([`RetryConfig::with_min_attempt_time`]) | none | none |
//! | max delay hint waited on | 120 s | 120 s |
//! | hinted wait handed to another model instead, when there is one | 500 ms or more | same |
//! | extra wait on a hint ([`HintJitter`]) | up to 10 % of the hint, at most 1 s | same |
//! | `Idempotency-Key` added | no | no |
//! | attempt-number header | none | none |
//! | hold streams for the first event | [`HoldFirstEvent::Auto`]: for `"stream": true` requests | same |
//! | bytes held for a first event | 64 KiB | 64 KiB |
//! | request body cap ([`ReplayBodyLayer`]) | 8 MiB | 8 MiB |
//!
//! Waits are whole milliseconds (tokio's timer tick), rounded up.
//!
//! ## The decision
//!
//! After each failed attempt the [`RetryPolicy`] decides: retry after a wait, or stop
//! with a reason. [`StandardPolicy`] documents its rules; a replacement only has to
//! implement one method and is tested without a runtime. Whatever the policy says,
//! the layer still enforces `max_attempts`, the deadline and the retry budget. A
//! budget refusal returns the last outcome (the provider's response keeps its own
//! classification; the log says [`BudgetExhausted`](backstop_classify::StopReason::BudgetExhausted)).
//! The budget is drawn when the retry is decided, before its wait, and the
//! withdrawal stands only once the retry is handed to the inner service: if it is
//! not (the pace refuses it after the wait, the inner service fails or is not ready
//! before the deadline, the caller drops the request during the wait), the layer
//! gives it back with [`RetryBudget::refund`](backstop_classify::RetryBudget::refund),
//! so the budget counts the retries sent.
//!
//! ## Streams
//!
//! A success is handed on as soon as its head arrives, except a `text/event-stream`
//! answer to a request that asked for a stream ([`HoldFirstEvent`]): it is held, within
//! the attempt timeout and at most 64 KiB, until its first event that is not a
//! keep-alive. If that event is an error (`data: {"error": …}`, Anthropic's
//! `event: error`), nothing reached the caller, so the attempt counts as failed and is
//! retried like any other (or returned as a `ClassifiedError` whose cause is
//! [`RetryError::FirstEventWasError`]). An error event after content has been
//! delivered ends the body with one `Err(ClassifiedError)` carrying the event's
//! verdict ([`RetryError::StreamInterrupted`]), after every byte before that event,
//! and is never replayed. See [`RetryBody`] and the [`sse`] reader.
//!
//! After the head (and a held stream's first event), the attempt timeout no longer
//! applies: a provider that stops sending mid-body is bounded by the stream idle
//! timeout ([`RetryConfig::with_stream_idle_timeout`], off by default), which ends the
//! body with a `TimedOut` [`RetryError::StreamStalled`] error after every byte
//! before, and never replays it. Its clock runs only while the caller waits for the
//! next bytes.
//!
//! ## The peers' known failures, and what this layer does instead
//!
//! | complaint (peers.md) | here |
//! |---|---|
//! | 1. quota and billing 429s retried like rate limits | the classify layer marks them [`Retryable::No`](backstop_classify::Retryable::No): exactly one attempt, no wait (tested for every non-retryable kind and every provider's quota format from the mock) |
//! | 2. Retry-After ignored, or obeyed without a cap (2.3 days) | a retry instruction is waited on exactly, plus at most 10 % / 1 s of jitter; a hint over `max_hint` (120 s) or over the time left stops at once with the provider's response and the hint, for the caller or the fallback layer; rate-limit *reset* times are weaker hints used only when they fit |
//! | 3. retries multiplying across layers | one layer retries, under one total deadline and the shared [`RetryBudget`](backstop_classify::RetryBudget); the classify and transport layers never retry; the attempt header lets a gateway see it is being retried. Turn your SDK's own retries off (`max_retries=0`) |
//! | 7. bodies that cannot be replayed | [`ReplayBodyLayer`] turns any body into `Bytes` once, under a cap, with a typed [`BodyLimitError`]; every attempt shares that allocation; `stream: true` requests are retried up to their first event |
//! | 9. total deadline vs per-attempt timeout | both exist and are validated (`attempt_timeout <= deadline`, [`ConfigError`]); each attempt gets the sooner of its timeout and the deadline; no wait or attempt starts past the deadline, and no retry with less than `min_attempt_time` left (property-tested) |
//! | 10. cloned inner service called without readiness | the service that was driven to ready makes the first attempt; every retry first awaits `ServiceExt::ready` on it (tested with a service that is pending before every call) |
//! | 11. retries invisible | every response and error carries the [`AttemptLog`](backstop_classify::AttemptLog); a span per request, an event per attempt; nothing is shared between attempts but the body bytes and the idempotency key |
//!
//! ## Overhead
//!
//! The success path (no retry), `benches/retry_overhead.rs`: one request through a bare
//! in-memory service, through `tower::retry::Retry` with a comparable policy (two
//! retries on a 5xx), and through this layer (`RetryConfig::interactive()`); plus the
//! [`AttemptLog`](backstop_classify::AttemptLog) alone, built, put on a response and
//! dropped. One run of
//! `cargo bench -p backstop-retry --bench retry_overhead -- --warm-up-time 1 --measurement-time 2`,
//! 2026-11-24 23:08 UTC, load average 0.5–0.7 (the best of interleaved rounds, which
//! filters out preemption). Instruction counts (callgrind, the bench binary's
//! `RETRY_OVERHEAD_CALLS` mode, see the bench's docs) and allocations do not depend
//! on load. Two requests: the benchmark's (two headers built in code) and the one
//! the sidecar proxy forwards from an SDK (fourteen headers, as hyper's parser makes
//! them):
//!
//! | per request | interleaved best | added over bare | instructions added over bare | allocations added |
//! |---|---|---|---|---|
//! | bare service | 92.7 ns | — | — | — |
//! | `tower::retry::Retry` | 282.1 ns | +189 ns | +1,706 | 4 |
//! | backstop `Retry` | 339.7 ns | +247 ns | +2,729 | 4 |
//! | the attempt log alone | 63 ns | | 959 | 3 |
//! | bare service, SDK request | 321.0 ns | — | — | — |
//! | `tower::retry::Retry`, SDK request | 803.0 ns | +482 ns | +6,731 | 9 |
//! | backstop `Retry`, SDK request | 665.2 ns | +344 ns | +4,497 | 4 |
//!
//! **The target is not met** for the benchmark's request: 1.20× tower's retry in time
//! in that run (1.28× in another two minutes later), 1.18× in instructions (target
//! ≤ 1.0), and about 250 ns added (target < 200 ns). For the SDK's request it is met
//! in ratio, 0.83× in time (both runs) and 0.90× in instructions, but not in time
//! added: 344–354 ns, where tower's retry adds 482–493. Where the difference goes:
//!
//! - Tower's policy clones the request for a retry: 4 allocations for the
//!   benchmark's request (the header map's two, and the first clone of each of the
//!   two header values' bytes, which moves them to a shared buffer), 9 for the SDK's
//!   (the map's two and one for each custom name hyper made, whose bytes move the
//!   same way), and as many frees. This layer hands the caller's own request to the
//!   first attempt and keeps its headers packed in one buffer: 1 allocation whatever
//!   the number of headers. So the copy for a retry costs less than tower's: about
//!   500 instructions less on the benchmark's request, about 3,800 on the SDK's.
//! - The [`AttemptLog`](backstop_classify::AttemptLog) every response carries is all
//!   of the rest, and more. Its first record is stored inline, but on a response
//!   that has no extensions yet the map costs its box, its table and the value's box:
//!   3 allocations, about 960 instructions and 63 ns with the frees, which tower's
//!   retry does not spend. It is the layer's contract (the fallback layer, the proxy
//!   and callers read it), so it stays. With hyper-util's `HttpConnector` as the
//!   transport every response carries its `HttpInfo`, so the map exists already and
//!   the log costs its value's box alone: measured with such a response (the
//!   bench's `-connected` shape), the layer adds 2,341 instructions against tower's
//!   1,756 (1.09×; 1.18× in time), the log's share about 530 of them. When the request carries extensions (in
//!   the full stack: the budget's handle, the fallback's model route) and the
//!   response none, the log goes into the emptied map of the request's copy instead,
//!   and costs 1 allocation (tested); in the full stack the classify layer has made
//!   the map already.
//! - The layer's own bookkeeping (the per-request span, the effective deadline and
//!   stream decision, the content-type and request-id lookups for the record) is
//!   about as much again as the copy saves.
//!
//! The history, and the same run with the request as it arrives inside a stack
//! (1.15× in time, 1.09× in instructions), are in the repository's `BENCHMARKS.md`. What brought it from 2.1–2.3× to
//! here: the first attempt is polled inside [`ResponseFuture`] (a `pin-project` state
//! machine) and the retry loop is boxed only when a retry or a held stream needs it; a
//! single-attempt request (`max_attempts` 1, or the last attempt) is sent without a
//! copy; a first-attempt success is settled where it lies; the provider request-id
//! lookups use constant header names (a `&str` name is parsed on every lookup, about
//! 400 instructions); the budget handle is looked up only when a retry needs it; the
//! log's first record is stored inline; the request's headers are kept packed for a
//! retry, and the caller's own request goes to the first attempt (1.28× → 1.20× in
//! instructions); every header list is packed, checked a word at a time (1.18×; the
//! SDK's request 1.07× → 0.90×).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod attempts;
mod backoff;
mod body;
mod config;
mod error;
mod first_event;
mod future;
mod kept;
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
    ConfigError, DEFAULT_FALLBACK_HANDOFF, DEFAULT_FIRST_EVENT_CAP, DEFAULT_MAX_HINT, HintJitter,
    HoldFirstEvent, RetryConfig,
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
