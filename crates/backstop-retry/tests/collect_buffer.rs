//! The buffer `collect` leaves a many-frame body in, measured with a counting global
//! allocator (this file is its own test binary): a body that declares its length
//! is read into one allocation of that length (up to the default cap, 8 MiB), and a
//! body that does not, or declares more, ends in a buffer at most an eighth larger
//! than itself, whatever its growth left unused.
//! The request holds that buffer for all its attempts, and the proxy's body budget
//! counts body bytes, so the two must stay close.

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use backstop_retry::collect;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated and not yet freed while tracking.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Bytes allocated while tracking, frees not deducted.
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn allocated(size: usize) {
    if TRACKING.load(Ordering::Relaxed) {
        LIVE.fetch_add(size as isize, Ordering::Relaxed);
        ALLOCATED.fetch_add(size, Ordering::Relaxed);
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

fn freed(size: usize) {
    if TRACKING.load(Ordering::Relaxed) {
        LIVE.fetch_sub(size as isize, Ordering::Relaxed);
    }
}

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        allocated(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        freed(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        freed(layout.size());
        allocated(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are global: one test at a time, from its first allocation to its
/// last free (a failing test's panic message included).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What collecting a body cost: bytes still held once it returned (the result
/// kept), bytes allocated in all, the largest allocation.
struct Cost {
    held: usize,
    allocated: usize,
    largest: usize,
}

/// Collects `len` bytes sent in frames of `frame` bytes, declaring `declared`
/// bytes, with allocation tracking on (the body is built before it starts;
/// the caller holds [`one_at_a_time`]). Returns the collected bytes, the bytes sent, the cost.
fn collect_tracked(len: usize, frame: usize, declared: Option<usize>) -> (Bytes, Bytes, Cost) {
    collect_tracked_under(8 * MIB, len, frame, declared)
}

/// [`collect_tracked`] under a cap of `limit` bytes.
fn collect_tracked_under(
    limit: usize,
    len: usize,
    frame: usize,
    declared: Option<usize>,
) -> (Bytes, Bytes, Cost) {
    let (whole, frames) = sliced(len, frame);
    let body = Frames {
        frames: &frames,
        declared: declared.map(|d| d as u64),
    };
    let mut poll = std::pin::pin!(collect(body, limit));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    LIVE.store(0, Ordering::SeqCst);
    ALLOCATED.store(0, Ordering::SeqCst);
    LARGEST.store(0, Ordering::SeqCst);
    TRACKING.store(true, Ordering::SeqCst);
    let result = loop {
        if let Poll::Ready(result) = poll.as_mut().poll(&mut cx) {
            break result;
        }
    };
    TRACKING.store(false, Ordering::SeqCst);
    let bytes = result.expect("within the limit");
    let cost = Cost {
        held: LIVE.load(Ordering::SeqCst).max(0) as usize,
        allocated: ALLOCATED.load(Ordering::SeqCst),
        largest: LARGEST.load(Ordering::SeqCst),
    };
    (bytes, whole, cost)
}

/// A body of ready frames, declaring its length or not. It lends slices of one
/// buffer made before tracking starts, so reading and dropping it frees nothing the
/// counters would deduct from what `collect` holds.
struct Frames<'a> {
    frames: &'a [Bytes],
    declared: Option<u64>,
}

/// `len` bytes (a repeating pattern) and the same bytes in slices of `frame` bytes.
fn sliced(len: usize, frame: usize) -> (Bytes, Vec<Bytes>) {
    let whole = Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let frames = (0..len)
        .step_by(frame)
        .map(|start| whole.slice(start..len.min(start + frame)))
        .collect();
    (whole, frames)
}

impl Body for Frames<'_> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some((first, rest)) = self.frames.split_first() else {
            return Poll::Ready(None);
        };
        self.frames = rest;
        Poll::Ready(Some(Ok(Frame::data(first.clone()))))
    }

    fn size_hint(&self) -> SizeHint {
        self.declared.map(SizeHint::with_exact).unwrap_or_default()
    }
}

const MIB: usize = 1 << 20;
/// Room for the small allocations around the buffer (a shared-bytes header).
const SLACK: usize = 256;

#[test]
fn a_declared_length_is_read_into_one_allocation_of_that_length() {
    let _one = one_at_a_time();
    let len = MIB + 1000;
    let (bytes, whole, cost) = collect_tracked(len, 16 * 1024, Some(len));
    assert_eq!(bytes, whole);
    assert_eq!(cost.largest, len, "one buffer of the declared length");
    assert!(
        cost.allocated <= len + SLACK,
        "{} bytes allocated for a {len}-byte body: the buffer grew",
        cost.allocated
    );
    assert!(cost.held <= len + SLACK, "{} bytes held", cost.held);
}

#[test]
fn an_undeclared_length_ends_in_a_buffer_at_most_an_eighth_larger() {
    let _one = one_at_a_time();
    // Just past a power of two: growth by doubling leaves nearly half unused.
    let len = MIB + 1000;
    let (bytes, whole, cost) = collect_tracked(len, 16 * 1024, None);
    assert_eq!(bytes, whole);
    assert!(
        cost.held <= len + len / 8 + SLACK,
        "{} bytes held for a {len}-byte body",
        cost.held
    );
}

#[test]
fn a_buffer_grown_close_to_its_length_is_kept_without_a_copy() {
    let _one = one_at_a_time();
    // Exactly a power of two: the grown buffer is full, and no second buffer of
    // the body's size is made.
    let len = MIB;
    let (bytes, whole, cost) = collect_tracked(len, 16 * 1024, None);
    assert_eq!(bytes, whole);
    assert!(cost.held <= len + SLACK, "{} bytes held", cost.held);
    // Growth reallocates (32, 64, … 1024 KiB); a final copy would add another MiB.
    assert!(
        cost.allocated < 2 * len + SLACK,
        "{} bytes allocated: the body was copied at the end",
        cost.allocated
    );
}

#[test]
fn a_body_shorter_than_it_declared_is_not_kept_in_the_declared_buffer() {
    let _one = one_at_a_time();
    let (bytes, whole, cost) = collect_tracked(100_000, 16 * 1024, Some(4 * MIB));
    assert_eq!(bytes, whole);
    assert!(
        cost.held <= 100_000 + SLACK,
        "{} bytes held for a 100000-byte body",
        cost.held
    );
}

#[test]
fn a_declared_length_past_the_default_cap_is_not_reserved_before_it_arrives() {
    let _one = one_at_a_time();
    // Under a cap of a gigabyte, a client declares 64 MiB and sends 100 kB: only the
    // default cap's 8 MiB is reserved up front (a declared terabyte under a terabyte
    // cap would otherwise be an allocation that aborts the process).
    let (bytes, whole, cost) =
        collect_tracked_under(1024 * MIB, 100_000, 16 * 1024, Some(64 * MIB));
    assert_eq!(bytes, whole);
    assert_eq!(cost.largest, 8 * MIB, "the up-front buffer");
    assert!(
        cost.held <= 100_000 + SLACK,
        "{} bytes held for a 100000-byte body",
        cost.held
    );
}

#[test]
fn a_declared_length_past_the_default_cap_ends_in_a_buffer_at_most_an_eighth_larger() {
    let _one = one_at_a_time();
    // Just past the up-front buffer: it grows by doubling, to nearly twice the body.
    let len = 9 * MIB + 1000;
    let (bytes, whole, cost) = collect_tracked_under(1024 * MIB, len, 16 * 1024, Some(len));
    assert_eq!(bytes, whole);
    assert!(
        cost.held <= len + len / 8 + SLACK,
        "{} bytes held for a {len}-byte body",
        cost.held
    );
}
