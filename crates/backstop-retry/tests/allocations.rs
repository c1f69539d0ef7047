//! The success path's cost in allocations: a request that succeeds at once through
//! [`Retry`](backstop_retry::Retry) allocates no more than the same request through
//! `tower::retry::Retry` plus what the [`AttemptLog`] on the response needs. Counted
//! with a global allocator, only on the thread that is measuring (tests run in
//! parallel) and one measurement at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use backstop_classify::{AttemptLog, AttemptRecord, Classification, ReplayBody, StopReason};
use backstop_retry::{RetryConfig, RetryLayer};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn note() {
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

fn track(on: bool) {
    TRACKING.with(|t| t.set(on));
}
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

type Req = Request<ReplayBody>;
type Res = Response<Full<Bytes>>;

/// The benchmark's request: a URI, two headers and a bytes-backed body, each of
/// which a clone of the request touches.
fn request() -> Req {
    Request::post("https://api.provider.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(ReplayBody::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .expect("static request")
}

fn bare()
-> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Req| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"{}"),
        ))))
    })
}

/// tower's retry with the benchmark's rule: up to two retries on a 5xx or an error.
#[derive(Clone)]
struct TwoRetries(u8);

impl<E> tower::retry::Policy<Req, Res, E> for TwoRetries {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let failed = result
            .as_ref()
            .map_or(true, |response| response.status().is_server_error());
        (failed && self.0 > 0).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
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

/// Allocations made by one call of `svc` (readiness, call, response, and dropping
/// the response), the request built beforehand. The second of two calls is
/// counted, so one-time set-up (tracing's callsite registration) is not.
fn allocations_per_call<S>(svc: S, check: impl Fn(&S::Response)) -> usize
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    allocations_per_call_with(svc, request, check)
}

/// As [`allocations_per_call`], with requests made by `make`.
fn allocations_per_call_with<S>(
    mut svc: S,
    make: impl Fn() -> Req,
    check: impl Fn(&S::Response),
) -> usize
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut count = 0;
    for _ in 0..2 {
        let req = make();
        COUNT.store(0, Ordering::SeqCst);
        track(true);
        let response = now(async {
            let ready = svc.ready().await.expect("ready");
            ready.call(req).await
        })
        .expect("success");
        check(&response);
        drop(response);
        track(false);
        count = COUNT.load(Ordering::SeqCst);
    }
    count
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Allocations made by `f` alone.
fn allocations_of<T>(f: impl FnOnce() -> T) -> usize {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    COUNT.store(0, Ordering::SeqCst);
    track(true);
    drop(f());
    track(false);
    COUNT.load(Ordering::SeqCst)
}

/// What every success carries, on a response that had no extensions: the
/// extensions map (its box, its table) and the value's box. The log's one record is
/// stored inline, so it costs nothing more.
fn attempt_log_allocations() -> usize {
    let mut log = AttemptLog::default();
    log.attempts
        .push(AttemptRecord::new(1, Classification::Success));
    allocations_of(|| {
        let mut response = Response::new(());
        response.extensions_mut().insert(log);
        response
    })
}

fn check_log(response: &Response<backstop_retry::RetryBody<Full<Bytes>>>) {
    let log = response.extensions().get::<AttemptLog>().expect("log");
    assert_eq!(log.attempts.len(), 1);
    assert_eq!(log.stop, Some(StopReason::Succeeded));
}

/// The copy of a request the layer keeps for a retry: its headers packed into one
/// buffer, and a clone of its extensions (none when it has none).
fn kept_copy_allocations(request: &Req) -> usize {
    1 + allocations_of(|| request.extensions().clone())
}

#[test]
fn a_success_allocates_the_packed_headers_and_the_attempt_log() {
    let runtime = runtime();
    let _context = runtime.enter();
    let request = request();
    // The header map's index and entries, and the two values built from `&str`,
    // whose bytes a first clone moves to a shared buffer.
    let copy = allocations_of(|| request.clone());
    assert_eq!(copy, 4);
    let log = attempt_log_allocations();
    // The map's box, its table, the log's box: the first record is inline.
    assert_eq!(log, 3);
    let kept = kept_copy_allocations(&request);
    assert_eq!(kept, 1);

    assert_eq!(allocations_per_call(bare(), |_| {}), 0);
    // tower's retry copies the request for a retry, and does nothing else.
    let tower = tower::retry::RetryLayer::new(TwoRetries(2)).layer(bare());
    assert_eq!(allocations_per_call(tower, |_| {}), copy);
    // No boxed future, no allocation for the retry machinery: the packed copy kept
    // for a retry, and the log. As many as tower's retry, log included.
    let retry = RetryLayer::new(RetryConfig::interactive()).layer(bare());
    assert_eq!(allocations_per_call(retry, check_log), kept + log);
    assert_eq!(kept + log, copy);
}

#[test]
fn a_single_attempt_request_is_not_copied() {
    let runtime = runtime();
    let _context = runtime.enter();
    let log = attempt_log_allocations();
    let config = RetryConfig::interactive()
        .with_max_attempts(1)
        .expect("valid");
    let retry = RetryLayer::new(config).layer(bare());
    assert_eq!(allocations_per_call(retry, check_log), log);
}

/// A request extension, as the layers outside put them (budget handle, model route).
#[derive(Clone, Debug, PartialEq)]
struct Tag(u64);

#[test]
fn the_log_reuses_the_request_extensions_map_and_nothing_of_the_request_leaks() {
    let runtime = runtime();
    let _context = runtime.enter();
    let tagged = || {
        let mut request = request();
        request.extensions_mut().insert(Tag(7));
        request
    };
    let kept = kept_copy_allocations(&tagged());
    // The packed headers, the extensions map's box and table, the tag's box.
    assert_eq!(kept, 4);
    let retry = RetryLayer::new(RetryConfig::interactive()).layer(bare());
    let allocations = allocations_per_call_with(retry, tagged, |response| {
        check_log(response);
        assert_eq!(response.extensions().get::<Tag>(), None);
        assert_eq!(response.extensions().len(), 1);
    });
    // The copy kept for a retry, and the log's box in the emptied map (its one
    // record is inline).
    assert_eq!(allocations, kept + 1);
}
