//! The fallback layer's targeted model edit (`read_model`, `rewrite_model`) against
//! `serde_json` as the reference parser.
//!
//! Input: 1 byte `n`, then `n % 32` bytes of the new model name (lossy UTF-8, so any
//! character including quotes and controls), then the request body. When `n >= 224`
//! the limit is the body's own length (so a longer name overflows it), else 64 KiB.
//!
//! Properties (beyond "never panics"):
//! - a body `serde_json` refuses is refused by the rewrite (`Malformed`) and by
//!   `read_model`;
//! - a body `serde_json` accepts gets the verdict its shape calls for: not an object,
//!   no `model`, `model` not a string, or (the documented difference) a duplicate
//!   top-level `model`; nothing else;
//! - when the rewrite succeeds, the output parses with `serde_json` and equals the
//!   input's `serde_json::Value` with `model` replaced; `read_model` of the output is
//!   the new name; `read_model` of the input is the `Value`'s model; every byte outside
//!   the model's string is the caller's, unchanged;
//! - the limit holds: neither the input nor the output may exceed it.
#![no_main]

use backstop_fallback::rewrite::locate_model;
use backstop_fallback::{RewriteError, read_model, rewrite_model};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

const LIMIT: usize = 64 * 1024;

/// How many times the top-level object names `model` (after decoding escapes), which
/// `serde_json::Value` cannot tell: it keeps the last.
struct ModelKeys(usize);

impl<'de> Deserialize<'de> for ModelKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> Visitor<'de> for Count {
            type Value = ModelKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ModelKeys, A::Error> {
                let mut n = 0;
                while let Some(key) = map.next_key::<String>()? {
                    n += usize::from(key == "model");
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(ModelKeys(n))
            }
        }
        deserializer.deserialize_map(Count)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(*selector % 32).min(rest.len());
    let (model, body) = rest.split_at(n);
    let limit = if *selector >= 224 { body.len() } else { LIMIT };
    let model = String::from_utf8_lossy(model);

    let reference = serde_json::from_slice::<Value>(body);
    let read = read_model(body);
    let rewritten = rewrite_model(body, &model, limit);

    let Ok(value) = reference else {
        assert!(
            matches!(
                rewritten,
                Err(RewriteError::Malformed { .. } | RewriteError::TooLarge { .. })
            ),
            "serde_json refuses the body, the rewrite says {rewritten:?}"
        );
        assert!(
            matches!(read, Err(RewriteError::Malformed { .. })),
            "serde_json refuses the body, read_model says {read:?}"
        );
        return;
    };

    match (&value, &rewritten) {
        (_, Err(RewriteError::Malformed { offset })) => {
            panic!("serde_json accepts the body, the rewrite calls it malformed at byte {offset}")
        }
        (
            _,
            Err(RewriteError::TooLarge {
                len,
                limit: reported,
            }),
        ) => {
            assert_eq!(*reported, limit, "TooLarge reports another limit");
            assert!(
                *len > limit,
                "TooLarge for {len} bytes under the {limit}-byte limit"
            );
        }
        (Value::Object(_), Err(RewriteError::DuplicateModel)) => {
            // serde_json keeps the last; the rewrite refuses (documented). Only a body
            // that really names `model` twice may get here.
            let keys = serde_json::from_slice::<ModelKeys>(body).map(|k| k.0);
            assert!(
                matches!(keys, Ok(n) if n >= 2),
                "DuplicateModel, but the object names model {keys:?} times"
            );
        }
        (Value::Object(map), Err(RewriteError::NoModelField)) => {
            assert!(
                !map.contains_key("model"),
                "rewrite missed the top-level model"
            );
        }
        (Value::Object(map), Err(RewriteError::ModelNotAString)) => {
            assert!(
                !map.get("model").is_some_and(Value::is_string),
                "rewrite says model is not a string, serde_json reads {:?}",
                map.get("model")
            );
        }
        (Value::Object(map), Ok(out)) => {
            assert!(
                out.len() <= limit,
                "output of {} bytes over the {limit}-byte limit",
                out.len()
            );
            assert!(
                matches!(serde_json::from_slice::<ModelKeys>(body), Ok(ModelKeys(1))),
                "rewrite accepted a body that does not name model exactly once"
            );
            let old = map
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("rewrite succeeded without a string model: {map:?}"));
            let mut expected = value.clone();
            expected["model"] = Value::String(model.clone().into_owned());
            let got: Value = serde_json::from_slice(out)
                .unwrap_or_else(|e| panic!("rewrite output is not JSON ({e}): {out:?}"));
            assert_eq!(
                got, expected,
                "rewrite output differs from the Value rewrite"
            );
            assert_eq!(
                read_model(out).as_deref(),
                Ok(&*model),
                "read_model of the output"
            );
            assert_eq!(read.as_deref(), Ok(old), "read_model of the input");
            let span = locate_model(body).expect("located once already");
            let tail = body.len() - span.end;
            assert_eq!(
                &out[..span.start],
                &body[..span.start],
                "bytes before model changed"
            );
            assert_eq!(
                &out[out.len() - tail..],
                &body[span.end..],
                "bytes after model changed"
            );
        }
        (Value::Object(_), Err(other)) => panic!("unexpected verdict on an object: {other:?}"),
        (_, verdict) => assert_eq!(
            verdict,
            &Err(RewriteError::NotAnObject),
            "serde_json reads a non-object"
        ),
    }
    if !matches!(rewritten, Ok(_) | Err(RewriteError::TooLarge { .. })) {
        assert_eq!(
            read.as_ref().err(),
            rewritten.as_ref().err(),
            "read_model and rewrite_model disagree"
        );
    }
});
