//! Model-based property test: random sequences of admissions, outcomes, drops and
//! clock advances, run against `KeyState` and against a small reference model written
//! as plainly as possible from the rules in the crate docs. After every step both must
//! agree on the admission verdict, the state, the open deadline and the counts.

use std::time::Duration;

use backstop_breaker::{BreakerConfig, BreakerState, KeyState, Outcome, Ticket};
use backstop_classify::{DelayHint, FailureKind, HintSource};
use proptest::prelude::*;
use tokio::time::Instant;

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Admit,
    Record(usize, Outcome),
    Release(usize),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    let source = prop_oneof![
        Just(HintSource::RetryAfterSeconds),
        Just(HintSource::RetryAfterMs),
        Just(HintSource::RateLimitResetTokens),
    ];
    let hint = proptest::option::of(
        (0u64..40_000, source).prop_map(|(ms, s)| DelayHint::new(Duration::from_millis(ms), s)),
    );
    let kind = prop_oneof![
        Just(FailureKind::ServerError),
        Just(FailureKind::RateLimited),
        Just(FailureKind::Overloaded),
        Just(FailureKind::TimedOut),
    ];
    prop_oneof![
        3 => Just(Outcome::Success),
        1 => Just(Outcome::SuccessAfterSlowDown),
        4 => (kind, hint.clone()).prop_map(|(kind, hint)| Outcome::Failure { kind, hint }),
        1 => hint.prop_map(|hint| Outcome::QuotaExhausted { hint }),
        1 => Just(Outcome::Ignored),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..4_000).prop_map(Op::Advance),
        4 => Just(Op::Admit),
        4 => (any::<usize>(), outcome()).prop_map(|(i, o)| Op::Record(i, o)),
        1 => any::<usize>().prop_map(Op::Release),
    ]
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    (0u32..4, 0u32..6, 1u32..3, 1u32..3).prop_map(|(consecutive, min_calls, probes, successes)| {
        BreakerConfig {
            consecutive_failures: consecutive,
            minimum_calls: min_calls,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            window_buckets: 5,
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(20),
            half_open_probes: probes,
            probe_successes_to_close: successes,
            probe_timeout: Duration::from_secs(7),
            hint_opens_at: Duration::from_secs(1),
            max_hinted_cooldown: Duration::from_secs(20),
            quota_cooldown: Duration::from_secs(15),
            max_keys: 16,
            // Pacing has its own tests; this model covers the open/half-open machine.
            pacing: None,
        }
    })
}

/// The reference model.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct ModelTicket {
    generation: u64,
    probe: Option<u64>,
    /// Admission order.
    seq: u64,
}

struct Model {
    config: BreakerConfig,
    t0: Instant,
    phase: Phase,
    generation: u64,
    consecutive: u32,
    /// (when, failed) for every counted call since the key last closed.
    calls: Vec<(Instant, bool)>,
    /// (probe id, deadline) of the probes in flight.
    probes: Vec<(u64, Instant)>,
    next_probe: u64,
    successes: u32,
    /// Probes that failed in a row (reset when the key closes).
    failed_probes: u32,
    /// Calls admitted so far.
    admitted: u64,
    /// The latest-admitted failure in the current run of failures: only a success
    /// admitted after it ends the run.
    latest_failure: Option<u64>,
}

impl Model {
    fn new(config: BreakerConfig, t0: Instant) -> Self {
        Model {
            config,
            t0,
            phase: Phase::Closed,
            generation: 0,
            consecutive: 0,
            calls: Vec::new(),
            probes: Vec::new(),
            next_probe: 0,
            successes: 0,
            failed_probes: 0,
            admitted: 0,
            latest_failure: None,
        }
    }

    fn bucket(&self, t: Instant) -> u128 {
        let len = self.config.window.as_nanos() / u128::from(self.config.window_buckets);
        (t - self.t0).as_nanos() / len
    }

    fn window(&self, now: Instant) -> (u32, u32) {
        let current = self.bucket(now);
        let inside: Vec<_> = self
            .calls
            .iter()
            .filter(|(t, _)| current - self.bucket(*t) < u128::from(self.config.window_buckets))
            .collect();
        (
            inside.len() as u32,
            inside.iter().filter(|(_, failed)| *failed).count() as u32,
        )
    }

    fn set(&mut self, phase: Phase) {
        self.phase = phase;
        self.generation += 1;
        self.probes.clear();
        self.successes = 0;
        if phase == Phase::Closed {
            self.consecutive = 0;
            self.calls.clear();
            self.failed_probes = 0;
            self.latest_failure = None;
        }
    }

    /// open_duration doubled per failed probe in a row, at most max_open_duration.
    fn open_period(&self) -> Duration {
        (self.config.open_duration * 2u32.pow(self.failed_probes.min(20)))
            .min(self.config.max_open_duration)
    }

    fn open_until(&mut self, until: Instant) {
        match self.phase {
            Phase::Open { until: current } => {
                if until > current {
                    self.phase = Phase::Open { until };
                }
            }
            _ => self.set(Phase::Open { until }),
        }
    }

    fn tick(&mut self, now: Instant) {
        loop {
            match self.phase {
                Phase::Open { until } if now >= until => self.set(Phase::HalfOpen),
                Phase::HalfOpen => {
                    let Some(expired) = self.probes.iter().map(|p| p.1).filter(|d| *d <= now).min()
                    else {
                        return;
                    };
                    self.failed_probes += 1;
                    self.set(Phase::Open {
                        until: expired + self.open_period(),
                    });
                }
                _ => return,
            }
        }
    }

    fn admit(&mut self, now: Instant) -> Result<ModelTicket, (BreakerState, Duration)> {
        self.tick(now);
        match self.phase {
            Phase::Closed => {
                self.admitted += 1;
                Ok(ModelTicket {
                    generation: self.generation,
                    probe: None,
                    seq: self.admitted,
                })
            }
            Phase::Open { until } => Err((BreakerState::Open, until - now)),
            Phase::HalfOpen => {
                if self.probes.len() < self.config.half_open_probes as usize {
                    let id = self.next_probe;
                    self.next_probe += 1;
                    self.probes.push((id, now + self.config.probe_timeout));
                    self.admitted += 1;
                    Ok(ModelTicket {
                        generation: self.generation,
                        probe: Some(id),
                        seq: self.admitted,
                    })
                } else {
                    // Look again after the oldest probe's age (at least 50 ms), never
                    // later than its timeout.
                    let free = self.probes.iter().map(|p| p.1).min().unwrap();
                    let age = now - (free - self.config.probe_timeout);
                    let recheck = age.max(Duration::from_millis(50)).min(free - now);
                    Err((BreakerState::HalfOpen, recheck))
                }
            }
        }
    }

    fn drop_probe(&mut self, ticket: ModelTicket) -> bool {
        if ticket.generation != self.generation {
            return false;
        }
        let before = self.probes.len();
        self.probes.retain(|p| Some(p.0) != ticket.probe);
        self.probes.len() < before
    }

    fn hinted(&self, hint: Option<DelayHint>) -> Option<Duration> {
        hint.filter(|h| h.source.is_retry_instruction())
            .map(|h| h.delay.min(self.config.max_hinted_cooldown))
    }

    fn record(&mut self, ticket: ModelTicket, outcome: Outcome, now: Instant) {
        self.tick(now);
        let current = ticket.generation == self.generation;
        match outcome {
            Outcome::Ignored => {
                self.drop_probe(ticket);
            }
            // Without pacing, a success after a 429 on an earlier attempt is a success.
            Outcome::Success | Outcome::SuccessAfterSlowDown => {
                if current && self.phase == Phase::Closed {
                    if self.latest_failure.is_none_or(|f| ticket.seq > f) {
                        self.consecutive = 0;
                        self.latest_failure = None;
                    }
                    self.calls.push((now, false));
                } else if self.phase == Phase::HalfOpen && self.drop_probe(ticket) {
                    self.successes += 1;
                    if self.successes >= self.config.probe_successes_to_close {
                        self.set(Phase::Closed);
                    }
                }
            }
            Outcome::QuotaExhausted { hint } => {
                self.drop_probe(ticket);
                let cooldown = self
                    .config
                    .quota_cooldown
                    .max(self.hinted(hint).unwrap_or_default());
                self.open_until(now + cooldown);
            }
            Outcome::Failure { kind, hint } => {
                let hinted = match kind {
                    FailureKind::RateLimited | FailureKind::Overloaded => self.hinted(hint),
                    _ => None,
                };
                if current && self.phase == Phase::Closed {
                    self.consecutive += 1;
                    self.latest_failure = Some(self.latest_failure.unwrap_or(0).max(ticket.seq));
                    self.calls.push((now, true));
                    let (calls, failures) = self.window(now);
                    let by_count = self.config.consecutive_failures > 0
                        && self.consecutive >= self.config.consecutive_failures;
                    let by_ratio = self.config.minimum_calls > 0
                        && calls >= self.config.minimum_calls
                        && failures as f64 >= 0.5 * calls as f64;
                    if by_count || by_ratio {
                        // The hint sets the cooldown; without one, the open period.
                        self.open_until(now + hinted.unwrap_or(self.open_period()));
                        return;
                    }
                } else if self.phase == Phase::HalfOpen && self.drop_probe(ticket) {
                    self.failed_probes += 1;
                    self.open_until(now + self.open_period().max(hinted.unwrap_or_default()));
                    return;
                }
                if let Some(h) = hinted.filter(|h| *h >= self.config.hint_opens_at) {
                    self.open_until(now + h);
                }
            }
        }
    }

    fn release(&mut self, ticket: ModelTicket, now: Instant) {
        self.tick(now);
        self.drop_probe(ticket);
    }

    fn state(&self) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen => BreakerState::HalfOpen,
        }
    }

    fn until(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open { until } => Some(until),
            _ => None,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn key_state_matches_the_reference_model(
        config in config(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut real = KeyState::new(t0, &config);
        let mut model = Model::new(config.clone(), t0);
        let mut tickets: Vec<(Ticket, ModelTicket)> = Vec::new();
        let mut ignore = |_| {};

        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Admit => {
                    // Both admission paths: the clock passed in, and read lazily.
                    let got = if step % 2 == 0 {
                        real.admit(now, &config, &mut ignore)
                    } else {
                        real.admit_with(|| now, &config, &mut ignore)
                    };
                    let want = model.admit(now);
                    match (got, want) {
                        (Ok(ticket), Ok(model_ticket)) => {
                            prop_assert_eq!(ticket.is_probe(), model_ticket.probe.is_some(), "step {}", step);
                            tickets.push((ticket, model_ticket));
                        }
                        (Err(rejection), Err((state, retry_in))) => {
                            prop_assert_eq!(rejection.state, state, "step {}", step);
                            prop_assert_eq!(rejection.retry_in, retry_in, "step {}", step);
                        }
                        (got, want) => prop_assert!(false, "step {}: real {:?}, model {:?}", step, got, want),
                    }
                }
                Op::Record(i, outcome) => {
                    if tickets.is_empty() { continue; }
                    let (ticket, model_ticket) = tickets.swap_remove(i % tickets.len());
                    real.record(ticket, outcome, now, &config, &mut ignore);
                    model.record(model_ticket, outcome, now);
                }
                Op::Release(i) => {
                    if tickets.is_empty() { continue; }
                    let (ticket, model_ticket) = tickets.swap_remove(i % tickets.len());
                    real.release(ticket, now, &config, &mut ignore);
                    model.release(model_ticket, now);
                }
            }
            real.advance(now, &config, &mut ignore);
            model.tick(now);
            prop_assert_eq!(real.state(), model.state(), "step {}", step);
            prop_assert_eq!(real.open_until(), model.until(), "step {}", step);
            prop_assert_eq!(real.consecutive_failures(), model.consecutive, "step {}", step);
            prop_assert_eq!(real.probes_in_flight() as usize, model.probes.len(), "step {}", step);
            if real.state() == BreakerState::Closed {
                prop_assert_eq!(real.window_counts(now), model.window(now), "step {}", step);
            }
        }
    }
}
