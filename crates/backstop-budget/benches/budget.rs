//! Deposit and withdraw cost of `WindowedBudget`, side by side with tower's
//! `TpsBudget`, uncontended and with two threads hammering one budget.
//!
//! Both are configured alike (10 s window, ratio 1.0 so every deposit pays for one
//! withdrawal and the steady state keeps withdrawing successfully, no floor).
//! Run briefly: `cargo bench -p backstop-budget -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use backstop_budget::{BudgetModel, RetryBudget, WindowedBudget, WindowedBudgetConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::retry::budget::{Budget as TowerBudget, TpsBudget};

const WINDOW: Duration = Duration::from_secs(10);

fn ours() -> WindowedBudget {
    WindowedBudget::new(WindowedBudgetConfig {
        window: WINDOW,
        min_retries_per_sec: 0.0,
        retry_ratio: 1.0,
    })
    .expect("valid config")
}

fn tower() -> TpsBudget {
    TpsBudget::new(WINDOW, 0, 1.0)
}

/// The operations both budgets offer, so one harness drives either.
trait Ops: Sync {
    fn deposit(&self);
    fn withdraw(&self) -> bool;
}

impl Ops for WindowedBudget {
    fn deposit(&self) {
        BudgetModel::deposit(self)
    }
    fn withdraw(&self) -> bool {
        self.try_withdraw()
    }
}

impl Ops for TpsBudget {
    fn deposit(&self) {
        TowerBudget::deposit(self)
    }
    fn withdraw(&self) -> bool {
        TowerBudget::withdraw(self)
    }
}

/// Runs `iters` deposit-then-withdraw pairs on each of `threads` threads sharing
/// `budget` and returns the slowest thread's time; criterion divides it by `iters`,
/// so the figure is the time of one pair while `threads` threads contend.
fn pairs_on_threads<B: Ops>(budget: &B, threads: usize, iters: u64) -> Duration {
    let start_line = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    start_line.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        budget.deposit();
                        black_box(budget.withdraw());
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn deposit(c: &mut Criterion) {
    let mut group = c.benchmark_group("deposit");
    let b = ours();
    group.bench_function("backstop WindowedBudget", |bench| {
        bench.iter(|| BudgetModel::deposit(&b))
    });
    let t = tower();
    group.bench_function("tower TpsBudget", |bench| {
        bench.iter(|| TowerBudget::deposit(&t))
    });
    group.finish();
}

fn withdraw(c: &mut Criterion) {
    let mut group = c.benchmark_group("withdraw_refused");
    // An empty budget: the path taken in an outage, once the budget is spent.
    let b = ours();
    group.bench_function("backstop WindowedBudget", |bench| {
        bench.iter(|| black_box(b.try_withdraw()))
    });
    let t = tower();
    group.bench_function("tower TpsBudget", |bench| {
        bench.iter(|| black_box(TowerBudget::withdraw(&t)))
    });
    group.finish();
}

fn deposit_withdraw_pair(c: &mut Criterion) {
    for threads in [1, 2] {
        let mut group = c.benchmark_group(format!("deposit+withdraw, {threads} thread(s)"));
        group.bench_function("backstop WindowedBudget", |bench| {
            bench.iter_custom(|iters| pairs_on_threads(&ours(), threads, iters))
        });
        group.bench_function("tower TpsBudget", |bench| {
            bench.iter_custom(|iters| pairs_on_threads(&tower(), threads, iters))
        });
        group.finish();
    }
}

criterion_group!(benches, deposit, withdraw, deposit_withdraw_pair);
criterion_main!(benches);
