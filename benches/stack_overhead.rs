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
use std::sync::Arc;
use std::time::Duration;

use backstop::BackstopLayer;
use backstop::classify::ReplayBody;
use backstop::fallback::{FallbackConfig, Target};
use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceExt};
use tower_http::classify::{ClassifiedResponse, ClassifyResponse, StatusInRangeAsFailures};

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
fn bare()
-> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Req| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"{\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\"}"),
        ))))
    })
}

/// What a tower user writes: up to 2 retries on 429/5xx (tower-http's classifier),
/// each withdrawn from a shared TpsBudget, which every request deposits into.
#[derive(Clone)]
struct TowerPolicy {
    budget: Arc<TpsBudget>,
    retries_left: u8,
}

impl<E> tower::retry::Policy<Req, Res, E> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => {
                let classifier = StatusInRangeAsFailures::new(429..=599);
                matches!(
                    classifier.classify_response(response),
                    ClassifiedResponse::Ready(Err(_))
                )
            }
            Err(_) => true,
        };
        if !failed {
            self.budget.deposit();
            return None;
        }
        if self.retries_left == 0 || !self.budget.withdraw() {
            return None;
        }
        self.retries_left -= 1;
        Some(tokio::time::sleep(Duration::from_millis(500)))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let mut clone = Request::new(req.body().replay());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

fn backstop_layer() -> BackstopLayer {
    let fallback = FallbackConfig::builder()
        .target(
            "gpt-4o",
            Target::new("openai", "https://api.provider.test/v1"),
        )
        .target(
            "claude-sonnet",
            Target::new("anthropic", "https://api.provider.test/v1"),
        )
        .chain("gpt-4o", ["claude-sonnet"])
        .build()
        .expect("valid fallback config");
    BackstopLayer::builder()
        .fallback(fallback)
        .retry_seed(1)
        .build()
        .expect("valid stack")
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

    let budget = Arc::new(TpsBudget::default());
    let tower_stack = tower::retry::RetryLayer::new(TowerPolicy {
        budget,
        retries_left: 2,
    })
    .layer(bare());
    group.bench_function("tower_retry_tps_budget", |b| {
        b.iter(|| {
            runtime.block_on(async { black_box(tower_stack.clone().oneshot(request()).await.ok()) })
        })
    });

    let backstop_stack = backstop_layer().layer(bare());
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
        "tower" => run(
            &runtime,
            tower::retry::RetryLayer::new(TowerPolicy {
                budget: Arc::new(TpsBudget::default()),
                retries_left: 2,
            })
            .layer(bare()),
            n,
        ),
        "backstop" => run(&runtime, backstop_layer().layer(bare()), n),
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
