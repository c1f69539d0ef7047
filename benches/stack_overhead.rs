//! Success-path overhead of the whole Backstop stack, side by side in one run with the
//! bare service and with the tower composition a user would write instead (tower's
//! `Retry` with a policy that classifies with tower-http's `StatusInRangeAsFailures`,
//! behind tower's `TpsBudget`).
//!
//! Every variant answers the same request from an in-memory service that replies 200
//! at once, on a current-thread tokio runtime (the stack's timers need one).
//!
//! Run: `cargo bench -p backstop --bench stack_overhead -- --warm-up-time 1 --measurement-time 3`
//! (in `cargo test --all-targets` each case runs once, as a smoke test).
//!
//! Instruction counts, which a loaded machine does not blur: with
//! `STACK_OVERHEAD_CALLS="<bare|tower|backstop> <n>"` the binary makes `n` calls and
//! nothing else; run it under `valgrind --tool=callgrind` with `n` and with `0`, and
//! divide the difference by `n`.

use std::convert::Infallible;
use std::hint::black_box;

use backstop::classify::ReplayBody;
use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

#[path = "../tests/baseline/mod.rs"]
mod baseline;

use baseline::{Req, Res, benchmark_stack, tower_composition};

const BODY: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}]}"#;

fn request() -> Req {
    Request::post("https://api.provider.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(ReplayBody::new(Bytes::from_static(BODY)))
        .expect("static request")
}

/// The provider stand-in: answers 200 at once.
fn bare()
-> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Req| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"{\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\"}"),
        ))))
    })
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("stack_success_path");

    let svc = bare();
    group.bench_function("bare", |b| {
        b.iter(|| runtime.block_on(async { black_box(svc.clone().oneshot(request()).await.ok()) }))
    });

    let tower_stack = tower_composition(2).layer(bare());
    group.bench_function("tower_retry_tps_budget", |b| {
        b.iter(|| {
            runtime.block_on(async { black_box(tower_stack.clone().oneshot(request()).await.ok()) })
        })
    });

    let backstop_stack = benchmark_stack().layer(bare());
    group.bench_function("backstop_full_stack", |b| {
        b.iter(|| {
            runtime
                .block_on(async { black_box(backstop_stack.clone().oneshot(request()).await.ok()) })
        })
    });

    // The same, reading the whole response body as a caller does.
    group.bench_function("backstop_full_stack_with_body", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = backstop_stack
                    .clone()
                    .oneshot(request())
                    .await
                    .expect("served");
                black_box(response.into_body().collect().await.ok())
            })
        })
    });
    group.finish();
}

/// `n` calls through one variant, for an instruction counter.
fn calls_only(spec: &str) {
    let mut words = spec.split_whitespace();
    let which = words.next().unwrap_or_default();
    let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    fn run<S>(runtime: &tokio::runtime::Runtime, svc: S, n: usize)
    where
        S: Service<Req> + Clone,
        S::Error: std::fmt::Debug,
    {
        for _ in 0..n {
            runtime.block_on(async { black_box(svc.clone().oneshot(request()).await.ok()) });
        }
    }
    match which {
        "bare" => run(&runtime, bare(), n),
        "tower" => run(&runtime, tower_composition(2).layer(bare()), n),
        "backstop" => run(&runtime, benchmark_stack().layer(bare()), n),
        other => eprintln!("STACK_OVERHEAD_CALLS: unknown variant {other:?}"),
    }
}

criterion_group!(benches, bench);

fn main() {
    if let Ok(spec) = std::env::var("STACK_OVERHEAD_CALLS") {
        calls_only(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
