//! A scripted fake provider for the retry layer's tests: each call takes the next
//! step of a script, and every attempt is recorded (time, headers, body).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::{
    BoxError, Classification, ClassifiedError, DelayHint, Failure, FailureKind, HintSource,
    ReplayBody,
};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::time::{Instant, Sleep};

/// A response body of scripted chunks, each after a delay (virtual time).
#[derive(Debug)]
pub struct ScriptBody {
    chunks: VecDeque<(Duration, Result<Bytes, &'static str>)>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ScriptBody {
    pub fn new(chunks: Vec<(Duration, Result<Bytes, &'static str>)>) -> Self {
        ScriptBody {
            chunks: chunks.into(),
            sleep: None,
        }
    }

    pub fn full(bytes: &'static str) -> Self {
        Self::new(vec![(
            Duration::ZERO,
            Ok(Bytes::from_static(bytes.as_bytes())),
        )])
    }
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some((delay, _)) = self.chunks.front() else {
            return Poll::Ready(None);
        };
        let delay = *delay;
        if !delay.is_zero() {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let (_, chunk) = self.chunks.pop_front().expect("checked above");
        Poll::Ready(Some(chunk.map(Frame::data).map_err(BoxError::from)))
    }
}

/// What the fake does on one call.
pub enum Step {
    /// Answer with this status, headers, classification (as the classify layer would
    /// attach) and body.
    Respond {
        status: StatusCode,
        headers: Vec<(&'static str, &'static str)>,
        classification: Option<Classification>,
        body: ScriptBody,
    },
    /// Fail with this classified transport error.
    Fail(FailureKind),
    /// Answer after this long.
    Delay(Duration, Box<Step>),
    /// Never answer.
    Hang,
}

impl Step {
    pub fn ok(body: &'static str) -> Step {
        Step::Respond {
            status: StatusCode::OK,
            headers: vec![("x-request-id", "req_ok")],
            classification: None,
            body: ScriptBody::full(body),
        }
    }

    pub fn status(code: u16) -> Step {
        Step::Respond {
            status: StatusCode::from_u16(code).unwrap(),
            headers: vec![],
            classification: None,
            body: ScriptBody::full("{\"error\":{}}"),
        }
    }

    /// A failure response carrying the given verdict.
    pub fn failure(code: u16, failure: Failure) -> Step {
        Step::Respond {
            status: StatusCode::from_u16(code).unwrap(),
            headers: vec![("x-request-id", "req_failed")],
            classification: Some(Classification::Failure(
                failure.with_status(StatusCode::from_u16(code).unwrap()),
            )),
            body: ScriptBody::full("{\"error\":{\"type\":\"scripted\"}}"),
        }
    }

    /// A 429 whose classification carries a `retry-after` hint.
    pub fn rate_limited(hint: Duration) -> Step {
        Step::failure(
            429,
            Failure::new(FailureKind::RateLimited)
                .with_hint(Some(DelayHint::new(hint, HintSource::RetryAfterSeconds))),
        )
    }

    pub fn sse(chunks: Vec<(Duration, Result<Bytes, &'static str>)>) -> Step {
        Step::Respond {
            status: StatusCode::OK,
            headers: vec![("content-type", "text/event-stream")],
            classification: None,
            body: ScriptBody::new(chunks),
        }
    }
}

/// One attempt as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The scripted fake. Clones share the script and the record.
#[derive(Clone)]
pub struct Fake {
    script: Arc<Mutex<VecDeque<Step>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    pub fn new(steps: Vec<Step>) -> Self {
        Fake {
            script: Arc::new(Mutex::new(steps.into())),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// When each attempt started, relative to `start`.
    pub fn starts(&self, start: Instant) -> Vec<Duration> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.at - start)
            .collect()
    }
}

impl tower::Service<Request<ReplayBody>> for Fake {
    type Response = Response<ScriptBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ScriptBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReplayBody>) -> Self::Future {
        self.seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            headers: request.headers().clone(),
            body: request.body().bytes().clone(),
        });
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .expect("the fake was called more often than scripted");
        Box::pin(play(step))
    }
}

fn play(
    step: Step,
) -> Pin<Box<dyn Future<Output = Result<Response<ScriptBody>, BoxError>> + Send>> {
    Box::pin(async move {
        match step {
            Step::Respond {
                status,
                headers,
                classification,
                body,
            } => {
                let mut response = Response::new(body);
                *response.status_mut() = status;
                for (name, value) in headers {
                    response.headers_mut().insert(name, value.parse().unwrap());
                }
                if let Some(c) = classification {
                    response.extensions_mut().insert(c);
                }
                Ok(response)
            }
            Step::Fail(kind) => Err(Box::new(ClassifiedError::new(
                Failure::new(kind),
                std::io::Error::other("scripted transport failure"),
            )) as BoxError),
            Step::Delay(d, step) => {
                tokio::time::sleep(d).await;
                play(*step).await
            }
            Step::Hang => std::future::pending().await,
        }
    })
}

/// Reads a body to the end: the data it yielded, and the error it ended with.
pub async fn read_body<B>(body: B) -> (Vec<u8>, Option<B::Error>)
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut body = body;
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(bytes) = frame.data_ref() {
                    data.extend_from_slice(bytes);
                }
            }
            Err(e) => {
                // Nothing may follow an error.
                assert!(body.frame().await.is_none(), "a frame followed the error");
                return (data, Some(e));
            }
        }
    }
    (data, None)
}

pub fn request(body: &'static str) -> Request<ReplayBody> {
    Request::post("http://provider.test/v1/chat/completions")
        .header("authorization", "Bearer sk-secret")
        .body(ReplayBody::from(body))
        .unwrap()
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A 429 with `Retry-After: 1`, as OpenAI sends it (for the tests over the mock).
pub fn mock_rate_limited() -> backstop_mock::Fault {
    backstop_mock::Fault::OpenAiRateLimit {
        retry_after: Some("1".into()),
        retry_after_ms: None,
    }
}

/// The mock provider answering `first` to the first call for `gpt-4o`, then healthy.
pub fn mock_answering_first(first: backstop_mock::Fault) -> backstop_mock::MockProvider {
    backstop_mock::MockProvider::new(
        backstop_mock::Scenario::new(1).model("gpt-4o", backstop_mock::ModelPlan::script([first])),
    )
}
