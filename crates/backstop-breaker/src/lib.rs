//! # backstop-breaker
//!
//! A circuit breaker with cooldowns for LLM upstreams: it stops sending to a model
//! that is down, rate-limited or out of quota, and says when to try again.
//!
//! ## Where it sits
//!
//! **fallback → breaker → budget → retry → attempt timeout → classify → transport**.
//! It sees one *logical* call per model hop (the retries happen inside it), so a
//! model counts as failing when the retry layer gave up on it, and an open key costs
//! the fallback layer nothing: the call fails at once and the next model is tried.
//!
//! ## What it reads
//!
//! - The key: the [`ModelRoute`](backstop_classify::ModelRoute) in the request's
//!   extensions (the fallback layer sets it on every hop: upstream, model, and a
//!   credential label when several keys serve one model). A request without one is
//!   keyed on its URI's authority and an empty model, so every model behind that host
//!   shares one key (and the key is built per call: set a `ModelRoute`).
//! - The outcome: the response's [`Classification`](backstop_classify::Classification)
//!   extension, or the inner error's verdict when it is a
//!   [`ClassifiedError`](backstop_classify::ClassifiedError). Any other inner error
//!   is classified with
//!   [`classify_transport_error`](backstop_classify::classify_transport_error)
//!   (unknown errors count as a lost connection) and returned as a `ClassifiedError`. A
//!   response with no classification is judged by its status (see
//!   [`Outcome::from_response`]). A success whose
//!   [`AttemptLog`](backstop_classify::AttemptLog) shows a 429 or 503 on an earlier
//!   attempt (the retry layer below waited it out) is a success and a slow-down
//!   signal for pacing.
//! - The request's [`Deadline`](backstop_classify::Deadline) and
//!   [`LatestStart`](backstop_classify::LatestStart), if any: a paced key books no
//!   slot for a caller that could not wait for it, nor one after the latest instant
//!   the caller would still start the call (a booked slot nobody uses is lost to
//!   every other caller).
//!
//! Only failures that say something about the upstream's health count
//! ([`FailureKind::reflects_upstream_health`](backstop_classify::FailureKind::reflects_upstream_health):
//! rate limited, overloaded, server error, request timeout, connect failed, timed out,
//! connection lost). Quota exhaustion opens the key for a long cooldown. A client's
//! invalid request, a content refusal, a context-length error, an auth or model-not-found
//! error and the local refusals of other layers (breaker open, budget exhausted,
//! throttled) never count.
//!
//! ## What it adds
//!
//! While a key is open (or half-open with every probe slot taken, or paced with no
//! slot free) a call fails at once, **without calling the inner service**, with
//! `ClassifiedError::local(Failure::new(FailureKind::BreakerOpen).with_hint(Some(DelayHint::new(retry_in, HintSource::Breaker))))`:
//! not retryable here, another model may serve, and when to come back: when open,
//! the exact time until a probe may go through; when half-open with every probe slot
//! taken, as long as the oldest probe has run so far (at least 50 ms, never past its
//! timeout), so callers ask again at doubling intervals while it runs; when paced,
//! the exact time until the slot this call booked is due (see *Pacing*). A refusal
//! whose wait the upstream directed (a pace; an open period set by its delay hint or
//! quota, or caused by its 429s and 503s, which ask for fewer calls rather than
//! report a breakage) is marked [`Retryable::Yes`](backstop_classify::Retryable), and
//! the fallback layer waits for that moment, within the request's deadline, when no
//! other model can serve. A refusal by a key opened on this breaker's own evidence of
//! breakage (500s, timeouts, resets counted; a hung probe) stays `Retryable::No`, and
//! the caller fails fast ([`Rejection::upstream_directed`]). The layer's error type is `ClassifiedError`; inner errors pass through
//! (converted as above when they are not classified yet).
//!
//! To the request of a call admitted while its key is paced (and only then): a
//! [`PaceHandle`](backstop_classify::PaceHandle), through which the retry layer
//! paces the call's retries and reports its 429s (see *Pacing*).
//!
//! ## What it never does
//!
//! It never retries, waits or sleeps (pacing refuses a call with the time its slot
//! is due; waiting is the caller's or the fallback layer's choice), and never cancels
//! a call: a call it admits runs to its end and its result is returned untouched (a
//! probe's timeout takes back the probe's *slot*, not the call). It never reads or logs headers, so credentials
//! cannot leak through it. It spawns no task and runs no timer: every deadline is
//! compared with the clock when a call arrives or finishes, which is exact (there is
//! no sweep interval). `poll_ready` forwards to the inner service; a refused call
//! leaves the inner service's readiness for the next one.
//!
//! It records an outcome when the inner future resolves: for a streamed response,
//! at the response head. A stream that fails after a 200 head counts as a success
//! here (the retry layer inside turns a failed *first* event into a failure).
//!
//! ## The state machine
//!
//! **Closed → Open → HalfOpen → Closed**, per key ([`KeyState`], pure and tested with
//! explicit instants):
//!
//! - *Closed → Open* on `consecutive_failures` health failures in a row (in the
//!   order the calls were made: outcomes arrive out of order, and a success from a
//!   call made before the latest failure, still in flight when the trouble began,
//!   does not reset the count), or when at
//!   least `failure_ratio` of the calls in the sliding `window` failed and the window
//!   holds at least `minimum_calls` (resilience4j's time-based window: `window_buckets`
//!   buckets, the window slides one bucket at a time). Open for the tripping
//!   failure's delay hint when it carries one (the provider said when to come back:
//!   a default never overrides it), otherwise for the open period: `open_duration`
//!   the first time, **doubled by each failed probe in a row** up to
//!   `max_open_duration`, back to `open_duration` once the key closes. A blip costs
//!   5 s; a model that stays down is probed at 5, 10, 20, 40, 60, 60 … s.
//! - *Closed/HalfOpen → Open at once* on a 429 or 503 (rate limited, overloaded) whose
//!   delay hint is a retry instruction (Retry-After, `retry-after-ms`, Gemini's
//!   `retryDelay`: not a rate-limit bucket's reset time) at least `hint_opens_at` long,
//!   until the hinted time (capped at `max_hinted_cooldown`). **Decision:** a single
//!   such 429 opens the key: the provider said it will refuse calls until then, so
//!   every other call sent meanwhile is a wasted attempt (and some providers extend
//!   the penalty). Shorter hints are the retry layer's business, which waits them out
//!   inside the request, and pacing's, which slows the key down; they still count as
//!   failures, with one exception: while pacing is on and the key is still serving
//!   calls (a success within the last second), such a 429 does not count towards
//!   `consecutive_failures`. The key is saturated, not down: a burst of them (a
//!   client starting up above its quota) would otherwise open a key that is serving
//!   its quota, and the simulator's rate-limited scenario lost up to two seconds of
//!   the quota to that on four seeds in ten. It still counts in the failure ratio,
//!   and once the key serves nothing (a provider refusing everything) 429s count as
//!   usual: in the 429 outage the key opens a second or so later than it would.
//! - *→ Open at once* on quota exhaustion, for `quota_cooldown` (or the capped hint
//!   when longer).
//! - *Open → HalfOpen* exactly when the open period ends.
//! - *HalfOpen*: at most `half_open_probes` calls in flight; each must finish within
//!   `probe_timeout`, or its slot is taken back at that instant and counts as a failure
//!   (so a hung probe cannot keep the key half-open). `probe_successes_to_close`
//!   successes close the key (counts cleared); a failure reopens it for the doubled
//!   open period, or its hint when that is longer (the trouble outlasted one
//!   cooldown already, so a `Retry-After: 1` does not bring the probes back every
//!   second). A probe dropped before finishing (its caller went away) frees its slot
//!   and counts as nothing. The key closes **paced** at the
//!   successes per second it served before it opened (see *Pacing*), so the calls
//!   that waited for the reopening reach the upstream one slot at a time.
//! - **Re-opening keeps the later deadline, never the earlier**: a cooldown arriving
//!   while open only ever moves the deadline later (reported as an Open → Open
//!   transition).
//! - Outcomes of calls admitted before the key last changed state no longer count
//!   (a success from before the outage does not close it); their cooldowns
//!   (hinted 429/503, quota) still apply.
//!
//! ## Pacing
//!
//! A 429 or 503 that leaves the key closed is still a signal: the upstream is
//! taking fewer calls than it is sent (a quota, a capacity limit). With no other
//! model to go to, refusing everything for a while wastes the quota, and sending
//! everything wastes attempts on 429s. So a closed key learns a **pace**, in calls
//! per second ([`Pacing`], pure and tested in `pace.rs`), the way TCP learns a
//! congestion window:
//!
//! - the first 429/503 sets it to `backoff` (0.95) times the successes the key
//!   recorded over the last second, what the upstream really served just before it
//!   pushed back (a key that served nothing in that second is down, not saturated:
//!   no pace, the counting rules handle it);
//! - each later 429/503 (or success after one) sets it to `backoff` times what was
//!   served over the last second, when that is below the rate (the upstream's proven
//!   capacity, so repeated signals do not compound below it), never more than one
//!   extra `backoff` below the rate (a key failing most calls is going down, which is
//!   the counting rules' business); once per generation: a signal from a call
//!   admitted before the last decrease was sent at the old rate;
//! - while it refuses calls it grows with every success: fast back up to its
//!   **ceiling** (what the upstream last proved it takes: what it served over the
//!   second before the last signal, even above the rate), closing `recovery` (1.0) of the gap per second, so
//!   a decrease costs a second or two of goodput; from the ceiling on by `growth`
//!   (3 %) of itself per second, so it finds a raised quota again; a pace that
//!   refuses nobody never grows;
//! - it lifts after a whole `window` (30 s) with no signal and nobody waiting.
//!
//! A paced key hands out evenly spaced slots. A call that finds no slot due is
//! refused with the time until the next free slot, and **books** it: callers that
//! come back when told get their slots in turn, newcomers queue behind them, and a
//! caller whose deadline comes first books nothing. A slot left untaken for one
//! interval is dropped, so idle time never builds up a burst. The same pace, at the
//! rate served before the outage, admits the calls that waited for a key to close.
//! `pacing: None` turns it all off.
//!
//! **Retries are paced too.** A call admitted while its key is paced carries a
//! [`PaceHandle`](backstop_classify::PaceHandle) in its request extensions (only
//! then: the unpaced hot path pays nothing). Through it the retry layer below takes
//! a paced slot before each retry (waiting for the slot within the deadline, or
//! handing the last failure on when none comes in time) instead of sending retries
//! on top of the pace, where they would cause the very 429s they retry; and it
//! reports each 429 an attempt gets at once, so the pace slows down within one
//! response time instead of when the whole call, retries included, finishes
//! seconds later (the feedback that lets the pace probe faster without more 429s).
//! A 503 is counted when the call finishes, as before: under a capacity limit,
//! signalling each one at once cut the pace too often (the simulator's overload
//! scenario lost up to 13 points of success).
//!
//! ## Defaults
//!
//! | setting | default | why |
//! |---|---|---|
//! | `consecutive_failures` | 5 | a hard-down model is caught after 5 logical calls (each already retried below); one or two blips never trip it |
//! | `failure_ratio` | 50 % | resilience4j's default. Polly's 10 % suits cheap high-volume RPCs; LLM upstreams shed 429s in bursts and would flap |
//! | `window` / `window_buckets` | 30 s / 10 | Polly's 30 s sampling duration, in 3 s buckets |
//! | `minimum_calls` | 10 | Polly and resilience4j use 100; one model key sees a few calls a second, so 100 would take minutes to gather |
//! | `open_duration` | 5 s | the first opening is short (LiteLLM's and Polly's 5 s): most outages of an LLM upstream are blips, and with no other model the callers wait it out |
//! | `max_open_duration` | 60 s | each failed probe doubles the open period up to this: a model that stays down costs one probe a minute |
//! | `half_open_probes` | 1 | an LLM call is costly and slow; one trial tells enough |
//! | `probe_successes_to_close` | 1 | with one probe, one success |
//! | `probe_timeout` | 60 s | a non-streaming completion can take tens of seconds, and a probe includes the retries below; set it to the retry layer's deadline |
//! | `hint_opens_at` | 2 s | `Retry-After: 1` is the smallest a provider can say in whole seconds and means "this request, a moment later": the retry layer waits it out and pacing slows the key; 2 s or more says the bucket stays empty for a while |
//! | `max_hinted_cooldown` | 10 min | a Retry-After of 2.3 days (seen in the wild) or Azure's 86 400 s is cut; a probe then finds out |
//! | `quota_cooldown` | 10 min | quota does not come back within a request; probing every 10 min costs one call |
//! | `max_keys` | 4096 | every buffer has a cap; once full, a new key replaces one at rest in its shard ([`KeyState::is_at_rest`]: closed, no failure in its window or in a row, nothing in flight or served in the last second, no pace; only its successes are forgotten), or else a stale one ([`KeyState::is_stale`]: no outcome for [`BreakerConfig::idle_horizon`], 60 s, nothing in flight, no open period running), so junk model names cannot starve later routes; when its shard has neither, it passes untracked, with one warning (so does a route whose upstream, model or label is longer than [`MAX_KEY_NAME_BYTES`], 512) |
//! | `pacing` | on: backoff 0.95, growth 0.03, recovery 1.0, min 0.5 calls/s | a quota's 429s come from a slight overshoot; a gentle backoff keeps the pace within 5 % of the quota, and repeated signals still halve it in 14 steps under a real overload. Tuned in the simulator over five seeds: faster growth (0.05) or a gentler backoff (0.98) gained goodput under a quota but cost the overload scenario its recovery |
//!
//! ## The cooldown complaints of other gateways' users (peers.md, item 6)
//!
//! - *Re-cooling kept the first, shorter deadline*: the deadline only moves later.
//! - *Cooldowns enforced only every ~10 s*: deadlines are compared with the clock at
//!   every call; a key half-opens at its deadline to the nanosecond.
//! - *When every deployment was cooling down the gateway failed at once with no
//!   Retry-After*: every refusal carries the time to come back as a
//!   [`HintSource::Breaker`](backstop_classify::HintSource) delay hint; the fallback
//!   layer waits for the earliest of them when the upstream set them and they fit in
//!   the request's deadline, and otherwise answers with it, which a proxy forwards
//!   as `Retry-After`.
//! - *Cooldown state could not be queried*: [`Breaker::snapshot`], [`Breaker::state`],
//!   [`Breaker::retry_in`] and [`Breaker::key`]; a gauge per key and transition
//!   counters through the `metrics` crate (see [`events`]); a tracing event at every
//!   transition.
//! - *Limits per process became limit × replicas*: the state lives behind the
//!   [`BreakerStore`] trait, so a store shared across replicas can back it. The
//!   default [`InProcessStore`] is per process: with N replicas a down model receives
//!   up to N × `half_open_probes` probes per open period.
//!
//! ## Sharing, querying, other stores
//!
//! [`Breaker`] is the shared handle: [`BreakerLayer::breaker`] returns it and
//! [`BreakerLayer::from_breaker`] builds a layer over an existing one, so a health
//! endpoint, the fallback layer and several stacks see the same keys. The state sits
//! behind [`BreakerStore`] (admit, snapshot) and its [`AdmittedCall`] permits (record,
//! release on drop); [`InProcessStore`] is the default. A shared store can run the
//! same pure [`KeyState`] against a shared record.
//!
//! ## Cost
//!
//! The closed-state hot path (admit + record) hashes the route once, takes a shard's
//! read lock for a binary search and the key's mutex twice, reads the clock once (at
//! the record: a closed key that is not paced admits without the time; a paced one
//! reads it to find its slot), and allocates nothing
//! (`benches/breaker.rs`, `-- --warm-up-time 1 --measurement-time 2`, on the 2-core
//! development VM on 2026-11-24 at 10:43 UTC, load average 0.0–0.4, after pacing came
//! in; later breaker changes have not been re-measured; BENCHMARKS.md has the first
//! session's figures beside these):
//!
//! | case | time per call |
//! |---|---|
//! | admit + record, the instant passed in | 68 ns |
//! | admit + record reading the clock, as the layer does | 92 ns |
//! | 2 threads, same key / two keys | 290 ns / 97 ns |
//!
//! The two-thread figures are wall time per call. Two threads on one key contend for
//! its lock: both write the one-second window pacing learns from under it, so its
//! cache line moves between the cores (170 ns before pacing, measured then under
//! load).
//!
//! ## Example
//!
//! ```
//! use backstop_breaker::{BreakerConfig, BreakerLayer, BreakerState};
//! use backstop_classify::{Classification, Failure, FailureKind, ModelRoute};
//! use http::{Request, Response};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An upstream that is down (in a real stack: retry → timeout → classify → HTTP client).
//! let upstream = tower::service_fn(|_req: Request<String>| async {
//!     let mut response = Response::new(String::from("{\"error\":{\"type\":\"server_error\"}}"));
//!     *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
//!     response
//!         .extensions_mut()
//!         .insert(Classification::Failure(Failure::new(FailureKind::ServerError)));
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//!
//! let layer = BreakerLayer::new(BreakerConfig::default())?;
//! let breaker = layer.breaker().clone();
//! let mut service = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! let route = ModelRoute::new("openai", "gpt-4o");
//! let request = || {
//!     let mut request = Request::new(String::from("{}"));
//!     request.extensions_mut().insert(route.clone());
//!     request
//! };
//! for _ in 0..5 {
//!     let response = service.ready().await?.call(request()).await?;
//!     assert_eq!(response.status(), 500);
//! }
//! assert_eq!(breaker.state(&route), BreakerState::Open);
//!
//! // The sixth call is refused at once, with the time until a probe may go through.
//! let refused = service.ready().await?.call(request()).await.unwrap_err();
//! assert_eq!(refused.kind(), FailureKind::BreakerOpen);
//! let hint = refused.failure().hint.expect("a breaker refusal says when to retry");
//! // The first opening is short: `open_duration`, 5 s by default. (This example runs
//! // on tokio's paused clock, so no time has passed since the key opened.)
//! assert_eq!(hint.delay, std::time::Duration::from_secs(5));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod breaker;
mod config;
pub mod events;
mod future;
mod layer;
mod outcome;
mod pace;
mod service;
mod snapshot;
mod state;
mod store;

pub use breaker::{Breaker, BreakerPermit};
pub use config::{BreakerConfig, ConfigError, MAX_WINDOW_BUCKETS};
pub use future::ResponseFuture;
pub use layer::BreakerLayer;
pub use outcome::Outcome;
pub use pace::Pacing;
pub use service::BreakerService;
pub use snapshot::KeySnapshot;
pub use state::{
    BreakerState, HALF_OPEN_RECHECK_MIN, KeyState, PacedSlot, Rejection, Ticket, Transition,
    TransitionReason,
};
pub use store::{
    AdmittedCall, BreakerStore, InProcessPermit, InProcessStore, MAX_KEY_NAME_BYTES, TransitionSink,
};
