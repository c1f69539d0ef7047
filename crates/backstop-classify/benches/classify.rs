//! What classification costs: the pure rules on typical error responses, and the
//! layer's overhead on a success (which it must never buffer) and on an error.

use std::convert::Infallible;
use std::time::SystemTime;

use backstop_classify::{ClassifyLayer, Rules, parse_delay_hint};
use bytes::Bytes;
use criterion::{Criterion, black_box, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};

const OPENAI_429: &[u8] = br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29000, Requested 1500.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
const GEMINI_429: &[u8] = br#"[{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"45.837906927s"}]}}]"#;

fn openai_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("retry-after-ms", HeaderValue::from_static("1200"));
    headers.insert(
        "x-ratelimit-reset-requests",
        HeaderValue::from_static("2m59.56s"),
    );
    headers.insert(
        "x-ratelimit-reset-tokens",
        HeaderValue::from_static("7.66s"),
    );
    headers.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from_static("0"),
    );
    headers
}

fn rules(c: &mut Criterion) {
    let rules = Rules::openai();
    let headers = openai_headers();
    let now = SystemTime::now();
    c.bench_function("classify_response openai 429", |b| {
        b.iter(|| {
            rules.classify_response(
                black_box(StatusCode::TOO_MANY_REQUESTS),
                black_box(&headers),
                black_box(OPENAI_429),
                now,
            )
        })
    });
    let gemini = Rules::gemini();
    let empty = HeaderMap::new();
    c.bench_function("classify_response gemini 429 array body", |b| {
        b.iter(|| {
            gemini.classify_response(
                black_box(StatusCode::TOO_MANY_REQUESTS),
                black_box(&empty),
                black_box(GEMINI_429),
                now,
            )
        })
    });
    c.bench_function("classify_response 200", |b| {
        b.iter(|| rules.classify_response(black_box(StatusCode::OK), black_box(&headers), b"", now))
    });
    c.bench_function("parse_delay_hint openai headers", |b| {
        b.iter(|| parse_delay_hint(black_box(&headers), now))
    });
}

fn layer(c: &mut Criterion) {
    let success = Bytes::from_static(br#"{"id":"chatcmpl-1","choices":[]}"#);
    let inner = tower::service_fn(move |_req: Request<()>| {
        let body = success.clone();
        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
    });
    let service = ClassifyLayer::new(Rules::openai()).layer(inner);
    c.bench_function("layer success round trip", |b| {
        b.iter(|| {
            let response = service
                .clone()
                .oneshot(Request::new(()))
                .now_or_never()
                .unwrap()
                .unwrap();
            response
                .into_body()
                .collect()
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });
    let inner = tower::service_fn(move |_req: Request<()>| async move {
        let mut response = Response::new(Full::new(Bytes::from_static(OPENAI_429)));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        *response.headers_mut() = openai_headers();
        Ok::<_, Infallible>(response)
    });
    let service = ClassifyLayer::new(Rules::openai()).layer(inner);
    c.bench_function("layer 429 round trip", |b| {
        b.iter(|| {
            let response = service
                .clone()
                .oneshot(Request::new(()))
                .now_or_never()
                .unwrap()
                .unwrap();
            response
                .into_body()
                .collect()
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });
}

criterion_group!(benches, rules, layer);
criterion_main!(benches);
