//! How the cost per request grows with the number of requests in flight at once: 1,
//! 16, 256 and 4,096 concurrent requests through one [`BackstopLayer`] (so one retry
//! budget and one breaker state shared by all), side by side in one run with the bare
//! service and the tower composition of `benches/stack_overhead.rs` (tower's `Retry`
//! classifying with tower-http's `StatusInRangeAsFailures`, one shared `TpsBudget`)
//! at the same concurrency.
//!
//! A multi-thread tokio runtime with 2 workers runs `N` tasks that each send their
//! share of the requests one after another; the in-memory service yields once before
//! answering 200, so every task has a request pending at the same time and the `N`
//! requests really are in flight together. Each task sends at least 16 requests, so
//! spawning the tasks is a small part of what is timed. After criterion's report the
//! binary prints two tables: for each concurrency, each variant's time per request
//! and its ratio to the bare service, as the mean over every batch criterion timed
//! and in the best batch (the figure least disturbed by other work on a shared
//! machine).
//!
//! Run: `cargo bench -p backstop --bench scaling -- --warm-up-time 1 --measurement-time 2`
//! (in `cargo test --all-targets` each case runs once, with one request per task).
//! `SCALING_WORKERS=<n>` sets the number of workers (default 2): comparing 1 with 2
//! tells a cost that does not shrink with a second worker (contention on shared
//! state) from one that does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use backstop::classify::ReplayBody;
use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};

#[path = "../tests/baseline/mod.rs"]
mod baseline;

use baseline::{Req, Res, benchmark_stack, tower_composition};

const BODY: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}]}"#;

/// The requests in flight at once.
const CONCURRENCY: [usize; 4] = [1, 16, 256, 4096];

/// In a full run, the fewest requests each task sends per timed batch.
const MIN_REQUESTS_PER_TASK: u64 = 16;

fn request() -> Req {
    Request::post("https://api.provider.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(ReplayBody::new(Bytes::from_static(BODY)))
        .expect("static request")
}

/// The provider stand-in: answers 200 after yielding once to the scheduler, so that
/// a request is pending while the other tasks' requests start.
fn bare()
-> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Req| async {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            b"{\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\"}",
        ))))
    })
}

/// A case: requests in flight, and the variant.
type Case = (usize, &'static str);

/// What the timed batches of one case came to.
#[derive(Clone, Copy, Debug, Default)]
struct Batches {
    elapsed: Duration,
    requests: u64,
    /// The lowest time per request of any one batch: the figure least disturbed by
    /// other work on a shared machine.
    best_ns: Option<f64>,
}

/// Per case, every timed batch.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<Case, Batches>>);

/// Which figure of a case the table shows.
#[derive(Clone, Copy, Debug)]
enum Figure {
    /// Total time over total requests, every batch criterion timed.
    Mean,
    /// The best batch.
    Best,
}

impl Tally {
    fn add(&self, variant: &'static str, in_flight: usize, elapsed: Duration, requests: u64) {
        let mut tally = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let batches = tally.entry((in_flight, variant)).or_default();
        batches.elapsed += elapsed;
        batches.requests += requests;
        let ns = elapsed.as_nanos() as f64 / requests.max(1) as f64;
        batches.best_ns = Some(batches.best_ns.map_or(ns, |best| best.min(ns)));
    }

    /// Nanoseconds per request, if the case ran.
    fn ns(&self, figure: Figure, variant: &'static str, in_flight: usize) -> Option<f64> {
        let tally = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let batches = tally.get(&(in_flight, variant))?;
        match figure {
            Figure::Mean => (batches.requests > 0)
                .then(|| batches.elapsed.as_nanos() as f64 / batches.requests as f64),
            Figure::Best => batches.best_ns,
        }
    }
}

/// Sends `requests` requests through clones of `svc` from `in_flight` tasks (the
/// requests split as evenly as they go) and waits for all of them.
fn batch<S>(runtime: &tokio::runtime::Runtime, svc: &S, in_flight: usize, requests: u64) -> Duration
where
    S: Service<Req> + Clone + Send + 'static,
    S::Response: Send,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    runtime.block_on(async {
        let tasks = in_flight as u64;
        let start = tokio::time::Instant::now();
        let mut handles = Vec::with_capacity(in_flight);
        for task in 0..tasks {
            let share = requests / tasks + u64::from(task < requests % tasks);
            let svc = svc.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..share {
                    let response = svc.clone().oneshot(request()).await;
                    black_box(response.expect("the in-memory service always serves"));
                }
            }));
        }
        for handle in handles {
            handle.await.expect("a request task panicked");
        }
        start.elapsed()
    })
}

/// What every case shares.
struct Run {
    runtime: tokio::runtime::Runtime,
    tally: Tally,
    /// `false` in the smoke run (`cargo test --all-targets`).
    full_run: bool,
}

/// One case: `variant` with `in_flight` requests at once.
fn bench_case<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    run: &Run,
    (variant, svc): (&'static str, &S),
    in_flight: usize,
) where
    S: Service<Req> + Clone + Send + 'static,
    S::Response: Send,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    group.bench_function(BenchmarkId::new(variant, in_flight), |b| {
        b.iter_custom(|iters| {
            // A batch must keep `in_flight` requests going: run at least that many
            // per task, and report the time of `iters` of them.
            let floor = if run.full_run {
                MIN_REQUESTS_PER_TASK
            } else {
                1
            };
            let requests = iters.max(in_flight as u64 * floor);
            let elapsed = batch(&run.runtime, svc, in_flight, requests);
            run.tally.add(variant, in_flight, elapsed, requests);
            elapsed.mul_f64(iters as f64 / requests as f64)
        })
    });
}

const BARE: &str = "bare";
const TOWER: &str = "tower_retry_tps_budget";
const BACKSTOP: &str = "backstop_full_stack";

fn print_table(tally: &Tally, figure: Figure, full_run: bool, workers: usize) {
    let what = match figure {
        Figure::Mean => "mean time per request over every timed batch",
        Figure::Best => "time per request in the best batch",
    };
    println!();
    println!(
        "scaling: {what}, {workers} tokio worker(s){}",
        if full_run {
            ""
        } else {
            " (smoke run, one request per task: not a measurement)"
        }
    );
    println!(
        "{:>9} | {:>10} | {:>10} {:>7} | {:>10} {:>7} | {:>13}",
        "in flight", "bare", "tower", "vs bare", "Backstop", "vs bare", "Backstop adds"
    );
    // A case a filter on the command line left out shows as a dash.
    let time = |ns: Option<f64>| ns.map_or("—".to_string(), |ns| format!("{ns:.0} ns"));
    let ratio = |ns: Option<f64>, bare: Option<f64>| match (ns, bare) {
        (Some(ns), Some(bare)) => format!("{:.2}×", ns / bare),
        _ => "—".to_string(),
    };
    for in_flight in CONCURRENCY {
        let bare = tally.ns(figure, BARE, in_flight);
        let tower = tally.ns(figure, TOWER, in_flight);
        let backstop = tally.ns(figure, BACKSTOP, in_flight);
        if bare.is_none() && tower.is_none() && backstop.is_none() {
            continue;
        }
        let added = match (backstop, bare) {
            (Some(backstop), Some(bare)) => format!("{:.0} ns", backstop - bare),
            _ => "—".to_string(),
        };
        println!(
            "{in_flight:>9} | {:>10} | {:>10} {:>7} | {:>10} {:>7} | {added:>13}",
            time(bare),
            time(tower),
            ratio(tower, bare),
            time(backstop),
            ratio(backstop, bare),
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs the binary
    // without it, and criterion then runs each case once.
    let full_run = std::env::args().any(|arg| arg == "--bench");
    let workers = std::env::var("SCALING_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|&w: &usize| w > 0)
        .unwrap_or(2);
    let run = Run {
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_time()
            .build()
            .expect("runtime"),
        tally: Tally::default(),
        full_run,
    };
    let mut c = Criterion::default().configure_from_args();

    let bare = bare();
    let tower_stack = tower_composition(2).layer(bare.clone());
    // One layer, one service: every task's clone shares the budget and the breaker.
    let backstop_stack = benchmark_stack().layer(bare.clone());
    // What one request in flight holds inline (its heap allocations come on top:
    // `tests/memory_per_request.rs` counts them): the reason a case with thousands in
    // flight can outgrow the CPU caches.
    let footprint = [
        (
            BARE,
            std::mem::size_of_val(&bare.clone().oneshot(request())),
        ),
        (
            TOWER,
            std::mem::size_of_val(&tower_stack.clone().oneshot(request())),
        ),
        (
            BACKSTOP,
            std::mem::size_of_val(&backstop_stack.clone().oneshot(request())),
        ),
    ];

    // Variants interleaved at each concurrency, so a change in the machine's load
    // falls on all three alike.
    let mut group = c.benchmark_group("scaling");
    group.sample_size(10);
    for in_flight in CONCURRENCY {
        bench_case(&mut group, &run, (BARE, &bare), in_flight);
        bench_case(&mut group, &run, (TOWER, &tower_stack), in_flight);
        bench_case(&mut group, &run, (BACKSTOP, &backstop_stack), in_flight);
    }
    group.finish();

    c.final_summary();
    print_table(&run.tally, Figure::Mean, run.full_run, workers);
    if run.full_run {
        // The smoke run times one batch per case: the best is the mean.
        print_table(&run.tally, Figure::Best, run.full_run, workers);
    }
    let footprint: Vec<String> = footprint
        .iter()
        .map(|(variant, bytes)| format!("{variant} {bytes} bytes"))
        .collect();
    println!("future of one request in flight: {}", footprint.join(", "));
}
