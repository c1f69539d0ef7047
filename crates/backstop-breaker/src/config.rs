//! The breaker's tunables and their defaults.

use std::fmt;
use std::time::Duration;

use crate::Pacing;

/// How a [`Breaker`](crate::Breaker) decides to open, how long it stays open and how it
/// probes for recovery. The defaults (see the crate docs for why each was chosen) suit
/// an LLM chat-completions upstream; [`BreakerConfig::validate`] checks a changed one.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many health failures in a row (0 disables the rule). Default 5.
    pub consecutive_failures: u32,
    /// Open when at least this fraction of the calls in the sliding window failed
    /// (and the window holds at least [`minimum_calls`](Self::minimum_calls)).
    /// Default 0.5.
    pub failure_ratio: f64,
    /// Length of the sliding window the ratio is computed over. Default 30 s.
    pub window: Duration,
    /// How many buckets the window is cut into (resilience4j style): the window
    /// slides one bucket at a time. Default 10 (3 s each).
    pub window_buckets: u32,
    /// The ratio rule applies only once the window holds this many calls, so three
    /// failures out of four at midnight do not open the key. 0 disables the ratio
    /// rule. Default 10.
    pub minimum_calls: u32,
    /// How long a key stays open the first time the counting rules open it (when the
    /// failure that tripped it carried no delay hint). Each failed half-open probe
    /// doubles the next open period, up to [`max_open_duration`](Self::max_open_duration);
    /// closing the key resets it. Default 5 s.
    pub open_duration: Duration,
    /// The longest open period the doubling reaches (at least `open_duration`).
    /// Default 60 s.
    pub max_open_duration: Duration,
    /// How many trial requests may be in flight at once while half-open. Default 1.
    pub half_open_probes: u32,
    /// How many probes must succeed before the key closes. Default 1.
    pub probe_successes_to_close: u32,
    /// A probe that has not finished after this long gives its slot back and counts as
    /// a failure, so a hung probe cannot keep the key half-open. A probe is one logical
    /// call, retries included: set it to the longest a call may take below the breaker
    /// (the retry layer's deadline). Default 60 s.
    pub probe_timeout: Duration,
    /// A 429 or 503 whose Retry-After (or Gemini `retryDelay`, `retry-after-ms`, …) is
    /// at least this long opens the key at once until the hinted time. Shorter hints
    /// are left to the retry layer, which waits them out inside the request, and to
    /// pacing, which slows the key down instead of stopping it; the failure still
    /// counts towards the rules above. Default 2 s.
    pub hint_opens_at: Duration,
    /// The longest cooldown a delay hint may impose; longer hints (Azure's "retry
    /// after 86400 seconds", a Retry-After of 2.3 days) are cut to this, after which a
    /// probe finds out. Default 10 min.
    pub max_hinted_cooldown: Duration,
    /// How long a quota or billing failure (`insufficient_quota`, spend limits,
    /// per-day quotas) keeps the key open. Default 10 min.
    pub quota_cooldown: Duration,
    /// At most this many keys are tracked by the in-process store. Once it is
    /// reached, a request for a new key takes the place of a key at rest (closed,
    /// no failure in its window or in a row, no probe or call in flight, nothing
    /// served in the last second, no pace: see
    /// [`KeyState::is_at_rest`](crate::KeyState::is_at_rest)) in the same one of the
    /// store's 16 shards, forgetting that key's successes, or else of a stale key
    /// (no outcome for [`idle_horizon`](Self::idle_horizon), no call in flight, no
    /// open period running: [`KeyState::is_stale`](crate::KeyState::is_stale)); when
    /// that shard has neither, it passes through untracked (and a warning is logged
    /// once). Default 4096.
    pub max_keys: usize,
    /// Pacing after a slow-down signal (a 429 or 503 that did not open the key, or a
    /// recovery from an open period): see the crate docs. `None` turns it off: a
    /// closed key then admits every call. Default on, [`Pacing::default`].
    pub pacing: Option<Pacing>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(30),
            window_buckets: 10,
            minimum_calls: 10,
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 1,
            probe_successes_to_close: 1,
            probe_timeout: Duration::from_secs(60),
            hint_opens_at: Duration::from_secs(2),
            max_hinted_cooldown: Duration::from_secs(600),
            quota_cooldown: Duration::from_secs(600),
            max_keys: 4096,
            pacing: Some(Pacing::default()),
        }
    }
}

impl BreakerConfig {
    /// How long a key must go without an outcome before a full store may forget
    /// it though it is not at rest (see [`KeyState::is_stale`](crate::KeyState::is_stale)):
    /// the longer of [`window`](Self::window) and
    /// [`max_open_duration`](Self::max_open_duration), 60 s by default.
    pub fn idle_horizon(&self) -> Duration {
        self.window.max(self.max_open_duration)
    }

    /// Checks that the values make a working breaker.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(ConfigError::FailureRatio(self.failure_ratio));
        }
        if self.window_buckets == 0 {
            return Err(ConfigError::ZeroBuckets);
        }
        if self.window_buckets > MAX_WINDOW_BUCKETS {
            return Err(ConfigError::TooManyBuckets(self.window_buckets));
        }
        if self.window < Duration::from_nanos(u64::from(self.window_buckets)) {
            return Err(ConfigError::WindowTooShort);
        }
        if self.open_duration.is_zero() {
            return Err(ConfigError::Zero("open_duration"));
        }
        if self.max_open_duration < self.open_duration {
            return Err(ConfigError::MaxOpenBelowOpen);
        }
        if self.probe_timeout.is_zero() {
            return Err(ConfigError::Zero("probe_timeout"));
        }
        if self.quota_cooldown.is_zero() {
            return Err(ConfigError::Zero("quota_cooldown"));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::Zero("half_open_probes"));
        }
        if self.probe_successes_to_close == 0 {
            return Err(ConfigError::Zero("probe_successes_to_close"));
        }
        if self.max_keys == 0 {
            return Err(ConfigError::Zero("max_keys"));
        }
        if let Some(p) = &self.pacing {
            if !(p.backoff > 0.0 && p.backoff < 1.0) {
                return Err(ConfigError::PaceBackoff(p.backoff));
            }
            if !(p.growth > 0.0 && p.growth <= 1.0) {
                return Err(ConfigError::PaceGrowth(p.growth));
            }
            if !(p.min_rate > 0.0 && p.min_rate <= 1e6) {
                return Err(ConfigError::PaceMinRate(p.min_rate));
            }
            if !(0.0..=1.0).contains(&p.recovery) {
                return Err(ConfigError::PaceRecovery(p.recovery));
            }
        }
        Ok(())
    }
}

/// The most buckets a window may have (each key holds one array of them).
pub const MAX_WINDOW_BUCKETS: u32 = 1000;

/// A [`BreakerConfig`] that cannot work.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `failure_ratio` outside (0, 1].
    FailureRatio(f64),
    /// `window_buckets` is 0.
    ZeroBuckets,
    /// `window_buckets` is above [`MAX_WINDOW_BUCKETS`].
    TooManyBuckets(u32),
    /// `window` is shorter than one nanosecond per bucket.
    WindowTooShort,
    /// A field that must be positive is zero.
    Zero(&'static str),
    /// `max_open_duration` is shorter than `open_duration`.
    MaxOpenBelowOpen,
    /// `pacing.backoff` outside (0, 1).
    PaceBackoff(f64),
    /// `pacing.growth` outside (0, 1].
    PaceGrowth(f64),
    /// `pacing.min_rate` outside (0, 1e6].
    PaceMinRate(f64),
    /// `pacing.recovery` outside [0, 1].
    PaceRecovery(f64),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::FailureRatio(r) => write!(
                f,
                "breaker failure_ratio {r} is outside (0, 1]; use e.g. 0.5 to open at 50 % failures"
            ),
            ConfigError::ZeroBuckets => f.write_str(
                "breaker window_buckets is 0; use at least 1 (the default is 10)",
            ),
            ConfigError::TooManyBuckets(n) => write!(
                f,
                "breaker window_buckets {n} is above {MAX_WINDOW_BUCKETS}; 10 to 100 buckets slide smoothly enough"
            ),
            ConfigError::WindowTooShort => f.write_str(
                "breaker window is shorter than its number of buckets in nanoseconds; use a window of seconds",
            ),
            ConfigError::Zero(field) => {
                write!(f, "breaker {field} is zero; it must be positive")
            }
            ConfigError::MaxOpenBelowOpen => f.write_str(
                "breaker max_open_duration is shorter than open_duration; raise it (the default is 60 s) or lower open_duration",
            ),
            ConfigError::PaceBackoff(b) => write!(
                f,
                "breaker pacing.backoff {b} is outside (0, 1); use e.g. 0.9 to slow down by 10 % per signal"
            ),
            ConfigError::PaceGrowth(g) => write!(
                f,
                "breaker pacing.growth {g} is outside (0, 1]; use e.g. 0.03 to grow 3 % a second"
            ),
            ConfigError::PaceMinRate(r) => write!(
                f,
                "breaker pacing.min_rate {r} is outside (0, 1000000] calls per second; use e.g. 0.5"
            ),
            ConfigError::PaceRecovery(r) => write!(
                f,
                "breaker pacing.recovery {r} is outside [0, 1]; use e.g. 1.0 to regain a lost rate within seconds, or 0 to grow by `growth` alone"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}
