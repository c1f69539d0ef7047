//! The lock-free windowed budget decides exactly as a plain reference model of its
//! definition: balance = reserve + ratio × deposits − withdrawals, counting only what
//! happened in the last `SLOTS` ticks, where a refund takes an allowed withdrawal
//! back out while it is still in the window. Property-tested over random histories.

use std::time::Duration;

use backstop_budget::{WindowedBudget, WindowedBudgetConfig};
use proptest::prelude::*;
use tokio::time::Instant;

const SLOTS: u64 = 10;

#[derive(Clone, Debug)]
enum Op {
    Deposit,
    Withdraw,
    /// Gives back one of the allowed withdrawals not given back yet (picked by this
    /// index, modulo their number), as the retry layer does for a retry it did not
    /// make.
    Refund(usize),
}

/// The definition, written the slow and obvious way (milli-retries).
struct Reference {
    reserve: i64,
    deposit: i64,
    events: Vec<(u64, i64)>, // (tick, amount)
}

/// An allowed withdrawal not given back yet: its index in `Reference::events` and
/// the millisecond it was made at.
struct Withdrawal {
    event: usize,
    at_ms: u64,
}

impl Reference {
    fn balance(&self, tick: u64) -> i64 {
        self.reserve
            + self
                .events
                .iter()
                .filter(|(t, _)| t + SLOTS > tick)
                .map(|(_, a)| a)
                .sum::<i64>()
    }

    /// Takes the withdrawal back out if it is still in the window at `tick`.
    fn refund(&mut self, withdrawal: &Withdrawal, tick: u64) -> bool {
        let (t, amount) = &mut self.events[withdrawal.event];
        let in_window = *t + SLOTS > tick;
        if in_window {
            *amount = 0;
        }
        in_window
    }

    fn apply(&mut self, op: &Op, tick: u64) -> bool {
        match op {
            Op::Refund(_) => unreachable!("refunds go through Reference::refund"),
            Op::Deposit => {
                self.events.push((tick, self.deposit));
                true
            }
            Op::Withdraw => {
                let ok = self.balance(tick) >= 1000;
                if ok {
                    self.events.push((tick, -1000));
                }
                ok
            }
        }
    }
}

fn history() -> impl Strategy<Value = Vec<(u64, Op)>> {
    // Gaps in milliseconds between operations: mostly small, sometimes a whole window.
    let gap = prop_oneof![8 => 0u64..300, 1 => 0u64..25_000];
    let op = prop_oneof![
        3 => Just(Op::Deposit),
        3 => Just(Op::Withdraw),
        1 => any::<usize>().prop_map(Op::Refund),
    ];
    prop::collection::vec((gap, op), 1..400)
}

proptest! {
    #[test]
    fn windowed_budget_matches_its_definition(
        ops in history(),
        ratio_permille in 0u32..=2_000,
        floor_tenths in 0u32..=30,
    ) {
        let config = WindowedBudgetConfig {
            window: Duration::from_secs(10),
            min_retries_per_sec: f64::from(floor_tenths) / 10.0,
            retry_ratio: f64::from(ratio_permille) / 1000.0,
        };
        let origin = Instant::now();
        let budget = WindowedBudget::starting_at(config, origin).unwrap();
        let mut reference = Reference {
            reserve: i64::from(floor_tenths) * 1000,
            deposit: i64::from(ratio_permille),
            events: Vec::new(),
        };
        let mut elapsed = 0u64;
        let mut allowed: Vec<Withdrawal> = Vec::new();
        for (gap, op) in &ops {
            elapsed += gap;
            let now = origin + Duration::from_millis(elapsed);
            let tick = elapsed / 1000;
            let (expected, actual) = match op {
                Op::Refund(pick) => {
                    if allowed.is_empty() {
                        continue;
                    }
                    let withdrawal = allowed.swap_remove(pick % allowed.len());
                    let made_at = origin + Duration::from_millis(withdrawal.at_ms);
                    (
                        reference.refund(&withdrawal, tick),
                        budget.refund_at(made_at, now),
                    )
                }
                Op::Deposit => {
                    budget.deposit_at(now);
                    (reference.apply(op, tick), true)
                }
                Op::Withdraw => {
                    let expected = reference.apply(op, tick);
                    if expected {
                        allowed.push(Withdrawal {
                            event: reference.events.len() - 1,
                            at_ms: elapsed,
                        });
                    }
                    (expected, budget.try_withdraw_at(now))
                }
            };
            prop_assert_eq!(actual, expected, "at {} ms", elapsed);
            let snapshot = budget.snapshot_at(now);
            prop_assert_eq!(
                (snapshot.balance * 1000.0).round() as i64,
                reference.balance(tick),
                "balance at {} ms", elapsed
            );
        }
    }
}
