//! One request through the proxy: routing, the checks made before the stack, the
//! call through the stack, and the response the caller gets.

use std::sync::Arc;

use backstop::classify::{ClassifiedError, printed_name};
use backstop::fallback::config::CREDENTIAL_HEADERS;
use backstop::fallback::{ServedBy, read_model};
use backstop::retry::{BodyLimitError, collect};
use backstop::{BackstopLayer, BackstopService};
use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::ServiceExt;

use super::admission::{Admitted, InFlightLimit, overloaded_response};
use super::body::{ProxyBody, SseErrorAsEvent};
use super::body_budget::{BodyBudget, BodyBudgetSpent, Budgeted, budget_spent_response};
use super::metrics::{Counters, Outcome, render};
use super::outcome::{Report, SHOULD_RETRY_HEADER, error_status};
use super::reply::{model_list, openai_error, text};
use super::upstream::Upstream;

/// Headers that describe one hop of a connection (RFC 9110 §7.6.1) or frame a body:
/// never forwarded in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) stack: BackstopService<Upstream>,
    pub(crate) layer: BackstopLayer,
    /// Served models (name → upstream), sorted by name.
    pub(crate) models: Vec<(String, String)>,
    pub(crate) max_request_body: usize,
    pub(crate) body_read_timeout: std::time::Duration,
    pub(crate) counters: Counters,
    /// The bound on chat requests in flight.
    pub(crate) in_flight: Arc<InFlightLimit>,
    /// The bound on the request-body bytes they hold.
    pub(crate) body_budget: Arc<BodyBudget>,
}

/// Answers one request. Never fails: every problem becomes an HTTP answer.
pub(crate) async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::POST, "/v1/chat/completions") => chat(shared, request).await,
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok".into()),
        (&Method::GET, "/metrics") => {
            let mut values = shared.counters.values();
            values.in_flight = shared.in_flight.in_flight() as u64;
            values.max_in_flight = shared.in_flight.max() as u64;
            values.buffered_body_bytes = shared.body_budget.held() as u64;
            values.max_buffered_body_bytes = shared.body_budget.max() as u64;
            let text_body = render(
                &values,
                &shared.layer.breaker().breaker().snapshot(),
                &shared.layer.budget().snapshot(),
                shared.layer.budget().throttle_snapshot().as_ref(),
            );
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                Bytes::from(text_body),
            )
        }
        (&Method::GET, "/v1/models") => model_list(
            shared
                .models
                .iter()
                .map(|(id, upstream)| (id.as_str(), upstream.as_str())),
        ),
        (_, "/v1/chat/completions" | "/healthz" | "/metrics" | "/v1/models") => {
            let mut response = openai_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                &format!("{} is not supported on {path}", request.method()),
            );
            let allow = if path == "/v1/chat/completions" {
                "POST"
            } else {
                "GET"
            };
            response
                .headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        _ => openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            &format!(
                "unknown path {path}; this proxy serves POST /v1/chat/completions, GET /v1/models, /healthz and /metrics"
            ),
        ),
    }
}

/// Admits the request under the in-flight bound (or sheds it at once, its body
/// unread), then answers it; the slot is held until the response body ends.
async fn chat(shared: Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    match shared.in_flight.try_admit() {
        Ok(guard) => Admitted::response(admitted_chat(shared, request).await, guard),
        Err(overloaded) => {
            shared.counters.record(Outcome::Shed, 0, false);
            // Debug, not info: under overload a line per shed request would add to
            // the load; the count is in /metrics.
            tracing::debug!(target: "backstop::proxy", max_in_flight = overloaded.max, "request shed");
            overloaded_response(overloaded)
        }
    }
}

async fn admitted_chat(shared: Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let limit = shared.max_request_body;
    // A declared length over the cap is refused before a byte of the body is read.
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return rejected(&shared, too_large(limit), started, None);
    }
    // The body is held until the stack has answered (for retries and fallback
    // hops): its bytes count against the budget all requests share until then. A
    // declared length is reserved before a byte is read.
    let mut reservation = shared.body_budget.reservation();
    if let Some(declared) = declared
        && let Err(spent) = reservation.cover(declared as usize)
    {
        return budget_spent(&shared, spent);
    }
    // A caller that trickles its body must not hold the task (and the body buffer)
    // forever: reading it has a time bound as well as a size bound.
    let body = Budgeted::new(body, &mut reservation);
    let read = tokio::time::timeout(shared.body_read_timeout, collect(body, limit)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BodyLimitError::TooLarge { .. })) => {
            return rejected(&shared, too_large(limit), started, None);
        }
        Ok(Err(BodyLimitError::Read(error))) if error.is::<BodyBudgetSpent>() => {
            let spent = BodyBudgetSpent {
                max: shared.body_budget.max(),
            };
            return budget_spent(&shared, spent);
        }
        Err(_elapsed) => {
            let response = openai_error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_body_timeout",
                &format!(
                    "the request body was not received within {}; send it faster or raise the proxy's body read timeout",
                    humantime::format_duration(shared.body_read_timeout)
                ),
            );
            return rejected(&shared, response, started, None);
        }
        Ok(Err(error)) => {
            let message = format!("{error}");
            let response = openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body_read_failed",
                &message,
            );
            return rejected(&shared, response, started, None);
        }
    };
    let model = match read_model(&bytes) {
        Ok(model) => model.into_owned(),
        Err(error) => {
            let response = openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_body",
                &error.to_string(),
            );
            return rejected(&shared, response, started, None);
        }
    };
    if !shared.models.iter().any(|(name, _)| *name == model) {
        let served: Vec<&str> = shared.models.iter().map(|(n, _)| n.as_str()).collect();
        let response = openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            // The name is the caller's, up to the whole body long: echoed cut short.
            &format!(
                "the model `{}` is not served by this proxy; configured models: {}",
                printed_name(&model),
                served.join(", ")
            ),
        );
        return rejected(&shared, response, started, Some(&model));
    }

    // The caller's credentials are for the proxy (or for nobody): the stack sends
    // each target its own configured key. The fallback layer strips the well-known
    // credential headers too; removing them here keeps them out of the stack
    // entirely, including its logs and records.
    for name in CREDENTIAL_HEADERS.iter().chain(HOP_BY_HOP.iter()) {
        parts.headers.remove(*name);
    }
    // The classify layer reads provider error bodies (quota vs rate limit, context
    // length…); a gzip-compressed body would hide them, so upstreams are asked for
    // identity encoding whatever the caller accepts.
    parts.headers.remove(ACCEPT_ENCODING);
    // The upstream connection is chosen by the client (HTTP/1.1, or HTTP/2 by
    // ALPN); an HTTP/2 caller's version must not be forced onto an HTTP/1 pool.
    parts.version = Version::HTTP_11;
    let upstream_request = Request::from_parts(parts, Full::new(bytes));

    let result = shared.stack.clone().oneshot(upstream_request).await;
    // The stack has let go of the request body (a streamed answer keeps no copy).
    drop(reservation);
    let now = Instant::now();
    match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            let report = Report::of_response(parts.extensions.get::<ServedBy>(), parts.status, now);
            for name in HOP_BY_HOP {
                parts.headers.remove(name);
            }
            report.apply(&mut parts.headers);
            let body = if is_event_stream(&parts.headers) {
                // An error event may be appended: the upstream's length no longer holds.
                parts.headers.remove(CONTENT_LENGTH);
                SseErrorAsEvent::new(body).boxed_unsync()
            } else {
                body.map_err(Into::into).boxed_unsync()
            };
            let outcome = match (report.final_failure, report.fallback) {
                (true, _) => Outcome::UpstreamError,
                (false, true) => Outcome::ServedByFallback,
                (false, false) => Outcome::Served,
            };
            finish(&shared, outcome, &report, parts.status, &model, started);
            Response::from_parts(parts, body)
        }
        Err(error) => {
            let report = Report::of_error(&error, now);
            let response = local_error(&error, &report);
            finish(
                &shared,
                Outcome::LocalError,
                &report,
                response.status(),
                &model,
                started,
            );
            response
        }
    }
}

/// The answer to an error Backstop raised itself: an OpenAI-style JSON body with the
/// status [`error_status`] chose, and the report headers.
fn local_error(error: &ClassifiedError, report: &Report) -> Response<ProxyBody> {
    let status = error_status(error);
    // `ClassifiedError`'s text names failure kinds, models and transport causes,
    // never request headers, so no credential can appear in it.
    let message = format!("backstop: {error}");
    let mut response = openai_error(status.status, status.error_type, status.code, &message);
    report.apply(response.headers_mut());
    response
}

/// A request the body budget has no room for: shed like one over the in-flight
/// bound (nothing was sent anywhere, and the budget frees as requests finish).
fn budget_spent(shared: &Shared, spent: BodyBudgetSpent) -> Response<ProxyBody> {
    shared.counters.record(Outcome::Shed, 0, false);
    tracing::debug!(target: "backstop::proxy", max_buffered_body_bytes = spent.max, "request shed: body budget spent");
    budget_spent_response(spent)
}

fn rejected(
    shared: &Shared,
    mut response: Response<ProxyBody>,
    started: Instant,
    model: Option<&str>,
) -> Response<ProxyBody> {
    // Retrying a refused request would be refused the same way.
    response
        .headers_mut()
        .insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
    shared.counters.record(Outcome::Rejected, 0, false);
    tracing::info!(
        target: "backstop::proxy",
        requested_model = %printed_name(model.unwrap_or("")),
        status = response.status().as_u16(),
        outcome = Outcome::Rejected.as_str(),
        latency_ms = started.elapsed().as_millis() as u64,
        "request refused before the stack"
    );
    response
}

fn finish(
    shared: &Shared,
    outcome: Outcome,
    report: &Report,
    status: StatusCode,
    model: &str,
    started: Instant,
) {
    shared
        .counters
        .record(outcome, report.attempts, report.fallback);
    // Only names, numbers and the outcome: no header, body or credential is logged.
    tracing::info!(
        target: "backstop::proxy",
        requested_model = model,
        served_model = report.model.as_deref().unwrap_or(""),
        status = status.as_u16(),
        attempts = report.attempts,
        fallback = report.fallback,
        outcome = outcome.as_str(),
        retry_after = report.retry_after,
        latency_ms = started.elapsed().as_millis() as u64,
        "request"
    );
}

fn too_large(limit: usize) -> Response<ProxyBody> {
    openai_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
        &format!(
            "request body exceeds the proxy's {limit}-byte limit; send a smaller request or raise max_request_body in the proxy's configuration"
        ),
    )
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}
