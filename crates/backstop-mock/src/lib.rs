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
//! The request body is read up to 16 MiB (413 beyond). Every response carries
//! `x-request-id: req_mock_<seq>`.
//!
//! ## Example
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
//! // Assert exact attempt counts.
//! assert_eq!(mock.attempts_for("gpt-4o"), 3);
//! let answered: Vec<_> = mock.attempts().iter().map(|a| a.fault.name()).collect();
//! assert_eq!(answered, ["openai_rate_limit", "openai_rate_limit", "ok"]);
//! # }
//! ```
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
pub use provider::{MAX_REQUEST_BODY_BYTES, MockProvider};
pub use record::Attempt;
pub use scenario::Scenario;
pub use server::MockServer;
