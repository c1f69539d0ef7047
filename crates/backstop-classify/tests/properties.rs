//! Property tests: arbitrary statuses, headers and bodies never panic, and the caller
//! always receives exactly the bytes the inner service sent.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backstop_classify::{
    Classification, ClassifyLayer, HintSource, Retryable, Rules, parse_delay_hint,
};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::{Layer, ServiceExt};

/// A body that yields the given chunks, then optionally an error.
struct ChunkBody {
    chunks: VecDeque<Bytes>,
    error: Option<std::io::Error>,
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(self.error.take().map(Err))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
    }
}

/// Header names the classifier reads, plus a few it must ignore.
const NAMES: &[&str] = &[
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-rate-limit-reset-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "x-should-retry",
    "content-type",
    "x-request-id",
];

fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        // Plausible and nearly plausible values.
        "-?[0-9]{0,25}(\\.[0-9]{0,12})?",
        "([0-9]{1,4}(h|m|s|ms|us|ns)){1,4}",
        "(true|false|TRUE|maybe)",
        "[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|\\+00:00|\\+02:00)?",
        "(inf|-inf|NaN|1e35|-1|0|)",
        // Anything a header may hold, including non-UTF-8 bytes.
        proptest::collection::vec(any::<u8>().prop_filter("header byte", |b| *b == b'\t' || (*b >= 0x20 && *b != 0x7f)), 0..40)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    ]
    .prop_filter_map("valid header value", |s| HeaderValue::from_str(&s).ok())
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((proptest::sample::select(NAMES), header_value()), 0..8).prop_map(
        |pairs| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(HeaderName::from_static(name), value);
            }
            map
        },
    )
}

/// A JSON-ish error body: shapes the envelope reader knows, filled with arbitrary
/// values, or arbitrary bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let word = "[a-zA-Z_ 0-9:.,`\\\\\"]{0,40}";
    let scalar = prop_oneof![
        word.prop_map(serde_json::Value::String),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
    ];
    let error = (
        scalar.clone(),
        scalar.clone(),
        scalar.clone(),
        scalar.clone(),
        "[0-9.]{0,8}s?",
        "(PerDay|PerMinute|x){0,2}",
    )
        .prop_map(|(t, code, message, status, delay, quota)| {
            serde_json::json!({
                "type": t,
                "code": code,
                "message": message,
                "status": status,
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": quota}]},
                ],
                "innererror": {"code": "ResponsibleAIPolicyViolation"},
            })
        });
    prop_oneof![
        error
            .clone()
            .prop_map(|e| serde_json::to_vec(&serde_json::json!({"error": e})).unwrap()),
        error
            .clone()
            .prop_map(|e| serde_json::to_vec(&serde_json::json!([{"error": e}])).unwrap()),
        error.prop_map(|e| {
            serde_json::to_vec(&serde_json::json!({"type": "error", "error": e})).unwrap()
        }),
        proptest::collection::vec(any::<u8>(), 0..600),
    ]
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_755_780_000)
}

fn all_rules() -> [Rules; 5] {
    [
        Rules::generic(),
        Rules::openai(),
        Rules::azure(),
        Rules::anthropic(),
        Rules::gemini(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn classify_response_never_panics_and_keeps_its_promises(
        status in 100u16..1000,
        headers in headers(),
        body in body(),
        cap in prop_oneof![Just(64 * 1024), 0usize..700],
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        for rules in all_rules() {
            let rules = rules.with_max_inspected_body(cap);
            let verdict = rules.classify_response(status, &headers, &body, now());
            match verdict {
                Classification::Success => prop_assert!(status.as_u16() < 400),
                Classification::Failure(f) => {
                    prop_assert!(status.as_u16() >= 400);
                    prop_assert_eq!(f.status, Some(status));
                    if let Some(hint) = f.hint {
                        prop_assert!(!hint.delay.is_zero());
                    }
                    // The server's explicit "don't" always holds.
                    let first = headers.get("x-should-retry").and_then(|v| v.to_str().ok());
                    if first.is_some_and(|v| v.trim().eq_ignore_ascii_case("false")) {
                        prop_assert_eq!(f.retryable, Retryable::No);
                        prop_assert_eq!(f.should_retry_header, Some(false));
                    }
                }
            }
            let stream = rules.classify_stream_error(&body);
            prop_assert_eq!(stream.status, None);
        }
    }

    #[test]
    fn delay_hints_are_positive_and_never_panic(headers in headers()) {
        if let Some(hint) = parse_delay_hint(&headers, now()) {
            prop_assert!(!hint.delay.is_zero());
            // The hint names a header that is really there.
            let names: &[&str] = match hint.source {
                HintSource::RetryAfterMs => &["retry-after-ms"],
                HintSource::XMsRetryAfterMs => &["x-ms-retry-after-ms"],
                HintSource::RetryAfterSeconds | HintSource::RetryAfterDate => &["retry-after"],
                HintSource::RateLimitResetRequests => &["x-ratelimit-reset-requests"],
                HintSource::RateLimitResetTokens => &["x-ratelimit-reset-tokens"],
                HintSource::AzureRateLimitResetTokens => &["x-rate-limit-reset-tokens"],
                HintSource::AnthropicRateLimitReset => {
                    &["anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-reset"]
                }
                _ => &[],
            };
            prop_assert!(names.iter().any(|n| headers.contains_key(*n)), "{:?}", hint);
        }
    }

    #[test]
    fn caller_receives_exactly_the_bytes_sent(
        status in prop_oneof![200u16..300, 400u16..600],
        headers in headers(),
        sent in body(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        cap in prop_oneof![Just(64 * 1024), 0usize..700],
        fail_at_end in any::<bool>(),
    ) {
        // Split the body at arbitrary points, empty chunks included.
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(sent.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = VecDeque::new();
        let mut start = 0;
        for point in points.into_iter().chain([sent.len()]) {
            chunks.push_back(Bytes::copy_from_slice(&sent[start..point]));
            start = point;
        }
        let inner_body = ChunkBody {
            chunks,
            error: fail_at_end.then(|| std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        };
        let mut response = Response::new(inner_body);
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        *response.headers_mut() = headers.clone();
        let slot = std::sync::Mutex::new(Some(response));
        let inner = tower::service_fn(move |_req: Request<()>| {
            let response = slot.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(response) }
        });
        let service = ClassifyLayer::new(Rules::generic())
            .with_max_error_body(cap)
            .layer(inner);

        // Everything is ready at once, so no runtime is needed.
        let response = service
            .oneshot(Request::new(()))
            .now_or_never()
            .expect("ready")
            .expect("no transport error");
        prop_assert_eq!(response.status().as_u16(), status);
        prop_assert_eq!(response.headers(), &headers);
        let classification = response.extensions().get::<Classification>().cloned().unwrap();
        prop_assert_eq!(classification.is_success(), status < 400);

        // What the caller is told about the length stays exact (a proxy re-serving the
        // response sets content-length from it).
        prop_assert_eq!(response.body().size_hint().exact(), Some(sent.len() as u64));

        let mut received = Vec::new();
        let mut body = response.into_body();
        let mut saw_error = false;
        while let Some(frame) = body.frame().now_or_never().expect("ready") {
            match frame {
                Ok(frame) => {
                    prop_assert!(!saw_error, "no data after the error");
                    received.extend_from_slice(&frame.into_data().unwrap());
                }
                Err(error) => {
                    prop_assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
                    saw_error = true;
                }
            }
        }
        prop_assert_eq!(received, sent);
        prop_assert_eq!(saw_error, fail_at_end);
    }
}
