//! Error-body classification (`Rules::classify_response`, `classify_stream_error`) of
//! every provider profile on arbitrary statuses, headers and bodies.
//!
//! Input: 2 bytes of status (mapped onto 100..=599), 1 byte choosing the profile,
//! `name: value` header lines separated by `\n` up to a blank line (`\n\n`), then the
//! body bytes (also used as a stream event's data).
//!
//! Properties (beyond "never panics"):
//! - a status below 400 is a success; any other is a failure carrying that status;
//! - `x-should-retry: false` (first value, trimmed, any case) makes the verdict
//!   `Retryable::No`; `true` makes it `Yes` unless the body proved a retry useless
//!   (quota, context length, content filter, unknown model);
//! - a hint is never zero, and a rate limit whose retry instruction is an hour or more
//!   is a quota (the default wait threshold), never a rate limit;
//! - the provider's error type and code are capped at 128 bytes;
//! - a body longer than the inspection cap is classified exactly as an empty body
//!   (status and headers alone);
//! - a stream error has no status and no `x-should-retry`, and a leading `data:` on
//!   its data does not change its verdict.
#![no_main]

use std::time::{Duration, SystemTime};

use backstop_classify::{Classification, Failure, FailureKind, Retryable, Rules};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;

fn parse_headers(text: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii_start();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

/// What the header says, computed independently of the crate.
fn should_retry_header(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get("x-should-retry")?.to_str().ok()?.trim();
    if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else {
        None
    }
}

fn check_common(failure: &Failure, context: &str) {
    if let Some(hint) = failure.hint {
        assert!(!hint.delay.is_zero(), "{context}: zero hint {hint:?}");
        if failure.kind == FailureKind::RateLimited && hint.source.is_retry_instruction() {
            assert!(
                hint.delay < Duration::from_secs(3_600),
                "{context}: a rate limit told to wait {:?} is not a quota",
                hint.delay
            );
        }
    }
    if let Some(pe) = &failure.provider_error {
        for text in [&pe.error_type, &pe.code].into_iter().flatten() {
            assert!(
                text.len() <= 128,
                "{context}: provider text of {} bytes",
                text.len()
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(([hi, lo, profile], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let status = 100 + u16::from_be_bytes([*hi, *lo]) % 500;
    let status = StatusCode::from_u16(status).expect("100..=599 is a valid status");
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest, &[][..]),
    };
    let headers = parse_headers(head);
    let rules = match profile % 5 {
        0 => Rules::generic(),
        1 => Rules::openai(),
        2 => Rules::azure(),
        3 => Rules::anthropic(),
        _ => Rules::gemini(),
    };
    let context = format!("{:?} {status}", rules.profile());
    // A fixed clock: HTTP-date and RFC 3339 hints are read against it.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);

    let verdict = rules.classify_response(status, &headers, body, now);
    if status.as_u16() < 400 {
        assert_eq!(verdict, Classification::Success, "{context}");
    } else {
        let failure = verdict
            .failure()
            .unwrap_or_else(|| panic!("{context}: an error status classified as success"));
        assert_eq!(failure.status, Some(status), "{context}");
        check_common(failure, &context);
        let header = should_retry_header(&headers);
        assert_eq!(failure.should_retry_header, header, "{context}");
        match header {
            Some(false) => assert_eq!(
                failure.retryable,
                Retryable::No,
                "{context}: x-should-retry: false ignored ({failure:?})"
            ),
            Some(true)
                if !matches!(
                    failure.kind,
                    FailureKind::QuotaExhausted
                        | FailureKind::ContextLengthExceeded
                        | FailureKind::ContentFiltered
                        | FailureKind::ModelNotFound
                ) =>
            {
                assert_eq!(
                    failure.retryable,
                    Retryable::Yes,
                    "{context}: x-should-retry: true ignored ({failure:?})"
                )
            }
            _ => {}
        }
        if !body.is_empty() {
            let capped = rules.clone().with_max_inspected_body(body.len() - 1);
            assert_eq!(
                capped.classify_response(status, &headers, body, now),
                capped.classify_response(status, &headers, &[], now),
                "{context}: a body over the cap was inspected"
            );
        }
    }

    let failure = rules.classify_stream_error(body);
    check_common(&failure, "stream error");
    assert_eq!(failure.status, None);
    assert_eq!(failure.should_retry_header, None);
    if !body.trim_ascii().starts_with(b"data:") {
        let mut prefixed = b"data: ".to_vec();
        prefixed.extend_from_slice(body);
        assert_eq!(
            rules.classify_stream_error(&prefixed),
            failure,
            "a leading `data:` changed the stream error's verdict"
        );
    }
});
