//! The success path (no retry needed): the bare in-memory service, the same service
//! under `tower::retry::Retry` with a comparable policy (at most 2 retries on 5xx),
//! and under backstop's `Retry`, in one run. After criterion's report it prints the
//! ratios from its own interleaved measurement.
//!
//! A fourth line, `attempt_log_alone`, is what every success through backstop's
//! layer carries and tower's retry does not: an `AttemptLog` of one record put on a
//! response without extensions, then dropped with it. It is part of the contract
//! (see the crate docs), so it is measured rather than skipped.
//!
//! The requests are built before the timed loop, and their batch's buffer is freed
//! after it (`iter_batched_ref`; `drain` in the interleaved rounds). Freeing a batch
//! buffer of a few hundred KiB inside the timed loop made glibc's allocator
//! consolidate every small chunk the requests freed during the batch, a cost that
//! belongs to the harness, not to a layer, and that a layer allocating 1 KiB or
//! more per call (a boxed future) avoids by consolidating a few warm chunks at a
//! time: it made the bare service look about 40 ns slower (batches of 2,000) and
//! favoured such layers.
//!
//! Run briefly: `cargo bench -p backstop-retry -- --warm-up-time 1 --measurement-time 2`.
//!
//! Three requests: the benchmark's own (two headers built in code), the same with one
//! typed value in its extensions (as inside a Backstop stack: `-routed`), and one with
//! the fourteen headers an SDK sends, as the proxy hands them on (`-sdk`). And one
//! response shape beside the bare one: the benchmark's request answered with a
//! response that carries one typed value, as every response from hyper-util's client
//! over TCP does (its `HttpInfo`: `-connected`). On such a response the attempt log
//! needs no map of its own.
//!
//! Instruction counts, which a loaded machine does not blur: with
//! `RETRY_OVERHEAD_CALLS="<bare|tower|backstop|log>[-routed|-sdk|-connected] <n>"` (`log` alone)
//! the binary makes `n` calls
//! (requests built in the loop) and nothing else; run it under
//! `valgrind --tool=callgrind` with `n` and with `0`, and divide the difference by `n`.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use backstop_classify::{AttemptLog, AttemptRecord, Classification, ReplayBody, StopReason};
use backstop_retry::{RetryConfig, RetryLayer};
use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};

type Req = Request<ReplayBody>;
type Res = Response<Full<Bytes>>;

const BODY: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}]}"#;

fn request() -> Req {
    Request::post("https://api.provider.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(ReplayBody::new(Bytes::from_static(BODY)))
        .expect("static request")
}

/// The request as the retry layer sees it inside a Backstop stack: the layers
/// outside have put one typed value in its extensions (the fallback layer's route).
fn request_with_route() -> Req {
    let mut request = request();
    request
        .extensions_mut()
        .insert(backstop_classify::ModelRoute::new("openai", "gpt-4o"));
    request
}

/// The request as the sidecar proxy hands it on: the headers an official SDK sends
/// (a project key, the client's `x-stainless-*` set) as hyper's parser makes them:
/// each value a slice of one shared buffer (a clone costs a reference count), each
/// name through `HeaderName::from_bytes` (a custom name is a copy of its bytes,
/// which its first clone moves to a shared buffer: an allocation).
fn request_from_sdk() -> Req {
    const SDK_HEADERS: [(&str, &str); 14] = [
        ("host", "api.provider.test"),
        ("accept-encoding", "gzip, deflate"),
        ("connection", "keep-alive"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "1.54.0"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.12.7"),
        (
            "authorization",
            "Bearer sk-proj-Zx8bT1qv0cXn3rLmW5yPa2KfGd7HjU4sEo9iRtYb6wNq1VzC3xMl8kJ5hF2gD0aS7pQ4eT9uI6oB1nW3rY8vX5zL2mK7jH4gF0dS9aQ6wE3rT8yU1iO5pA2sD7fG4hJ0kL9zX6cV3bN8mQ1wE5rT2yU",
        ),
        ("x-stainless-retry-count", "0"),
    ];
    let shared = Bytes::from(SDK_HEADERS.iter().map(|(_, v)| *v).collect::<String>());
    let mut request = Request::post("https://api.provider.test/v1/chat/completions")
        .body(ReplayBody::new(Bytes::from_static(BODY)))
        .expect("static request");
    let mut at = 0;
    for (name, value) in SDK_HEADERS {
        let bytes = shared.slice(at..at + value.len());
        at += value.len();
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
            http::HeaderValue::from_maybe_shared(bytes).expect("valid value"),
        );
    }
    request
}

/// The provider stand-in: answers 200 at once, with a response that carries no
/// extensions.
fn bare() -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send {
    provider(false)
}

/// What hyper-util's client puts on every response it returns over a TCP
/// connection (its `HttpInfo`: the two socket addresses; it has no public
/// constructor, so this stands in for it at the same size).
#[derive(Clone, Copy)]
struct ConnectionInfo {
    _remote: std::net::SocketAddr,
    _local: std::net::SocketAddr,
}

/// The provider stand-in; `connected`: its responses carry a [`ConnectionInfo`], as
/// a hyper-util client's do.
fn provider(
    connected: bool,
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send {
    tower::service_fn(move |_req: Req| {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{\"id\":\"chatcmpl-1\"}")));
        if connected {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 443));
            response.extensions_mut().insert(ConnectionInfo {
                _remote: addr,
                _local: addr,
            });
        }
        std::future::ready(Ok::<_, Infallible>(response))
    })
}

/// tower's retry with the comparable rule: up to two retries on a 5xx or an error.
#[derive(Clone)]
struct TwoRetries(u8);

impl<E> tower::retry::Policy<Req, Res, E> for TwoRetries {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        if failed && self.0 > 0 {
            self.0 -= 1;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// Builds the log a first-attempt success carries, puts it on a response without
/// extensions, and drops both (as the caller does).
fn attempt_log_alone() {
    let mut record = AttemptRecord::new(1, Classification::Success);
    record.status = Some(http::StatusCode::OK);
    let mut log = AttemptLog {
        stop: Some(StopReason::Succeeded),
        ..AttemptLog::default()
    };
    log.attempts.push(record);
    let mut response = Response::new(());
    response.extensions_mut().insert(black_box(log));
    black_box(response);
}

/// Polls a future that never waits (every service here answers at once).
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fn one_call<S>(svc: &mut S, req: Req)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let response = now(async {
        let ready = svc.ready().await.expect("ready");
        ready.call(req).await
    });
    black_box(response.expect("success"));
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("success_path");
    let mut plain = bare();
    group.bench_function("bare", |b| {
        b.iter_batched_ref(
            request,
            |req| one_call(&mut plain, std::mem::take(req)),
            BatchSize::SmallInput,
        )
    });
    let mut tower_retry = tower::retry::RetryLayer::new(TwoRetries(2)).layer(bare());
    group.bench_function("tower_retry", |b| {
        b.iter_batched_ref(
            request,
            |req| one_call(&mut tower_retry, std::mem::take(req)),
            BatchSize::SmallInput,
        )
    });
    let mut backstop = RetryLayer::new(RetryConfig::interactive()).layer(bare());
    group.bench_function("backstop_retry", |b| {
        b.iter_batched_ref(
            request,
            |req| one_call(&mut backstop, std::mem::take(req)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("attempt_log_alone", |b| b.iter(attempt_log_alone));
    group.finish();
}

/// Nanoseconds per call, best of `rounds` rounds of `n` calls (requests built, and
/// their batch freed, outside the timed loop: see the module docs).
fn per_call<S>(svc: &mut S, make: fn() -> Req, n: usize, rounds: usize) -> f64
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let mut requests: Vec<Req> = (0..n).map(|_| make()).collect();
        let start = Instant::now();
        for req in requests.drain(..) {
            one_call(svc, req);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
        drop(requests);
    }
    best
}

/// Nanoseconds per [`attempt_log_alone`], best of `rounds` rounds of `n`.
fn log_alone(n: usize, rounds: usize) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            attempt_log_alone();
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

/// A request and response shape the benchmark measures.
struct Shape {
    /// The mode's suffix in `RETRY_OVERHEAD_CALLS` (see the module docs).
    suffix: &'static str,
    title: &'static str,
    request: fn() -> Req,
    /// Whether the provider's responses carry an extension.
    connected: bool,
}

const SHAPES: [Shape; 4] = [
    Shape {
        suffix: "",
        title: "the benchmark's request (two headers built in code)",
        request,
        connected: false,
    },
    Shape {
        suffix: "routed",
        title: "the request carrying one extension (as inside a Backstop stack)",
        request: request_with_route,
        connected: false,
    },
    Shape {
        suffix: "sdk",
        title: "the request with an SDK's fourteen headers as hyper parsed them",
        request: request_from_sdk,
        connected: false,
    },
    Shape {
        suffix: "connected",
        title: "the benchmark's request, answered as hyper-util's client answers (one extension)",
        request,
        connected: true,
    },
];

fn print_ratios() {
    // Short rounds, many of them: on a loaded machine a short round is more often
    // not preempted, and the best round is what is kept.
    let (n, rounds) = (2_000, 20);
    // [bare, tower, backstop] per shape, and the log alone.
    let mut best = [[f64::INFINITY; 3]; SHAPES.len()];
    let mut log = f64::INFINITY;
    // Interleaved, so drift in machine load hits all of them alike.
    for _ in 0..10 {
        for (shape, best) in SHAPES.iter().zip(&mut best) {
            let mut plain = provider(shape.connected);
            let mut tower_retry =
                tower::retry::RetryLayer::new(TwoRetries(2)).layer(provider(shape.connected));
            let mut backstop =
                RetryLayer::new(RetryConfig::interactive()).layer(provider(shape.connected));
            best[0] = best[0].min(per_call(&mut plain, shape.request, n, rounds));
            best[1] = best[1].min(per_call(&mut tower_retry, shape.request, n, rounds));
            best[2] = best[2].min(per_call(&mut backstop, shape.request, n, rounds));
        }
        log = log.min(log_alone(n, rounds));
    }
    println!();
    println!("success path, ns per call (best of interleaved rounds):");
    for (shape, [b, t, r]) in SHAPES.iter().zip(best) {
        println!("{}:", shape.title);
        println!("  bare service          {b:8.1}");
        println!(
            "  tower::retry::Retry   {t:8.1}   (+{:.1} ns over bare)",
            t - b
        );
        println!(
            "  backstop Retry        {r:8.1}   (+{:.1} ns over bare)",
            r - b
        );
        println!("  ratio backstop / tower retry = {:.2}", r / t);
    }
    println!("attempt log alone (on a response without extensions): {log:.1} ns");
}

/// `n` calls through one service, for an instruction counter: `spec` is
/// `<bare|tower|backstop>[-routed|-sdk|-connected] <n>` or `log <n>`.
fn calls_only(spec: &str) {
    let mut words = spec.split_whitespace();
    let which = words.next().unwrap_or_default();
    let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    if which == "log" {
        (0..n).for_each(|_| attempt_log_alone());
        return;
    }
    let (layer, shape) = which.split_once('-').unwrap_or((which, ""));
    let Some(&Shape {
        request: make,
        connected,
        ..
    }) = SHAPES.iter().find(|s| s.suffix == shape)
    else {
        return eprintln!("RETRY_OVERHEAD_CALLS: unknown request shape {shape:?}");
    };
    match layer {
        "bare" => {
            let mut svc = provider(connected);
            (0..n).for_each(|_| one_call(&mut svc, make()));
        }
        "tower" => {
            let mut svc = tower::retry::RetryLayer::new(TwoRetries(2)).layer(provider(connected));
            (0..n).for_each(|_| one_call(&mut svc, make()));
        }
        "backstop" => {
            let mut svc = RetryLayer::new(RetryConfig::interactive()).layer(provider(connected));
            (0..n).for_each(|_| one_call(&mut svc, make()));
        }
        other => eprintln!("RETRY_OVERHEAD_CALLS: unknown service {other:?}"),
    }
}

fn main() {
    // The layer reads tokio's clock: run inside a runtime context.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _context = runtime.enter();
    if let Ok(spec) = std::env::var("RETRY_OVERHEAD_CALLS") {
        calls_only(&spec);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
    print_ratios();
}
