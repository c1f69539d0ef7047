//! A full in-process store makes room for a new route by forgetting a key at rest,
//! or else one idle for the idle horizon (stale), and never one with a call in flight
//! or an open period still running, nor a key with a recent failure or pace.
//!
//! Keys are spread over 16 shards by a hash seeded at random per store, and a new
//! key can only take the place of one in its own shard. So the tests that expect
//! room fill the store with 1024 keys: every shard then holds some (the chance that
//! one of the 16 holds none is 16 × (15/16)^1024, about 10^-28), and a shard's count
//! never changes once the store is full (the key evicted is in the shard the new one
//! goes into). The tests that expect no room make every key unevictable, which holds
//! wherever the keys fall.

use std::collections::BTreeSet;
use std::time::Duration;

use backstop_breaker::{Breaker, BreakerConfig, BreakerPermit, BreakerState, Outcome};
use backstop_classify::{FailureKind, ModelRoute};
use tokio::time::Instant;

/// Enough keys that every shard holds some (see the module docs).
const FULL: usize = 1024;

fn junk(i: usize) -> ModelRoute {
    ModelRoute::new("upstream", format!("junk-{i}"))
}

fn real(i: usize) -> ModelRoute {
    ModelRoute::new("upstream", format!("real-{i}"))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn server_error() -> Outcome {
    Outcome::Failure {
        kind: FailureKind::ServerError,
        hint: None,
    }
}

/// One call for `route` admitted and finished at `at` with `outcome` (never
/// refused: every route here is closed or untracked when called).
fn call(breaker: &Breaker, route: &ModelRoute, at: Instant, outcome: Outcome) {
    breaker
        .admit_at(route, at)
        .expect("admitted")
        .record_at(outcome, at);
}

fn breaker(max_keys: usize) -> Breaker {
    Breaker::new(BreakerConfig {
        max_keys,
        ..BreakerConfig::default()
    })
    .unwrap()
}

fn routes(breaker: &Breaker, now: Instant) -> BTreeSet<ModelRoute> {
    breaker
        .snapshot_at(now)
        .into_iter()
        .map(|k| k.route)
        .collect()
}

/// Fills the store with `FULL` junk keys, each given `outcomes` at `t0`.
fn fill(breaker: &Breaker, t0: Instant, outcomes: &[Outcome]) {
    for i in 0..FULL {
        for outcome in outcomes {
            call(breaker, &junk(i), t0, *outcome);
        }
    }
    assert_eq!(breaker.snapshot_at(t0).len(), FULL);
}

/// A call for `route` (new) at `now` takes exactly one key's place: the count stays,
/// the new route is listed, one junk key is gone. Returns the evicted route.
fn makes_room(breaker: &Breaker, route: &ModelRoute, now: Instant) -> ModelRoute {
    let before = routes(breaker, now);
    assert!(!before.contains(route));
    let permit = breaker.admit_at(route, now).expect("a new key is closed");
    let after = routes(breaker, now);
    assert_eq!(after.len(), before.len(), "one out, one in");
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        vec![route],
        "the new route is tracked"
    );
    let gone: Vec<_> = before.difference(&after).cloned().collect();
    assert_eq!(gone.len(), 1, "exactly one key evicted: {gone:?}");
    assert!(breaker.key(&gone[0]).is_none());
    drop(permit);
    gone.into_iter().next().unwrap()
}

/// Calls for `count` new routes at `now` all pass untracked, and the keys stay as
/// they were.
fn no_room(breaker: &Breaker, count: usize, now: Instant) {
    let before = breaker.snapshot_at(now);
    assert_eq!(before.len(), FULL);
    for i in 0..count {
        let route = real(1_000_000 + i);
        call(breaker, &route, now, server_error());
        assert!(breaker.key(&route).is_none(), "{route:?} was tracked");
    }
    assert_eq!(breaker.snapshot_at(now), before);
}

#[test]
fn junk_routes_at_rest_make_room_for_later_routes() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    // Junk model names answered 404 (ignored) fill the table.
    fill(&breaker, t0, &[Outcome::Ignored]);
    let mut evicted = BTreeSet::new();
    for i in 0..100 {
        let gone = makes_room(&breaker, &real(i), t0);
        assert!(gone.model.starts_with("junk-"), "{gone:?}");
        assert!(evicted.insert(gone));
        // The real route is served: busy for the next second, so it is not the
        // next one to go.
        call(&breaker, &real(i), t0, Outcome::Success);
    }
    let snapshot = breaker.snapshot_at(t0);
    assert_eq!(snapshot.len(), FULL);
    assert_eq!(
        snapshot
            .iter()
            .filter(|k| k.route.model.starts_with("real-"))
            .count(),
        100
    );
    // A route tracked this way is protected like any other: five failures open it.
    let route = real(7);
    for _ in 0..5 {
        call(&breaker, &route, t0, server_error());
    }
    assert_eq!(breaker.state(&route), BreakerState::Open);
    assert!(breaker.admit_at(&route, t0).is_err());
    // An evicted route that comes back gets a fresh key, in the place of another.
    let back = evicted.first().unwrap().clone();
    makes_room(&breaker, &back, t0);
    let key = breaker.key(&back).unwrap();
    assert_eq!((key.window_calls, key.window_failures), (0, 0));
    assert_eq!(key.last_reason, None);
}

#[test]
fn a_key_that_served_within_the_last_second_is_kept_until_the_second_is_over() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    fill(&breaker, t0, &[Outcome::Success]);
    no_room(&breaker, 20, t0 + secs(1) - Duration::from_nanos(1));
    // The successes are forgotten with the key: the new one starts empty.
    let gone = makes_room(&breaker, &real(0), t0 + secs(1));
    assert!(breaker.key(&gone).is_none());
}

#[test]
fn a_key_with_a_failure_in_its_window_is_kept_until_the_failure_leaves_it() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    // A failure, then a success that ends the run: only the window holds the failure.
    fill(&breaker, t0, &[server_error(), Outcome::Success]);
    let sample = breaker.key(&junk(0)).unwrap();
    assert_eq!(sample.consecutive_failures, 0);
    assert_eq!((sample.window_calls, sample.window_failures), (2, 1));
    no_room(&breaker, 20, t0 + secs(2));
    // The 30 s window in 3 s buckets: the failure's bucket leaves it at 30 s.
    no_room(&breaker, 20, t0 + secs(30) - Duration::from_nanos(1));
    makes_room(&breaker, &real(0), t0 + secs(30));
}

#[test]
fn failures_in_a_row_keep_a_key_until_it_has_been_idle_for_the_horizon() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    fill(&breaker, t0, &[server_error()]);
    let sample = breaker.key(&junk(0)).unwrap();
    assert_eq!(sample.consecutive_failures, 1);
    // The failure has left the 30 s window, but the run of failures is kept...
    let left = t0 + secs(31);
    assert_eq!(breaker.snapshot_at(left)[0].window_failures, 0);
    no_room(&breaker, 20, left);
    // ...until the key has had no outcome for the idle horizon: the longer of the
    // window (30 s) and `max_open_duration` (60 s).
    assert_eq!(BreakerConfig::default().idle_horizon(), secs(60));
    no_room(&breaker, 20, t0 + secs(60) - Duration::from_nanos(1));
    makes_room(&breaker, &real(0), t0 + secs(60));
}

#[test]
fn a_success_that_ends_a_run_of_failures_puts_the_key_at_rest_a_second_later() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    fill(&breaker, t0, &[server_error()]);
    // A success on every key ends its run, after the failure left the window.
    let later = t0 + secs(40);
    for i in 0..FULL {
        call(&breaker, &junk(i), later, Outcome::Success);
    }
    assert_eq!(breaker.key(&junk(0)).unwrap().consecutive_failures, 0);
    // Served within the last second (and just now: not idle either).
    no_room(&breaker, 20, later + secs(1) - Duration::from_nanos(1));
    makes_room(&breaker, &real(0), later + secs(1));
}

#[test]
fn an_open_key_is_kept_until_its_cooldown_is_over() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    fill(&breaker, t0, &[Outcome::QuotaExhausted { hint: None }]);
    assert_eq!(breaker.snapshot_at(t0)[0].state, BreakerState::Open);
    no_room(&breaker, 20, t0 + secs(1));
    // Idle far longer than the horizon, but open until the quota cooldown (10 min)
    // is over: what the provider said still holds.
    let over = t0 + secs(600);
    no_room(&breaker, 20, over - Duration::from_nanos(1));
    // Over, with nobody calling: half-open, and forgotten when room is needed.
    assert_eq!(breaker.snapshot_at(over)[0].state, BreakerState::HalfOpen);
    makes_room(&breaker, &real(0), over);
}

#[test]
fn a_key_at_rest_goes_before_a_stale_one() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    // Even keys at rest (answered 404), odd ones stale by t0 + 120 s (one failure).
    for i in 0..FULL {
        let outcome = if i % 2 == 0 {
            Outcome::Ignored
        } else {
            server_error()
        };
        call(&breaker, &junk(i), t0, outcome);
    }
    let now = t0 + secs(120);
    // 50 new routes: each shard holds about 32 keys at rest (512 over 16), and gets
    // about 3 of the new routes. That some shard gets more new routes than it holds
    // keys at rest (which would let a stale key go) has a chance of 5.8 × 10^-8
    // (the two binomials, summed over the 16 shards).
    for i in 0..50 {
        let gone = makes_room(&breaker, &real(i), now);
        let n: usize = gone.model.trim_start_matches("junk-").parse().unwrap();
        assert_eq!(n % 2, 0, "a stale key went first: {gone:?}");
        // Served: busy for the next second, so not at rest itself.
        call(&breaker, &real(i), now, Outcome::Success);
    }
}

#[test]
fn a_paced_key_is_kept_until_its_pace_would_lift() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    // A success, then one after a 429: the key is paced at what it served.
    fill(
        &breaker,
        t0,
        &[Outcome::Success, Outcome::SuccessAfterSlowDown],
    );
    let sample = breaker.key(&junk(0)).unwrap();
    assert!(sample.pace_per_s.is_some());
    assert_eq!(
        (sample.consecutive_failures, sample.window_failures),
        (0, 0)
    );
    no_room(&breaker, 20, t0 + secs(2));
    no_room(&breaker, 20, t0 + secs(30) - Duration::from_nanos(1));
    // A whole 30 s window without a signal: the next admission would lift the pace.
    makes_room(&breaker, &real(0), t0 + secs(30));
}

#[test]
fn a_key_with_a_call_in_flight_is_kept_until_the_call_ends() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    let permits: Vec<BreakerPermit> = (0..FULL)
        .map(|i| breaker.admit_at(&junk(i), t0).unwrap())
        .collect();
    assert_eq!(breaker.snapshot_at(t0).len(), FULL);
    // Nothing but the permits keeps the keys.
    no_room(&breaker, 20, t0 + secs(3600));
    // Cancelled calls give their keys back (a closed key counts nothing for them).
    drop(permits);
    makes_room(&breaker, &real(0), t0 + secs(3600));
}

#[test]
fn a_key_whose_pace_a_retrying_call_still_holds_is_kept_until_the_call_lets_go() {
    let breaker = breaker(FULL);
    let t0 = Instant::now();
    fill(
        &breaker,
        t0,
        &[Outcome::Success, Outcome::SuccessAfterSlowDown],
    );
    // A call admitted while paced hands its pace to the retry layer, which may hold
    // it after the call's outcome is recorded.
    let admitted = t0 + secs(2);
    let handles: Vec<_> = (0..FULL)
        .map(|i| {
            let permit = breaker.admit_at(&junk(i), admitted).unwrap();
            let handle = permit.pace().expect("admitted while paced");
            permit.record_at(Outcome::Success, admitted);
            handle
        })
        .collect();
    // Long after the pace would lift, the handles still hold the keys.
    let later = t0 + secs(3600);
    no_room(&breaker, 20, later);
    drop(handles);
    makes_room(&breaker, &real(0), later);
}

#[test]
fn with_no_key_at_rest_anywhere_new_routes_pass_untracked() {
    // Few keys, of every kind that is kept: wherever they fall, none can go.
    let breaker = breaker(8);
    let t0 = Instant::now();
    let kinds: [&[Outcome]; 4] = [
        &[server_error(), Outcome::Success],
        &[server_error()],
        &[Outcome::QuotaExhausted { hint: None }],
        &[Outcome::Success, Outcome::SuccessAfterSlowDown],
    ];
    for (i, outcomes) in kinds.iter().enumerate() {
        for outcome in *outcomes {
            call(&breaker, &junk(i), t0, *outcome);
        }
    }
    let held: Vec<_> = (4..8)
        .map(|i| breaker.admit_at(&junk(i), t0).unwrap())
        .collect();
    let now = t0 + secs(2);
    let before = breaker.snapshot_at(now);
    assert_eq!(before.len(), 8);
    for i in 0..200 {
        let route = real(i);
        for _ in 0..10 {
            // Never refused: untracked.
            call(&breaker, &route, now, server_error());
        }
        assert!(breaker.key(&route).is_none());
    }
    assert_eq!(breaker.snapshot_at(now), before);
    drop(held);
}
