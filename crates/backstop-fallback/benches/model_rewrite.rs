//! The targeted `model` rewrite against the two ways of doing it with serde_json.
//!
//! Bodies of 1 KiB, 100 KiB, 1 MiB and 8 MiB shaped like chat requests (messages
//! with newlines, quotes and non-ASCII text, a tool schema with its own nested
//! `"model"` key), with `"model"` placed last as the OpenAI Python SDK serialises it.
//!
//! - `targeted_rewrite`: this crate's [`rewrite_model`]: validate, find, splice into
//!   one new buffer. What the layer does on a switch.
//! - `value_round_trip`: `serde_json::from_slice::<Value>`, set `model`,
//!   `serde_json::to_vec`. What a naive fallback does.
//! - `targeted_read` and `typed_partial_read`: reading the model only, with
//!   [`read_model`] and with a borrow-deserialise of a struct holding just `model`
//!   (serde skips, but still validates, every other field). There is no rewrite
//!   counterpart for the typed read: it cannot re-serialise what it skipped.
use std::borrow::Cow;
use std::hint::black_box;

use backstop_fallback::{read_model, rewrite_model};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::Deserialize;

const LIMIT: usize = 64 * 1024 * 1024;

#[derive(Deserialize)]
struct ModelOnly<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
}

/// A chat request body of about `size` bytes, `"model"` last: a conversation that
/// cycles through English prose, an escape-dense code answer and French and
/// Japanese text, then a tool schema with its own nested `"model"` key.
fn body(size: usize) -> Vec<u8> {
    const TURNS: [&str; 3] = [
        r#"Could you review the retry logic below? We call the chat completions endpoint from a background worker, and when the provider answers 429 we sleep for the value of the retry-after header before trying again. Last night a job slept for two days because the header said \"198300\". What is the right way to cap that, and should we fall back to another model instead of waiting?\n\nThanks!"#,
        r#"Here is the function you asked about:\n\n```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```\nIt returns the \"sum\" of both arguments.\n"#,
        r#"Merci ! Voilà la réponse en français : le délai est plafonné à deux minutes, et au-delà on passe au modèle suivant. 日本語の説明も必要ですか？"#,
    ];
    const TAIL: &str = r#"],"tools":[{"type":"function","function":{"name":"lookup","parameters":{"type":"object","properties":{"model":{"type":"string"}}}}}],"temperature":0.7,"stream":false,"model":"gpt-4o"}"#;
    let mut out = String::with_capacity(size + 1024);
    out.push_str(r#"{"messages":["#);
    let mut turn = 0;
    while out.len() + TAIL.len() < size {
        if turn > 0 {
            out.push(',');
        }
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        out.push_str(r#"{"role":""#);
        out.push_str(role);
        out.push_str(r#"","content":""#);
        out.push_str(TURNS[turn % 3]);
        out.push_str(r#""}"#);
        turn += 1;
    }
    out.push_str(TAIL);
    out.into_bytes()
}

fn rewrite(c: &mut Criterion) {
    let sizes = [
        ("1KiB", 1024),
        ("100KiB", 100 * 1024),
        ("1MiB", 1024 * 1024),
        ("8MiB", 8 * 1024 * 1024),
    ];
    let mut group = c.benchmark_group("model_rewrite");
    for (label, size) in sizes {
        let body = body(size);
        assert_eq!(read_model(&body).unwrap(), "gpt-4o");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("targeted_rewrite", label),
            &body,
            |b, body| {
                b.iter(|| rewrite_model(black_box(body), "claude-sonnet-4-5", LIMIT).unwrap())
            },
        );
        group.bench_with_input(
            BenchmarkId::new("value_round_trip", label),
            &body,
            |b, body| {
                b.iter(|| {
                    let mut value: serde_json::Value =
                        serde_json::from_slice(black_box(body)).unwrap();
                    value["model"] = serde_json::Value::from("claude-sonnet-4-5");
                    serde_json::to_vec(&value).unwrap()
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("targeted_read", label),
            &body,
            |b, body| b.iter(|| read_model(black_box(body)).unwrap().len()),
        );
        group.bench_with_input(
            BenchmarkId::new("typed_partial_read", label),
            &body,
            |b, body| {
                b.iter(|| {
                    serde_json::from_slice::<ModelOnly<'_>>(black_box(body))
                        .unwrap()
                        .model
                        .len()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, rewrite);
criterion_main!(benches);
