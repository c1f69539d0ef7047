//! The lock-free windowed budget decides exactly as a plain reference model of its
//! definition: balance = reserve + ratio × deposits − withdrawals, counting only what
//! happened in the last `SLOTS` ticks. Property-tested over random histories.

use std::time::Duration;

use backstop_budget::{WindowedBudget, WindowedBudgetConfig};
use proptest::prelude::*;
use tokio::time::Instant;

const SLOTS: u64 = 10;

#[derive(Clone, Debug)]
enum Op {
    Deposit,
    Withdraw,
}

/// The definition, written the slow and obvious way (milli-retries).
struct Reference {
    reserve: i64,
    deposit: i64,
    events: Vec<(u64, i64)>, // (tick, amount)
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

    fn apply(&mut self, op: &Op, tick: u64) -> bool {
        match op {
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
    let op = prop_oneof![Just(Op::Deposit), Just(Op::Withdraw)];
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
        for (gap, op) in &ops {
            elapsed += gap;
            let now = origin + Duration::from_millis(elapsed);
            let tick = elapsed / 1000;
            let expected = reference.apply(op, tick);
            let actual = match op {
                Op::Deposit => { budget.deposit_at(now); true }
                Op::Withdraw => budget.try_withdraw_at(now),
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
