//! `parse_delay_hint`: every format, its precedence, and the values that must mean
//! "no hint".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backstop_classify::{DelayHint, HintSource, parse_delay_hint};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Thu, 21 Aug 2025 12:40:00 GMT.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_755_780_000)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn parse(pairs: &[(&str, &str)]) -> Option<DelayHint> {
    parse_delay_hint(&headers(pairs), now())
}

fn hint(delay: Duration, source: HintSource) -> Option<DelayHint> {
    Some(DelayHint::new(delay, source))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn retry_after_ms_is_milliseconds() {
    assert_eq!(
        parse(&[("retry-after-ms", "1500")]),
        hint(ms(1_500), HintSource::RetryAfterMs)
    );
    assert_eq!(
        parse(&[("retry-after-ms", "0.5")]),
        hint(Duration::from_micros(500), HintSource::RetryAfterMs)
    );
}

#[test]
fn x_ms_retry_after_ms_is_milliseconds() {
    assert_eq!(
        parse(&[("x-ms-retry-after-ms", "250")]),
        hint(ms(250), HintSource::XMsRetryAfterMs)
    );
}

#[test]
fn retry_after_integer_and_fractional_seconds() {
    assert_eq!(
        parse(&[("retry-after", "20")]),
        hint(Duration::from_secs(20), HintSource::RetryAfterSeconds)
    );
    assert_eq!(
        parse(&[("retry-after", "1.25")]),
        hint(ms(1_250), HintSource::RetryAfterSeconds)
    );
    // Reported as given, never capped: the retry layer caps.
    assert_eq!(
        parse(&[("retry-after", "198300")]),
        hint(Duration::from_secs(198_300), HintSource::RetryAfterSeconds)
    );
}

#[test]
fn retry_after_http_date_is_relative_to_now() {
    assert_eq!(
        parse(&[("retry-after", "Thu, 21 Aug 2025 12:40:30 GMT")]),
        hint(Duration::from_secs(30), HintSource::RetryAfterDate)
    );
    // Far future: reported as given.
    assert_eq!(
        parse(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
        hint(
            Duration::from_secs(253_402_300_799 - 1_755_780_000),
            HintSource::RetryAfterDate
        )
    );
    // Now and the past: no hint.
    assert_eq!(
        parse(&[("retry-after", "Thu, 21 Aug 2025 12:40:00 GMT")]),
        None
    );
    assert_eq!(
        parse(&[("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT")]),
        None
    );
    // The obsolete date formats httpdate accepts.
    assert_eq!(
        parse(&[("retry-after", "Thursday, 21-Aug-25 12:41:00 GMT")]),
        hint(Duration::from_secs(60), HintSource::RetryAfterDate)
    );
}

#[test]
fn precedence_ms_then_x_ms_then_retry_after_then_bucket_resets() {
    let all = [
        ("x-ratelimit-reset-requests", "1s"),
        ("x-rate-limit-reset-tokens", "2"),
        ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:03Z"),
        ("retry-after", "4"),
        ("x-ms-retry-after-ms", "5000"),
        ("retry-after-ms", "6000"),
    ];
    assert_eq!(parse(&all), hint(ms(6_000), HintSource::RetryAfterMs));
    assert_eq!(
        parse(&all[..5]),
        hint(ms(5_000), HintSource::XMsRetryAfterMs)
    );
    assert_eq!(
        parse(&all[..4]),
        hint(ms(4_000), HintSource::RetryAfterSeconds)
    );
    assert_eq!(
        parse(&all[..3]),
        hint(ms(1_000), HintSource::RateLimitResetRequests)
    );
    assert_eq!(
        parse(&all[1..3]),
        hint(ms(2_000), HintSource::AzureRateLimitResetTokens)
    );
    assert_eq!(
        parse(&all[2..3]),
        hint(ms(3_000), HintSource::AnthropicRateLimitReset)
    );
}

#[test]
fn an_invalid_stronger_header_falls_through_to_the_next() {
    assert_eq!(
        parse(&[("retry-after-ms", "soon"), ("retry-after", "3")]),
        hint(ms(3_000), HintSource::RetryAfterSeconds)
    );
    assert_eq!(
        parse(&[
            ("retry-after-ms", "-1"),
            ("x-ms-retry-after-ms", "0"),
            ("x-ratelimit-reset-tokens", "9ms")
        ]),
        hint(ms(9), HintSource::RateLimitResetTokens)
    );
}

#[test]
fn go_style_reset_durations() {
    for (text, want) in [
        ("6m0s", ms(360_000)),
        ("1s", ms(1_000)),
        ("12ms", ms(12)),
        ("9ms", ms(9)),
        ("7.66s", ms(7_660)),
        ("2m59.56s", ms(179_560)),
        ("1h2m3s", ms(3_723_000)),
    ] {
        assert_eq!(
            parse(&[("x-ratelimit-reset-tokens", text)]),
            hint(want, HintSource::RateLimitResetTokens),
            "{text}"
        );
    }
    // 0s is "no hint".
    assert_eq!(parse(&[("x-ratelimit-reset-requests", "0s")]), None);
}

#[test]
fn openai_bucket_choice() {
    // Nothing says which bucket is empty: the later reset.
    assert_eq!(
        parse(&[
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s")
        ]),
        hint(ms(360_000), HintSource::RateLimitResetTokens)
    );
    // The requests bucket is empty: its reset, even though the tokens one is later.
    assert_eq!(
        parse(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "1200"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]),
        hint(ms(1_000), HintSource::RateLimitResetRequests)
    );
}

#[test]
fn azure_bare_seconds_reset() {
    assert_eq!(
        parse(&[("x-rate-limit-reset-tokens", "55")]),
        hint(ms(55_000), HintSource::AzureRateLimitResetTokens)
    );
    assert_eq!(parse(&[("x-rate-limit-reset-tokens", "-1")]), None);
    assert_eq!(parse(&[("x-rate-limit-reset-tokens", "0")]), None);
}

#[test]
fn anthropic_rfc3339_resets() {
    assert_eq!(
        parse(&[("anthropic-ratelimit-tokens-reset", "2025-08-21T12:40:59Z")]),
        hint(ms(59_000), HintSource::AnthropicRateLimitReset)
    );
    assert_eq!(
        parse(&[(
            "anthropic-ratelimit-output-tokens-reset",
            "2025-08-21T12:40:00.250Z"
        )]),
        hint(ms(250), HintSource::AnthropicRateLimitReset)
    );
    // The empty bucket's reset, not the latest.
    assert_eq!(
        parse(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:10Z"),
            ("anthropic-ratelimit-tokens-remaining", "5000"),
            ("anthropic-ratelimit-tokens-reset", "2025-08-21T12:40:50Z"),
        ]),
        hint(ms(10_000), HintSource::AnthropicRateLimitReset)
    );
    assert_eq!(
        parse(&[(
            "anthropic-ratelimit-requests-reset",
            "2025-08-21T12:40:59+00:00"
        )]),
        hint(ms(59_000), HintSource::AnthropicRateLimitReset)
    );
    // Past, now, non-UTC offsets (Anthropic sends UTC only), garbage: no hint.
    for bad in [
        "2025-08-21T12:39:59Z",
        "2025-08-21T12:40:00Z",
        "2025-08-21T14:40:59+02:00",
        "2025-08-21 12:40:59",
        "tomorrow",
        "",
    ] {
        assert_eq!(
            parse(&[("anthropic-ratelimit-requests-reset", bad)]),
            None,
            "{bad:?}"
        );
    }
}

#[test]
fn malformed_values_mean_no_hint() {
    for name in [
        "retry-after",
        "retry-after-ms",
        "x-ms-retry-after-ms",
        "x-rate-limit-reset-tokens",
    ] {
        for bad in [
            "",
            " ",
            "-1",
            "-0.5",
            "0",
            "0.0",
            "inf",
            "-inf",
            "infinity",
            "NaN",
            "nan",
            "1e35",
            "1E3",
            "0x10",
            "ten",
            "1,5",
            "1.",
            ".5",
            "20 seconds",
            "+3",
        ] {
            assert_eq!(parse(&[(name, bad)]), None, "{name}: {bad:?}");
        }
    }
    for bad in ["", "-1s", "1e3s", "6m0", "abc", "1.5.5s", "inf", "NaN"] {
        assert_eq!(
            parse(&[("x-ratelimit-reset-requests", bad)]),
            None,
            "{bad:?}"
        );
    }
}

#[test]
fn values_too_large_for_a_duration_mean_no_hint() {
    for name in ["retry-after", "retry-after-ms", "x-rate-limit-reset-tokens"] {
        assert_eq!(
            parse(&[(name, "100000000000000000000000000000000000")]),
            None,
            "{name}"
        );
        assert_eq!(parse(&[(name, &"9".repeat(500))]), None, "{name}");
    }
    assert_eq!(
        parse(&[("x-ratelimit-reset-tokens", "99999999999999999999h")]),
        None
    );
    // The largest representable value is still reported as given.
    assert_eq!(
        parse(&[("retry-after", "18446744073709551615")]),
        hint(Duration::from_secs(u64::MAX), HintSource::RetryAfterSeconds)
    );
}

#[test]
fn duplicated_headers_take_the_first_valid_value() {
    assert_eq!(
        parse(&[("retry-after", "7"), ("retry-after", "9")]),
        hint(ms(7_000), HintSource::RetryAfterSeconds)
    );
    assert_eq!(
        parse(&[
            ("retry-after", "garbage"),
            ("retry-after", "-1"),
            ("retry-after", "9")
        ]),
        hint(ms(9_000), HintSource::RetryAfterSeconds)
    );
    assert_eq!(
        parse(&[("retry-after-ms", "0"), ("retry-after-ms", "300")]),
        hint(ms(300), HintSource::RetryAfterMs)
    );
}

#[test]
fn non_utf8_header_values_are_ignored() {
    let mut map = HeaderMap::new();
    map.append("retry-after", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
    map.append("retry-after", HeaderValue::from_static("2"));
    assert_eq!(
        parse_delay_hint(&map, now()),
        hint(ms(2_000), HintSource::RetryAfterSeconds)
    );
}

#[test]
fn no_hint_headers_no_hint() {
    assert_eq!(parse(&[]), None);
    assert_eq!(
        parse(&[
            ("x-request-id", "req_1"),
            ("x-ratelimit-limit-requests", "500")
        ]),
        None
    );
}
