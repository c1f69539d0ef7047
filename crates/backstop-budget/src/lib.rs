//! # backstop-budget
//!
//! The retry budget layer: retries can never turn an outage into a retry storm.
//!
//! It sits **outside the retry layer**, in the stack
//! **fallback → breaker → budget → retry → attempt timeout → classify → transport**.
//! Per-request attempt caps do not protect a provider in trouble (3 retries make every
//! request 4 attempts, and stacked layers multiply); a budget bounds retries across all
//! the requests that share it.
//!
//! ## The contract
//!
//! For each logical request the layer:
//!
//! 1. if adaptive throttling is on, may **reject it locally** (see below): the inner
//!    service is not called and the caller gets a
//!    [`ClassifiedError`] of kind [`FailureKind::Throttled`] (never retried, marked
//!    `another_model_may_serve`, so the fallback layer routes it to the next model);
//! 2. **deposits** into the shared budget ([`BudgetModel::deposit`]);
//! 3. **adds** a [`RetryBudgetHandle`] to the request's extensions. The retry layer
//!    calls [`RetryBudget::try_withdraw`] on it before every retry and, when refused,
//!    does not retry: it returns the last outcome, its stop reason
//!    `StopReason::BudgetExhausted`. The budget caps the retries *sent*: when an
//!    allowed retry is then not made (the upstream's pace has no slot for it after
//!    its wait, the inner service is not ready before the deadline, or the caller
//!    drops the request during the wait), the retry layer calls
//!    [`RetryBudget::refund`] and the withdrawal is given back
//!    ([`BudgetModel::give_back`]; counted in `retries_refunded`);
//! 4. calls the inner service and, when the call completes, **reads the outcome** (the
//!    response's [`Classification`](backstop_classify::Classification) extension, the
//!    status when there is none, or the error's classification) to feed the model and
//!    the throttle.
//!
//! It **reads** nothing of the request (no header, no body) and only the
//! classification of the outcome. It **adds** only the handle.
//! It **never** retries, waits, buffers a body, or changes a response. Its error type
//! is [`ClassifiedError`]: an inner `ClassifiedError` is passed through unchanged, any
//! other inner error is classified by
//! [`classify_transport_error`](backstop_classify::classify_transport_error).
//!
//! Without this layer the retry layer works on its own caps; with it, a retry the
//! budget refuses is not made.
//!
//! ## Models
//!
//! Two models ship behind one trait, [`BudgetModel`]; bring your own by implementing it.
//!
//! * [`WindowedBudget`] (default): Finagle / tower `TpsBudget` semantics. Each request
//!   deposits `retry_ratio` of a retry, each retry withdraws one, both leave the
//!   balance a `window` later; a reserve of `min_retries_per_sec × window` is always
//!   there. Lock-free: deposits and withdrawals go into rings of time slots, each
//!   update one compare-and-swap; a withdrawal is decided by one compare-and-swap on
//!   the total spent, so concurrent retries never overdraw it. A refund takes the
//!   withdrawal back out of the slot it went into, while that slot is still in the
//!   window (after that it no longer counts anyway).
//! * [`RetryThrottle`]: gRPC retry throttling. Tokens start at `max_tokens`, −1 per
//!   failed attempt, +`token_ratio` per success; retries only while tokens > max/2.
//!
//! Defaults of [`WindowedBudget`], and why:
//!
//! | parameter | default | why |
//! |---|---|---|
//! | `window` | 10 s | Finagle's and tower's. Long enough to average over bursts, short enough that retries resume within seconds of recovery. |
//! | `retry_ratio` | 10 % | The SRE book's per-client budget, half tower's 20 %: an outage then costs a provider at most ~1.1× its normal load (plus the floor) instead of 4× with 3 retries. |
//! | `min_retries_per_sec` | 1 | Finagle and tower use 10/s, sized for RPC services doing thousands of requests per second. LLM clients send a few per second: with a 10/s floor a client below ~3.4 requests/s would never be refused a retry (3 retries each, 4× in an outage) and one at 10 requests/s would still cost 2.1×; with 1/s the latter costs 1.2×, and a quiet process can still retry a transient 503. |
//!
//! [`RetryThrottle`] defaults to gRPC's documented example: `max_tokens` 10,
//! `token_ratio` 0.1.
//!
//! ## The amplification bound
//!
//! Cut time into blocks of one window, aligned on the budget's creation. At any
//! successful withdrawal the balance stays ≥ 0, and the balance is the reserve plus the
//! deposits' share minus the withdrawals of the last window; every withdrawal of a
//! block is inside the window ending at that block's last withdrawal. So for each block
//! with at least one retry:
//!
//! ```text
//! retries(block) ≤ min_retries_per_sec · window + retry_ratio · max_deposits_per_window
//! ```
//!
//! For N requests at a steady r per second over T seconds, with retries spread over m
//! blocks (m = ⌈T/window⌉, plus one when backoff pushes retries past the last block):
//!
//! ```text
//! attempts per logical request ≤ 1 + m · window · (retry_ratio · r + min_retries_per_sec) / N
//!                              ≈ 1 + retry_ratio + min_retries_per_sec / r
//! ```
//!
//! With the defaults, 10 000 requests at 100/s over 100 s against a provider failing
//! every request, retries spill into an 11th block: at most
//! 11 · (10 + 100) = 1 210 retries, **≤ 1.121 attempts per request** (the test
//! `amplification` asserts it); the same retry layer without a budget makes exactly 4.
//!
//! ## Adaptive client-side throttling (optional)
//!
//! From the SRE book's "Handling Overload": over a sliding window (default 2 min)
//! count the requests and the accepts, and reject locally with probability
//! `max(0, (requests − k·accepts) / (requests + 1))`, `k` = 2 by default
//! ([`AdaptiveThrottle`], [`rejection_probability`]). A request counts as
//! **accepted** unless it ended in upstream trouble: rate limited, overloaded, 5xx,
//! 408, connect failure, timeout, connection lost, or an inner layer's refusal for one
//! of those (budget exhausted, breaker open). Quota, context-length, content-policy,
//! auth and invalid-request failures count as accepted: the provider answered, and
//! throttling would not help ([`Outcome`]). A locally rejected request counts as a
//! request, never reaches the inner service, and is never deposited.
//!
//! By default only requests that were sent count
//! ([`AdaptiveThrottleConfig::count_local_rejections`] is `false`): throttling is gone
//! one window after the provider recovers at the latest, and a provider that can serve
//! C of r requests per second is sent about `√(k · C · r)` (45/s for 10 of 100/s); one
//! that rejects everything about `√(r / window)` per second. With
//! `count_local_rejections: true` (the SRE book's own definition) the provider is sent
//! about k·C (20/s in that example) and a dead one about one request per window, but
//! the gate reopens only as fast as accepts grow: about
//! `(window / k) · ln((r − C) / ((k − 1) · C))` after an overload (132 s for 10 of
//! 100 requests/s) and ~11 min after a total outage at 100 requests/s, which is why it
//! is not the default. Both behaviours are asserted in `tests/throttle.rs`.
//!
//! ## Observability
//!
//! * [`RetryBudgetLayer::snapshot`] ([`BudgetSnapshot`]: balance, retries available,
//!   deposits, retries allowed, refused and refunded) and
//!   [`RetryBudgetLayer::throttle_snapshot`] ([`ThrottleSnapshot`]).
//! * Counters through the [`metrics`] facade, labelled `budget = <name>`:
//!   [`METRIC_DEPOSITS`], [`METRIC_RETRIES_ALLOWED`], [`METRIC_RETRIES_REFUSED`],
//!   [`METRIC_RETRIES_REFUNDED`], [`METRIC_LOCAL_REJECTIONS`]. They are registered
//!   when the layer is built.
//! * Tracing: a `warn` when the budget becomes exhausted (at most one per 10 s) and
//!   when throttling starts; `debug`/`info` when they end. Never per request.
//!
//! ## Example
//!
//! ```
//! use backstop_budget::{
//!     AdaptiveThrottle, AdaptiveThrottleConfig, RetryBudgetLayer, WindowedBudget,
//! };
//! use backstop_classify::{ClassifiedError, RetryBudgetHandle};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let budget = RetryBudgetLayer::builder(WindowedBudget::default())
//!     .name("openai")
//!     .adaptive_throttle(AdaptiveThrottle::new(AdaptiveThrottleConfig::default())?)
//!     .build();
//!
//! // In a real stack the retry layer sits between the budget and the transport.
//! let mut client = ServiceBuilder::new()
//!     .layer(budget.clone())
//!     .service_fn(|request: http::Request<String>| async move {
//!         // What the retry layer sees:
//!         let handle = request.extensions().get::<RetryBudgetHandle>().cloned();
//!         assert!(handle.is_some());
//!         Ok::<_, ClassifiedError>(http::Response::new(String::from("{}")))
//!     });
//!
//! let response = client
//!     .ready()
//!     .await?
//!     .call(http::Request::new(String::from("{\"model\":\"gpt-4o\"}")))
//!     .await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(budget.snapshot().deposits, 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## Cost
//!
//! `benches/budget.rs` runs [`WindowedBudget`] and tower's `TpsBudget` side by side
//! in one run (same window, ratio 1.0 so withdrawals keep succeeding, no floor). One
//! brief run (`--warm-up-time 1 --measurement-time 2`) on the shared 2-core
//! development machine while other builds ran, so absolute figures move ±20 % from
//! run to run; the ratio within a run is the figure to read:
//!
//! | operation | backstop | tower | ratio |
//! |---|---|---|---|
//! | deposit (every request) | 36.5 ns | 35.3 ns | 1.03 |
//! | withdraw, refused (an outage) | 36.8 ns | 68.9 ns | 0.53 |
//! | deposit + withdraw, 1 thread | 92.2 ns | 89.0 ns | 1.04 |
//! | deposit + withdraw, 2 threads on one budget | 237 ns | 257 ns | 0.92 |
//!
//! A deposit is at parity: most of it is reading the clock (tokio's `Instant::now`),
//! which both pay (tower then takes a mutex, here one compare-and-swap into the slot
//! and one counter add for the snapshot). A refused withdrawal reads the slots and
//! bumps a counter; tower's takes its mutex first.
//! Unlike `TpsBudget` there is no mutex, and a withdrawal is decided by a single
//! compare-and-swap, so two threads cannot both spend the last retry.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod adaptive;
mod future;
mod layer;
mod model;
mod observe;
mod outcome;
mod retry_throttle;
mod scope;
mod service;
mod window;
mod windowed;

pub use adaptive::{
    AdaptiveThrottle, AdaptiveThrottleConfig, Admission, ThrottleSnapshot, rejection_probability,
};
pub use backstop_classify::{ClassifiedError, FailureKind, RetryBudget, RetryBudgetHandle};
pub use future::ResponseFuture;
pub use layer::{RetryBudgetLayer, RetryBudgetLayerBuilder};
pub use model::{BudgetModel, BudgetSnapshot, ConfigError};
pub use observe::{
    METRIC_DEPOSITS, METRIC_LOCAL_REJECTIONS, METRIC_RETRIES_ALLOWED, METRIC_RETRIES_REFUNDED,
    METRIC_RETRIES_REFUSED,
};
pub use outcome::Outcome;
pub use retry_throttle::{RetryThrottle, RetryThrottleConfig};
pub use service::{LocallyRejected, RetryBudgetService};
pub use windowed::{WindowedBudget, WindowedBudgetConfig};
