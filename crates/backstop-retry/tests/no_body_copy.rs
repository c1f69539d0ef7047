//! A retry replays the request body by reference count, never by copy: with a
//! counting global allocator (this file is its own test binary, so the allocator
//! sees only this test), no allocation during a two-attempt request comes near the
//! body's size.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use backstop_classify::ReplayBody;
use backstop_retry::{RetryConfig, RetryLayer};
use bytes::Bytes;
use common::{Fake, Step};
use tower::{Layer, ServiceExt};

struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if TRACKING.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` with allocation tracking on; returns (largest allocation, count).
fn tracked<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    TRACKING.store(true, Ordering::SeqCst);
    let out = f();
    TRACKING.store(false, Ordering::SeqCst);
    (
        out,
        LARGEST.load(Ordering::SeqCst),
        COUNT.load(Ordering::SeqCst),
    )
}

const BODY_SIZE: usize = 1 << 20;

#[test]
fn a_retry_does_not_copy_the_request_body() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'{'; BODY_SIZE]);
    let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::batch()).layer(fake.clone());
    let request = http::Request::post("http://provider.test/v1/chat/completions")
        .body(ReplayBody::new(body.clone()))
        .unwrap();

    let (status, largest, count) =
        tracked(|| runtime.block_on(async { svc.oneshot(request).await.unwrap().status() }));
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(fake.attempts(), 2);
    assert!(
        count > 0,
        "the allocator saw the request's small allocations"
    );
    assert!(
        largest < BODY_SIZE / 16,
        "an allocation of {largest} bytes during a retry of a {BODY_SIZE}-byte body"
    );
    // Both attempts saw the caller's allocation itself.
    for seen in fake.seen.lock().unwrap().iter() {
        assert_eq!(seen.body.as_ptr(), body.as_ptr());
    }

    // The detector works: a copy of the body is seen.
    let (_copy, largest, _) = tracked(|| body.to_vec());
    assert!(largest >= BODY_SIZE);
}
