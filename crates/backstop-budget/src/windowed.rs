//! The default model: deposits per request, withdrawals per retry, both expiring
//! after a window (Finagle's `RetryBudget`, tower's `TpsBudget`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use backstop_classify::RetryBudget;
use tokio::time::Instant;

use crate::model::{BudgetModel, BudgetSnapshot, ConfigError, check_range, check_window};
use crate::window::{SlotRing, Ticker};

/// Fixed-point scale: one retry costs this many milli-tokens, so ratios such as 15 %
/// are exact (tower's `TpsBudget` rounds `1 / ratio` down to an integer: 15 % becomes
/// one retry per 6 requests, 16.7 %).
const RETRY_COST: i64 = 1000;

const MAX_RETRY_RATIO: f64 = 10.0;
const MAX_MIN_RETRIES_PER_SEC: f64 = 1_000_000.0;

/// The parameters of a [`WindowedBudget`]. See the crate docs for why the defaults are
/// what they are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowedBudgetConfig {
    /// How long a deposit (and a withdrawal) counts. Between 1 s and 1 h; expiry
    /// happens in tenths of it. Default 10 s.
    pub window: Duration,
    /// Retries allowed per second whatever the traffic, so a process that sends few
    /// requests can still retry now and then. Default 1.
    pub min_retries_per_sec: f64,
    /// Retries allowed per logical request, on top of the floor (0.1 = 10 %).
    /// Between 0 and 10. Default 0.1.
    pub retry_ratio: f64,
}

impl Default for WindowedBudgetConfig {
    fn default() -> Self {
        WindowedBudgetConfig {
            window: Duration::from_secs(10),
            min_retries_per_sec: 1.0,
            retry_ratio: 0.1,
        }
    }
}

/// A retry budget with Finagle / tower `TpsBudget` semantics, lock-free.
///
/// Every logical request deposits `retry_ratio` of a retry; every retry withdraws one;
/// deposits and withdrawals leave the balance `window` after they were made. On top, a
/// constant reserve of `min_retries_per_sec × window` retries. So over any window,
/// retries ≤ reserve + `retry_ratio` × requests.
///
/// A withdrawal is decided by one compare-and-swap on the total spent, so
/// concurrent retries can never overdraw the budget (tower's `TpsBudget` checks and
/// subtracts in two steps and can).
/// Time is [`tokio::time::Instant`]: under a paused test clock the window runs in
/// virtual time.
///
/// Each tenth of the window records up to about two million retries' worth of
/// deposits and as many withdrawals; beyond that, further deposits in the same tenth
/// are dropped and withdrawals refused, so a saturated budget errs toward fewer
/// retries, never more.
///
/// ```
/// use backstop_budget::{BudgetModel, WindowedBudget, WindowedBudgetConfig};
/// use backstop_classify::RetryBudget;
/// use std::time::Duration;
///
/// let budget = WindowedBudget::new(WindowedBudgetConfig {
///     window: Duration::from_secs(10),
///     min_retries_per_sec: 0.0,
///     retry_ratio: 0.5,
/// })?;
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.try_withdraw(), "two requests at 50 % pay for one retry");
/// assert!(!budget.try_withdraw());
/// # Ok::<(), backstop_budget::ConfigError>(())
/// ```
#[derive(Debug)]
pub struct WindowedBudget {
    config: WindowedBudgetConfig,
    ticker: Ticker,
    /// Milli-retries deposited, per slot. Read by summing the slots at withdrawal
    /// time, so a deposit, the per-request hot path, is one compare-and-swap.
    deposited: SlotRing,
    /// Milli-retries withdrawn, per slot.
    withdrawn: SlotRing,
    /// The sum of `withdrawn`, kept as one word so a withdrawal is decided by a
    /// single compare-and-swap on it: two threads cannot both take the last retry.
    spent: AtomicI64,
    /// Milli-retries of the floor, always available.
    reserve: i64,
    deposit_amount: i64,
    deposits: AtomicU64,
    retries_allowed: AtomicU64,
    retries_refused: AtomicU64,
    retries_refunded: AtomicU64,
}

impl WindowedBudget {
    /// A budget with `config`, its window starting now.
    pub fn new(config: WindowedBudgetConfig) -> Result<Self, ConfigError> {
        Self::starting_at(config, Instant::now())
    }

    /// A budget with `config` whose first window starts at `origin` (for simulations
    /// driven through the `*_at` methods).
    pub fn starting_at(config: WindowedBudgetConfig, origin: Instant) -> Result<Self, ConfigError> {
        check_window(config.window)?;
        check_range("retry_ratio", config.retry_ratio, 0.0, MAX_RETRY_RATIO)?;
        check_range(
            "min_retries_per_sec",
            config.min_retries_per_sec,
            0.0,
            MAX_MIN_RETRIES_PER_SEC,
        )?;
        Ok(Self::checked(config, origin))
    }

    /// Builds from a config already known to be in range.
    fn checked(config: WindowedBudgetConfig, origin: Instant) -> Self {
        let reserve = (config.min_retries_per_sec * config.window.as_secs_f64() * RETRY_COST as f64)
            .round() as i64;
        WindowedBudget {
            config,
            ticker: Ticker::new(origin, config.window),
            deposited: SlotRing::new(),
            withdrawn: SlotRing::new(),
            spent: AtomicI64::new(0),
            reserve,
            deposit_amount: (config.retry_ratio * RETRY_COST as f64).round() as i64,
            deposits: AtomicU64::new(0),
            retries_allowed: AtomicU64::new(0),
            retries_refused: AtomicU64::new(0),
            retries_refunded: AtomicU64::new(0),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &WindowedBudgetConfig {
        &self.config
    }

    /// The retries the floor alone allows per window: `min_retries_per_sec × window`.
    pub fn reserve(&self) -> f64 {
        self.config.min_retries_per_sec * self.config.window.as_secs_f64()
    }

    /// Clears what has left the window by `now` (taking expired withdrawals out of
    /// `spent`); returns the tick.
    fn advance(&self, now: Instant) -> u64 {
        let tick = self.ticker.tick(now);
        // Deposits need no total: sums skip expired slots. Clearing them keeps a slot
        // untouched for 2³² ticks from being mistaken for a current one.
        self.deposited.expire(tick);
        let expired = self.withdrawn.expire(tick);
        if expired != 0 {
            self.spent.fetch_sub(expired, Ordering::AcqRel);
        }
        tick
    }

    /// Milli-retries available at `tick` if `spent` were `spent`.
    fn available(&self, tick: u64, spent: i64) -> i64 {
        self.reserve + self.deposited.sum(tick) - spent
    }

    /// [`BudgetModel::deposit`] at `now`.
    pub fn deposit_at(&self, now: Instant) {
        let tick = self.advance(now);
        self.deposits.fetch_add(1, Ordering::Relaxed);
        if self.deposit_amount != 0 {
            self.deposited.add(tick, self.deposit_amount);
        }
    }

    /// [`RetryBudget::try_withdraw`] at `now`.
    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let tick = self.advance(now);
        // The deposits are re-read on every round: the decision is made against the
        // deposits and withdrawals as they are at the moment the swap succeeds.
        let taken = self
            .spent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spent| {
                (self.available(tick, spent) >= RETRY_COST).then_some(spent + RETRY_COST)
            })
            .is_ok();
        if taken {
            match self.withdrawn.try_add(tick, RETRY_COST) {
                // `spent` already counts RETRY_COST; correct it if the slot changed by
                // something else (a displaced stale value).
                Some(RETRY_COST) => {}
                Some(change) => {
                    self.spent.fetch_add(change - RETRY_COST, Ordering::AcqRel);
                }
                // This slot already holds over two million retries' worth of
                // withdrawals: refuse rather than let one go unrecorded (and so free).
                None => {
                    self.spent.fetch_sub(RETRY_COST, Ordering::AcqRel);
                    self.retries_refused.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
            self.retries_allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.retries_refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Gives back, at `now`, one retry withdrawn at `withdrawn_at` (an instant
    /// [`WindowedBudget::try_withdraw_at`] allowed a retry at) whose retry was not
    /// made; returns whether it did. A withdrawal that has already left the window
    /// no longer counts and is not given back (`false`, nothing changed). Name each
    /// allowed withdrawal at most once: the budget counts withdrawals per tenth of
    /// the window, not one by one, so a second refund would give back another
    /// caller's retry.
    pub fn refund_at(&self, withdrawn_at: Instant, now: Instant) -> bool {
        self.advance(now);
        let tick = self.ticker.tick(withdrawn_at);
        let given_back = self.withdrawn.take_back(tick, RETRY_COST);
        if given_back {
            self.spent.fetch_sub(RETRY_COST, Ordering::AcqRel);
            self.retries_refunded.fetch_add(1, Ordering::Relaxed);
        }
        given_back
    }

    /// [`BudgetModel::snapshot`] at `now`.
    pub fn snapshot_at(&self, now: Instant) -> BudgetSnapshot {
        let tick = self.advance(now);
        let balance = self.available(tick, self.spent.load(Ordering::Acquire));
        BudgetSnapshot {
            model: "windowed",
            balance: balance as f64 / RETRY_COST as f64,
            retries_available: u64::try_from(balance / RETRY_COST).unwrap_or(0),
            deposits: self.deposits.load(Ordering::Relaxed),
            retries_allowed: self.retries_allowed.load(Ordering::Relaxed),
            retries_refused: self.retries_refused.load(Ordering::Relaxed),
            retries_refunded: self.retries_refunded.load(Ordering::Relaxed),
        }
    }
}

impl Default for WindowedBudget {
    /// 10 s window, 1 retry/s floor, 10 % ratio.
    fn default() -> Self {
        Self::checked(WindowedBudgetConfig::default(), Instant::now())
    }
}

impl RetryBudget for WindowedBudget {
    fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }
}

impl BudgetModel for WindowedBudget {
    fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    fn try_withdraw_at(&self, now: Instant) -> bool {
        WindowedBudget::try_withdraw_at(self, now)
    }

    fn give_back(&self, withdrawn_at: Instant) {
        self.refund_at(withdrawn_at, Instant::now());
    }

    fn snapshot(&self) -> BudgetSnapshot {
        self.snapshot_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(window_secs: u64, floor: f64, ratio: f64, origin: Instant) -> WindowedBudget {
        WindowedBudget::starting_at(
            WindowedBudgetConfig {
                window: Duration::from_secs(window_secs),
                min_retries_per_sec: floor,
                retry_ratio: ratio,
            },
            origin,
        )
        .unwrap()
    }

    fn withdraw_all(b: &WindowedBudget, now: Instant) -> u32 {
        let mut n = 0;
        while b.try_withdraw_at(now) {
            n += 1;
        }
        n
    }

    #[test]
    fn a_refund_gives_a_withdrawal_back_only_while_it_is_in_the_window() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 1.0, t0);
        b.deposit_at(t0);
        b.deposit_at(t0 + Duration::from_secs(5));
        assert!(b.try_withdraw_at(t0));
        // Within the window the withdrawal comes back: two retries' worth again.
        let t1 = t0 + Duration::from_secs(6);
        assert!(b.refund_at(t0, t1));
        assert_eq!(b.snapshot_at(t1).balance, 2.0);
        // Withdrawn again at 0 s; at 10 s that withdrawal (and the first deposit)
        // have left the window: giving it back then would credit a retry nobody
        // paid for.
        assert!(b.try_withdraw_at(t0));
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(b.snapshot_at(t2).balance, 1.0);
        assert!(!b.refund_at(t0, t2));
        let s = b.snapshot_at(t2);
        assert_eq!(
            (s.balance, s.retries_allowed, s.retries_refunded),
            (1.0, 2, 1)
        );
    }

    #[test]
    fn an_empty_budget_refuses_the_first_retry() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 0.1, t0);
        assert!(!b.try_withdraw_at(t0));
        let s = b.snapshot_at(t0);
        assert_eq!((s.retries_allowed, s.retries_refused), (0, 1));
    }

    #[test]
    fn ten_requests_at_ten_percent_pay_for_exactly_one_retry() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 0.1, t0);
        for _ in 0..9 {
            b.deposit_at(t0);
        }
        assert!(!b.try_withdraw_at(t0), "nine deposits are 0.9 of a retry");
        b.deposit_at(t0);
        assert_eq!(withdraw_all(&b, t0), 1);
    }

    #[test]
    fn fractional_ratios_are_exact() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 0.15, t0);
        for _ in 0..100 {
            b.deposit_at(t0);
        }
        assert_eq!(withdraw_all(&b, t0), 15);
    }

    #[test]
    fn the_floor_grants_min_retries_per_sec_times_window() {
        let t0 = Instant::now();
        let b = budget(10, 2.0, 0.1, t0);
        assert_eq!(b.reserve(), 20.0);
        assert_eq!(withdraw_all(&b, t0), 20);
        assert_eq!(b.snapshot_at(t0).retries_available, 0);
    }

    #[test]
    fn deposits_expire_after_the_window() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 1.0, t0);
        b.deposit_at(t0);
        // Still in the window in its last slot…
        assert_eq!(
            b.snapshot_at(t0 + Duration::from_millis(9_999))
                .retries_available,
            1
        );
        // …gone once its slot is reused.
        assert_eq!(
            b.snapshot_at(t0 + Duration::from_secs(10))
                .retries_available,
            0
        );
        assert!(!b.try_withdraw_at(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn withdrawals_expire_too_so_the_floor_refills_each_window() {
        let t0 = Instant::now();
        let b = budget(10, 1.0, 0.0, t0);
        assert_eq!(withdraw_all(&b, t0), 10);
        assert_eq!(withdraw_all(&b, t0 + Duration::from_secs(9)), 0);
        assert_eq!(withdraw_all(&b, t0 + Duration::from_secs(10)), 10);
    }

    #[test]
    fn balance_goes_negative_when_deposits_expire_before_their_withdrawals() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 1.0, t0);
        for _ in 0..3 {
            b.deposit_at(t0);
        }
        // Spent five seconds later: the withdrawals outlive the deposits by 5 s.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(withdraw_all(&b, t5), 3);
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(b.snapshot_at(t10).balance, -3.0);
        b.deposit_at(t10);
        assert!(
            !b.try_withdraw_at(t10),
            "still paying off the expired deposits"
        );
        assert_eq!(b.snapshot_at(t0 + Duration::from_secs(15)).balance, 1.0);
    }

    #[test]
    fn a_slot_full_of_withdrawals_refuses_instead_of_forgetting_one() {
        let t0 = Instant::now();
        // A reserve of 2.5 million retries, more than one slot can record.
        let b = budget(10, 250_000.0, 0.0, t0);
        let slot_capacity = u32::try_from(i64::from(i32::MAX) / RETRY_COST).unwrap();
        assert_eq!(withdraw_all(&b, t0), slot_capacity);
        let s = b.snapshot_at(t0);
        assert_eq!(s.retries_available, 2_500_000 - u64::from(slot_capacity));
        // The next tenth of the window has its own slot.
        assert!(b.try_withdraw_at(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn snapshot_counts_every_call() {
        let t0 = Instant::now();
        let b = budget(10, 0.0, 0.5, t0);
        for _ in 0..4 {
            b.deposit_at(t0);
        }
        assert_eq!(withdraw_all(&b, t0), 2);
        assert!(!b.try_withdraw_at(t0));
        assert!(b.refund_at(t0, t0));
        assert_eq!(
            b.snapshot_at(t0),
            BudgetSnapshot {
                model: "windowed",
                balance: 1.0,
                retries_available: 1,
                deposits: 4,
                retries_allowed: 2,
                retries_refused: 2,
                retries_refunded: 1,
            }
        );
    }

    #[test]
    fn out_of_range_configs_are_refused() {
        let bad = |c: WindowedBudgetConfig| WindowedBudget::new(c).unwrap_err();
        let ok = WindowedBudgetConfig::default();
        assert!(matches!(
            bad(WindowedBudgetConfig {
                window: Duration::ZERO,
                ..ok
            }),
            ConfigError::Window { .. }
        ));
        assert!(matches!(
            bad(WindowedBudgetConfig {
                retry_ratio: f64::INFINITY,
                ..ok
            }),
            ConfigError::OutOfRange {
                parameter: "retry_ratio",
                ..
            }
        ));
        assert!(matches!(
            bad(WindowedBudgetConfig {
                min_retries_per_sec: -1.0,
                ..ok
            }),
            ConfigError::OutOfRange {
                parameter: "min_retries_per_sec",
                ..
            }
        ));
    }

    #[test]
    fn default_is_ten_seconds_one_per_second_ten_percent() {
        let b = WindowedBudget::default();
        assert_eq!(
            *b.config(),
            WindowedBudgetConfig {
                window: Duration::from_secs(10),
                min_retries_per_sec: 1.0,
                retry_ratio: 0.1,
            }
        );
        assert_eq!(b.reserve(), 10.0);
    }
}
