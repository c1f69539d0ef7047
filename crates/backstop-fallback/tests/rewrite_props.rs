//! The targeted rewrite against `serde_json`: on random request bodies it must agree
//! with a full parse + modify, and on damaged bodies it must reject exactly what
//! `serde_json` rejects.

use backstop_fallback::{RewriteError, read_model, rewrite_model};
use proptest::prelude::*;
use serde_json::Value;

const LIMIT: usize = 1 << 24;

/// How a generated document is written out: whitespace and escaping choices, drawn
/// once per document and consumed as the writer goes.
#[derive(Clone, Debug)]
struct Style {
    choices: Vec<u8>,
    at: usize,
}

impl Style {
    fn next(&mut self) -> u8 {
        let c = self.choices[self.at % self.choices.len()];
        self.at += 1;
        c
    }

    fn ws(&mut self, out: &mut String) {
        const WS: [&str; 6] = ["", "", " ", "\n  ", "\t", "\r\n"];
        out.push_str(WS[(self.next() % 6) as usize]);
    }
}

fn write_string(s: &str, style: &mut Style, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let pick = style.next() % 5;
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if pick == 0 => out.push_str("\\/"),
            '\n' if pick < 3 => out.push_str("\\n"),
            c if (c as u32) < 0x20 || pick == 1 => {
                // \u escape, as a surrogate pair beyond the BMP.
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_value(v: &Value, style: &mut Style, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&v.to_string()),
        Value::String(s) => write_string(s, style, out),
        Value::Array(items) => {
            out.push('[');
            style.ws(out);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    style.ws(out);
                }
                write_value(item, style, out);
                style.ws(out);
            }
            out.push(']');
        }
        Value::Object(map) => write_members(map.iter(), style, out),
    }
}

fn write_members<'a>(
    members: impl Iterator<Item = (&'a String, &'a Value)>,
    style: &mut Style,
    out: &mut String,
) {
    out.push('{');
    style.ws(out);
    for (i, (k, v)) in members.enumerate() {
        if i > 0 {
            out.push(',');
            style.ws(out);
        }
        write_string(k, style, out);
        style.ws(out);
        out.push(':');
        style.ws(out);
        write_value(v, style, out);
        style.ws(out);
    }
    out.push('}');
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9 _.-]{0,12}",
        // Quotes, backslashes, controls, slashes, accents, CJK, emoji.
        "[\"\\\\/\\n\\t\\u{1}\\u{1f}aé中😀 ]{0,10}",
        Just("model".to_owned()),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Decimal fractions that print without an exponent.
        (-1_000_000i64..1_000_000, 1u32..4)
            .prop_map(|(n, d)| Value::from(n as f64 / 10f64.powi(d as i32))),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            // Nested objects often carry their own "model" key: it must stay untouched.
            prop::collection::btree_map(text(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request body: top-level members in random order with `model` at a random
/// place, written with random whitespace and escapes.
fn body() -> impl Strategy<Value = (String, Value, String)> {
    (
        prop::collection::btree_map(text(), value(), 0..6),
        text(),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 1..64),
    )
        .prop_map(|(mut members, model, place, choices)| {
            members.remove("model");
            let mut ordered: Vec<(String, Value)> = members.into_iter().collect();
            let at = place.index(ordered.len() + 1);
            ordered.insert(at, ("model".to_owned(), Value::String(model.clone())));
            let mut style = Style { choices, at: 0 };
            let mut out = String::new();
            style.ws(&mut out);
            write_members(ordered.iter().map(|(k, v)| (k, v)), &mut style, &mut out);
            style.ws(&mut out);
            let value = Value::Object(ordered.into_iter().collect());
            (out, value, model)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rewrite_equals_the_value_level_rewrite((body, value, model) in body(), new_model in text()) {
        let parsed: Value = serde_json::from_str(&body).expect("generator writes valid JSON");
        prop_assert_eq!(&parsed, &value);
        prop_assert_eq!(read_model(body.as_bytes()).unwrap(), model.as_str());

        let rewritten = rewrite_model(body.as_bytes(), &new_model, LIMIT).unwrap();
        let reparsed: Value = serde_json::from_slice(&rewritten).expect("rewritten body is JSON");
        let mut expected = value;
        expected["model"] = Value::String(new_model.clone());
        prop_assert_eq!(reparsed, expected);
        prop_assert_eq!(read_model(&rewritten).unwrap(), new_model.as_str());
    }

    #[test]
    fn damaged_bodies_are_rejected_exactly_when_serde_json_rejects_them(
        (body, _, _) in body(),
        cut in any::<prop::sample::Index>(),
        byte in prop_oneof![
            Just(b'"'), Just(b'\\'), Just(b'{'), Just(b'}'), Just(b'['), Just(b']'),
            Just(b','), Just(b':'), Just(b'u'), Just(b'0'), Just(b'e'), Just(0x01u8),
            Just(0xffu8), Just(b' '),
        ],
        how in 0u8..3,
    ) {
        let mut damaged = body.into_bytes();
        let at = cut.index(damaged.len() + 1);
        match how {
            0 => damaged.truncate(at),
            1 if at < damaged.len() => { damaged.remove(at); }
            _ => damaged.insert(at, byte),
        }
        let serde_accepts = serde_json::from_slice::<Value>(&damaged).is_ok();
        let ours = read_model(&damaged);
        let we_call_it_malformed = matches!(ours, Err(RewriteError::Malformed { .. }));
        prop_assert_eq!(
            serde_accepts,
            !we_call_it_malformed,
            "body {:?}: ours {:?}",
            String::from_utf8_lossy(&damaged),
            ours
        );
        if we_call_it_malformed {
            // A refused body is never rewritten.
            prop_assert!(rewrite_model(&damaged, "x", LIMIT).is_err());
        }
    }
}

#[test]
fn serde_json_and_the_scanner_share_the_nesting_limit() {
    let deep = |n: usize| {
        format!(
            "{{\"model\":\"a\",\"m\":{}{}}}",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    for n in [125, 126, 127, 128] {
        let body = deep(n);
        assert_eq!(
            serde_json::from_str::<Value>(&body).is_ok(),
            read_model(body.as_bytes()).is_ok(),
            "depth {n}"
        );
    }
}

#[test]
fn lone_surrogates_are_refused_like_serde_json_refuses_them() {
    for body in [
        r#"{"model":"a","x":"\ud800"}"#,
        r#"{"model":"a","x":"\udc00"}"#,
        r#"{"model":"a","x":"\ud800\u0041"}"#,
    ] {
        assert!(serde_json::from_str::<Value>(body).is_err(), "{body}");
        assert!(read_model(body.as_bytes()).is_err(), "{body}");
    }
}
