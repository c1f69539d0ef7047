//! Strict parsers for the duration texts providers send.
//!
//! Every parser here is exact (no `f64` rounding: `"45.837906927s"` is 45 s 837 906 927
//! ns), overflow-safe (checked `u128` nanosecond arithmetic, so `1e35`-sized values give
//! `None`), and refuses anything it does not fully understand: signs, exponents,
//! `inf`/`nan`, empty strings, trailing garbage. Zero is returned as zero; the callers
//! decide that zero means "no hint".

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Longest text looked at: no legitimate duration is longer, and it bounds the work.
const MAX_LEN: usize = 64;

/// A non-negative decimal number `digits[.digits]`, as its whole part and its
/// fraction in billionths (digits beyond the ninth are dropped).
fn decimal(text: &str) -> Option<(u128, u128)> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text, None),
    };
    // `.5` and `5.` are refused: no provider sends them and accepting them widens
    // what garbage gets through.
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut whole_value: u128 = 0;
    for b in whole.bytes() {
        whole_value = whole_value
            .checked_mul(10)?
            .checked_add(u128::from(b - b'0'))?;
    }
    let mut billionths: u128 = 0;
    if let Some(fraction) = fraction {
        if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut scale = NANOS_PER_SEC;
        for b in fraction.bytes().take(9) {
            scale /= 10;
            billionths += u128::from(b - b'0') * scale;
        }
    }
    Some((whole_value, billionths))
}

/// `value` units of `unit_nanos` nanoseconds each, or `None` on overflow.
fn scaled((whole, billionths): (u128, u128), unit_nanos: u128) -> Option<Duration> {
    let nanos = whole
        .checked_mul(unit_nanos)?
        .checked_add(billionths.checked_mul(unit_nanos)? / NANOS_PER_SEC)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    // The remainder is below 10^9, so it always fits a u32.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, sub))
}

fn bounded(text: &str) -> Option<&str> {
    let text = text.trim();
    (!text.is_empty() && text.len() <= MAX_LEN).then_some(text)
}

/// Seconds, integer or fractional: `"20"`, `"1.5"` (`retry-after`, Azure's
/// `x-rate-limit-reset-tokens`).
pub(crate) fn parse_seconds(text: &str) -> Option<Duration> {
    scaled(decimal(bounded(text)?)?, NANOS_PER_SEC)
}

/// Milliseconds, integer or fractional: `"1500"` (`retry-after-ms`, `x-ms-retry-after-ms`).
pub(crate) fn parse_millis(text: &str) -> Option<Duration> {
    scaled(decimal(bounded(text)?)?, 1_000_000)
}

/// A Go `time.Duration` string as OpenAI and Groq send in `x-ratelimit-reset-*`:
/// `"6m0s"`, `"12ms"`, `"7.66s"`, `"2m59.56s"`, `"1h2m3s"`. Units `h`, `m`, `s`, `ms`,
/// `us`/`µs`, `ns`; `ms` is tried before `m`. No sign, at least one component.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = bounded(text)?;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let value = decimal(number)?;
        let (unit_nanos, unit_len) = [
            ("ms", 1_000_000),
            ("us", 1_000),
            ("µs", 1_000),
            ("ns", 1),
            ("h", 3_600 * NANOS_PER_SEC),
            ("m", 60 * NANOS_PER_SEC),
            ("s", NANOS_PER_SEC),
        ]
        .into_iter()
        .find(|(unit, _)| after.starts_with(unit))
        .map(|(unit, nanos)| (nanos, unit.len()))?;
        total = total.checked_add(scaled(value, unit_nanos)?)?;
        rest = &after[unit_len..];
    }
    Some(total)
}

/// A protobuf `Duration` in JSON: decimal seconds with an `s` suffix (`"58s"`,
/// `"45.837906927s"`), as Gemini's `RetryInfo.retryDelay`. Zero gives `None`.
pub(crate) fn parse_protobuf_duration(text: &str) -> Option<Duration> {
    let number = bounded(text)?.strip_suffix('s')?;
    parse_seconds(number).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_durations_from_openai_and_groq() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("12ms"), Some(ms(12)));
        assert_eq!(parse_go_duration("9ms"), Some(ms(9)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("7.66s"), Some(ms(7_660)));
        assert_eq!(parse_go_duration("2m59.56s"), Some(ms(179_560)));
        assert_eq!(
            parse_go_duration("1h2m3s"),
            Some(Duration::from_secs(3_723))
        );
        assert_eq!(parse_go_duration("1m30ms"), Some(ms(60_030)));
        assert_eq!(
            parse_go_duration("1.5ms"),
            Some(Duration::from_micros(1_500))
        );
        assert_eq!(parse_go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("7ns"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn go_duration_garbage_is_refused() {
        for bad in [
            "", " ", "6", "s", "-1s", "+1s", "1x", "1.s", ".5s", "1e3s", "1 s", "inf", "NaN",
            "1m-2s", "1hh", "ms",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn go_duration_overflow_is_refused() {
        assert_eq!(parse_go_duration("99999999999999999999999h"), None);
        // u64::MAX seconds is 5124095576030431h 15s.
        assert_eq!(
            parse_go_duration("5124095576030431h15s"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_go_duration("5124095576030431h16s"), None);
        assert_eq!(parse_go_duration("5124095576030432h"), None);
    }

    #[test]
    fn seconds_and_millis_are_exact() {
        assert_eq!(parse_seconds("20"), Some(Duration::from_secs(20)));
        assert_eq!(parse_seconds(" 1.5 "), Some(ms(1_500)));
        assert_eq!(parse_seconds("0.001"), Some(ms(1)));
        assert_eq!(parse_seconds("0"), Some(Duration::ZERO));
        assert_eq!(parse_millis("1500"), Some(ms(1_500)));
        assert_eq!(parse_millis("0.5"), Some(Duration::from_micros(500)));
        assert_eq!(
            parse_seconds("1.1234567891"),
            Some(Duration::new(1, 123_456_789))
        );
    }

    #[test]
    fn seconds_refuse_signs_exponents_and_non_finite() {
        for bad in [
            "", "-1", "+1", "1e35", "1E3", "inf", "-inf", "NaN", "nan", "0x10", "1,5", "1.", ".5",
            "1.5.5", "ten", "१२",
        ] {
            assert_eq!(parse_seconds(bad), None, "{bad:?}");
            assert_eq!(parse_millis(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn huge_values_overflow_to_none() {
        assert_eq!(parse_seconds("100000000000000000000000000000000000"), None);
        assert_eq!(parse_seconds("18446744073709551616"), None);
        assert_eq!(
            parse_seconds("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_seconds(&"9".repeat(65)), None);
    }

    #[test]
    fn protobuf_durations_from_gemini() {
        assert_eq!(
            parse_protobuf_duration("58s"),
            Some(Duration::from_secs(58))
        );
        assert_eq!(
            parse_protobuf_duration("45.837906927s"),
            Some(Duration::new(45, 837_906_927))
        );
        assert_eq!(parse_protobuf_duration("0s"), None);
        assert_eq!(parse_protobuf_duration("58"), None);
        assert_eq!(parse_protobuf_duration("-3s"), None);
        assert_eq!(parse_protobuf_duration("1m"), None);
    }
}
