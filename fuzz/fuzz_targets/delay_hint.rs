//! `parse_delay_hint` on arbitrary headers and an arbitrary clock.
//!
//! Input: 8 bytes of `now` (seconds since the Unix epoch, little endian; a `now` the
//! platform cannot represent is skipped), then `name: value` lines separated by `\n`.
//! Names and values are arbitrary bytes; lines `http` refuses are dropped, so the
//! header map is whatever a peer could actually put on the wire.
//!
//! Properties (beyond "never panics"):
//! - a hint is never zero (zero means "no hint") and always names a header source,
//!   never a local one (breaker, budget) nor a body one (Gemini, error message);
//! - its source header is present, with a value of at most 64 characters (the parser's
//!   input cap), so no hint comes from an unbounded text;
//! - priority: the same hint is read from the map reduced to the source's own header
//!   family (the other headers did not change it), and a bucket reset is only chosen
//!   when no retry instruction (`retry-after-ms`, `x-ms-retry-after-ms`,
//!   `retry-after`) is readable;
//! - the parse is a pure function: the same input gives the same hint.
#![no_main]

use std::time::{Duration, SystemTime};

use backstop_classify::{HintSource, parse_delay_hint};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// The headers each source is read from (the reset and the remaining count of a
/// bucket decide together).
fn family(source: HintSource) -> &'static [&'static str] {
    match source {
        HintSource::RetryAfterMs => &["retry-after-ms"],
        HintSource::XMsRetryAfterMs => &["x-ms-retry-after-ms"],
        HintSource::RetryAfterSeconds | HintSource::RetryAfterDate => &["retry-after"],
        HintSource::RateLimitResetRequests | HintSource::RateLimitResetTokens => &[
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
        ],
        HintSource::AzureRateLimitResetTokens => &["x-rate-limit-reset-tokens"],
        HintSource::AnthropicRateLimitReset => &[
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-output-tokens-reset",
            "anthropic-ratelimit-output-tokens-remaining",
        ],
        other => panic!("parse_delay_hint returned a non-header source: {other:?}"),
    }
}

/// The header whose value the hint's delay was read from.
fn value_header(source: HintSource) -> &'static [&'static str] {
    match source {
        HintSource::RateLimitResetRequests => &["x-ratelimit-reset-requests"],
        HintSource::RateLimitResetTokens => &["x-ratelimit-reset-tokens"],
        HintSource::AnthropicRateLimitReset => &[
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-output-tokens-reset",
        ],
        other => family(other),
    }
}

const INSTRUCTIONS: [&str; 3] = ["retry-after-ms", "x-ms-retry-after-ms", "retry-after"];

fn only(headers: &HeaderMap, names: &[&str]) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if names.contains(&name.as_str()) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

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

fuzz_target!(|data: &[u8]| {
    let Some((clock, text)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Some(now) =
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::from_le_bytes(*clock)))
    else {
        return;
    };
    let headers = parse_headers(text);

    let hint = parse_delay_hint(&headers, now);
    assert_eq!(hint, parse_delay_hint(&headers, now), "not deterministic");
    let Some(hint) = hint else {
        return;
    };
    assert!(
        !hint.delay.is_zero(),
        "zero delay returned as a hint: {hint:?}"
    );

    let source_values: Vec<&HeaderValue> = value_header(hint.source)
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .collect();
    assert!(
        source_values
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.trim().len() <= 64)),
        "{hint:?} read from no bounded header value: {source_values:?}"
    );

    let reduced = only(&headers, family(hint.source));
    assert_eq!(
        parse_delay_hint(&reduced, now),
        Some(hint),
        "other headers changed the hint read from {}",
        hint.source
    );
    if !hint.source.is_retry_instruction() {
        assert_eq!(
            parse_delay_hint(&only(&headers, &INSTRUCTIONS), now),
            None,
            "a bucket reset ({}) won over a readable retry instruction",
            hint.source
        );
    }
});
