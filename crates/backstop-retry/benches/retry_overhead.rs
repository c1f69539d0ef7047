//! The success path (no retry needed): the bare in-memory service, the same service
//! under `tower::retry::Retry` with a comparable policy (at most 2 retries on 5xx),
//! and under backstop's `Retry`, in one run. After criterion's report it prints the
//! ratios from its own interleaved measurement.
//!
//! Run briefly: `cargo bench -p backstop-retry -- --warm-up-time 1 --measurement-time 2`.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use backstop_classify::ReplayBody;
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

/// The provider stand-in: answers 200 at once.
fn bare() -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send {
    tower::service_fn(|_req: Req| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"{\"id\":\"chatcmpl-1\"}"),
        ))))
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
        b.iter_batched(
            request,
            |req| one_call(&mut plain, req),
            BatchSize::SmallInput,
        )
    });
    let mut tower_retry = tower::retry::RetryLayer::new(TwoRetries(2)).layer(bare());
    group.bench_function("tower_retry", |b| {
        b.iter_batched(
            request,
            |req| one_call(&mut tower_retry, req),
            BatchSize::SmallInput,
        )
    });
    let mut backstop = RetryLayer::new(RetryConfig::interactive()).layer(bare());
    group.bench_function("backstop_retry", |b| {
        b.iter_batched(
            request,
            |req| one_call(&mut backstop, req),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Nanoseconds per call, best of `rounds` rounds of `n` calls (requests built
/// outside the timed loop).
fn per_call<S>(svc: &mut S, n: usize, rounds: usize) -> f64
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let requests: Vec<Req> = (0..n).map(|_| request()).collect();
        let start = Instant::now();
        for req in requests {
            one_call(svc, req);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn print_ratios() {
    let (n, rounds) = (20_000, 5);
    let mut plain = bare();
    let mut tower_retry = tower::retry::RetryLayer::new(TwoRetries(2)).layer(bare());
    let mut backstop = RetryLayer::new(RetryConfig::interactive()).layer(bare());
    // Interleaved, so drift in machine load hits all three alike.
    let (mut b, mut t, mut r) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..6 {
        b = b.min(per_call(&mut plain, n, rounds));
        t = t.min(per_call(&mut tower_retry, n, rounds));
        r = r.min(per_call(&mut backstop, n, rounds));
    }
    println!();
    println!("success path, ns per call (best of interleaved rounds):");
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

fn main() {
    // The layer reads tokio's clock: run inside a runtime context.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _context = runtime.enter();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
    print_ratios();
}
