//! The in-memory face: a `tower::Service` that plays an OpenAI-compatible provider.

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower_service::Service;

use crate::body::MockBody;
use crate::completion::{CREATED_EPOCH, Served, models_json};
use crate::decision::{AnswerSource, InFlight, ModelState};
use crate::fault::Fault;
use crate::future::ResponseFuture;
use crate::record::{Attempt, redact};
use crate::scenario::Scenario;
use crate::wire::{Wire, WireContext, render};

/// The largest request body the mock reads; larger ones get a 413.
pub const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The longest model name the mock serves: a longer one gets a 400
/// (`model_name_too_long`). Real names are under a hundred bytes; the cap keeps what
/// the mock holds per model, and in each attempt record, small.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// How many distinct models the mock keeps a plan's progress and a count for: a
/// request for a further model gets a 404 (`model_not_found`) and is recorded
/// without a model, so a client sending ever new names cannot grow the mock's
/// state without bound.
pub const MAX_MODELS: usize = 10_000;

/// How many attempts a provider keeps in detail unless told otherwise
/// ([`MockProvider::set_record_limit`]); counts stay exact beyond it.
pub const DEFAULT_RECORD_LIMIT: usize = 100_000;

/// A fault-injecting, OpenAI-compatible provider living in memory.
///
/// Clones share one state (plans' progress, random sources and records), so a
/// clone handed to a client stack and the one kept by the test see the same
/// attempts. Always ready.
#[derive(Clone)]
pub struct MockProvider {
    shared: Arc<Shared>,
}

struct Shared {
    scenario: Scenario,
    created: Instant,
    state: Mutex<State>,
    /// Woken whenever an attempt is admitted or leaves flight, or the records change.
    changed: Arc<Notify>,
    /// How many [`AnswersHeld`] guards are alive; answers wait while it is not 0.
    holds: watch::Sender<usize>,
    /// How many [`StreamsHeld`] guards are alive; streams that have sent their
    /// first event wait while it is not 0.
    stream_holds: watch::Sender<usize>,
}

struct State {
    next_seq: u64,
    models: HashMap<String, ModelState>,
    /// The most recent attempts, at most `record_limit` of them.
    attempts: VecDeque<Attempt>,
    record_limit: usize,
    /// Exact counts since the last reset, kept apart from the capped records.
    received: usize,
    received_per_model: HashMap<String, usize>,
}

impl Default for State {
    fn default() -> Self {
        State {
            next_seq: 0,
            models: HashMap::new(),
            attempts: VecDeque::new(),
            record_limit: DEFAULT_RECORD_LIMIT,
            received: 0,
            received_per_model: HashMap::new(),
        }
    }
}

impl fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockProvider")
            .field("seed", &self.shared.scenario.seed)
            .field(
                "models",
                &self.shared.scenario.models.keys().collect::<Vec<_>>(),
            )
            .field("attempts", &self.attempt_count())
            .finish()
    }
}

impl From<Scenario> for MockProvider {
    fn from(scenario: Scenario) -> Self {
        MockProvider::new(scenario)
    }
}

impl MockProvider {
    /// A provider playing `scenario`; outage windows count from now (tokio time).
    pub fn new(scenario: Scenario) -> Self {
        MockProvider {
            shared: Arc::new(Shared {
                scenario,
                created: Instant::now(),
                state: Mutex::new(State::default()),
                changed: Arc::new(Notify::new()),
                holds: watch::Sender::new(0),
                stream_holds: watch::Sender::new(0),
            }),
        }
    }

    /// The scenario being played.
    pub fn scenario(&self) -> &Scenario {
        &self.shared.scenario
    }

    /// When the mock was created (the origin of outage windows).
    pub fn started_at(&self) -> Instant {
        self.shared.created
    }

    /// Every attempt received since creation or the last
    /// [`reset_records`](Self::reset_records), in arrival order; at most the
    /// most recent [record limit](Self::set_record_limit) of them.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state().attempts.iter().cloned().collect()
    }

    /// How many attempts were received (exact, whatever the record limit).
    pub fn attempt_count(&self) -> usize {
        self.state().received
    }

    /// How many attempts named `model`, refused ones included (see
    /// [`Attempt::delivered`]); exact, whatever the record limit.
    pub fn attempts_for(&self, model: &str) -> usize {
        self.state()
            .received_per_model
            .get(model)
            .copied()
            .unwrap_or(0)
    }

    /// Forgets the recorded attempts and counts. Plans keep their progress
    /// (script position, random sources, load) and `seq` keeps counting.
    pub fn reset_records(&self) {
        let mut state = self.state();
        state.attempts.clear();
        state.received = 0;
        state.received_per_model.clear();
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Keeps at most `limit` attempts in detail (default
    /// [`DEFAULT_RECORD_LIMIT`]), dropping the oldest beyond it, so a long-running
    /// server or simulation has bounded memory. Counts stay exact.
    pub fn set_record_limit(&self, limit: usize) {
        let mut state = self.state();
        state.record_limit = limit;
        while state.attempts.len() > limit {
            state.attempts.pop_front();
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Attempts of `model` currently in flight (see [`Capacity`](crate::Capacity)).
    pub fn in_flight(&self, model: &str) -> usize {
        self.state()
            .models
            .get(model)
            .map_or(0, ModelState::in_flight)
    }

    /// Waits until `condition` holds for this provider. It is checked at once, then
    /// each time the provider's state changes: an attempt is admitted (counted,
    /// recorded, in flight), an attempt stops being in flight (its answer ended or
    /// was dropped), or the records are reset or trimmed.
    ///
    /// For tests over real sockets, where the mock cannot be stepped as in paused
    /// time: wait for the event instead of polling a count with sleeps.
    ///
    /// ```
    /// # use backstop_mock::{MockProvider, Scenario};
    /// # async fn example(mock: MockProvider) {
    /// // Four requests sent elsewhere are all at the provider.
    /// let failsafe = std::time::Duration::from_secs(10);
    /// tokio::time::timeout(failsafe, mock.wait_for(|p| p.in_flight("gpt-4o") == 4))
    ///     .await
    ///     .expect("the four requests never reached the mock");
    /// # }
    /// ```
    ///
    /// It never gives up by itself: wrap it in a timeout as a failsafe, as above.
    /// `condition` is called with no lock held, so it may use every accessor
    /// ([`in_flight`](Self::in_flight), [`attempts_for`](Self::attempts_for)…).
    pub async fn wait_for(&self, mut condition: impl FnMut(&MockProvider) -> bool) {
        loop {
            // Registered before the check, so a change between the check and the
            // await still wakes it.
            let changed = self.shared.changed.notified();
            if condition(self) {
                return;
            }
            changed.await;
        }
    }

    /// Holds every answer to a chat request before its response head (and before
    /// the plan's latency) until the returned guard, and every other one alive, is
    /// dropped. Held attempts are admitted as usual: counted, recorded, answered in
    /// arrival order and in flight while they wait. A refused connection is never
    /// held, and neither is the model list.
    ///
    /// Lets a test gather many requests at the provider at once, check them with
    /// [`wait_for`](Self::wait_for), then let them all go.
    pub fn hold_answers(&self) -> AnswersHeld {
        AnswersHeld(Hold::take(&self.shared, |shared| &shared.holds))
    }

    /// Holds every streamed answer after its first event until the returned guard,
    /// and every other one alive, is dropped: a stream that has sent its first
    /// event sends nothing more, neither an event nor its end, and stays in flight;
    /// released, it goes on at its own pace (its next event `chunk_delay` after the
    /// release). Answers not yet started, and whole (non-stream) bodies, are not
    /// held; a stream's first event is not either.
    ///
    /// Lets a test look at the world while a stream is known to be open (that the
    /// first event reached the client while the provider's stream was still in
    /// flight, say), then let it finish.
    pub fn hold_streams(&self) -> StreamsHeld {
        StreamsHeld(Hold::take(&self.shared, |shared| &shared.stream_holds))
    }

    /// Returns once no [`AnswersHeld`] guard is alive.
    async fn released(&self) {
        let mut holds = self.shared.holds.subscribe();
        // The sender lives in `self.shared`: it cannot be gone.
        let _released = holds.wait_for(|holds| *holds == 0).await;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the records usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn answer<B>(self, request: Request<B>) -> Result<Response<MockBody>, io::Error>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let bytes = match Limited::new(body, MAX_REQUEST_BODY_BYTES).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(protocol_error(
                413,
                "Request body exceeds the mock provider's 16 MiB limit.",
                "request_too_large",
            )),
            Err(_) => Err(protocol_error(
                400,
                "The request body could not be read.",
                "invalid_body",
            )),
        };

        let path = parts.uri.path();
        let route = if parts.method == Method::GET && path.ends_with("/models") {
            Route::Models
        } else if parts.method == Method::POST && path.ends_with("/chat/completions") {
            Route::Chat
        } else {
            Route::Unknown
        };

        let request_fields = bytes.and_then(|b| match route {
            Route::Chat => chat_fields(&b),
            Route::Models => Ok(ChatFields::default()),
            Route::Unknown => Err(protocol_error(
                404,
                &format!("Unknown request URL: {} {}.", parts.method, path),
                "unknown_url",
            )),
        });

        let Admitted {
            seq,
            since_start,
            fault,
            fields,
            decision,
        } = self.admit(parts, route, request_fields);
        let served_created = CREATED_EPOCH + since_start.as_secs();

        let request_id = HeaderValue::try_from(format!("req_mock_{seq}"))
            .unwrap_or(HeaderValue::from_static("req_mock"));

        if route == Route::Models && fault.is_ok() {
            let mut response =
                Response::new(MockBody::full(models_json(self.shared.scenario.models())));
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            response.headers_mut().insert("x-request-id", request_id);
            return Ok(response);
        }

        let model = fields.model.unwrap_or_default();
        let plan = self.shared.scenario.plan_for(&model);
        let cx = WireContext {
            served: Served {
                model: &model,
                seq,
                created: served_created,
            },
            stream: fields.stream,
            chunks: plan.stream_chunks,
            pings: plan.stream_pings,
        };
        let wire = render(&fault, &cx);
        if !matches!(wire, Wire::Refuse) {
            self.released().await;
        }
        let (latency, in_flight) = match decision {
            Some(d) => (d.latency, d.in_flight),
            None => (Duration::ZERO, None),
        };
        let stream_holds = self.shared.stream_holds.subscribe();
        deliver(
            wire,
            latency,
            plan.chunk_delay,
            in_flight,
            request_id,
            stream_holds,
        )
        .await
    }

    /// Records the attempt and decides its answer, under the lock: arrival order
    /// is the order in which requests finish being read.
    fn admit(
        &self,
        parts: http::request::Parts,
        route: Route,
        request_fields: Result<ChatFields, Fault>,
    ) -> Admitted {
        let headers = redact(parts.headers);
        let mut state = self.state();
        let seq = state.next_seq;
        state.next_seq += 1;
        let at = Instant::now();
        let since_start = at.saturating_duration_since(self.shared.created);

        let (fault, fields, decision) = match (route, request_fields) {
            (_, Err(fault)) => (fault, ChatFields::default(), None),
            (Route::Models, Ok(fields)) => (Fault::Ok, fields, None),
            (_, Ok(fields))
                if fields.model.as_ref().is_some_and(|model| {
                    state.models.len() >= MAX_MODELS && !state.models.contains_key(model)
                }) =>
            {
                let fault = protocol_error(
                    404,
                    &format!("backstop-mock serves at most {MAX_MODELS} distinct models"),
                    "model_not_found",
                );
                (fault, ChatFields::default(), None)
            }
            (_, Ok(fields)) => {
                let model = fields.model.clone().unwrap_or_default();
                let plan = self.shared.scenario.plan_for(&model);
                let seed = self.shared.scenario.seed;
                let mut decision = state
                    .models
                    .entry(model.clone())
                    .or_insert_with(|| ModelState::new(seed, &model))
                    .decide(plan, since_start);
                decision.in_flight = decision
                    .in_flight
                    .map(|in_flight| in_flight.notifying(Arc::clone(&self.shared.changed)));
                (decision.fault.clone(), fields, Some(decision))
            }
        };
        state.received += 1;
        if let Some(model) = &fields.model {
            *state.received_per_model.entry(model.clone()).or_insert(0) += 1;
        }
        state.attempts.push_back(Attempt {
            seq,
            model: fields.model.clone(),
            at,
            since_start,
            method: parts.method,
            uri: parts.uri,
            headers,
            stream: fields.stream,
            fault: fault.clone(),
            source: decision
                .as_ref()
                .map_or(AnswerSource::Protocol, |d| d.source),
            delivered: !matches!(fault, Fault::ConnectRefused),
        });
        while state.attempts.len() > state.record_limit {
            state.attempts.pop_front();
        }
        drop(state);
        self.shared.changed.notify_waiters();
        Admitted {
            seq,
            since_start,
            fault,
            fields,
            decision,
        }
    }
}

/// Holds the provider's answers while alive (see [`MockProvider::hold_answers`]);
/// dropping it lets them go.
#[must_use = "answers are held only while the guard is alive"]
pub struct AnswersHeld(Hold);

/// Holds the provider's streams after their first event while alive (see
/// [`MockProvider::hold_streams`]); dropping it lets them go on.
#[must_use = "streams are held only while the guard is alive"]
pub struct StreamsHeld(Hold);

impl fmt::Debug for AnswersHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt("AnswersHeld", f)
    }
}

impl fmt::Debug for StreamsHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt("StreamsHeld", f)
    }
}

/// One hold of either kind: counted in its `count` while alive.
struct Hold {
    shared: Arc<Shared>,
    count: fn(&Shared) -> &watch::Sender<usize>,
}

impl Hold {
    fn take(shared: &Arc<Shared>, count: fn(&Shared) -> &watch::Sender<usize>) -> Self {
        count(shared).send_modify(|holds| *holds += 1);
        Hold {
            shared: Arc::clone(shared),
            count,
        }
    }

    fn fmt(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("holds", &*(self.count)(&self.shared).borrow())
            .finish()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        (self.count)(&self.shared).send_modify(|holds| *holds -= 1);
    }
}

/// The outcome of admitting one attempt.
struct Admitted {
    seq: u64,
    since_start: Duration,
    fault: Fault,
    fields: ChatFields,
    decision: Option<crate::decision::Decision>,
}

/// Plays a rendered answer out in tokio time.
async fn deliver(
    wire: Wire,
    latency: Duration,
    chunk_delay: Duration,
    in_flight: Option<InFlight>,
    request_id: HeaderValue,
    stream_holds: watch::Receiver<usize>,
) -> Result<Response<MockBody>, io::Error> {
    match wire {
        // A refused connect fails at once: no server ever saw it.
        Wire::Refuse => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "backstop-mock: connection refused",
        )),
        Wire::Hang => {
            // Holding `in_flight` keeps the attempt counted until the caller gives up.
            let _held = in_flight;
            std::future::pending().await
        }
        Wire::ResetBeforeHead => {
            let _held = in_flight;
            tokio::time::sleep(latency).await;
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "backstop-mock: connection reset before the response head",
            ))
        }
        Wire::Respond {
            status,
            headers,
            body,
        } => {
            tokio::time::sleep(latency).await;
            let mut response =
                Response::new(MockBody::new(body, chunk_delay, in_flight, stream_holds));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response.headers_mut().insert("x-request-id", request_id);
            Ok(response)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Models,
    Unknown,
}

#[derive(Debug, Default)]
struct ChatFields {
    model: Option<String>,
    stream: bool,
}

/// Reads `model` and `stream` from a chat request body; a body without a string
/// `model` gets OpenAI's 400.
fn chat_fields(body: &[u8]) -> Result<ChatFields, Fault> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        protocol_error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
            "invalid_json",
        )
    })?;
    let model = value
        .get("model")
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    let stream = value.get("stream").and_then(serde_json::Value::as_bool) == Some(true);
    match model {
        Some(model) if model.len() > MAX_MODEL_NAME_BYTES => Err(protocol_error(
            400,
            &format!("backstop-mock serves model names of at most {MAX_MODEL_NAME_BYTES} bytes"),
            "model_name_too_long",
        )),
        Some(model) => Ok(ChatFields {
            model: Some(model),
            stream,
        }),
        None => Err(protocol_error(
            400,
            "you must provide a model parameter",
            "missing_model",
        )),
    }
}

/// One of the mock's own protocol answers, as the exact status and OpenAI-style body sent.
fn protocol_error(status: u16, message: &str, code: &str) -> Fault {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    Fault::Status {
        status,
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: body.to_string(),
    }
}

impl<B> Service<Request<B>> for MockProvider
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Response = Response<MockBody>;
    type Error = io::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        ResponseFuture::new(self.clone().answer(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ModelPlan;
    use http_body_util::Full;

    fn chat(model: &str, stream: bool) -> Request<Full<Bytes>> {
        let body = json!({"model": model, "stream": stream, "messages": []});
        Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// `mock.wait_for(condition)`, failing (at once, in paused time) rather than
    /// hanging should no change ever wake it.
    async fn wait(mock: &MockProvider, condition: impl FnMut(&MockProvider) -> bool) {
        tokio::time::timeout(secs(3600), mock.wait_for(condition))
            .await
            .expect("no change woke the waiter");
    }

    /// A stream whose three frames (two chunks, then `[DONE]`) come 1 s apart, a
    /// hang and a refusal.
    fn mock() -> MockProvider {
        MockProvider::new(
            Scenario::new(1)
                .model(
                    "stream",
                    ModelPlan::ok().stream_chunks(2).chunk_delay(secs(1)),
                )
                .model("hang", ModelPlan::always(Fault::Hang))
                .model("refused", ModelPlan::always(Fault::ConnectRefused)),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_wakes_when_an_attempt_is_admitted_and_when_it_leaves_flight() {
        let mock = mock();
        let start = Instant::now();
        // Already true: no wait.
        wait(&mock, |p| p.attempt_count() == 0).await;
        assert_eq!(start.elapsed(), Duration::ZERO);

        let client = mock.clone();
        let streamed = tokio::spawn(async move {
            tokio::time::sleep(secs(3)).await;
            let response = client.clone().call(chat("stream", true)).await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        });
        // Woken by the admission, at 3 s.
        wait(&mock, |p| p.in_flight("stream") == 1).await;
        assert_eq!(start.elapsed(), secs(3));
        assert_eq!(mock.attempts_for("stream"), 1);
        // And by the stream's end, 2 s after its head.
        wait(&mock, |p| p.in_flight("stream") == 0).await;
        assert_eq!(start.elapsed(), secs(5));
        let body = streamed.await.unwrap();
        assert!(body.ends_with(b"data: [DONE]\n\n"), "{body:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_wakes_when_a_dropped_answer_leaves_flight_and_on_a_reset() {
        let mock = mock();
        let hung = tokio::spawn(mock.clone().call(chat("hang", false)));
        wait(&mock, |p| p.in_flight("hang") == 1).await;
        let start = Instant::now();
        let waiter = tokio::spawn({
            let mock = mock.clone();
            async move { wait(&mock, |p| p.in_flight("hang") == 0).await }
        });
        tokio::time::sleep(secs(60)).await;
        assert!(!waiter.is_finished(), "a hang stays in flight");
        hung.abort();
        waiter.await.unwrap();
        assert_eq!(start.elapsed(), secs(60));

        let waiter = tokio::spawn({
            let mock = mock.clone();
            async move { wait(&mock, |p| p.attempt_count() == 0).await }
        });
        tokio::time::sleep(secs(1)).await;
        assert!(!waiter.is_finished());
        mock.reset_records();
        waiter.await.unwrap();
        assert_eq!(start.elapsed(), secs(61));
    }

    #[tokio::test(start_paused = true)]
    async fn held_answers_are_admitted_and_in_flight_and_go_once_every_guard_is_dropped() {
        let mock = mock();
        let first = mock.hold_answers();
        let second = mock.hold_answers();
        let start = Instant::now();
        let answers: Vec<_> = (0..3)
            .map(|_| tokio::spawn(mock.clone().call(chat("stream", false))))
            .collect();
        wait(&mock, |p| p.in_flight("stream") == 3).await;
        assert_eq!(mock.attempts_for("stream"), 3);
        // A refusal is never held.
        let refused = mock.clone().call(chat("refused", false)).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

        tokio::time::sleep(secs(60)).await;
        assert!(
            answers.iter().all(|a| !a.is_finished()),
            "held for a minute"
        );
        drop(first);
        tokio::time::sleep(secs(1)).await;
        assert!(
            answers.iter().all(|a| !a.is_finished()),
            "one guard still held"
        );
        drop(second);
        for answer in answers {
            let response = answer.await.unwrap().unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(start.elapsed(), secs(61));
        assert_eq!(mock.in_flight("stream"), 0);
        // Once released, answers are no longer held.
        let response = mock.clone().call(chat("stream", false)).await.unwrap();
        assert_eq!(response.status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn held_streams_stop_after_their_first_event_until_every_guard_is_dropped() {
        // The same stream, not held, as a fresh mock's first answer: its bytes, 2 s
        // from head to end.
        let start = Instant::now();
        let response = mock().call(chat("stream", true)).await.unwrap();
        let expected = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(start.elapsed(), secs(2));

        let mock = mock();
        let first = mock.hold_streams();
        let second = mock.hold_streams();
        let start = Instant::now();
        let mut body = mock
            .clone()
            .call(chat("stream", true))
            .await
            .unwrap()
            .into_body();
        // The first event is not held.
        let mut got = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .to_vec();
        assert_eq!(start.elapsed(), Duration::ZERO);
        // A whole body is not held either.
        let whole = mock.clone().call(chat("stream", false)).await.unwrap();
        whole.into_body().collect().await.unwrap();
        assert_eq!(mock.in_flight("stream"), 1);
        // Nothing more for a minute, in flight all along, one guard or two.
        assert!(tokio::time::timeout(secs(60), body.frame()).await.is_err());
        drop(first);
        assert!(tokio::time::timeout(secs(1), body.frame()).await.is_err());
        assert_eq!(mock.in_flight("stream"), 1);
        drop(second);
        // Released at 61 s: the rest at its own pace, each event 1 s after the one
        // before or after the release.
        got.extend_from_slice(&body.collect().await.unwrap().to_bytes());
        assert_eq!(start.elapsed(), secs(63));
        assert_eq!(got, expected);
        assert_eq!(mock.in_flight("stream"), 0);
    }

    #[test]
    fn each_kind_of_hold_shows_how_many_of_its_kind_are_alive() {
        let mock = mock();
        let answers = mock.hold_answers();
        let streams = [mock.hold_streams(), mock.hold_streams()];
        assert_eq!(format!("{answers:?}"), "AnswersHeld { holds: 1 }");
        assert_eq!(format!("{:?}", streams[0]), "StreamsHeld { holds: 2 }");
        drop(streams);
        assert_eq!(*mock.shared.stream_holds.borrow(), 0);
        assert_eq!(*mock.shared.holds.borrow(), 1);
        drop(answers);
        assert_eq!(*mock.shared.holds.borrow(), 0);
    }
}
