//! The per-key state machine: pure, no runtime, the time passed in.
//!
//! Closed → Open → HalfOpen → Closed. Every deadline is compared against the `now`
//! the caller passes, at every call, so a cooldown ends exactly when it should (never
//! "at the next sweep") and tests drive it with exact instants. Every deadline is
//! made with [`instant_after`]: a cooldown or timeout past a century (a provider's
//! `retry-after: 10000000000000000000` under no hint cap, a setting of
//! `Duration::MAX`) ends a century later instead of overflowing the clock.

use std::time::Duration;

use backstop_classify::{DelayHint, FailureKind, HintSource, instant_after};
use tokio::time::Instant;

use crate::pace::Pace;
use crate::{BreakerConfig, Outcome};

/// Where a key's breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are refused at once until the cooldown ends.
    Open,
    /// A bounded number of trial calls (probes) may go through.
    HalfOpen,
}

impl BreakerState {
    /// A stable snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of the state gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key changed state (or, for Open → Open, why its cooldown was extended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionReason {
    /// This many health failures in a row.
    ConsecutiveFailures {
        /// Failures in a row when the key opened.
        failures: u32,
    },
    /// The failure ratio over the sliding window reached the threshold.
    FailureRatio {
        /// Failures in the window.
        failures: u32,
        /// Calls in the window.
        calls: u32,
    },
    /// A 429/503 carried a delay hint at least `hint_opens_at` long.
    DelayHint {
        /// The hinted delay (after the `max_hinted_cooldown` cap).
        delay: Duration,
        /// Where the hint came from.
        source: HintSource,
    },
    /// Quota or billing exhausted.
    QuotaExhausted,
    /// A half-open probe failed.
    ProbeFailed,
    /// A half-open probe did not finish within `probe_timeout`.
    ProbeTimedOut,
    /// The open period ended; probes may go through.
    CooldownElapsed,
    /// Enough probes succeeded.
    ProbesSucceeded,
}

impl TransitionReason {
    /// A stable snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionReason::ConsecutiveFailures { .. } => "consecutive_failures",
            TransitionReason::FailureRatio { .. } => "failure_ratio",
            TransitionReason::DelayHint { .. } => "delay_hint",
            TransitionReason::QuotaExhausted => "quota_exhausted",
            TransitionReason::ProbeFailed => "probe_failed",
            TransitionReason::ProbeTimedOut => "probe_timed_out",
            TransitionReason::CooldownElapsed => "cooldown_elapsed",
            TransitionReason::ProbesSucceeded => "probes_succeeded",
        }
    }
}

/// One change of a key's state. `from == to == Open` means the open deadline moved
/// later (a longer cooldown arrived while open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// When it happened: the scheduled instant for time-driven transitions (a cooldown's
    /// end, a probe's timeout), the recording instant otherwise.
    pub at: Instant,
    /// Why.
    pub reason: TransitionReason,
    /// Until when the key is open, when `to` is Open.
    pub open_until: Option<Instant>,
}

/// The right to make one call, handed out by [`KeyState::admit`] and given back with
/// its outcome to [`KeyState::record`] (or [`KeyState::release`] if the call was
/// dropped). Outcomes of tickets from an earlier state (a call admitted before the key
/// opened) no longer count, except for the cooldowns they carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    probe: Option<u64>,
    /// The pace generation the call was admitted in (0: no pace then).
    pace: u32,
    /// The call's place in the order calls were admitted to this key.
    seq: u64,
}

impl Ticket {
    /// `true` when this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// `true` when the call was admitted while its key was paced.
    pub fn is_paced(&self) -> bool {
        self.pace != 0
    }

    /// The paced slot the call was admitted in.
    pub fn paced_slot(&self) -> PacedSlot {
        PacedSlot {
            generation: self.pace,
        }
    }
}

/// Which pace generation an attempt was sent in (see [`KeyState::admit_retry`]), so
/// that its slow-down signal counts once, and only against the rate it was sent at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacedSlot {
    generation: u32,
}

impl PacedSlot {
    /// The slot of pace generation `generation` (0: not paced).
    pub fn of(generation: u32) -> Self {
        PacedSlot { generation }
    }

    /// Its pace generation (0: not paced).
    pub fn generation(self) -> u32 {
        self.generation
    }
}

/// A refused call: the key is open, half-open with every probe slot taken, or closed
/// but paced with no slot free now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Open, HalfOpen, or Closed (paced).
    pub state: BreakerState,
    /// Whether the wait was directed by the upstream: a pace learned from its
    /// slow-down signals, or an open period its delay hint or quota set, or its 429s
    /// and 503s caused (they ask for fewer calls). `false` when the key opened on
    /// this breaker's own evidence of breakage (500s, timeouts counted, a probe that
    /// failed that way or never answered) with no hint: the upstream is down for as
    /// long as it takes, and a caller should fail fast rather than wait for the
    /// reopening. The fallback layer waits for a reopening only when this is `true`.
    pub upstream_directed: bool,
    /// When open: the time until it half-opens. When half-open: when to look again,
    /// as long as the oldest probe has run so far (at least
    /// [`HALF_OPEN_RECHECK_MIN`], never past that probe's timeout, when its slot is
    /// freed at the latest). When paced: the time until the slot this call booked
    /// is due.
    pub retry_in: Duration,
}

/// The shortest "look again" a refusal by a busy half-open key gives: a probe that
/// has just started is given this long before anyone asks again.
pub const HALF_OPEN_RECHECK_MIN: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
}

/// Calls and failures over the last `window`, in `window_buckets` buckets that each
/// cover `window / window_buckets` of time since the key was created.
#[derive(Clone, Debug)]
struct FailureWindow {
    origin: Instant,
    /// One bucket's length in nanoseconds (u64 arithmetic: u128 division would
    /// dominate the hot path).
    bucket_nanos: u64,
    buckets: Box<[Bucket]>,
}

impl FailureWindow {
    fn new(origin: Instant, window: Duration, buckets: u32) -> Self {
        let bucket_nanos = window.as_nanos() / u128::from(buckets.max(1));
        FailureWindow {
            origin,
            bucket_nanos: u64::try_from(bucket_nanos).unwrap_or(u64::MAX).max(1),
            buckets: vec![Bucket::default(); buckets.max(1) as usize].into_boxed_slice(),
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        // u64 nanoseconds cover 584 years of uptime.
        let nanos = elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(elapsed.subsec_nanos()));
        nanos / self.bucket_nanos
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let index = self.index(now);
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(index % len) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        if failed {
            bucket.failures = bucket.failures.saturating_add(1);
        }
    }

    /// (calls, failures) in the buckets still inside the window at `now`.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let index = self.index(now);
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.index <= index && index - b.index < len)
            .fold((0u32, 0u32), |(c, f), b| {
                (c.saturating_add(b.calls), f.saturating_add(b.failures))
            })
    }

    /// (calls, failures) in the buckets that have not yet left the window at `now`,
    /// counting those from later than `now` too (an outcome recorded with a clock
    /// reading taken after the caller's): unlike [`FailureWindow::totals`], which
    /// answers "what happened up to now", this never misses a recorded call.
    fn unexpired(&self, now: Instant) -> (u32, u32) {
        let index = self.index(now);
        let len = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| index.saturating_sub(b.index) < len)
            .fold((0u32, 0u32), |(c, f), b| {
                (c.saturating_add(b.calls), f.saturating_add(b.failures))
            })
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }

    /// The span the buckets cover.
    fn length(&self) -> Duration {
        Duration::from_nanos(self.bucket_nanos.saturating_mul(self.buckets.len() as u64))
    }
}

#[derive(Clone, Copy, Debug)]
struct Probe {
    id: u64,
    deadline: Instant,
}

/// The breaker state of one key (one [`ModelRoute`](backstop_classify::ModelRoute)).
///
/// Pure: every method takes the current instant, and reports each state change to the
/// `emit` callback. A [`BreakerStore`](crate::BreakerStore) keeps one per key. Pass
/// every method the configuration the key was created with.
#[derive(Clone, Debug)]
pub struct KeyState {
    state: BreakerState,
    /// Bumped at every state change; a ticket from another epoch is stale.
    epoch: u64,
    consecutive: u32,
    window: FailureWindow,
    open_until: Option<Instant>,
    last_reason: Option<TransitionReason>,
    probes: Vec<Probe>,
    next_probe: u64,
    probe_successes: u32,
    /// Half-open probes that failed in a row: each doubles the next open period.
    failed_probes: u32,
    /// Calls admitted so far (the next ticket's `seq`).
    admissions: u64,
    /// The latest-admitted call among the failures counted in `consecutive`: only a
    /// success from a call admitted after it resets the count.
    latest_failure: Option<u64>,
    /// Successes over the last second, in any state: what the upstream is serving
    /// now, the starting point of a pace.
    recent: FailureWindow,
    /// Since when the key has been closed (the failure window holds no older calls).
    closed_since: Instant,
    /// Successes per second over the failure window when the key last opened from
    /// closed: the rate a recovering key is paced at once it closes again.
    rate_before_open: f64,
    pace: Option<Pace>,
    /// Whether the current (or last) open period was set by the upstream (a delay
    /// hint, a quota) rather than by this breaker's own evidence.
    upstream_cooldown: bool,
    /// The latest instant an outcome was recorded at (the key's creation before
    /// the first): how long the key has been idle.
    last_outcome: Instant,
}

/// What the recent-successes window spans.
const RECENT: Duration = Duration::from_secs(1);

impl KeyState {
    /// A closed key, created at `now`.
    pub fn new(now: Instant, config: &BreakerConfig) -> Self {
        KeyState {
            state: BreakerState::Closed,
            epoch: 0,
            consecutive: 0,
            window: FailureWindow::new(now, config.window, config.window_buckets),
            open_until: None,
            last_reason: None,
            probes: Vec::new(),
            next_probe: 0,
            probe_successes: 0,
            failed_probes: 0,
            admissions: 0,
            latest_failure: None,
            recent: FailureWindow::new(now, RECENT, 10),
            closed_since: now,
            rate_before_open: 0.0,
            pace: None,
            upstream_cooldown: false,
            last_outcome: now,
        }
    }

    /// The pace, in calls per second, when the key is paced.
    pub fn pace(&self) -> Option<f64> {
        self.pace.as_ref().map(Pace::rate)
    }

    /// How long the key stays open the next time the counting rules or a failed probe
    /// open it without a delay hint: `open_duration` doubled per failed probe in a row,
    /// at most `max_open_duration`.
    pub fn open_period(&self, config: &BreakerConfig) -> Duration {
        let doubling = 1u32.checked_shl(self.failed_probes).unwrap_or(u32::MAX);
        config
            .open_duration
            .saturating_mul(doubling)
            .min(config.max_open_duration)
    }

    /// The state as of the last call (call [`KeyState::advance`] first for `now`).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Until when the key is open, when it is.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    /// Health failures in a row (reset when the key closes, and by a success from a
    /// call admitted after the latest of them).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// (calls, failures) in the sliding window at `now` (counted while closed).
    pub fn window_counts(&self, now: Instant) -> (u32, u32) {
        self.window.totals(now)
    }

    /// Half-open probes in flight.
    pub fn probes_in_flight(&self) -> u32 {
        self.probes.len() as u32
    }

    /// Why the key last changed state.
    pub fn last_reason(&self) -> Option<TransitionReason> {
        self.last_reason
    }

    /// Whether the key holds, at `now`, nothing a key created afresh would not also
    /// know, apart from successes, so that a store may forget it (see
    /// [`InProcessStore`](crate::InProcessStore)): it is closed, with no failure in
    /// its sliding window, no health failures in a row (even ones that have left the
    /// window: they still count towards `consecutive_failures`), no probe in flight,
    /// no success in the last second (the rate a pace would start from, and what
    /// tells a saturated key from a down one), and no pace, or only one that
    /// [`admit`](KeyState::admit) would lift at `now` (a whole `window` with no
    /// slow-down signal and nobody waiting for a slot). An open key is never at rest,
    /// even past its cooldown: it has not been shown to recover yet.
    ///
    /// What forgetting it loses is the successes in its window: the failure ratio of a
    /// key created afresh starts from an empty window (it waits for `minimum_calls`
    /// calls again, and no earlier successes dilute its first failures).
    ///
    /// Outcomes recorded at an instant later than `now` count as within the window.
    /// Whether a call is still in flight (holding a ticket) is the store's to know:
    /// this says nothing about it, as a closed key keeps no list of its tickets.
    pub fn is_at_rest(&self, now: Instant, config: &BreakerConfig) -> bool {
        self.state == BreakerState::Closed
            && self.consecutive == 0
            && self.latest_failure.is_none()
            && self.probes.is_empty()
            && self.window.unexpired(now).1 == 0
            && self.recent.unexpired(now).0 == 0
            && self
                .pace
                .as_ref()
                .is_none_or(|pace| pace.may_lift(now, config.window))
    }

    /// Whether the key has been idle so long, at `now`, that what it knows no longer
    /// describes its route, so that a full store may forget it when no key is
    /// [at rest](Self::is_at_rest) (see [`InProcessStore`](crate::InProcessStore)):
    /// no outcome recorded for at least [`idle_horizon`](BreakerConfig::idle_horizon)
    /// (the longer of `window` and `max_open_duration`), no probe in flight, and no
    /// open period still running (a key open until a provider's quota resets is kept
    /// until then, however long).
    ///
    /// What forgetting it loses: its failures in a row, a pace, and the half-open
    /// state of a key whose open period ended with nobody calling. If its route comes
    /// back, it starts closed, so the first calls go through freely instead of as
    /// probes, and a down upstream opens it again by the counting rules.
    ///
    /// Outcomes recorded at an instant later than `now` count as recent.
    pub fn is_stale(&self, now: Instant, config: &BreakerConfig) -> bool {
        self.probes.is_empty()
            && !(self.state == BreakerState::Open && self.open_until.is_none_or(|u| u > now))
            && now.saturating_duration_since(self.last_outcome) >= config.idle_horizon()
    }

    /// Applies the transitions time alone causes up to `now`: an open period that
    /// ended (Open → HalfOpen at its deadline), a probe that timed out (HalfOpen →
    /// Open at its timeout).
    pub fn advance(
        &mut self,
        now: Instant,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) {
        loop {
            match self.state {
                BreakerState::Open => match self.open_until {
                    Some(until) if now >= until => {
                        self.enter(
                            BreakerState::HalfOpen,
                            until,
                            TransitionReason::CooldownElapsed,
                            None,
                            emit,
                        );
                    }
                    _ => return,
                },
                BreakerState::HalfOpen => {
                    let expired = self
                        .probes
                        .iter()
                        .map(|p| p.deadline)
                        .filter(|d| *d <= now)
                        .min();
                    match expired {
                        // The permit is taken back at the probe's timeout, as a failure.
                        Some(at) => {
                            self.failed_probes = self.failed_probes.saturating_add(1);
                            let period = self.open_period(config);
                            // Its own evidence: the probe never answered.
                            self.upstream_cooldown = false;
                            self.enter(
                                BreakerState::Open,
                                at,
                                TransitionReason::ProbeTimedOut,
                                Some(instant_after(at, period)),
                                emit,
                            )
                        }
                        None => return,
                    }
                }
                BreakerState::Closed => return,
            }
        }
    }

    /// Asks to make one call at `now`.
    pub fn admit(
        &mut self,
        now: Instant,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) -> Result<Ticket, Rejection> {
        self.admit_before(now, None, config, emit)
    }

    /// Asks to make one call at `now` for a caller that gives up at `deadline`: when
    /// the key is paced and the next free slot is not before the deadline, the call is
    /// refused without booking it (the slot stays free for a caller who can wait).
    pub fn admit_before(
        &mut self,
        now: Instant,
        deadline: Option<Instant>,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) -> Result<Ticket, Rejection> {
        self.advance(now, config, emit);
        match self.state {
            BreakerState::Closed => {
                self.lift_quiet_pace(now, config);
                let Some(pace) = &mut self.pace else {
                    return Ok(self.ticket(None, 0));
                };
                match pace.admit(now, deadline) {
                    Ok(()) => {
                        let generation = pace.generation();
                        Ok(self.ticket(None, generation))
                    }
                    Err(wait) => Err(Rejection {
                        state: BreakerState::Closed,
                        upstream_directed: true,
                        retry_in: wait.retry_in,
                    }),
                }
            }
            BreakerState::Open => Err(Rejection {
                state: BreakerState::Open,
                upstream_directed: self.upstream_cooldown,
                retry_in: self
                    .open_until
                    .map_or(Duration::ZERO, |until| until.saturating_duration_since(now)),
            }),
            BreakerState::HalfOpen => {
                if self.probes.len() < config.half_open_probes as usize {
                    let id = self.next_probe;
                    self.next_probe = self.next_probe.wrapping_add(1);
                    self.probes.push(Probe {
                        id,
                        deadline: instant_after(now, config.probe_timeout),
                    });
                    Ok(self.ticket(Some(id), 0))
                } else {
                    // Look again after as long as the oldest probe has run so far: a
                    // probe that has run for a while is expected to need about as long
                    // again, so callers ask at doubling intervals, never later than
                    // the moment its slot is freed by its timeout.
                    let first_free = self
                        .probes
                        .iter()
                        .map(|p| p.deadline)
                        .min()
                        .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
                    let age = config.probe_timeout.saturating_sub(first_free);
                    Err(Rejection {
                        state: BreakerState::HalfOpen,
                        upstream_directed: self.upstream_cooldown,
                        retry_in: age.max(HALF_OPEN_RECHECK_MIN).min(first_free),
                    })
                }
            }
        }
    }

    /// [`KeyState::admit`] reading `clock` only when the state needs the time: a
    /// closed key admits without it (nothing time-driven can happen to a closed key).
    pub fn admit_with(
        &mut self,
        clock: impl FnOnce() -> Instant,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) -> Result<Ticket, Rejection> {
        self.admit_with_before(clock, None, config, emit)
    }

    /// [`KeyState::admit_before`] reading `clock` only when the state needs the time
    /// (a closed key that is not paced admits without it).
    pub fn admit_with_before(
        &mut self,
        clock: impl FnOnce() -> Instant,
        deadline: Option<Instant>,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) -> Result<Ticket, Rejection> {
        if self.state == BreakerState::Closed && self.pace.is_none() {
            return Ok(self.ticket(None, 0));
        }
        self.admit_before(clock(), deadline, config, emit)
    }

    /// Takes a paced slot at `now` for a retry of a call already admitted (the retry
    /// layer's, through [`PaceHandle`](backstop_classify::PaceHandle)), or books the
    /// next one: `Err(wait)` says when it is due. A retry that could not come back
    /// before `deadline` books nothing. A key that is no longer paced lets it go; so
    /// does an open one (the call was admitted, and the breaker counts calls, not
    /// attempts: the pace is what spaces attempts).
    pub fn admit_retry(
        &mut self,
        now: Instant,
        deadline: Option<Instant>,
        config: &BreakerConfig,
    ) -> Result<PacedSlot, Duration> {
        self.lift_quiet_pace(now, config);
        match &mut self.pace {
            Some(pace) if self.state == BreakerState::Closed => {
                pace.admit(now, deadline).map_err(|wait| wait.retry_in)?;
                Ok(PacedSlot {
                    generation: pace.generation(),
                })
            }
            _ => Ok(PacedSlot { generation: 0 }),
        }
    }

    /// Lifts the pace after a whole `window` with no slow-down signal and nobody
    /// waiting for a slot.
    fn lift_quiet_pace(&mut self, now: Instant, config: &BreakerConfig) {
        if self
            .pace
            .as_ref()
            .is_some_and(|p| p.may_lift(now, config.window))
        {
            self.pace = None;
        }
    }

    /// How long from `now` until the slot [`KeyState::admit_retry`] would book (zero:
    /// one is free now, or the key is not paced), without booking it.
    pub fn retry_due_in(&self, now: Instant, config: &BreakerConfig) -> Duration {
        match &self.pace {
            Some(pace)
                if self.state == BreakerState::Closed && !pace.may_lift(now, config.window) =>
            {
                pace.next_free(now)
            }
            _ => Duration::ZERO,
        }
    }

    /// An attempt sent in pace generation `slot` (its call's admission, or the retry's
    /// [`PacedSlot`]) was answered with a 429 or 503 at `now`: the pace slows down at
    /// once, not only when the call finishes (its retries can take seconds, and the
    /// pace would keep overshooting meanwhile). Once per generation, like every
    /// slow-down signal; the call's own outcome later repeats it harmlessly.
    pub fn attempt_slowed(&mut self, slot: PacedSlot, now: Instant, config: &BreakerConfig) {
        if slot.generation != 0 && self.pace.is_some() {
            self.slow_down(slot.generation, now, config);
        }
    }

    /// Records the outcome of the call `ticket` was for, finished at `now`.
    pub fn record(
        &mut self,
        ticket: Ticket,
        outcome: Outcome,
        now: Instant,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) {
        self.advance(now, config, emit);
        self.last_outcome = self.last_outcome.max(now);
        let current = ticket.epoch == self.epoch;
        match outcome {
            Outcome::Ignored => {
                if current {
                    self.take_probe(ticket);
                }
            }
            Outcome::Success | Outcome::SuccessAfterSlowDown => {
                if outcome == Outcome::SuccessAfterSlowDown {
                    self.slow_down(ticket.pace, now, config);
                }
                self.recent.record(now, false);
                if let (Some(pace), Some(pacing)) = (&mut self.pace, &config.pacing) {
                    pace.served(now, pacing);
                }
                if !current {
                    return;
                }
                match self.state {
                    BreakerState::Closed => {
                        // Outcomes arrive out of order: a success from a call made
                        // before the latest failure says nothing about now.
                        if self.latest_failure.is_none_or(|f| ticket.seq > f) {
                            self.consecutive = 0;
                            self.latest_failure = None;
                        }
                        self.window.record(now, false);
                    }
                    BreakerState::HalfOpen => {
                        if self.take_probe(ticket) {
                            self.probe_successes += 1;
                            if self.probe_successes >= config.probe_successes_to_close {
                                self.enter(
                                    BreakerState::Closed,
                                    now,
                                    TransitionReason::ProbesSucceeded,
                                    None,
                                    emit,
                                );
                                self.pace_recovery(now, config);
                            }
                        }
                    }
                    BreakerState::Open => {}
                }
            }
            Outcome::QuotaExhausted { hint } => {
                if current {
                    self.take_probe(ticket);
                }
                let cooldown = config
                    .quota_cooldown
                    .max(retry_instruction(hint, config).map_or(Duration::ZERO, |h| h.delay));
                self.open_at_least(
                    instant_after(now, cooldown),
                    now,
                    TransitionReason::QuotaExhausted,
                    true,
                    emit,
                );
            }
            Outcome::Failure { kind, hint } => {
                // A 429 or a 503 says "fewer calls" rather than "broken": the upstream
                // directs the cooldown it causes, and callers may wait it out.
                let slow_down = matches!(kind, FailureKind::RateLimited | FailureKind::Overloaded);
                if slow_down {
                    self.slow_down(ticket.pace, now, config);
                }
                let hinted = cooldown_hint(kind, hint, config);
                // A 429 whose provider asked for only a moment (less than
                // `hint_opens_at`) from a key still serving calls says "saturated":
                // pacing's business, not a breakage to count towards
                // `consecutive_failures` (a burst of them would open a key that serves
                // its quota). It still counts in the failure ratio, and once the key
                // serves nothing, 429s count as usual.
                let saturated = config.pacing.is_some()
                    && kind == FailureKind::RateLimited
                    && hinted.is_some_and(|h| h.delay < config.hint_opens_at)
                    && self.recent.totals(now).0 > 0;
                if current && self.state == BreakerState::Closed {
                    if !saturated {
                        self.consecutive = self.consecutive.saturating_add(1);
                        self.latest_failure = Some(
                            self.latest_failure
                                .map_or(ticket.seq, |f| f.max(ticket.seq)),
                        );
                    }
                    self.window.record(now, true);
                    if let Some(reason) = self.trip_reason(now, config) {
                        // The provider's own "come back in" sets the cooldown; without
                        // one, the open period scaled to the evidence so far.
                        let cooldown = hinted.map_or_else(|| self.open_period(config), |h| h.delay);
                        let upstream = slow_down || hinted.is_some();
                        self.open_at_least(
                            instant_after(now, cooldown),
                            now,
                            reason,
                            upstream,
                            emit,
                        );
                        return;
                    }
                } else if current && self.state == BreakerState::HalfOpen && self.take_probe(ticket)
                {
                    // The probe failed again after the cooldown: the evidence says the
                    // trouble outlasts it, so the doubled period applies, and a hint is
                    // the least the provider asked for.
                    self.failed_probes = self.failed_probes.saturating_add(1);
                    let own = self.open_period(config);
                    let cooldown = own.max(hinted.map_or(Duration::ZERO, |h| h.delay));
                    self.open_at_least(
                        instant_after(now, cooldown),
                        now,
                        TransitionReason::ProbeFailed,
                        slow_down || cooldown > own,
                        emit,
                    );
                    return;
                }
                // A long enough Retry-After on a 429/503 opens the key by itself, from any
                // state and even from a call admitted before the last state change: the
                // provider said when it will take calls again.
                if let Some(hint) = hinted.filter(|h| h.delay >= config.hint_opens_at) {
                    self.open_at_least(
                        instant_after(now, hint.delay),
                        now,
                        TransitionReason::DelayHint {
                            delay: hint.delay,
                            source: hint.source,
                        },
                        true,
                        emit,
                    );
                }
            }
        }
    }

    /// Gives back the ticket of a call that was dropped before it finished (its outcome
    /// is unknown, so nothing is counted; a probe frees its slot).
    pub fn release(
        &mut self,
        ticket: Ticket,
        now: Instant,
        config: &BreakerConfig,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) {
        self.advance(now, config, emit);
        if ticket.epoch == self.epoch {
            self.take_probe(ticket);
        }
    }

    /// A 429 or 503 from the call `ticket` was for: the upstream wants fewer calls.
    /// Engages the pace at `backoff` times the successes of the last second, or slows
    /// an existing pace to that (once per generation). A key that served nothing in the last
    /// second is down rather than saturated: that is the counting rules' business, and
    /// a pace learned from it would start near zero.
    fn slow_down(&mut self, generation: u32, now: Instant, config: &BreakerConfig) {
        let Some(pacing) = &config.pacing else {
            return;
        };
        let (calls, failures) = self.recent.totals(now);
        let served = f64::from(calls.saturating_sub(failures)) / RECENT.as_secs_f64();
        match &mut self.pace {
            Some(pace) => {
                pace.slow_down(generation, served, now, pacing);
            }
            None => {
                if served > 0.0 {
                    // What was served is what the upstream took when it pushed back.
                    self.pace = Some(Pace::new(
                        served * pacing.backoff,
                        served,
                        now,
                        self.next_pace_generation(),
                        pacing,
                    ));
                }
            }
        }
    }

    /// A key that has just closed after an open period admits the calls that waited
    /// for it gradually: paced at the successes per second it served before it opened
    /// (unless a pace learned from slow-down signals is already in force). A key that
    /// served nothing before is not paced: there is no rate to start from.
    fn pace_recovery(&mut self, now: Instant, config: &BreakerConfig) {
        let Some(pacing) = &config.pacing else {
            return;
        };
        if self.pace.is_none() && self.rate_before_open > 0.0 {
            self.pace = Some(Pace::new(
                self.rate_before_open,
                self.rate_before_open,
                now,
                self.next_pace_generation(),
                pacing,
            ));
        }
    }

    /// The next ticket, in admission order.
    fn ticket(&mut self, probe: Option<u64>, pace: u32) -> Ticket {
        let seq = self.admissions;
        self.admissions = self.admissions.wrapping_add(1);
        Ticket {
            epoch: self.epoch,
            probe,
            pace,
            seq,
        }
    }

    /// A generation no ticket admitted so far carries (0 means "not paced").
    fn next_pace_generation(&self) -> u32 {
        self.epoch.wrapping_add(1) as u32 | 1
    }

    fn take_probe(&mut self, ticket: Ticket) -> bool {
        let Some(id) = ticket.probe else {
            return false;
        };
        match self.probes.iter().position(|p| p.id == id) {
            Some(i) => {
                self.probes.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn trip_reason(&self, now: Instant, config: &BreakerConfig) -> Option<TransitionReason> {
        if config.consecutive_failures > 0 && self.consecutive >= config.consecutive_failures {
            return Some(TransitionReason::ConsecutiveFailures {
                failures: self.consecutive,
            });
        }
        if config.minimum_calls > 0 {
            let (calls, failures) = self.window.totals(now);
            if calls >= config.minimum_calls
                && f64::from(failures) >= config.failure_ratio * f64::from(calls)
            {
                return Some(TransitionReason::FailureRatio { failures, calls });
            }
        }
        None
    }

    /// Opens the key until `until`, or moves an open key's deadline to `until` when
    /// that is later. Never moves a deadline earlier. `upstream` says whether the
    /// upstream asked for this cooldown (a hint, a quota) or this breaker's own
    /// evidence set it; the deadline in force decides what refusals say.
    fn open_at_least(
        &mut self,
        until: Instant,
        now: Instant,
        reason: TransitionReason,
        upstream: bool,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) {
        if self.state == BreakerState::Open {
            if self.open_until.is_some_and(|current| until > current) {
                self.open_until = Some(until);
                self.upstream_cooldown = upstream;
                self.last_reason = Some(reason);
                emit(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::Open,
                    at: now,
                    reason,
                    open_until: Some(until),
                });
            }
            return;
        }
        self.upstream_cooldown = upstream;
        self.enter(BreakerState::Open, now, reason, Some(until), emit);
    }

    fn enter(
        &mut self,
        to: BreakerState,
        at: Instant,
        reason: TransitionReason,
        open_until: Option<Instant>,
        emit: &mut (impl FnMut(Transition) + ?Sized),
    ) {
        let from = self.state;
        if from == BreakerState::Closed && to == BreakerState::Open {
            // What the key served while it was healthy: the pace it recovers at.
            let span = at
                .saturating_duration_since(self.closed_since)
                .min(self.window.length());
            let (calls, failures) = self.window.totals(at);
            self.rate_before_open = if span.is_zero() {
                0.0
            } else {
                f64::from(calls.saturating_sub(failures)) / span.as_secs_f64()
            };
        }
        self.state = to;
        self.epoch = self.epoch.wrapping_add(1);
        self.open_until = open_until;
        self.last_reason = Some(reason);
        self.probes.clear();
        self.probe_successes = 0;
        if to == BreakerState::Closed {
            self.consecutive = 0;
            self.latest_failure = None;
            self.window.clear();
            self.failed_probes = 0;
            self.closed_since = at;
        }
        emit(Transition {
            from,
            to,
            at,
            reason,
            open_until,
        });
    }
}

/// A hint that says when to retry (not a rate-limit bucket's reset time), capped.
fn retry_instruction(hint: Option<DelayHint>, config: &BreakerConfig) -> Option<DelayHint> {
    hint.filter(|h| h.source.is_retry_instruction())
        .map(|h| DelayHint::new(h.delay.min(config.max_hinted_cooldown), h.source))
}

/// The cooldown a failure's hint asks for: only 429s and 503s (rate limited,
/// overloaded) carry a hint about the upstream as a whole.
fn cooldown_hint(
    kind: FailureKind,
    hint: Option<DelayHint>,
    config: &BreakerConfig,
) -> Option<DelayHint> {
    match kind {
        FailureKind::RateLimited | FailureKind::Overloaded => retry_instruction(hint, config),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Admits one call at `at` and records `outcome` for it at `at`.
    fn call(key: &mut KeyState, config: &BreakerConfig, at: Instant, outcome: Outcome) {
        let ticket = key.admit(at, config, &mut |_| {}).expect("admitted");
        key.record(ticket, outcome, at, config, &mut |_| {});
    }

    fn server_error() -> Outcome {
        Outcome::Failure {
            kind: FailureKind::ServerError,
            hint: None,
        }
    }

    #[test]
    fn a_new_key_and_one_that_saw_only_ignored_outcomes_are_at_rest() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        assert!(key.is_at_rest(t0, &config));
        call(&mut key, &config, t0, Outcome::Ignored);
        assert!(key.is_at_rest(t0, &config));
    }

    #[test]
    fn a_success_keeps_a_key_busy_for_the_second_pacing_learns_from() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(&mut key, &config, t0, Outcome::Success);
        // The recent window is ten buckets of 100 ms: the success's bucket leaves it
        // one second after its start.
        assert!(!key.is_at_rest(t0 + secs(1) - Duration::from_nanos(1), &config));
        assert!(key.is_at_rest(t0 + secs(1), &config));
        // The success is still in the failure window: successes are what may be
        // forgotten.
        assert_eq!(key.window_counts(t0 + secs(1)), (1, 0));
    }

    #[test]
    fn a_failure_in_the_window_keeps_a_key_until_it_leaves_the_window() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(&mut key, &config, t0, server_error());
        // A success admitted after it ends the run of failures; the failure stays
        // in the window.
        call(&mut key, &config, t0, Outcome::Success);
        assert_eq!(key.consecutive_failures(), 0);
        assert!(!key.is_at_rest(t0 + secs(10), &config));
        // 30 s window in 3 s buckets: the failure's bucket leaves it at 30 s.
        let left = t0 + config.window;
        assert!(!key.is_at_rest(left - Duration::from_nanos(1), &config));
        assert_eq!(key.window_counts(left), (0, 0));
        assert!(key.is_at_rest(left, &config));
    }

    #[test]
    fn failures_in_a_row_keep_a_key_after_they_left_the_window() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(&mut key, &config, t0, server_error());
        let later = t0 + config.window * 10;
        assert_eq!(key.window_counts(later), (0, 0));
        assert_eq!(key.consecutive_failures(), 1);
        assert!(!key.is_at_rest(later, &config));
        // A success ends the run; a second later the key is at rest.
        call(&mut key, &config, later, Outcome::Success);
        assert!(key.is_at_rest(later + secs(1), &config));
    }

    #[test]
    fn a_failure_recorded_after_the_instant_asked_about_still_counts() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(&mut key, &config, t0 + secs(10), server_error());
        call(&mut key, &config, t0 + secs(10), Outcome::Success);
        assert_eq!(key.consecutive_failures(), 0);
        assert_eq!(key.window_counts(t0), (0, 0));
        assert!(!key.is_at_rest(t0, &config));
    }

    #[test]
    fn an_open_or_half_open_key_is_never_at_rest() {
        let config = BreakerConfig {
            pacing: None,
            ..BreakerConfig::default()
        };
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(
            &mut key,
            &config,
            t0,
            Outcome::QuotaExhausted { hint: None },
        );
        assert_eq!(key.state(), BreakerState::Open);
        assert!(!key.is_at_rest(t0, &config));
        // Past its cooldown, not yet advanced: still open, still kept.
        let after = t0 + config.quota_cooldown + secs(1);
        assert!(!key.is_at_rest(after, &config));
        // Half-open, a probe in flight.
        let probe = key.admit(after, &config, &mut |_| {}).expect("a probe");
        assert_eq!(key.state(), BreakerState::HalfOpen);
        assert_eq!(key.probes_in_flight(), 1);
        assert!(!key.is_at_rest(after, &config));
        // The probe succeeds: closed, window cleared; at rest a second later.
        key.record(probe, Outcome::Success, after, &config, &mut |_| {});
        assert_eq!(key.state(), BreakerState::Closed);
        assert!(!key.is_at_rest(after, &config));
        assert!(key.is_at_rest(after + secs(1), &config));
    }

    #[test]
    fn a_paced_key_is_kept_until_its_pace_would_lift() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(&mut key, &config, t0, Outcome::Success);
        call(&mut key, &config, t0, Outcome::SuccessAfterSlowDown);
        assert!(key.pace().is_some());
        assert_eq!(key.window_counts(t0), (2, 0));
        assert_eq!(key.consecutive_failures(), 0);
        // Nothing but the pace keeps it after the recent second.
        assert!(!key.is_at_rest(t0 + secs(2), &config));
        assert!(!key.is_at_rest(t0 + config.window - Duration::from_nanos(1), &config));
        // A whole window without a signal: the next admission would lift the pace,
        // so it is not worth keeping the key for.
        assert!(key.pace().is_some());
        assert!(key.is_at_rest(t0 + config.window, &config));
    }

    #[test]
    fn a_key_is_stale_once_idle_for_the_horizon_with_no_open_period_running() {
        let config = BreakerConfig::default();
        let horizon = config.idle_horizon();
        assert_eq!(horizon, secs(60));
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        // A new key counts as idle since its creation.
        assert!(!key.is_stale(t0 + horizon - Duration::from_nanos(1), &config));
        assert!(key.is_stale(t0 + horizon, &config));
        // One failure: not at rest however long, stale once idle for the horizon
        // after that failure.
        let failed = t0 + secs(5);
        call(&mut key, &config, failed, server_error());
        assert!(!key.is_at_rest(failed + secs(3600), &config));
        assert!(!key.is_stale(failed + horizon - Duration::from_nanos(1), &config));
        assert!(key.is_stale(failed + horizon, &config));
        // An outcome recorded later than the instant asked about counts as recent.
        call(&mut key, &config, failed + secs(100), Outcome::Ignored);
        assert!(!key.is_stale(failed + secs(99) + horizon, &config));
    }

    #[test]
    fn an_open_key_is_stale_only_after_its_open_period_and_a_probe_never_is() {
        let config = BreakerConfig::default();
        let t0 = Instant::now();
        let mut key = KeyState::new(t0, &config);
        call(
            &mut key,
            &config,
            t0,
            Outcome::QuotaExhausted { hint: None },
        );
        assert_eq!(key.state(), BreakerState::Open);
        let until = key.open_until().unwrap();
        assert_eq!(until, t0 + config.quota_cooldown);
        assert!(!key.is_stale(until - Duration::from_nanos(1), &config));
        assert!(key.is_stale(until, &config));
        // A probe in flight keeps it, idle or not.
        let later = until + secs(3600);
        let probe = key.admit(later, &config, &mut |_| {}).expect("a probe");
        assert_eq!(key.probes_in_flight(), 1);
        assert!(!key.is_stale(later + secs(1), &config));
        key.release(probe, later + secs(1), &config, &mut |_| {});
        assert!(key.is_stale(later + secs(1), &config));
    }

    #[test]
    fn the_idle_horizon_is_the_longer_of_the_window_and_the_longest_open_period() {
        let config = BreakerConfig {
            window: secs(300),
            ..BreakerConfig::default()
        };
        assert_eq!(config.idle_horizon(), secs(300));
    }
}
