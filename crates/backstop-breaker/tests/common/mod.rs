//! The per-key state machine's test driver, shared by the state-machine, open-period
//! and pacing tests: a key, its config, a start instant, and every transition, driven
//! with offsets from that start.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::time::Duration;

use backstop_breaker::{
    BreakerConfig, BreakerState, KeyState, Outcome, Rejection, Ticket, Transition, TransitionReason,
};
use tokio::time::Instant;

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// A key under test: its state, the config, the start instant and every transition.
pub struct Key {
    pub state: KeyState,
    pub config: BreakerConfig,
    pub t0: Instant,
    pub transitions: Vec<Transition>,
}

impl Key {
    pub fn new(config: BreakerConfig) -> Self {
        let t0 = Instant::now();
        Key {
            state: KeyState::new(t0, &config),
            config,
            t0,
            transitions: Vec::new(),
        }
    }

    pub fn at(&self, offset: Duration) -> Instant {
        self.t0 + offset
    }

    pub fn admit(&mut self, offset: Duration) -> Result<Ticket, Rejection> {
        let now = self.at(offset);
        let transitions = &mut self.transitions;
        self.state
            .admit(now, &self.config, &mut |t| transitions.push(t))
    }

    pub fn record(&mut self, ticket: Ticket, outcome: Outcome, offset: Duration) {
        let now = self.at(offset);
        let transitions = &mut self.transitions;
        self.state
            .record(ticket, outcome, now, &self.config, &mut |t| {
                transitions.push(t)
            });
    }

    pub fn release(&mut self, ticket: Ticket, offset: Duration) {
        let now = self.at(offset);
        let transitions = &mut self.transitions;
        self.state
            .release(ticket, now, &self.config, &mut |t| transitions.push(t));
    }

    /// Admits and records one call at `offset`.
    pub fn call(&mut self, outcome: Outcome, offset: Duration) {
        let ticket = self.admit(offset).expect("call admitted");
        self.record(ticket, outcome, offset);
    }

    pub fn open_until(&self) -> Option<Duration> {
        self.state.open_until().map(|u| u - self.t0)
    }

    /// (from, to, at offset, reason) of every transition so far.
    pub fn log(&self) -> Vec<(BreakerState, BreakerState, Duration, TransitionReason)> {
        self.transitions
            .iter()
            .map(|t| (t.from, t.to, t.at - self.t0, t.reason))
            .collect()
    }
}
