//! How one model behaves: scripted answers, seeded random faults, latency,
//! outage windows and a capacity limit.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::fault::Fault;
use crate::human_duration;

/// The behaviour of one model.
///
/// For each attempt the mock decides, in this order (first match wins):
/// 1. an [outage](ModelPlan::outage) window covering the arrival time;
/// 2. the [capacity](ModelPlan::capacity) limit, when exceeded;
/// 3. the next [scripted](ModelPlan::script) answer, or [`then`](ModelPlan::then)
///    once the script is used up; when that answer is [`Fault::Ok`], the
///    [random faults](ModelPlan::with_random) are rolled in order and the first hit
///    replaces it.
///
/// The script advances only on attempts that reach step 3. The random faults are
/// rolled on every attempt that reaches step 3 (hit or not), so the sequence of
/// answers depends only on the seed, the plan and the order of attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelPlan {
    /// Answers given in order, one per attempt.
    pub script: Vec<Fault>,
    /// The answer once the script is used up.
    pub then: Fault,
    /// Delay before the response head (every answer but a refused connection).
    pub latency: Latency,
    /// Seeded random faults that may replace an `Ok` answer.
    pub random: Vec<RandomFault>,
    /// Windows of time, since the mock was created, during which every attempt
    /// gets the window's fault.
    pub outages: Vec<Outage>,
    /// An optional limit on concurrent or per-second requests.
    pub capacity: Option<Capacity>,
    /// Chunks in a normal SSE stream (at least 1, at most
    /// [`MAX_STREAM_FRAMES`](crate::MAX_STREAM_FRAMES)).
    pub stream_chunks: usize,
    /// Delay between consecutive SSE frames (the first frame goes with the head).
    #[serde(with = "human_duration")]
    pub chunk_delay: Duration,
    /// Anthropic-style `event: ping` keep-alive frames sent before the first chunk
    /// of every stream (default 0, at most
    /// [`MAX_STREAM_FRAMES`](crate::MAX_STREAM_FRAMES)); they count as frames for
    /// `chunk_delay`.
    pub stream_pings: usize,
}

impl Default for ModelPlan {
    fn default() -> Self {
        ModelPlan::ok()
    }
}

impl ModelPlan {
    /// Always answers with a normal completion.
    pub fn ok() -> Self {
        ModelPlan {
            script: Vec::new(),
            then: Fault::Ok,
            latency: Latency::None,
            random: Vec::new(),
            outages: Vec::new(),
            capacity: None,
            stream_chunks: 3,
            chunk_delay: Duration::ZERO,
            stream_pings: 0,
        }
    }

    /// Always answers with `fault`.
    pub fn always(fault: Fault) -> Self {
        ModelPlan::ok().then(fault)
    }

    /// Answers with these faults in order, then with [`then`](Self::then)
    /// (a normal completion unless set).
    ///
    /// ```
    /// use backstop_mock::{Fault, ModelPlan};
    /// // Two 429s with `retry-after: 2`, then 200 for ever.
    /// let rate_limited = Fault::OpenAiRateLimit { retry_after: Some("2".into()), retry_after_ms: None };
    /// let plan = ModelPlan::script([rate_limited.clone(), rate_limited]);
    /// assert_eq!(plan.script.len(), 2);
    /// ```
    pub fn script(faults: impl IntoIterator<Item = Fault>) -> Self {
        ModelPlan {
            script: faults.into_iter().collect(),
            ..ModelPlan::ok()
        }
    }

    /// The answer once the script is used up.
    #[must_use]
    pub fn then(mut self, fault: Fault) -> Self {
        self.then = fault;
        self
    }

    /// Delay before each response head.
    #[must_use]
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// With probability `probability` (clamped to 0..=1), replaces an `Ok` answer
    /// by `fault`. Several calls add several independent rolls, checked in order.
    #[must_use]
    pub fn with_random(mut self, probability: f64, fault: Fault) -> Self {
        self.random.push(RandomFault { probability, fault });
        self
    }

    /// Answers `fault` to every attempt arriving in `[from, until)`, measured from
    /// the mock's creation.
    #[must_use]
    pub fn outage(mut self, from: Duration, until: Duration, fault: Fault) -> Self {
        self.outages.push(Outage { from, until, fault });
        self
    }

    /// Limits concurrent and/or per-second requests to this model.
    #[must_use]
    pub fn capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Chunks in a normal SSE stream (default 3; at least 1 is sent).
    #[must_use]
    pub fn stream_chunks(mut self, chunks: usize) -> Self {
        self.stream_chunks = chunks;
        self
    }

    /// Delay between consecutive SSE frames (default none).
    #[must_use]
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Sends `n` Anthropic-style `event: ping` frames before the first chunk of
    /// every stream, which a client must skip (default 0).
    #[must_use]
    pub fn stream_pings(mut self, n: usize) -> Self {
        self.stream_pings = n;
        self
    }

    /// Every fault this plan can answer with.
    pub(crate) fn faults(&self) -> impl Iterator<Item = &Fault> {
        self.script
            .iter()
            .chain(std::iter::once(&self.then))
            .chain(self.random.iter().map(|r| &r.fault))
            .chain(self.outages.iter().map(|o| &o.fault))
            .chain(self.capacity.iter().map(|c| &c.over))
    }
}

/// A seeded random fault: see [`ModelPlan::with_random`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomFault {
    /// Chance of a hit on each roll, 0..=1.
    pub probability: f64,
    /// The answer on a hit.
    pub fault: Fault,
}

/// An outage window: see [`ModelPlan::outage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Start, since the mock's creation (inclusive).
    #[serde(with = "human_duration")]
    pub from: Duration,
    /// End, since the mock's creation (exclusive).
    #[serde(with = "human_duration")]
    pub until: Duration,
    /// The answer during the window.
    pub fault: Fault,
}

/// A capacity limit for one model.
///
/// An attempt is *in flight* from its arrival until its response body has ended
/// or been dropped (a hanging attempt stays in flight until the caller gives up).
/// The per-second limit counts admitted attempts in the sliding second before the
/// arrival. Attempts turned away with `over` count towards neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// At most this many admitted attempts in flight at once.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// At most this many admitted attempts per sliding second.
    #[serde(default)]
    pub max_per_second: Option<u32>,
    /// The answer beyond the limit. Defaults to a 429 with `retry-after: 1`.
    #[serde(default = "Capacity::default_over")]
    pub over: Fault,
}

impl Capacity {
    fn default_over() -> Fault {
        Fault::OpenAiRateLimit {
            retry_after: Some("1".to_owned()),
            retry_after_ms: None,
        }
    }

    /// At most `c` attempts in flight; beyond that a 429 with `retry-after: 1`.
    pub fn in_flight(c: usize) -> Self {
        Capacity {
            max_in_flight: Some(c),
            max_per_second: None,
            over: Capacity::default_over(),
        }
    }

    /// At most `r` attempts per sliding second; beyond that a 429 with `retry-after: 1`.
    pub fn per_second(r: u32) -> Self {
        Capacity {
            max_in_flight: None,
            max_per_second: Some(r),
            over: Capacity::default_over(),
        }
    }

    /// The answer beyond the limit (a 503 such as [`Fault::OpenAiOverloaded`], say).
    #[must_use]
    pub fn over(mut self, fault: Fault) -> Self {
        self.over = fault;
        self
    }
}

/// Delay before a response head, drawn from a seeded random source.
///
/// In TOML: `{ kind = "fixed", value = "250ms" }`,
/// `{ kind = "uniform", min = "100ms", max = "300ms" }`,
/// `{ kind = "exponential", mean = "200ms", cap = "2s" }`,
/// `{ kind = "log_normal", median = "300ms", sigma = 0.5, cap = "5s" }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Latency {
    /// No delay.
    #[default]
    None,
    /// Always the same delay.
    Fixed {
        /// The delay.
        #[serde(with = "human_duration")]
        value: Duration,
    },
    /// Uniform in `[min, max]`.
    Uniform {
        /// Shortest delay.
        #[serde(with = "human_duration")]
        min: Duration,
        /// Longest delay.
        #[serde(with = "human_duration")]
        max: Duration,
    },
    /// Exponential with the given mean, never above `cap`.
    Exponential {
        /// Mean delay.
        #[serde(with = "human_duration")]
        mean: Duration,
        /// Longest delay.
        #[serde(with = "human_duration")]
        cap: Duration,
    },
    /// Log-normal (a long right tail, like real model latency) with the given
    /// median and shape `sigma`, never above `cap`.
    LogNormal {
        /// Median delay.
        #[serde(with = "human_duration")]
        median: Duration,
        /// Standard deviation of the underlying normal (0.5 is a moderate tail).
        sigma: f64,
        /// Longest delay.
        #[serde(with = "human_duration")]
        cap: Duration,
    },
}

impl Latency {
    /// Always `value`.
    pub fn fixed(value: Duration) -> Self {
        Latency::Fixed { value }
    }

    /// Uniform in `[min, max]`.
    pub fn uniform(min: Duration, max: Duration) -> Self {
        Latency::Uniform { min, max }
    }

    /// Exponential with mean `mean`, capped at `cap`.
    pub fn exponential(mean: Duration, cap: Duration) -> Self {
        Latency::Exponential { mean, cap }
    }

    /// Log-normal with median `median` and shape `sigma`, capped at `cap`.
    pub fn log_normal(median: Duration, sigma: f64, cap: Duration) -> Self {
        Latency::LogNormal { median, sigma, cap }
    }

    /// Draws one delay. Draws exactly one or two numbers from `rng` (none for
    /// `None` and `Fixed`), so the sequence is reproducible from the seed.
    pub(crate) fn sample<R: Rng>(&self, rng: &mut R) -> Duration {
        match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed { value } => value,
            Latency::Uniform { min, max } => {
                let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
                let u: f64 = rng.random();
                lo + (hi - lo).mul_f64(u)
            }
            Latency::Exponential { mean, cap } => {
                let u: f64 = rng.random();
                // Inverse CDF; 1 - u is in (0, 1], so the log is finite.
                let factor = -(1.0 - u).ln();
                capped(mean.as_secs_f64() * factor, cap)
            }
            Latency::LogNormal { median, sigma, cap } => {
                // Box–Muller: u1 in (0, 1] keeps the log finite.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                capped(median.as_secs_f64() * (sigma * z).exp(), cap)
            }
        }
    }
}

fn capped(seconds: f64, cap: Duration) -> Duration {
    if !seconds.is_finite() || seconds >= cap.as_secs_f64() {
        cap
    } else if seconds <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn uniform_latency_stays_within_its_bounds() {
        let mut rng = SmallRng::seed_from_u64(7);
        let l = Latency::uniform(Duration::from_millis(100), Duration::from_millis(300));
        for _ in 0..1000 {
            let d = l.sample(&mut rng);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(300),
                "{d:?}"
            );
        }
    }

    #[test]
    fn exponential_and_log_normal_latency_never_exceed_the_cap() {
        let mut rng = SmallRng::seed_from_u64(7);
        let cap = Duration::from_millis(500);
        let e = Latency::exponential(Duration::from_millis(400), cap);
        let ln = Latency::log_normal(Duration::from_millis(300), 2.0, cap);
        let mut hit_cap = 0;
        for _ in 0..2000 {
            let a = e.sample(&mut rng);
            let b = ln.sample(&mut rng);
            assert!(a <= cap && b <= cap);
            hit_cap += usize::from(a == cap) + usize::from(b == cap);
        }
        // Both distributions have real mass beyond 500ms, so the cap must bite.
        assert!(hit_cap > 100, "cap reached only {hit_cap} times");
    }

    #[test]
    fn exponential_latency_mean_is_close_to_the_configured_mean() {
        let mut rng = SmallRng::seed_from_u64(11);
        let e = Latency::exponential(Duration::from_millis(200), Duration::from_secs(100));
        let n = 20_000;
        let total: f64 = (0..n).map(|_| e.sample(&mut rng).as_secs_f64()).sum();
        let mean = total / f64::from(n);
        assert!((mean - 0.2).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn log_normal_latency_median_is_close_to_the_configured_median() {
        let mut rng = SmallRng::seed_from_u64(13);
        let l = Latency::log_normal(Duration::from_millis(300), 0.5, Duration::from_secs(100));
        let mut v: Vec<Duration> = (0..10_001).map(|_| l.sample(&mut rng)).collect();
        v.sort();
        let median = v[5000].as_secs_f64();
        assert!((median - 0.3).abs() < 0.015, "median {median}");
    }
}
