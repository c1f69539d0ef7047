//! The retry layer's incremental SSE reader (`backstop_retry::sse::SseReader`) on
//! arbitrary streams cut at arbitrary points.
//!
//! Input: 1 byte choosing the cap (1..=256 bytes, small so that truncation is
//! exercised), 1 byte `k`, then `k % 16` cut points of 2 bytes each (taken modulo the
//! stream's length), then the stream.
//!
//! Properties (beyond "never panics"):
//! - every byte is consumed exactly once, and an event is dispatched exactly where a
//!   line ended (after `\n`, or after `\r` not followed by `\n`);
//! - the split stream gives the same events (event name, data, truncation flag) as the
//!   stream fed in one piece, ending at the same offsets (but for a `\r\n` cut between
//!   its two bytes, where the event ends at the `\r`);
//! - the cap holds: no dispatched event carries more than `cap` bytes of data or of
//!   event name, whatever the chunking.
//!
//! These found three ways the reader's events depended on the chunking (fixed in
//! 23f428f; regression tests in `tests/fuzz_regressions.rs`).
#![no_main]

use backstop_retry::sse::{SseEvent, SseReader};
use libfuzzer_sys::fuzz_target;

/// The events of `chunks` fed in order, each with the stream offset where it ended.
fn events(chunks: &[&[u8]], cap: usize) -> Vec<(usize, SseEvent)> {
    let mut reader = SseReader::new(cap);
    let mut out = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        let mut rest = *chunk;
        loop {
            let fed = reader.feed(rest);
            assert!(
                fed.consumed <= rest.len(),
                "consumed more than it was given"
            );
            if fed.event.is_some() {
                let end = offset + fed.consumed;
                assert!(
                    fed.consumed > 0,
                    "dispatched an event without consuming a byte"
                );
                let last = rest[fed.consumed - 1];
                assert!(
                    last == b'\n' || last == b'\r',
                    "event dispatched at {end}, not at a line end (byte {last:#04x})"
                );
            }
            offset += fed.consumed;
            rest = &rest[fed.consumed..];
            match fed.event {
                Some(event) => out.push((offset, event)),
                None => break,
            }
        }
        assert!(
            rest.is_empty(),
            "feed returned without an event or the whole chunk"
        );
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(([cap, k], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let cap = usize::from(*cap) + 1;
    let cuts_len = (usize::from(*k) % 16 * 2).min(rest.len() / 2 * 2);
    let (cuts, stream) = rest.split_at(cuts_len);
    let mut points: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    points.sort_unstable();
    let mut chunks = Vec::with_capacity(points.len() + 1);
    let mut last = 0;
    for p in points {
        chunks.push(&stream[last..p]);
        last = p;
    }
    chunks.push(&stream[last..]);

    let whole = events(&[stream], cap);
    let split = events(&chunks, cap);

    for (_, event) in whole.iter().chain(&split) {
        assert!(
            event.data.len() <= cap,
            "event data of {} bytes over the {cap}-byte cap",
            event.data.len()
        );
        let name = event.event.as_deref().map_or(0, <[u8]>::len);
        assert!(
            name <= cap,
            "event name of {name} bytes over the {cap}-byte cap"
        );
    }
    assert_eq!(
        whole.len(),
        split.len(),
        "{} events in one piece, {} when split at {:?}",
        whole.len(),
        split.len(),
        chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
    );
    for ((whole_end, whole_event), (split_end, split_event)) in whole.iter().zip(&split) {
        assert_eq!(whole_event, split_event, "chunking changed an event");
        let crlf_cut = *whole_end == split_end + 1
            && stream.get(split_end.wrapping_sub(1)) == Some(&b'\r')
            && stream.get(*split_end) == Some(&b'\n');
        assert!(
            whole_end == split_end || crlf_cut,
            "event ends at {whole_end} in one piece, at {split_end} when split"
        );
    }
});
