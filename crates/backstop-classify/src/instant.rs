//! `now + delay` that never overflows: the one definition every layer uses to turn
//! a configured or provider-sent delay into a deadline.
//!
//! `Instant + Duration` panics when the sum does not fit the clock, and a delay can
//! be anything: a provider's `retry-after-ms: 18446744073709551615999`, a setting of
//! `Duration::MAX` meaning "no cap", a timeout of ten quintillion seconds. Past a
//! century every such deadline means "never" in practice, so a century is where the
//! arithmetic stops.

use std::time::Duration;

use tokio::time::Instant;

/// The longest delay [`instant_after`] adds: a century (100 × 365 days). Longer delays
/// give the same instant, which no process lives to see; a layer that needs a bound
/// for a delay it computes (an interval between paced calls, say) can use it too.
pub const MAX_INSTANT_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `delay` after `now`, never overflowing: a delay over
/// [`MAX_INSTANT_DELAY`] counts as that. For every delay up to it this is exactly
/// `now + delay`.
///
/// On a clock so close to its end that even a century does not fit (none that
/// counts from boot or from the epoch is), it falls back to an hour, then to `now`.
///
/// ```
/// use std::time::Duration;
/// use backstop_classify::{MAX_INSTANT_DELAY, instant_after};
/// use tokio::time::Instant;
///
/// let now = Instant::now();
/// assert_eq!(instant_after(now, Duration::from_secs(20)), now + Duration::from_secs(20));
/// // `now + Duration::MAX` would panic.
/// assert_eq!(instant_after(now, Duration::MAX), now + MAX_INSTANT_DELAY);
/// ```
pub fn instant_after(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay.min(MAX_INSTANT_DELAY))
        .or_else(|| now.checked_add(Duration::from_secs(3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_that_fits_is_added_exactly() {
        let now = Instant::now();
        for delay in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_secs(20),
            MAX_INSTANT_DELAY,
        ] {
            assert_eq!(instant_after(now, delay), now + delay);
        }
    }

    #[test]
    fn a_delay_past_the_cap_is_the_cap_not_a_panic() {
        let now = Instant::now();
        for delay in [
            MAX_INSTANT_DELAY + Duration::from_nanos(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            assert_eq!(instant_after(now, delay), now + MAX_INSTANT_DELAY);
        }
    }
}
