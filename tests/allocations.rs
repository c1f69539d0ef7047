//! The whole stack's success-path cost in allocations: a request that the primary
//! model serves at once, through [`BackstopLayer`] with a fallback chain configured,
//! allocates at most a fixed number of times more than the same request to the bare
//! service. A regression guard for the figures in the stack-overhead benchmark.
//!
//! Counted with a global allocator (this file is its own test binary, so the
//! allocator sees only these tests; one test at a time, by a lock).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use backstop::classify::{AttemptLog, Classification, ReplayBody};
use backstop::fallback::ServedBy;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};

struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

mod baseline;

use baseline::{Req, Res, benchmark_stack};

/// The benchmark's request: a URI, two headers (one a credential the fallback layer
/// replaces) and a bytes-backed body naming a model that has a target.
fn request() -> Req {
    Request::post("https://api.provider.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(ReplayBody::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}]}"#,
        )))
        .expect("static request")
}

fn bare()
-> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Req| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"{\"id\":\"chatcmpl-1\",\"model\":\"gpt-4o\"}"),
        ))))
    })
}

/// Allocations made by one `oneshot` on a clone of `svc` (readiness, call, response,
/// and dropping the response), the request built beforehand, on a current-thread
/// runtime as the benchmark runs it. The third of three calls is counted, so
/// one-time set-up (the breaker's key, tracing's callsite registration, the
/// runtime's timer structures) is not.
fn allocations_per_call<S>(
    runtime: &tokio::runtime::Runtime,
    svc: &S,
    check: impl Fn(&S::Response),
) -> usize
where
    S: Service<Req> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut counted = 0;
    for _ in 0..3 {
        let request = request();
        let svc = svc.clone();
        COUNT.store(0, Ordering::Relaxed);
        TRACKING.store(true, Ordering::Relaxed);
        let response = runtime.block_on(svc.oneshot(request));
        TRACKING.store(false, Ordering::Relaxed);
        let response = response.expect("served");
        check(&response);
        TRACKING.store(true, Ordering::Relaxed);
        drop(response);
        TRACKING.store(false, Ordering::Relaxed);
        counted = COUNT.load(Ordering::Relaxed);
    }
    counted
}

/// What the stack adds over the bare service, per successful request (the figure
/// reached now; 24 when this guard was first written, before the body adapter
/// stopped boxing its future and the attempt log kept its first record inline; 21
/// until session 9, when the retry layer began to keep the request's headers packed
/// in one buffer rather than as a clone of the map).
/// Where they go: the fallback layer's request for the hop (a copy of the header map, the
/// shared buffers the caller's header values move to when first copied, and the
/// `ModelRoute` extension, which creates the request's extension map); the budget's
/// per-request scope and its handle; the retry layer's copy of the request for a
/// retry (its headers packed in one buffer, its extensions cloned) and its attempt log (its one record inline); the classification, which creates the response's
/// extension map; the fallback layer's served-by record, its hop list and the hop's
/// copy of the attempt log.
const MAX_EXTRA_ALLOCATIONS: usize = 20;

#[test]
fn a_served_request_costs_a_bounded_number_of_allocations_over_the_bare_service() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");

    let bare_count = allocations_per_call(&runtime, &bare(), |response: &Res| {
        assert_eq!(response.status(), 200);
    });
    let full = benchmark_stack().layer(bare());
    let stack_count = allocations_per_call(&runtime, &full, |response| {
        // The stack did its work: classified, logged, and recorded who served.
        assert_eq!(response.status(), 200);
        let extensions = response.extensions();
        assert_eq!(
            extensions.get::<Classification>(),
            Some(&Classification::Success)
        );
        assert_eq!(
            extensions.get::<AttemptLog>().map(|log| log.attempts.len()),
            Some(1)
        );
        let served = extensions.get::<ServedBy>().expect("served-by record");
        assert_eq!(&*served.model, "gpt-4o");
        assert!(served.served && !served.fallback_fired);
    });
    let extra = stack_count.saturating_sub(bare_count);
    eprintln!("allocations per request: bare {bare_count}, full stack {stack_count} (+{extra})");
    assert!(
        extra <= MAX_EXTRA_ALLOCATIONS,
        "the full stack allocates {extra} times more than the bare service per \
         successful request (bare {bare_count}, stack {stack_count}); the guard is \
         {MAX_EXTRA_ALLOCATIONS}"
    );
}
