//! Where the per-key states live: a small trait, and the in-process default.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use backstop_classify::{ModelRoute, PaceHandle, UpstreamPace};
use tokio::time::Instant;

use crate::{
    BreakerConfig, ConfigError, KeySnapshot, KeyState, Outcome, PacedSlot, Rejection, Transition,
};

/// The callback a store reports each state change to (the [`Breaker`](crate::Breaker)
/// turns them into tracing events and metrics).
pub type TransitionSink<'a> = &'a mut dyn FnMut(&ModelRoute, Transition);

/// Keeps the breaker state of every key.
///
/// The default, [`InProcessStore`], keeps it in this process. A store shared across
/// processes (so that N replicas do not each send their own probes and counts to a
/// model that is down) implements the same operations, typically by running
/// [`KeyState`] against a shared record.
pub trait BreakerStore: Send + Sync + 'static {
    /// What an admitted call holds until it records its outcome.
    type Permit: AdmittedCall;

    /// Asks to make one call to `route`. `clock` gives the current instant; call it
    /// only when the key's state needs the time (a closed key does not), as the hot
    /// path pays for every clock read.
    fn admit(
        &self,
        route: &ModelRoute,
        clock: &dyn Fn() -> Instant,
        emit: TransitionSink<'_>,
    ) -> Result<Self::Permit, Rejection>;

    /// [`BreakerStore::admit`] for a caller that gives up at `deadline`: a paced key
    /// books no slot the caller could not wait for. The default ignores the deadline.
    fn admit_before(
        &self,
        route: &ModelRoute,
        clock: &dyn Fn() -> Instant,
        deadline: Option<Instant>,
        emit: TransitionSink<'_>,
    ) -> Result<Self::Permit, Rejection> {
        let _ = deadline;
        self.admit(route, clock, emit)
    }

    /// Every key, as of `now`, sorted by route.
    fn snapshot(&self, now: Instant) -> Vec<KeySnapshot>;

    /// One key as of `now`, if it is known.
    fn key_snapshot(&self, route: &ModelRoute, now: Instant) -> Option<KeySnapshot>;
}

/// An admitted call's hold on its key. It records the call's outcome itself, so the
/// hot path needs no second lookup and no handle on the whole store.
///
/// Dropping it unrecorded (the call was cancelled) must release it: free a half-open
/// probe slot and count nothing.
pub trait AdmittedCall: Send + 'static {
    /// Records the outcome of the call, finished at `now`.
    fn record(self, outcome: Outcome, now: Instant, emit: TransitionSink<'_>);

    /// The key's pace, when the call was admitted while its key was paced (see
    /// [`PaceHandle`]). The default: none, so the call's retries are not paced.
    fn pace(&self) -> Option<PaceHandle> {
        None
    }
}

/// A keyed multiply-rotate hash for routes (the constant is rustc-hash's): a few
/// nanoseconds where SipHash takes about 40 ns, on a path that runs for every call.
/// It is not flood-resistant like SipHash; a collision only costs a route comparison,
/// the number of keys is capped by `max_keys`, and the per-store random seed keeps
/// collisions from being predictable.
#[derive(Clone, Copy, Debug)]
struct RouteHashing {
    seed: u64,
}

impl BuildHasher for RouteHashing {
    type Hasher = RouteHasher;

    fn build_hasher(&self) -> RouteHasher {
        RouteHasher(self.seed)
    }
}

struct RouteHasher(u64);

impl RouteHasher {
    const K: u64 = 0xf135_7aea_2e62_a9c5;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for RouteHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        // The tail as one word from whole-width reads (a partial copy into a zeroed
        // buffer stalls store forwarding), tagged with its length.
        let tail = match rest.len() {
            0 => return,
            1..=3 => {
                u64::from(rest[0])
                    | u64::from(rest[rest.len() / 2]) << 8
                    | u64::from(rest[rest.len() - 1]) << 16
            }
            n => {
                let mut lo = [0u8; 4];
                let mut hi = [0u8; 4];
                lo.copy_from_slice(&rest[..4]);
                hi.copy_from_slice(&rest[n - 4..]);
                u64::from(u32::from_le_bytes(lo)) | u64::from(u32::from_le_bytes(hi)) << 32
            }
        };
        self.add(tail ^ ((rest.len() as u64) << 59));
    }

    // The derived `Hash` of a route writes each string's bytes, a 0xff terminator and
    // the credential's discriminant: take the small ones as words directly.
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn write_isize(&mut self, i: isize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // One more round so the high bits (which pick the shard) depend on every word.
        let h = (self.0 ^ (self.0 >> 31)).wrapping_mul(Self::K);
        h ^ (h >> 29)
    }
}

/// Route equality with a pointer fast path: the fallback layer clones its routes'
/// `Arc<str>`s from its configuration, so the strings are usually the same
/// allocation (std's `Arc` pointer shortcut does not apply to `str`).
fn same_route(a: &ModelRoute, b: &ModelRoute) -> bool {
    fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
        Arc::ptr_eq(a, b) || a == b
    }
    same(&a.model, &b.model)
        && same(&a.upstream, &b.upstream)
        && match (&a.credential, &b.credential) {
            (None, None) => true,
            (Some(a), Some(b)) => same(a, b),
            _ => false,
        }
}

/// Enough shards that two threads working on different keys rarely share a lock.
const SHARDS: usize = 16;

/// One shard of the key map: cells sorted by the route's hash, so a lookup hashes
/// the route once (for the shard and the search alike) and compares routes only on
/// a hash match.
type Shard = RwLock<Vec<(u64, Arc<KeyCell>)>>;

struct KeyCell {
    route: ModelRoute,
    /// The store's configuration, shared read-only, so a permit can record and
    /// release through its cell alone.
    config: Arc<BreakerConfig>,
    state: Mutex<KeyState>,
}

impl KeyCell {
    fn with_state<R>(&self, f: impl FnOnce(&mut KeyState) -> R) -> R {
        // No code panics while holding the lock; if some did, the state is still a
        // valid state machine, so keep using it.
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    /// Runs `f` on the state and reports its transitions to `emit` once the lock is
    /// released: a tracing subscriber or metrics recorder that is slow, or that reads
    /// the breaker, never runs under the key's lock.
    fn change<R>(
        &self,
        emit: TransitionSink<'_>,
        f: impl FnOnce(&mut KeyState, &mut dyn FnMut(Transition)) -> R,
    ) -> R {
        // Transitions are rare: the buffer allocates only when one happens.
        let mut pending = Vec::new();
        let result = self.with_state(|s| f(s, &mut |t| pending.push(t)));
        for transition in pending {
            emit(&self.route, transition);
        }
        result
    }
}

/// The in-process store: a sharded map from route to a mutex-guarded [`KeyState`].
///
/// The closed-state hot path hashes the route once, takes a shard's read lock for a
/// binary search and the key's mutex to admit, and only the key's mutex to record;
/// it allocates nothing. At most [`BreakerConfig::max_keys`] keys are tracked; calls
/// for a route with a name longer than [`MAX_KEY_NAME_BYTES`] pass untracked.
///
/// # A full table
///
/// Keys are spread over 16 shards by a hash seeded per store. Once `max_keys` keys
/// are tracked, a call for a new route makes room by forgetting (evicting) a key
/// **at rest** in the shard the new key goes into: one that no call holds (no permit
/// outstanding, no paced call's retries holding its pace) and whose state is
/// [at rest](KeyState::is_at_rest): closed, no failure in its window, none in a row,
/// no probe, nothing served in the last second, no pace that would not lift. Such
/// a key knows nothing a key created afresh would not, except its successes: if its
/// route comes back, it starts with an empty window (the failure ratio counts from
/// there). So routes a caller made up once (junk model names, answered 404 or
/// served) cannot keep later routes from being tracked. The key forgotten is the
/// first at rest in the shard's order (by the seeded hash, so not one an outsider
/// can pick), not the one idle longest: finding that would scan the whole shard
/// under its write lock, which blocks the shard's lookups, for every new route
/// once the table is full, where the first found usually ends the scan early;
/// and which key at rest goes changes only whose successes are forgotten. The
/// search looks at the keys of that one shard (about `max_keys / 16` at most) and
/// happens only when the table is full and the route is new; a call for a tracked
/// key does no extra work.
///
/// When no key in the shard is at rest, the first **stale** one goes
/// ([`KeyState::is_stale`]): no outcome for the idle horizon (the longer of `window`
/// and `max_open_duration`, 60 s by default), no probe or call in flight, and no
/// open period still running. Such a key's failures in a row, pace or half-open
/// state describe its route as it was a minute or more ago; forgotten, the route
/// starts closed if it comes back, and a down upstream opens it again by the
/// counting rules. So junk routes that fail (answered 5xx, timing out, opened by a
/// quota) make room too, once idle for the horizon and past their open period.
///
/// When no key in the shard is either (every one is open, half-open with a probe,
/// has a call in flight, or has had an outcome within the horizon and is not at
/// rest), the call passes untracked as before, and the first time this happens a
/// warning is logged. An evicted key is no longer listed by
/// [`BreakerStore::snapshot`] or found by [`BreakerStore::key_snapshot`]; its state
/// gauge keeps its last value (see [`events`](crate::events)).
pub struct InProcessStore {
    config: Arc<BreakerConfig>,
    shards: Box<[Shard]>,
    route_hashing: RouteHashing,
    keys: AtomicUsize,
    overflow_warned: AtomicBool,
    overlong_warned: AtomicBool,
}

/// The longest upstream, model or credential label a key is made for. A model name
/// can come from the caller's request body (a request for a model no target is
/// configured for goes where the caller sent it, keyed by its name): without this
/// cap, `max_keys` junk names of megabytes each would be held for the life of the
/// process and printed in every event and metric of their keys. Real names are
/// under a hundred bytes; a host name is at most 253.
pub const MAX_KEY_NAME_BYTES: usize = 512;

/// Whether a key is made for `route` (see [`MAX_KEY_NAME_BYTES`]).
fn fits_a_key(route: &ModelRoute) -> bool {
    route.upstream.len() <= MAX_KEY_NAME_BYTES
        && route.model.len() <= MAX_KEY_NAME_BYTES
        && route
            .credential
            .as_ref()
            .is_none_or(|label| label.len() <= MAX_KEY_NAME_BYTES)
}

impl std::fmt::Debug for InProcessStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessStore")
            .field("config", &self.config)
            .field("keys", &self.keys.load(Ordering::Relaxed))
            .finish()
    }
}

/// An admitted call's hold on an [`InProcessStore`] key (released when dropped
/// unrecorded).
pub struct InProcessPermit {
    held: Option<(Arc<KeyCell>, crate::Ticket)>,
}

impl std::fmt::Debug for InProcessPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.held {
            Some((cell, ticket)) => f
                .debug_struct("InProcessPermit")
                .field("route", &cell.route)
                .field("ticket", ticket)
                .finish(),
            None => f.write_str("InProcessPermit(untracked)"),
        }
    }
}

impl InProcessStore {
    /// An empty store running `config`.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(InProcessStore {
            config: Arc::new(config),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            route_hashing: RouteHashing {
                seed: RandomState::new().hash_one(0x0062_7265_616b_6572_u64),
            },
            keys: AtomicUsize::new(0),
            overflow_warned: AtomicBool::new(false),
            overlong_warned: AtomicBool::new(false),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn shard(&self, hash: u64) -> &Shard {
        // The high bits pick the shard; the sort within it uses the whole hash.
        &self.shards[(hash >> 60) as usize % SHARDS]
    }

    fn find(cells: &[(u64, Arc<KeyCell>)], hash: u64, route: &ModelRoute) -> Result<usize, usize> {
        let start = cells.partition_point(|(h, _)| *h < hash);
        cells[start..]
            .iter()
            .take_while(|(h, _)| *h == hash)
            .position(|(_, cell)| same_route(&cell.route, route))
            .map(|i| start + i)
            .ok_or(start)
    }

    fn lookup(&self, route: &ModelRoute) -> Option<Arc<KeyCell>> {
        let hash = self.route_hashing.hash_one(route);
        let cells = self
            .shard(hash)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Self::find(&cells, hash, route)
            .ok()
            .map(|i| Arc::clone(&cells[i].1))
    }

    fn cell(&self, route: &ModelRoute, clock: &dyn Fn() -> Instant) -> Option<Arc<KeyCell>> {
        let hash = self.route_hashing.hash_one(route);
        let shard = self.shard(hash);
        {
            let cells = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Ok(i) = Self::find(&cells, hash, route) {
                return Some(Arc::clone(&cells[i].1));
            }
        }
        if !fits_a_key(route) {
            if !self.overlong_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_bytes = MAX_KEY_NAME_BYTES,
                    upstream = %backstop_classify::printed_name(&route.upstream),
                    model = %backstop_classify::printed_name(&route.model),
                    "circuit breaker key name too long; calls for it pass untracked"
                );
            }
            return None;
        }
        let mut cells = shard.write().unwrap_or_else(PoisonError::into_inner);
        let mut at = match Self::find(&cells, hash, route) {
            Ok(i) => return Some(Arc::clone(&cells[i].1)),
            Err(at) => at,
        };
        let mut evicted = None;
        let now = if self.keys.load(Ordering::Relaxed) >= self.config.max_keys {
            // Full: the new key takes the place of one at rest in this shard (one
            // out, one in, so the count stays), or passes untracked.
            let now = clock();
            // A key at rest first (it loses only successes), else a stale one.
            let Some((i, why)) = cells
                .iter_mut()
                .position(|(_, cell)| Self::evictable(cell, KeyState::is_at_rest, now))
                .map(|i| (i, "at rest"))
                .or_else(|| {
                    cells
                        .iter_mut()
                        .position(|(_, cell)| Self::evictable(cell, KeyState::is_stale, now))
                        .map(|i| (i, "stale"))
                })
            else {
                let first_time = !self.overflow_warned.swap(true, Ordering::Relaxed);
                // Log with no lock held: a subscriber may read the breaker.
                drop(cells);
                if first_time {
                    tracing::warn!(
                        max_keys = self.config.max_keys,
                        upstream = %backstop_classify::printed_name(&route.upstream),
                        model = %backstop_classify::printed_name(&route.model),
                        "circuit breaker key limit reached and no key at rest or stale to make room; calls for new keys pass untracked until one is (raise `max_keys`)"
                    );
                }
                return None;
            };
            evicted = Some((cells.remove(i).1, why));
            if i < at {
                at -= 1;
            }
            now
        } else {
            self.keys.fetch_add(1, Ordering::Relaxed);
            clock()
        };
        let cell = Arc::new(KeyCell {
            route: route.clone(),
            config: Arc::clone(&self.config),
            state: Mutex::new(KeyState::new(now, &self.config)),
        });
        cells.insert(at, (hash, Arc::clone(&cell)));
        drop(cells);
        // Events, and freeing the evicted key, with no lock held.
        if let Some((evicted, why)) = evicted {
            crate::events::evicted(&evicted.route, why);
        }
        crate::events::tracked(&cell.route);
        Some(cell)
    }

    /// Whether `cell` may make room for a new key at `now`: nobody but its shard
    /// holds it, and `forgettable` says yes of its state ([at
    /// rest](KeyState::is_at_rest) or [stale](KeyState::is_stale)).
    ///
    /// Every other holder of a cell (a permit, the pace handle of a call admitted
    /// while paced, a lookup for a snapshot) got its `Arc` by cloning the shard's
    /// under the shard's lock, or by cloning another holder's. Called with the
    /// shard's write lock held, a unique `Arc` therefore stays unique: no call is in
    /// flight on the key, none can start, and its state cannot change until the lock
    /// is released. `Arc::get_mut` reads the count with the ordering that makes the
    /// last holder's writes to the state visible, and the unique borrow reads the
    /// state without locking it.
    fn evictable(
        cell: &mut Arc<KeyCell>,
        forgettable: fn(&KeyState, Instant, &BreakerConfig) -> bool,
        now: Instant,
    ) -> bool {
        Arc::get_mut(cell).is_some_and(|cell| {
            forgettable(
                cell.state.get_mut().unwrap_or_else(PoisonError::into_inner),
                now,
                &cell.config,
            )
        })
    }
}

impl BreakerStore for InProcessStore {
    type Permit = InProcessPermit;

    fn admit(
        &self,
        route: &ModelRoute,
        clock: &dyn Fn() -> Instant,
        emit: TransitionSink<'_>,
    ) -> Result<InProcessPermit, Rejection> {
        self.admit_before(route, clock, None, emit)
    }

    fn admit_before(
        &self,
        route: &ModelRoute,
        clock: &dyn Fn() -> Instant,
        deadline: Option<Instant>,
        emit: TransitionSink<'_>,
    ) -> Result<InProcessPermit, Rejection> {
        let Some(cell) = self.cell(route, clock) else {
            return Ok(InProcessPermit { held: None });
        };
        let ticket = cell.change(emit, |s, emit| {
            s.admit_with_before(clock, deadline, &self.config, emit)
        })?;
        Ok(InProcessPermit {
            held: Some((cell, ticket)),
        })
    }

    fn snapshot(&self, now: Instant) -> Vec<KeySnapshot> {
        let mut all = Vec::with_capacity(self.keys.load(Ordering::Relaxed));
        for shard in self.shards.iter() {
            let cells = shard.read().unwrap_or_else(PoisonError::into_inner);
            all.extend(cells.iter().map(|(_, cell)| {
                cell.with_state(|s| KeySnapshot::of(&cell.route, s, now, &self.config))
            }));
        }
        all.sort_by(|a, b| a.route.cmp(&b.route));
        all
    }

    fn key_snapshot(&self, route: &ModelRoute, now: Instant) -> Option<KeySnapshot> {
        let cell = self.lookup(route)?;
        Some(cell.with_state(|s| KeySnapshot::of(&cell.route, s, now, &self.config)))
    }
}

impl AdmittedCall for InProcessPermit {
    fn pace(&self) -> Option<PaceHandle> {
        // Only a call admitted while paced carries the handle (an `Arc` clone and a
        // request extension): the unpaced hot path pays nothing for it.
        let (cell, ticket) = self.held.as_ref().filter(|(_, t)| t.is_paced())?;
        Some(PaceHandle(Arc::new(PacedCall {
            cell: Arc::clone(cell),
            generation: AtomicU32::new(ticket.paced_slot().generation()),
        })))
    }

    fn record(mut self, outcome: Outcome, now: Instant, emit: TransitionSink<'_>) {
        if let Some((cell, ticket)) = self.held.take() {
            cell.change(emit, |s, emit| {
                s.record(ticket, outcome, now, &cell.config, emit)
            });
        }
    }
}

/// A call admitted while its key was paced, as the retry layer reaches the pace.
struct PacedCall {
    cell: Arc<KeyCell>,
    /// The pace generation of the call's latest attempt: its admission's, then each
    /// retry's slot.
    generation: AtomicU32,
}

impl PacedCall {
    fn slot(&self) -> PacedSlot {
        PacedSlot::of(self.generation.load(Ordering::Relaxed))
    }
}

impl UpstreamPace for PacedCall {
    fn admit_retry(&self, now: Instant, deadline: Option<Instant>) -> Result<(), Duration> {
        let slot = self
            .cell
            .with_state(|s| s.admit_retry(now, deadline, &self.cell.config))?;
        self.generation.store(slot.generation(), Ordering::Relaxed);
        Ok(())
    }

    fn retry_due_in(&self, now: Instant) -> Duration {
        self.cell
            .with_state(|s| s.retry_due_in(now, &self.cell.config))
    }

    fn slowed_down(&self, now: Instant) {
        let slot = self.slot();
        self.cell
            .with_state(|s| s.attempt_slowed(slot, now, &self.cell.config));
    }
}

impl Drop for InProcessPermit {
    fn drop(&mut self) {
        // Only a probe holds something (its slot); a closed-state call releases nothing.
        if let Some((cell, ticket)) = self.held.take().filter(|(_, t)| t.is_probe()) {
            let now = Instant::now();
            cell.change(&mut crate::events::announce, |s, emit| {
                s.release(ticket, now, &cell.config, emit)
            });
        }
    }
}
