//! The retry configuration, its presets and its validation.

use std::fmt;
use std::time::Duration;

use std::sync::Arc;

use backstop_classify::Rules;
use http::HeaderName;

use crate::{Backoff, Jitter};

/// A configuration the retry layer refuses, with what to change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_attempts` was 0.
    ZeroAttempts,
    /// The backoff multiplier was not a finite number `>= 1`.
    InvalidMultiplier {
        /// The value given.
        multiplier: f64,
    },
    /// The backoff's first delay was larger than its cap.
    BaseAboveCap {
        /// The first delay given.
        base: Duration,
        /// The cap given.
        cap: Duration,
    },
    /// The per-attempt timeout was longer than the total deadline, so the deadline
    /// would always cut the attempt first (the timeouts-multiply confusion).
    AttemptTimeoutAboveDeadline {
        /// The per-attempt timeout given.
        attempt_timeout: Duration,
        /// The total deadline.
        deadline: Duration,
    },
    /// A zero duration where a positive one is needed.
    ZeroDuration {
        /// Which setting.
        setting: &'static str,
    },
    /// The hint-jitter fraction was not a finite number in `[0, 1]`.
    InvalidHintJitter {
        /// The value given.
        fraction: f64,
    },
    /// The first-event cap was 0 bytes.
    ZeroFirstEventCap,
    /// The least time a retry needs before the deadline was not shorter than the
    /// deadline itself, so no retry could ever start.
    MinAttemptTimeNotBelowDeadline {
        /// The minimum time left given.
        min_attempt_time: Duration,
        /// The total deadline.
        deadline: Duration,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroAttempts => {
                f.write_str("`max_attempts` must be at least 1 (1 means: never retry)")
            }
            ConfigError::InvalidMultiplier { multiplier } => write!(
                f,
                "backoff multiplier {multiplier} is invalid; use a finite number >= 1 (2 doubles each wait)"
            ),
            ConfigError::BaseAboveCap { base, cap } => write!(
                f,
                "backoff base {base:?} is larger than its cap {cap:?}; lower the base or raise the cap"
            ),
            ConfigError::AttemptTimeoutAboveDeadline {
                attempt_timeout,
                deadline,
            } => write!(
                f,
                "`attempt_timeout` {attempt_timeout:?} is longer than the total `deadline` {deadline:?}; \
                 the attempt timeout bounds one attempt and must fit inside the deadline"
            ),
            ConfigError::ZeroDuration { setting } => {
                write!(f, "`{setting}` must be longer than zero")
            }
            ConfigError::InvalidHintJitter { fraction } => write!(
                f,
                "hint jitter fraction {fraction} is invalid; use a number between 0 and 1 (0.1 adds up to 10 %)"
            ),
            ConfigError::ZeroFirstEventCap => {
                f.write_str("`first_event_cap` must be at least 1 byte")
            }
            ConfigError::MinAttemptTimeNotBelowDeadline {
                min_attempt_time,
                deadline,
            } => write!(
                f,
                "`min_attempt_time` ({min_attempt_time:?}) must be shorter than the deadline \
                 ({deadline:?}), or no retry could ever start; lower it or raise the deadline"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// When the layer holds a streamed response back until its first SSE event, so an
/// error sent as the first event can still be retried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HoldFirstEvent {
    /// Hold `text/event-stream` responses to requests that ask for a stream: the
    /// request carries the [`StreamRequest`](crate::StreamRequest) marker, or its
    /// body (a [`ReplayBody`](backstop_classify::ReplayBody), `Bytes` or `String`)
    /// contains `"stream": true` (a byte scan, not a JSON parse: see
    /// [`stream_requested`](crate::stream_requested)).
    #[default]
    Auto,
    /// Hold every `text/event-stream` response.
    Always,
    /// Hand every response on as soon as its head arrives.
    Never,
}

/// The extra random wait added on top of a provider's delay hint, so clients that got
/// the same hint do not all come back in the same millisecond.
///
/// The extra is uniform in `[0, min(hint × fraction, max)]`. Default: 10 %, at most
/// 1 s. The wait is therefore never shorter than the hint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HintJitter {
    fraction: f64,
    max: Duration,
}

impl HintJitter {
    /// Up to `fraction` of the hint (in `[0, 1]`), at most `max`.
    pub fn new(fraction: f64, max: Duration) -> Result<Self, ConfigError> {
        if !fraction.is_finite() || !(0.0..=1.0).contains(&fraction) {
            return Err(ConfigError::InvalidHintJitter { fraction });
        }
        Ok(HintJitter { fraction, max })
    }

    /// No extra: wait exactly the hint.
    pub fn none() -> Self {
        HintJitter {
            fraction: 0.0,
            max: Duration::ZERO,
        }
    }

    /// The largest extra for a hint of `hint`.
    pub fn max_extra(&self, hint: Duration) -> Duration {
        // `hint.mul_f64(fraction)`, the same arithmetic, without its panic: a hint of
        // 2^64 - 1024 s or more is 2^64 s as an `f64`, which no `Duration` holds.
        Duration::try_from_secs_f64(self.fraction * hint.as_secs_f64())
            .unwrap_or(Duration::MAX)
            .min(self.max)
    }
}

impl Default for HintJitter {
    fn default() -> Self {
        HintJitter {
            fraction: 0.1,
            max: Duration::from_secs(1),
        }
    }
}

/// Everything the retry layer needs to know, validated on construction: a
/// `RetryConfig` that exists is one the layer can run.
///
/// Start from a preset ([`RetryConfig::interactive`], [`RetryConfig::batch`]) and
/// change what you need; setters that could break an invariant return a
/// [`ConfigError`].
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) stream_idle_timeout: Option<Duration>,
    pub(crate) max_hint: Duration,
    pub(crate) hint_jitter: HintJitter,
    pub(crate) idempotency_key: bool,
    pub(crate) attempt_header: Option<HeaderName>,
    pub(crate) hold_first_event: HoldFirstEvent,
    pub(crate) first_event_cap: usize,
    pub(crate) rules: Arc<Rules>,
    pub(crate) fallback_handoff: Option<Duration>,
    pub(crate) min_attempt_time: Duration,
}

/// The default [`RetryConfig::with_fallback_handoff`]: a hinted wait of half a second
/// or more, a delay a caller notices, goes to another model when there is one.
pub const DEFAULT_FALLBACK_HANDOFF: Duration = Duration::from_millis(500);

/// The default maximum delay hint the layer will wait on (openai-python's window).
pub const DEFAULT_MAX_HINT: Duration = Duration::from_secs(120);

/// The default cap on bytes held while waiting for a stream's first event.
pub const DEFAULT_FIRST_EVENT_CAP: usize = 64 * 1024;

impl RetryConfig {
    /// For a user waiting on the answer (openai-python-like): 3 attempts, waits of
    /// 0.5 s doubling to at most 8 s with [`Jitter::Equal`] (each wait in `[t/2, t]`:
    /// spread out, yet never an immediate hammering of a rate-limited provider), no
    /// total deadline and no attempt timeout of its own (set them for your latency
    /// budget).
    pub fn interactive() -> Self {
        let backoff = Backoff::preset(
            Duration::from_millis(500),
            2.0,
            Duration::from_secs(8),
            Jitter::Equal,
        );
        RetryConfig {
            backoff,
            max_attempts: 3,
            deadline: None,
            attempt_timeout: None,
            stream_idle_timeout: None,
            max_hint: DEFAULT_MAX_HINT,
            hint_jitter: HintJitter::default(),
            idempotency_key: false,
            attempt_header: None,
            hold_first_event: HoldFirstEvent::Auto,
            first_event_cap: DEFAULT_FIRST_EVENT_CAP,
            fallback_handoff: Some(DEFAULT_FALLBACK_HANDOFF),
            rules: Arc::new(Rules::default()),
            min_attempt_time: Duration::ZERO,
        }
    }

    /// For background work (the common tenacity pattern, without its SDK-under-it
    /// multiplication): 4 attempts, waits 2, 4, 8 s (the sequence continues 16, 30,
    /// 30 … if you raise `max_attempts`), no jitter (as tenacity; provider hints still
    /// get [`HintJitter`]), at most 60 s in all.
    pub fn batch() -> Self {
        let backoff = Backoff::preset(
            Duration::from_secs(2),
            2.0,
            Duration::from_secs(30),
            Jitter::None,
        );
        RetryConfig {
            backoff,
            max_attempts: 4,
            deadline: Some(Duration::from_secs(60)),
            ..RetryConfig::interactive()
        }
    }

    /// Replaces the backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Changes only the backoff's jitter kind.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.backoff = self.backoff.with_jitter(jitter);
        self
    }

    /// The most attempts per logical request, the first included (1: never retry).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Result<Self, ConfigError> {
        if max_attempts == 0 {
            return Err(ConfigError::ZeroAttempts);
        }
        self.max_attempts = max_attempts;
        Ok(self)
    }

    /// The total time for all attempts and waits of one logical request, or `None`
    /// for no deadline of the layer's own (a [`backstop_classify::Deadline`] in the
    /// request still applies).
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Result<Self, ConfigError> {
        self.deadline = not_zero("deadline", deadline)?;
        self.check_timeouts()?;
        Ok(self)
    }

    /// The least time before the deadline a retry must have left when it would start
    /// (after its wait): a retry that would start later is not made, and the last
    /// outcome goes to the caller (or the fallback layer) at once, as when the wait
    /// itself would reach the deadline. Such a retry would most likely be cut off
    /// by the deadline: a call the provider serves (and bills) and nobody receives.
    ///
    /// Default zero: a retry may start at any time before the deadline, as the
    /// deadline rule alone says. Set it somewhat below your provider's usual time to
    /// a response head (for a non-streamed chat completion, the whole answer): a
    /// retry with a little less time than the usual often still succeeds, and the
    /// fallback it would hand over to may be worse off (the chaos soak's figures are
    /// in `RELIABILITY.md`). It
    /// applies to retries only (the first attempt is the caller's), and only when
    /// there is a deadline (the layer's own or the request's
    /// [`Deadline`](backstop_classify::Deadline)). With a deadline of the layer's
    /// own it must be shorter than that deadline.
    pub fn with_min_attempt_time(mut self, min_left: Duration) -> Result<Self, ConfigError> {
        self.min_attempt_time = min_left;
        self.check_timeouts()?;
        Ok(self)
    }

    /// The time one attempt may take to produce a response head (and, for a held
    /// stream, its first event), or `None` for no limit of its own.
    pub fn with_attempt_timeout(
        mut self,
        attempt_timeout: Option<Duration>,
    ) -> Result<Self, ConfigError> {
        self.attempt_timeout = not_zero("attempt_timeout", attempt_timeout)?;
        self.check_timeouts()?;
        Ok(self)
    }

    /// The longest the provider may leave a response body silent while the caller
    /// waits for its next bytes, or `None` (the default) for no limit. Past it the
    /// body ends with a `ClassifiedError` whose failure is
    /// [`FailureKind::TimedOut`](backstop_classify::FailureKind) and whose cause is
    /// [`RetryError::StreamStalled`](crate::RetryError); the bytes before it reach
    /// the caller unchanged, and the request is never replayed (it is committed).
    ///
    /// The clock runs only while the caller is waiting: it starts when the caller
    /// asks for the next frame and none is ready, and stops with each frame. A
    /// caller that reads slowly is never cut off for it. The attempt timeout covers
    /// the time to the head (and to a held stream's first event); this covers every
    /// gap after. Off by default because a silent gap is not always a fault: a
    /// reasoning model may stream its first content only after minutes of thought.
    /// Set it above the longest pause your models make.
    pub fn with_stream_idle_timeout(
        mut self,
        stream_idle_timeout: Option<Duration>,
    ) -> Result<Self, ConfigError> {
        self.stream_idle_timeout = not_zero("stream_idle_timeout", stream_idle_timeout)?;
        Ok(self)
    }

    /// The longest delay hint the layer will wait on; a longer one stops retrying at
    /// once ([`StopReason::HintTooLong`](backstop_classify::StopReason)).
    pub fn with_max_hint(mut self, max_hint: Duration) -> Self {
        self.max_hint = max_hint;
        self
    }

    /// The extra random wait added to delay hints.
    pub fn with_hint_jitter(mut self, hint_jitter: HintJitter) -> Self {
        self.hint_jitter = hint_jitter;
        self
    }

    /// Whether the layer adds one stable `Idempotency-Key` header to every attempt of
    /// a logical request that has none (a key the caller set is always kept). With a
    /// key, a timeout or reset after the request was written may be retried: turn it
    /// on only for providers that de-duplicate on that header.
    pub fn with_idempotency_key(mut self, on: bool) -> Self {
        self.idempotency_key = on;
        self
    }

    /// When a failure's provider delay hint asks for a wait at least this long and the
    /// request is marked [`FallbackAvailable`](backstop_classify::FallbackAvailable)
    /// (the fallback layer has another model for it), the failure goes to the
    /// fallback layer at once ([`StopReason::HandedToFallback`](backstop_classify::StopReason))
    /// instead of being waited out on this model: the provider said "not now", and
    /// another model can answer now. Default [`DEFAULT_FALLBACK_HANDOFF`] (500 ms):
    /// a few milliseconds' hint is still waited out on the requested model. `None`
    /// always waits. Failures without a hint are retried as usual.
    pub fn with_fallback_handoff(mut self, at_least: Option<Duration>) -> Self {
        self.fallback_handoff = at_least;
        self
    }

    /// A request header set to the attempt number (1, 2, …) on every attempt.
    pub fn with_attempt_header(mut self, name: Option<HeaderName>) -> Self {
        self.attempt_header = name;
        self
    }

    /// When to hold a streamed response until its first SSE event.
    pub fn with_hold_first_event(mut self, hold: HoldFirstEvent) -> Self {
        self.hold_first_event = hold;
        self
    }

    /// The most bytes held while waiting for a stream's first event; past it the
    /// stream is handed on as it is.
    pub fn with_first_event_cap(mut self, bytes: usize) -> Result<Self, ConfigError> {
        if bytes == 0 {
            return Err(ConfigError::ZeroFirstEventCap);
        }
        self.first_event_cap = bytes;
        Ok(self)
    }

    /// The classification rules the layer applies itself: to a response that arrives
    /// without a [`Classification`](backstop_classify::Classification) (no classify
    /// layer inside; status and headers only, the body is not read) and to SSE error
    /// events. Default: [`Rules::default`], the generic OpenAI-compatible profile. Use
    /// the same profile as your classify layer.
    pub fn with_rules(mut self, rules: Rules) -> Self {
        self.rules = Arc::new(rules);
        self
    }

    /// The classification rules the layer applies itself.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    fn check_timeouts(&self) -> Result<(), ConfigError> {
        if let (Some(attempt_timeout), Some(deadline)) = (self.attempt_timeout, self.deadline)
            && attempt_timeout > deadline
        {
            return Err(ConfigError::AttemptTimeoutAboveDeadline {
                attempt_timeout,
                deadline,
            });
        }
        if let Some(deadline) = self.deadline
            && !self.min_attempt_time.is_zero()
            && self.min_attempt_time >= deadline
        {
            return Err(ConfigError::MinAttemptTimeNotBelowDeadline {
                min_attempt_time: self.min_attempt_time,
                deadline,
            });
        }
        Ok(())
    }

    /// The backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The most attempts, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The total deadline, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The per-attempt timeout, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// The longest silence allowed in a response body, if any.
    pub fn stream_idle_timeout(&self) -> Option<Duration> {
        self.stream_idle_timeout
    }

    /// The longest delay hint waited on.
    pub fn max_hint(&self) -> Duration {
        self.max_hint
    }

    /// The extra random wait on hints.
    pub fn hint_jitter(&self) -> HintJitter {
        self.hint_jitter
    }

    /// Whether the layer adds an `Idempotency-Key`.
    pub fn idempotency_key(&self) -> bool {
        self.idempotency_key
    }

    /// The hinted wait from which a failure goes to the fallback layer at once when
    /// another model can serve ([`RetryConfig::with_fallback_handoff`]).
    pub fn fallback_handoff(&self) -> Option<Duration> {
        self.fallback_handoff
    }

    /// The least time before the deadline a retry needs to be started
    /// ([`RetryConfig::with_min_attempt_time`]).
    pub fn min_attempt_time(&self) -> Duration {
        self.min_attempt_time
    }

    /// The attempt-number header, if set.
    pub fn attempt_header(&self) -> Option<&HeaderName> {
        self.attempt_header.as_ref()
    }

    /// When streams are held until their first event.
    pub fn hold_first_event(&self) -> HoldFirstEvent {
        self.hold_first_event
    }

    /// The cap on bytes held for a first event.
    pub fn first_event_cap(&self) -> usize {
        self.first_event_cap
    }
}

/// `duration` unless it is zero: an optional time limit of zero would refuse every
/// attempt or body, so it is a configuration error naming `setting`.
fn not_zero(
    setting: &'static str,
    duration: Option<Duration>,
) -> Result<Option<Duration>, ConfigError> {
    match duration {
        Some(Duration::ZERO) => Err(ConfigError::ZeroDuration { setting }),
        other => Ok(other),
    }
}

impl Default for RetryConfig {
    /// [`RetryConfig::interactive`].
    fn default() -> Self {
        RetryConfig::interactive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_timeout_longer_than_deadline_is_refused() {
        let err = RetryConfig::batch()
            .with_attempt_timeout(Some(Duration::from_secs(61)))
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::AttemptTimeoutAboveDeadline {
                attempt_timeout: Duration::from_secs(61),
                deadline: Duration::from_secs(60)
            }
        );
        assert!(err.to_string().contains("attempt_timeout"));
        // Setting the deadline second is checked too.
        let err = RetryConfig::interactive()
            .with_attempt_timeout(Some(Duration::from_secs(30)))
            .unwrap()
            .with_deadline(Some(Duration::from_secs(10)))
            .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::AttemptTimeoutAboveDeadline { .. }
        ));
    }

    #[test]
    fn zero_attempts_and_zero_durations_are_refused() {
        assert_eq!(
            RetryConfig::interactive().with_max_attempts(0),
            Err(ConfigError::ZeroAttempts)
        );
        assert_eq!(
            RetryConfig::interactive().with_deadline(Some(Duration::ZERO)),
            Err(ConfigError::ZeroDuration {
                setting: "deadline"
            })
        );
        assert_eq!(
            RetryConfig::interactive().with_first_event_cap(0),
            Err(ConfigError::ZeroFirstEventCap)
        );
        assert!(HintJitter::new(1.5, Duration::from_secs(1)).is_err());
        assert!(HintJitter::new(f64::NAN, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn presets_have_the_documented_values() {
        let i = RetryConfig::interactive();
        assert_eq!(i.max_attempts(), 3);
        assert_eq!(i.backoff().base(), Duration::from_millis(500));
        assert_eq!(i.backoff().cap(), Duration::from_secs(8));
        assert_eq!(i.backoff().jitter(), Jitter::Equal);
        assert_eq!(i.deadline(), None);
        assert_eq!(i.max_hint(), Duration::from_secs(120));
        let b = RetryConfig::batch();
        assert_eq!(b.max_attempts(), 4);
        assert_eq!(b.backoff().base(), Duration::from_secs(2));
        assert_eq!(b.backoff().cap(), Duration::from_secs(30));
        assert_eq!(b.backoff().jitter(), Jitter::None);
        assert_eq!(b.deadline(), Some(Duration::from_secs(60)));
        // The presets' constants pass the same validation as user input.
        for p in [i, b] {
            let bo = p.backoff();
            assert_eq!(
                Backoff::new(bo.base(), bo.multiplier(), bo.cap())
                    .map(|n| n.with_jitter(bo.jitter())),
                Ok(*bo)
            );
        }
    }

    #[test]
    fn hint_jitter_extra_is_capped_by_fraction_and_max() {
        let j = HintJitter::default();
        assert_eq!(
            j.max_extra(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(j.max_extra(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(
            HintJitter::none().max_extra(Duration::from_secs(60)),
            Duration::ZERO
        );
    }
}
