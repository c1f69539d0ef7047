//! One rewrite allocates exactly one buffer, of exactly the output's size.
//!
//! A counting global allocator needs `unsafe impl GlobalAlloc`; it lives in this
//! test binary only (the library forbids unsafe code). Only allocations made on the
//! thread that switched counting on are counted, so the test harness's own threads
//! cannot disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use backstop_fallback::{read_model, rewrite_model};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNTING.try_with(|on| {
            if on.get() {
                ALLOCATIONS.with(|a| a.set(a.get() + 1));
                BYTES.with(|b| b.set(b.get() + layout.size()));
            }
        });
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    ALLOCATIONS.with(|a| a.set(0));
    BYTES.with(|b| b.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCATIONS.with(Cell::get), BYTES.with(Cell::get))
}

fn big_body() -> Vec<u8> {
    let content = "x".repeat(200_000);
    format!(
        r#"{{"messages":[{{"role":"user","content":"{content}","model":"nested"}}],"temperature":0.7,"model":"gpt-4o"}}"#
    )
    .into_bytes()
}

#[test]
fn one_rewrite_allocates_exactly_one_body_sized_buffer() {
    let body = big_body();
    let (out, allocations, bytes) = counted(|| rewrite_model(&body, "claude-sonnet-4-5", 1 << 24));
    let out = out.unwrap();
    assert_eq!(
        out.len(),
        body.len() - "gpt-4o".len() + "claude-sonnet-4-5".len()
    );
    assert_eq!(allocations, 1);
    assert_eq!(bytes, out.len());
}

#[test]
fn reading_an_unescaped_model_allocates_nothing() {
    let body = big_body();
    let (model, allocations, _) = counted(|| read_model(&body).map(|m| m.len()));
    assert_eq!(model, Ok(6));
    assert_eq!(allocations, 0);
}
