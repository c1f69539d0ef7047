//! Adaptive client-side throttling (Google SRE book, "Handling Overload").

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::model::{ConfigError, check_range, check_window};
use crate::window::{SlotRing, Ticker};

const MAX_K: f64 = 100.0;

/// The parameters of an [`AdaptiveThrottle`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveThrottleConfig {
    /// Over how long requests and accepts are counted (1 s to 1 h). Default 2 min,
    /// the SRE book's: long enough that a few lucky accepts in a drowning provider do
    /// not reopen the gate, short enough that it fades within minutes of recovery.
    pub window: Duration,
    /// The multiplier: the provider is sent up to `k` times what it accepts.
    /// Between 1 and 100. Default 2 (the SRE book's; lower is more aggressive).
    pub k: f64,
    /// Whether a request rejected locally counts in `requests`, as the SRE book
    /// defines it. Default `false`: a demanding user expects throttling to be gone
    /// within one window of the provider's recovery, not ~11 minutes after an outage.
    ///
    /// * `true`: the provider is sent about `k ×` what it accepts, the book's
    ///   guarantee. The price is a slow fade after an overload: the window is full of
    ///   local rejections, so the gate reopens only as fast as accepts grow,
    ///   e<sup>k·t/window</sup>. After an overload where the provider served C of r
    ///   requests per second, throttling lasts about
    ///   `(window / k) · ln((r − C) / ((k − 1) · C))` (132 s for 10 of 100/s with the
    ///   defaults); after a total outage about `(window / k) · ln(r · window)` plus a
    ///   wait of about one window for the first request to get through (≈ 11 min at
    ///   100/s).
    /// * `false`: only requests that were sent count. The gate is fully open one
    ///   window after recovery at the latest (by then every request in the window
    ///   was sent and accepted), but an overloaded provider is sent about
    ///   `√(k · C · r)` instead of `k · C` (45/s instead of 20/s for 10 of 100/s), and
    ///   a dead one about `√(r / window)` per second instead of one per window.
    pub count_local_rejections: bool,
}

impl Default for AdaptiveThrottleConfig {
    fn default() -> Self {
        AdaptiveThrottleConfig {
            window: Duration::from_secs(120),
            k: 2.0,
            count_local_rejections: false,
        }
    }
}

/// The SRE book's client-side rejection probability:
/// `max(0, (requests − k·accepts) / (requests + 1))`.
///
/// ```
/// use backstop_budget::rejection_probability;
/// assert_eq!(rejection_probability(100, 100, 2.0), 0.0);
/// assert_eq!(rejection_probability(100, 0, 2.0), 100.0 / 101.0);
/// assert_eq!(rejection_probability(100, 25, 2.0), 50.0 / 101.0);
/// ```
pub fn rejection_probability(requests: u64, accepts: u64, k: f64) -> f64 {
    let requests = requests as f64;
    ((requests - k * accepts as f64) / (requests + 1.0)).max(0.0)
}

/// Whether a request may go to the provider.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    /// Send it.
    Send,
    /// Reject it locally; it was drawn at this probability.
    Reject {
        /// The rejection probability at the moment of the draw.
        probability: f64,
    },
}

/// The state of an adaptive throttle at one moment.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ThrottleSnapshot {
    /// Requests counted in the window (sent or rejected locally).
    pub requests: u64,
    /// Requests the provider accepted in the window.
    pub accepts: u64,
    /// The probability the next request is rejected locally.
    pub rejection_probability: f64,
    /// Requests rejected locally since creation.
    pub local_rejections: u64,
}

/// Rejects requests locally, before they reach the provider, with the probability
/// [`rejection_probability`] gives for the requests and accepts counted over the last
/// window.
///
/// A request counts when its outcome is known (or when it is rejected locally), so a
/// request the caller cancels counts neither way. When the provider accepts everything
/// the probability is exactly 0 and no random number is drawn; when it accepts
/// nothing, about one request per window still goes through, to notice recovery.
///
/// The randomness is a [`SmallRng`], seedable for tests; it sits behind a mutex that
/// is only taken while the probability is above zero.
#[derive(Debug)]
pub struct AdaptiveThrottle {
    config: AdaptiveThrottleConfig,
    ticker: Ticker,
    requests: SlotRing,
    accepts: SlotRing,
    rng: Mutex<SmallRng>,
    local_rejections: AtomicU64,
}

impl AdaptiveThrottle {
    /// A throttle with `config`, its randomness seeded from the operating system.
    pub fn new(config: AdaptiveThrottleConfig) -> Result<Self, ConfigError> {
        Self::starting_at(config, Instant::now(), SmallRng::from_os_rng())
    }

    /// A throttle with `config` and a fixed seed (reproducible draws).
    pub fn with_seed(config: AdaptiveThrottleConfig, seed: u64) -> Result<Self, ConfigError> {
        Self::starting_at(config, Instant::now(), SmallRng::seed_from_u64(seed))
    }

    /// A throttle with `config`, `rng`, and its first window starting at `origin`.
    pub fn starting_at(
        config: AdaptiveThrottleConfig,
        origin: Instant,
        rng: SmallRng,
    ) -> Result<Self, ConfigError> {
        check_window(config.window)?;
        // k < 1 would throttle a provider that accepts everything.
        check_range("k", config.k, 1.0, MAX_K)?;
        Ok(AdaptiveThrottle {
            config,
            ticker: Ticker::new(origin, config.window),
            requests: SlotRing::new(),
            accepts: SlotRing::new(),
            rng: Mutex::new(rng),
            local_rejections: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdaptiveThrottleConfig {
        &self.config
    }

    fn counts(&self, now: Instant) -> (u64, u64, u64) {
        let tick = self.ticker.tick(now);
        self.requests.expire(tick);
        self.accepts.expire(tick);
        let requests = u64::try_from(self.requests.sum(tick)).unwrap_or(0);
        let accepts = u64::try_from(self.accepts.sum(tick)).unwrap_or(0);
        (tick, requests, accepts)
    }

    /// The probability that a request at `now` is rejected locally.
    pub fn rejection_probability_at(&self, now: Instant) -> f64 {
        let (_, requests, accepts) = self.counts(now);
        rejection_probability(requests, accepts, self.config.k)
    }

    /// Decides for a request at `now` with `draw` uniform in `[0, 1)`: rejects when
    /// `draw` is below the probability. A rejection is counted as a request unless
    /// [`AdaptiveThrottleConfig::count_local_rejections`] is off.
    pub fn decide_at(&self, now: Instant, draw: f64) -> Admission {
        let (tick, requests, accepts) = self.counts(now);
        self.decide(
            tick,
            rejection_probability(requests, accepts, self.config.k),
            draw,
        )
    }

    fn decide(&self, tick: u64, probability: f64, draw: f64) -> Admission {
        if draw < probability {
            if self.config.count_local_rejections {
                self.requests.add(tick, 1);
            }
            self.local_rejections.fetch_add(1, Ordering::Relaxed);
            Admission::Reject { probability }
        } else {
            Admission::Send
        }
    }

    /// Decides for a request at `now`, drawing from the throttle's own randomness
    /// (only when the probability is above zero).
    pub fn admit_at(&self, now: Instant) -> Admission {
        let (tick, requests, accepts) = self.counts(now);
        let probability = rejection_probability(requests, accepts, self.config.k);
        if probability <= 0.0 {
            return Admission::Send;
        }
        let draw: f64 = {
            // A poisoned lock only means another thread panicked mid-draw; the
            // generator state is still a valid generator state.
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            rng.random()
        };
        self.decide(tick, probability, draw)
    }

    /// [`AdaptiveThrottle::admit_at`] now.
    pub fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    /// Counts a request that was sent, at `now`, and whether the provider accepted it.
    pub fn record_at(&self, now: Instant, accepted: bool) {
        let tick = self.ticker.tick(now);
        self.requests.expire(tick);
        self.accepts.expire(tick);
        self.requests.add(tick, 1);
        if accepted {
            self.accepts.add(tick, 1);
        }
    }

    /// [`AdaptiveThrottle::record_at`] now.
    pub fn record(&self, accepted: bool) {
        self.record_at(Instant::now(), accepted);
    }

    /// The state at `now`.
    pub fn snapshot_at(&self, now: Instant) -> ThrottleSnapshot {
        let (_, requests, accepts) = self.counts(now);
        ThrottleSnapshot {
            requests,
            accepts,
            rejection_probability: rejection_probability(requests, accepts, self.config.k),
            local_rejections: self.local_rejections.load(Ordering::Relaxed),
        }
    }

    /// [`AdaptiveThrottle::snapshot_at`] now.
    pub fn snapshot(&self) -> ThrottleSnapshot {
        self.snapshot_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SRE book's counting (local rejections count as requests).
    fn throttle(origin: Instant, seed: u64) -> AdaptiveThrottle {
        AdaptiveThrottle::starting_at(
            AdaptiveThrottleConfig {
                count_local_rejections: true,
                ..AdaptiveThrottleConfig::default()
            },
            origin,
            SmallRng::seed_from_u64(seed),
        )
        .unwrap()
    }

    #[test]
    fn by_default_only_sent_requests_count() {
        assert!(!AdaptiveThrottleConfig::default().count_local_rejections);
    }

    #[test]
    fn the_formula_matches_the_sre_book() {
        assert_eq!(rejection_probability(0, 0, 2.0), 0.0);
        assert_eq!(rejection_probability(10, 5, 2.0), 0.0);
        assert_eq!(rejection_probability(10, 4, 2.0), 2.0 / 11.0);
        assert_eq!(rejection_probability(10, 0, 1.5), 10.0 / 11.0);
        assert_eq!(rejection_probability(10, 4, 1.5), 4.0 / 11.0);
    }

    #[test]
    fn an_all_accepting_provider_is_never_throttled() {
        let t0 = Instant::now();
        let t = throttle(t0, 1);
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i * 10);
            // A draw of 0 rejects whenever the probability is above zero.
            assert_eq!(t.decide_at(now, 0.0), Admission::Send);
            t.record_at(now, true);
        }
        assert_eq!(
            t.snapshot_at(t0 + Duration::from_secs(100))
                .local_rejections,
            0
        );
    }

    #[test]
    fn rejections_raise_the_probability_exactly_as_the_formula_says() {
        let t0 = Instant::now();
        let t = throttle(t0, 1);
        for _ in 0..8 {
            t.record_at(t0, false);
        }
        for _ in 0..2 {
            t.record_at(t0, true);
        }
        assert_eq!(t.rejection_probability_at(t0), 6.0 / 11.0);
        assert_eq!(t.decide_at(t0, 0.99), Admission::Send);
        assert_eq!(
            t.decide_at(t0, 0.5),
            Admission::Reject {
                probability: 6.0 / 11.0
            }
        );
        // The local rejection counts as a request with no accept.
        let s = t.snapshot_at(t0);
        assert_eq!((s.requests, s.accepts, s.local_rejections), (11, 2, 1));
        assert_eq!(s.rejection_probability, 7.0 / 12.0);
    }

    #[test]
    fn local_rejections_can_be_left_out_of_the_requests() {
        let t0 = Instant::now();
        let t = AdaptiveThrottle::starting_at(
            AdaptiveThrottleConfig {
                count_local_rejections: false,
                ..AdaptiveThrottleConfig::default()
            },
            t0,
            SmallRng::seed_from_u64(1),
        )
        .unwrap();
        for _ in 0..4 {
            t.record_at(t0, false);
        }
        assert_eq!(t.decide_at(t0, 0.0), Admission::Reject { probability: 0.8 });
        let s = t.snapshot_at(t0);
        assert_eq!((s.requests, s.local_rejections), (4, 1));
    }

    #[test]
    fn counts_leave_after_the_window() {
        let t0 = Instant::now();
        let t = throttle(t0, 1);
        for _ in 0..100 {
            t.record_at(t0, false);
        }
        assert!(t.rejection_probability_at(t0 + Duration::from_secs(119)) > 0.99);
        assert_eq!(
            t.rejection_probability_at(t0 + Duration::from_secs(120)),
            0.0
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_decisions() {
        let t0 = Instant::now();
        let run = |seed| {
            let t = throttle(t0, seed);
            for _ in 0..10 {
                t.record_at(t0, false);
            }
            (0..50).map(|_| t.admit_at(t0)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn k_below_one_is_refused() {
        let e = AdaptiveThrottle::new(AdaptiveThrottleConfig {
            k: 0.5,
            ..AdaptiveThrottleConfig::default()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::OutOfRange { parameter: "k", .. }));
    }
}
