//! # backstop-mock: a fault-injecting, OpenAI-compatible mock LLM provider
//!
//! The provider every Backstop test, simulation and benchmark runs against. It
//! plays an OpenAI-compatible chat-completions API and fails, on purpose, in each
//! provider's exact wire format (OpenAI, Azure OpenAI, Anthropic, Gemini), at the
//! transport level (refused, reset, hung connections) and under load.
//!
//! It does **not** depend on `backstop-classify`: it plays the provider and must
//! not share our parser's assumptions.
//!
//! ## One behaviour model, two faces
//!
//! * In memory: [`MockProvider`] is a `tower::Service<http::Request<B>>` answering
//!   `http::Response<MockBody>`. All waiting uses tokio time, so it runs in paused
//!   virtual time (`#[tokio::test(start_paused = true)]`).
//! * Over HTTP (HTTP/1.1 and h2c on loopback): [`MockServer`] serves the same
//!   provider, sharing its records.
//!
//! It speaks `POST …/chat/completions` (JSON, or SSE with `"stream": true`: N
//! chunks then `data: [DONE]`) and `GET …/models`; any other path gets a 404.
//! The request body is read up to 16 MiB (413 beyond). A model name over 256 bytes
//! gets a 400 ([`MAX_MODEL_NAME_BYTES`]), and a request for a model beyond the first
//! 10,000 distinct ones a 404 ([`MAX_MODELS`]): whatever a client sends, the
//! mock's state stays bounded (attempt records are capped too, see
//! [`MockProvider::set_record_limit`]). Every response carries
//! `x-request-id: req_mock_<seq>`.
//!
//! ## Example: a script, then exact attempt counts
//!
//! ```
//! use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Two 429s with `retry-after: 2`, then 200.
//! let limited = Fault::OpenAiRateLimit { retry_after: Some("2".into()), retry_after_ms: None };
//! let mock = MockProvider::new(
//!     Scenario::new(7).model("gpt-4o", ModelPlan::script([limited.clone(), limited])),
//! );
//! // The layer under test goes here; clones of the mock share its records.
//! let service = ServiceBuilder::new().service(mock.clone());
//!
//! let request = || {
//!     http::Request::post("/v1/chat/completions")
//!         .body(Full::new(bytes::Bytes::from_static(br#"{"model":"gpt-4o","messages":[]}"#)))
//!         .unwrap()
//! };
//! let first = service.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), 429);
//! assert_eq!(first.headers()["retry-after"], "2");
//! service.clone().oneshot(request()).await.unwrap();
//! let third = service.clone().oneshot(request()).await.unwrap();
//! assert_eq!(third.status(), 200);
//! let body = third.into_body().collect().await.unwrap().to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(json["model"], "gpt-4o");
//!
//! // Assert exact attempt counts, answers and request headers.
//! assert_eq!(mock.attempts_for("gpt-4o"), 3);
//! let answered: Vec<_> = mock.attempts().iter().map(|a| a.fault.name()).collect();
//! assert_eq!(answered, ["openai_rate_limit", "openai_rate_limit", "ok"]);
//! # }
//! ```
//!
//! Each [`Attempt`] records its arrival number, model, tokio time (`at`,
//! `since_start`), method, URI, headers (an attempt counter, an `Idempotency-Key`…;
//! credentials are hidden from `Debug`), whether it asked to stream, the
//! [`Fault`] it was answered with and which rule chose it ([`AnswerSource`]).
//!
//! ## Scenarios in TOML (or JSON)
//!
//! A scenario is a seed, a plan per model, and a `default` plan for the models it
//! does not list. A fault is a table tagged by `kind` (the snake-case variant name
//! of [`Fault`]); durations are written `"250ms"`, `"2s"`, `"1m 30s"`. Unknown
//! keys are errors. The same structure in JSON is read by
//! [`Scenario::from_json_str`].
//!
//! ```
//! use backstop_mock::Scenario;
//!
//! let scenario = Scenario::from_toml_str(r#"
//! seed = 42
//!
//! ## Models not listed below: always 404 model_not_found.
//! [default]
//! then = { kind = "openai_model_not_found" }
//!
//! [models."gpt-4o"]
//! ## Two 429s with retry-after: 2, then (the default `then`) 200.
//! script = [
//!     { kind = "openai_rate_limit", retry_after = "2" },
//!     { kind = "openai_rate_limit", retry_after = "2" },
//! ]
//! latency = { kind = "log_normal", median = "300ms", sigma = 0.5, cap = "5s" }
//! stream_chunks = 5          # SSE chunks before data: [DONE]
//! chunk_delay = "20ms"       # between SSE frames
//!
//! [[models."gpt-4o".random]] # seeded: 5% of otherwise-ok answers are 500s
//! probability = 0.05
//! fault = { kind = "openai_server_error" }
//!
//! [[models."gpt-4o".outages]] # from 10 s to 70 s after start: 503
//! from = "10s"
//! until = "70s"
//! fault = { kind = "openai_overloaded" }
//!
//! [models."gpt-4o".capacity] # beyond 4 in flight or 20/s: 429 retry-after: 1
//! max_in_flight = 4
//! max_per_second = 20
//! over = { kind = "openai_rate_limit", retry_after = "1" }
//!
//! [models."claude-sonnet"]
//! then = { kind = "anthropic_overloaded" }
//! stream_pings = 1           # `event: ping` keep-alives before a stream's chunks
//!
//! [models."gemini-flash"]
//! script = [{ kind = "gemini_resource_exhausted", retry_delay = "58s", per_day = false }]
//!
//! [models."flaky-stream"]
//! then = { kind = "stream_error_after", chunks = 2, style = "openai" }
//!
//! [models."custom"]
//! then = { kind = "with_headers", fault = { kind = "openai_server_error" }, headers = [["x-should-retry", "false"]] }
//! "#).unwrap();
//! assert_eq!(scenario.models().count(), 5);
//! ```
//!
//! How one attempt is answered (outage, then capacity, then script or random
//! fault) is described on [`ModelPlan`]; latency distributions on [`Latency`];
//! the capacity model on [`Capacity`].
//!
//! ## Determinism
//!
//! The same seed, scenario and order of attempts give the same answers, the same
//! latencies and the same response bytes (ids and `created` come from the arrival
//! number and tokio time, never from the wall clock). Each model draws from its
//! own random sources (derived from the seed and the model name; faults and
//! latency separately), so traffic to one model never changes another's answers,
//! and adding latency to a plan never changes its faults.
//!
//! An attempt *arrives* when its request body has been read: in memory, when its
//! response future is first polled (a `Full` body is read at once); over HTTP,
//! when the server has the whole body. Attempts to the same model that are in
//! flight concurrently are answered in that arrival order, which the test
//! controls in memory (`oneshot` one at a time, or poll in a fixed order under
//! paused time) but not over real sockets: there, only the multiset of answers
//! is reproducible, not which concurrent request got which.
//!
//! ## The HTTP face
//!
//! ```no_run
//! use backstop_mock::{Fault, MockServer, ModelPlan, Scenario};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let scenario = Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::AnthropicOverloaded));
//! let server = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap()).await?;
//! println!("point an OpenAI client at {}", server.base_url());
//! // … run the client …
//! assert_eq!(server.provider().attempts_for("gpt-4o"), 1);
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Real sockets do not follow paused time, so a test over HTTP cannot step the
//! mock. Instead of polling its counts with sleeps, it waits for the event:
//! [`MockProvider::wait_for`] returns once a condition on the provider holds,
//! checked whenever an attempt is admitted or leaves flight (wrap it in a timeout
//! as a failsafe). [`MockProvider::hold_answers`] holds answers before their
//! response head while its guard lives, so a test can gather many requests at the
//! provider, check exactly how many are in flight, then let them all go.
//! [`MockProvider::hold_streams`] holds streams after their first event, so a test
//! can check what holds while a stream is known to be open, then let it finish.
//!
//! `cargo run -p backstop-mock --example serve -- scenario.toml 127.0.0.1:8080`
//! serves a scenario file until interrupted.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
mod completion;
mod decision;
mod error;
mod fault;
mod future;
mod human_duration;
mod plan;
mod provider;
mod record;
mod scenario;
mod server;
mod wire;

pub use body::MockBody;
pub use decision::AnswerSource;
pub use error::ScenarioError;
pub use fault::{Fault, StreamStyle};
pub use future::ResponseFuture;
pub use plan::{Capacity, Latency, ModelPlan, Outage, RandomFault};
pub use provider::{
    AnswersHeld, DEFAULT_RECORD_LIMIT, MAX_MODEL_NAME_BYTES, MAX_MODELS, MAX_REQUEST_BODY_BYTES,
    MockProvider, StreamsHeld,
};
pub use record::Attempt;
pub use scenario::Scenario;
pub use server::MockServer;
pub use wire::MAX_STREAM_FRAMES;
