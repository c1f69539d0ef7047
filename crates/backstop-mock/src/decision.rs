//! The pure decision: which answer, after which delay, for one attempt on one model.
//!
//! No clock and no runtime: the caller passes the arrival time (since the mock's
//! creation), so every rule is testable with plain `#[test]`s.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use crate::fault::Fault;
use crate::plan::ModelPlan;

/// Which rule of the plan produced an answer (see [`ModelPlan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    /// An outage window.
    Outage,
    /// The capacity limit was exceeded.
    OverCapacity,
    /// The script, or `then` once the script was used up.
    Plan,
    /// A random fault roll hit.
    Random,
    /// The mock's own protocol answer: the model list, or a 400/404/413 for a
    /// request it could not serve.
    Protocol,
}

/// The answer to one attempt.
#[derive(Debug)]
pub(crate) struct Decision {
    /// What to answer.
    pub(crate) fault: Fault,
    /// Delay before the response head.
    pub(crate) latency: Duration,
    /// Where the answer came from.
    pub(crate) source: AnswerSource,
    /// Held while the attempt is in flight (admitted attempts only).
    pub(crate) in_flight: Option<InFlight>,
}

/// Counts an admitted attempt as in flight until dropped, then tells whoever
/// [watches](InFlight::notifying) the count.
#[derive(Debug)]
pub(crate) struct InFlight {
    count: Arc<AtomicUsize>,
    released: Option<Arc<Notify>>,
}

impl InFlight {
    /// Wakes every waiter on `changed` once the attempt is no longer in flight.
    pub(crate) fn notifying(mut self, changed: Arc<Notify>) -> Self {
        self.released = Some(changed);
        self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some(changed) = &self.released {
            changed.notify_waiters();
        }
    }
}

/// The evolving state of one model: script position, random sources, load.
#[derive(Debug)]
pub(crate) struct ModelState {
    script_pos: usize,
    // Faults and latency draw from separate sources, so adding latency to a plan
    // does not change which faults it answers.
    fault_rng: SmallRng,
    latency_rng: SmallRng,
    in_flight: Arc<AtomicUsize>,
    /// Arrival times of admitted attempts within the last second, oldest first.
    admitted: VecDeque<Duration>,
}

impl ModelState {
    /// Fresh state for `model` under the scenario seed `seed`. Each model gets its
    /// own random sources derived from the seed and the model's name, so traffic to
    /// one model never changes the answers of another.
    pub(crate) fn new(seed: u64, model: &str) -> Self {
        let base = splitmix64(seed ^ fnv1a(model.as_bytes()));
        ModelState {
            script_pos: 0,
            fault_rng: SmallRng::seed_from_u64(base),
            latency_rng: SmallRng::seed_from_u64(splitmix64(base ^ 0x6c61_7465_6e63_7921)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            admitted: VecDeque::new(),
        }
    }

    /// Attempts of this model currently in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Decides the answer to an attempt arriving `now` after the mock's creation.
    pub(crate) fn decide(&mut self, plan: &ModelPlan, now: Duration) -> Decision {
        let latency = plan.latency.sample(&mut self.latency_rng);

        if let Some(outage) = plan.outages.iter().find(|o| o.from <= now && now < o.until) {
            return Decision {
                fault: outage.fault.clone(),
                latency,
                source: AnswerSource::Outage,
                in_flight: None,
            };
        }

        while let Some(&oldest) = self.admitted.front() {
            if now.saturating_sub(oldest) >= Duration::from_secs(1) {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        if let Some(capacity) = &plan.capacity {
            let too_many_in_flight = capacity
                .max_in_flight
                .is_some_and(|c| self.in_flight() >= c);
            let too_many_per_second = capacity
                .max_per_second
                .is_some_and(|r| self.admitted.len() >= r as usize);
            if too_many_in_flight || too_many_per_second {
                return Decision {
                    fault: capacity.over.clone(),
                    latency,
                    source: AnswerSource::OverCapacity,
                    in_flight: None,
                };
            }
        }

        let scripted = match plan.script.get(self.script_pos) {
            Some(fault) => {
                self.script_pos += 1;
                fault.clone()
            }
            None => plan.then.clone(),
        };
        // Roll every random fault on every attempt, hit or not, so the random
        // sequence depends only on the number of attempts, not on their answers.
        let rolls: Vec<bool> = plan
            .random
            .iter()
            .map(|r| self.fault_rng.random::<f64>() < r.probability.clamp(0.0, 1.0))
            .collect();
        let (fault, source) = match plan.random.iter().zip(&rolls).find(|(_, hit)| **hit) {
            Some((random, _)) if scripted.is_ok() => (random.fault.clone(), AnswerSource::Random),
            _ => (scripted, AnswerSource::Plan),
        };

        // A refused connection never reached the provider: it takes no capacity.
        let in_flight = if matches!(fault, Fault::ConnectRefused) {
            None
        } else {
            self.admitted.push_back(now);
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            Some(InFlight {
                count: Arc::clone(&self.in_flight),
                released: None,
            })
        };
        Decision {
            fault,
            latency,
            source,
            in_flight,
        }
    }
}

/// FNV-1a: a stable hash (std's hasher may change between Rust releases, which
/// would change every scenario's answers).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Spreads nearby seeds (42, 43) into unrelated ones.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Capacity, Latency};

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn names(state: &mut ModelState, plan: &ModelPlan, n: usize) -> Vec<&'static str> {
        (0..n)
            .map(|_| state.decide(plan, Duration::ZERO).fault.name())
            .collect()
    }

    #[test]
    fn script_is_answered_in_order_then_the_then_fault_for_ever() {
        let plan = ModelPlan::script([Fault::OpenAiServerError, Fault::AnthropicOverloaded])
            .then(Fault::GatewayTimeout);
        let mut s = ModelState::new(1, "m");
        assert_eq!(
            names(&mut s, &plan, 4),
            [
                "openai_server_error",
                "anthropic_overloaded",
                "gateway_timeout",
                "gateway_timeout"
            ]
        );
    }

    #[test]
    fn same_seed_and_model_give_the_same_random_sequence() {
        let plan = ModelPlan::ok().with_random(0.5, Fault::OpenAiServerError);
        let a = names(&mut ModelState::new(42, "m"), &plan, 64);
        let b = names(&mut ModelState::new(42, "m"), &plan, 64);
        let c = names(&mut ModelState::new(43, "m"), &plan, 64);
        let d = names(&mut ModelState::new(42, "other"), &plan, 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let hits = a.iter().filter(|n| **n == "openai_server_error").count();
        assert!((16..=48).contains(&hits), "{hits} hits of 64 at p=0.5");
    }

    #[test]
    fn random_faults_never_replace_a_scripted_failure() {
        let plan =
            ModelPlan::always(Fault::GatewayTimeout).with_random(1.0, Fault::OpenAiServerError);
        let mut s = ModelState::new(1, "m");
        assert_eq!(names(&mut s, &plan, 3), ["gateway_timeout"; 3]);
    }

    #[test]
    fn probability_one_always_hits_and_zero_never_does() {
        let always = ModelPlan::ok().with_random(1.0, Fault::OpenAiOverloaded);
        let never = ModelPlan::ok().with_random(0.0, Fault::OpenAiOverloaded);
        assert_eq!(
            names(&mut ModelState::new(3, "m"), &always, 50),
            ["openai_overloaded"; 50]
        );
        assert_eq!(names(&mut ModelState::new(3, "m"), &never, 50), ["ok"; 50]);
    }

    #[test]
    fn latency_does_not_change_the_fault_sequence() {
        let plain = ModelPlan::ok().with_random(0.3, Fault::OpenAiServerError);
        let slow = plain
            .clone()
            .latency(Latency::uniform(Duration::ZERO, Duration::from_secs(1)));
        assert_eq!(
            names(&mut ModelState::new(9, "m"), &plain, 100),
            names(&mut ModelState::new(9, "m"), &slow, 100)
        );
    }

    #[test]
    fn outage_window_is_half_open_and_does_not_consume_the_script() {
        let plan = ModelPlan::script([Fault::OpenAiServerError]).outage(
            secs(10.0),
            secs(20.0),
            Fault::GeminiUnavailable,
        );
        let mut s = ModelState::new(1, "m");
        let at = |s: &mut ModelState, t: f64| s.decide(&plan, secs(t)).fault.name();
        assert_eq!(at(&mut s, 10.0), "gemini_unavailable");
        assert_eq!(at(&mut s, 19.999), "gemini_unavailable");
        assert_eq!(at(&mut s, 20.0), "openai_server_error");
        assert_eq!(at(&mut s, 21.0), "ok");
        assert_eq!(at(&mut s, 9.999), "ok");
    }

    #[test]
    fn in_flight_limit_turns_away_the_extra_attempt_until_one_finishes() {
        let plan = ModelPlan::ok().capacity(Capacity::in_flight(2).over(Fault::OpenAiOverloaded));
        let mut s = ModelState::new(1, "m");
        let a = s.decide(&plan, Duration::ZERO);
        let b = s.decide(&plan, Duration::ZERO);
        let c = s.decide(&plan, Duration::ZERO);
        assert_eq!((a.fault.name(), b.fault.name()), ("ok", "ok"));
        assert_eq!(c.fault.name(), "openai_overloaded");
        assert_eq!(c.source, AnswerSource::OverCapacity);
        assert_eq!(s.in_flight(), 2);
        drop(a);
        assert_eq!(s.in_flight(), 1);
        assert_eq!(s.decide(&plan, Duration::ZERO).fault.name(), "ok");
    }

    #[test]
    fn per_second_limit_uses_a_sliding_second_of_admitted_attempts() {
        let plan = ModelPlan::ok().capacity(Capacity::per_second(2));
        let mut s = ModelState::new(1, "m");
        let mut at = |t: f64| s.decide(&plan, secs(t)).fault.name();
        assert_eq!(at(0.0), "ok");
        assert_eq!(at(0.5), "ok");
        assert_eq!(at(0.9), "openai_rate_limit");
        // The turned-away attempt at 0.9 does not count: at 1.0 the one from 0.0 has left.
        assert_eq!(at(1.0), "ok");
        assert_eq!(at(1.2), "openai_rate_limit");
        assert_eq!(at(1.5), "ok");
    }

    #[test]
    fn refused_connections_take_no_capacity() {
        let plan = ModelPlan::script([Fault::ConnectRefused]).capacity(Capacity::per_second(1));
        let mut s = ModelState::new(1, "m");
        assert_eq!(s.decide(&plan, secs(0.0)).fault.name(), "connect_refused");
        assert_eq!(s.decide(&plan, secs(0.1)).fault.name(), "ok");
    }
}
