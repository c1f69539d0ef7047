//! The scan classifies a body's bytes 64 at a time (a bitmask per window, kept from
//! one string to the next). These tests put every kind of byte a string scan must
//! stop at on each side of a window boundary, in the last partial window and at the
//! very end of the body, and check the result against `serde_json` and the exact
//! offsets of refusals.

use backstop_fallback::{RewriteError, read_model, rewrite_model};
use proptest::prelude::*;
use serde_json::Value;

const LIMIT: usize = 1 << 24;

/// String contents (as written in JSON) that make the scan stop: escapes of every
/// kind, two-, three- and four-byte characters, `\u` escapes and surrogate pairs.
const CONTENTS: [&str; 8] = [
    r#"a\"b"#,
    r#"\\\\\\"#,
    r#"x\n\t\r\b\f\/y"#,
    "é",
    "日本語",
    "😀",
    r#"\u00e9\ud83d\ude00\u0041"#,
    "plain text that is longer than one window of sixty-four bytes, without a single escape",
];

fn value_level_rewrite(body: &str, model: &str) -> Value {
    let mut value: Value = serde_json::from_str(body).expect("test body is JSON");
    value["model"] = Value::String(model.to_owned());
    value
}

#[test]
fn string_contents_agree_with_serde_json_at_every_offset_of_two_windows() {
    for content in CONTENTS {
        for pad in 0..140 {
            let body = format!(
                "{{\"messages\":[{{\"content\":\"{}{content}\"}}],\"model\":\"{}{content}\"}}",
                "p".repeat(pad),
                "m".repeat(pad % 67)
            );
            let parsed: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                read_model(body.as_bytes()).unwrap(),
                parsed["model"].as_str().unwrap(),
                "{body}"
            );
            let rewritten = rewrite_model(body.as_bytes(), "claude", LIMIT).unwrap();
            assert_eq!(
                serde_json::from_slice::<Value>(&rewritten).unwrap(),
                value_level_rewrite(&body, "claude"),
                "{body}"
            );
        }
    }
}

#[test]
fn a_bad_byte_in_a_string_is_refused_at_its_own_offset_wherever_it_falls() {
    // (bytes placed in the string, offset of the refused byte within them)
    let bad: [(&[u8], usize); 7] = [
        (b"\x01", 0),      // raw control character
        (b"\n", 0),        // raw newline
        (b"\x1f", 0),      // the highest control character
        (b"\xff", 0),      // never valid in UTF-8
        (b"\x80", 0),      // a continuation byte with no lead
        (b"\xe6\x97z", 0), // a three-byte character cut short
        (br"\x", 1),       // an unknown escape: refused at the letter
    ];
    for (bytes, at) in bad {
        for pad in 0..140 {
            let mut body = br#"{"model":"gpt-4o","content":""#.to_vec();
            body.extend(std::iter::repeat_n(b'p', pad));
            let offset = body.len() + at;
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"tail\"}");
            assert!(serde_json::from_slice::<Value>(&body).is_err());
            assert_eq!(
                read_model(&body),
                Err(RewriteError::Malformed { offset }),
                "{:?} after {pad} bytes",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(
                rewrite_model(&body, "claude", LIMIT),
                Err(RewriteError::Malformed { offset })
            );
        }
    }
}

#[test]
fn an_unterminated_string_is_refused_at_the_end_of_the_body_for_every_length() {
    for len in 0..200 {
        let mut body = br#"{"model":"gpt-4o","content":""#.to_vec();
        body.extend(std::iter::repeat_n(b'p', len));
        assert_eq!(
            read_model(&body),
            Err(RewriteError::Malformed { offset: body.len() }),
            "{len} bytes of string"
        );
        // Ending on a backslash or inside a character is the same refusal.
        for ending in [&b"\\"[..], b"\\u00", b"\xc3", b"\xe6\x97"] {
            let mut cut = body.clone();
            cut.extend_from_slice(ending);
            assert!(
                matches!(read_model(&cut), Err(RewriteError::Malformed { .. })),
                "{len} bytes then {ending:?}"
            );
        }
    }
}

#[test]
fn model_found_whatever_the_body_length_around_the_window_size() {
    for len in 0..300 {
        let body = format!(r#"{{"p":"{}","model":"gpt-4o"}}"#, "x".repeat(len));
        assert_eq!(read_model(body.as_bytes()).unwrap(), "gpt-4o", "{len}");
        let body = format!(r#"{{"model":"{}"}}"#, "é".repeat(len));
        assert_eq!(read_model(body.as_bytes()).unwrap(), "é".repeat(len));
    }
}

/// Long message text: runs of plain ASCII, escapes, and non-ASCII characters of
/// every width, so strings span several windows.
fn long_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-z ]{1,80}",
            "[\"\\\\/\\n\\t\\u{1}\\u{1f}]{1,4}",
            "[éàü]{1,3}",
            "[日本語]{1,5}",
            "[😀🎉]{1,2}",
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

fn chat_body(texts: &[String], model: &str) -> String {
    let messages: Vec<Value> = texts
        .iter()
        .map(|t| serde_json::json!({"role": "user", "content": t}))
        .collect();
    // The model last, as the OpenAI Python SDK writes it.
    format!(
        "{{\"messages\":{},\"model\":{}}}",
        serde_json::to_string(&messages).unwrap(),
        serde_json::to_string(model).unwrap()
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn long_messages_rewrite_like_serde_json(
        texts in prop::collection::vec(long_text(), 0..6),
        model in long_text(),
        new_model in long_text(),
    ) {
        let body = chat_body(&texts, &model);
        prop_assert_eq!(read_model(body.as_bytes()).unwrap(), model.as_str());
        let rewritten = rewrite_model(body.as_bytes(), &new_model, LIMIT).unwrap();
        prop_assert_eq!(
            serde_json::from_slice::<Value>(&rewritten).unwrap(),
            value_level_rewrite(&body, &new_model)
        );
    }

    #[test]
    fn damaged_long_messages_are_refused_exactly_when_serde_json_refuses_them(
        texts in prop::collection::vec(long_text(), 1..4),
        cut in any::<prop::sample::Index>(),
        byte in prop_oneof![
            Just(b'"'), Just(b'\\'), Just(0x01u8), Just(b'\n'), Just(0x80u8), Just(0xc3u8),
            Just(0xe6u8), Just(0xf0u8), Just(0xffu8), Just(b'u'), Just(b'}'),
        ],
        how in 0u8..3,
    ) {
        let mut damaged = chat_body(&texts, "gpt-4o").into_bytes();
        let at = cut.index(damaged.len() + 1);
        match how {
            0 => damaged.truncate(at),
            1 if at < damaged.len() => { damaged.remove(at); }
            _ => damaged.insert(at, byte),
        }
        let serde_accepts = serde_json::from_slice::<Value>(&damaged).is_ok();
        let ours = read_model(&damaged);
        prop_assert_eq!(
            serde_accepts,
            !matches!(ours, Err(RewriteError::Malformed { .. })),
            "body {:?}: ours {:?}",
            String::from_utf8_lossy(&damaged),
            ours
        );
    }
}
