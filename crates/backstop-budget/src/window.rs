//! A sliding window as a ring of time slots, updated with atomics only.
//!
//! Both the windowed budget and the adaptive throttle count events "over the last
//! window". Like Finagle's and tower's budgets, the window is cut into
//! [`SLOTS`] slots; an event lands in the slot of the tick it happened in and leaves
//! the window when that slot is reused `SLOTS` ticks later. So an event stays in the
//! window for between `window − window/SLOTS` and `window`.
//!
//! Each slot is one `AtomicU64` holding the tick it belongs to (32 bits) and a signed
//! 32-bit value. Packing both in one word is what makes the ring exact without a
//! lock: a writer that finds a slot still holding an older tick replaces tick and
//! value in one compare-and-swap, so exactly one thread ever takes an expired value
//! out of the window, and no update for the new tick can be lost to a late reset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How many slots a window is cut into (the granularity of expiry).
pub(crate) const SLOTS: usize = 10;

/// Maps instants to tick numbers: tick `n` covers `[origin + n·slot, origin + (n+1)·slot)`.
///
/// Remembers the last tick it computed: a 64-bit division costs more than the rest
/// of a deposit, and nearly every call falls in the same slot as the one before.
#[derive(Debug)]
pub(crate) struct Ticker {
    origin: Instant,
    slot_nanos: u64,
    /// Some recently computed tick. Any value is safe: it is used only after
    /// checking that `now` falls inside it.
    recent: AtomicU64,
}

impl Ticker {
    /// A ticker for a window of `window`, starting at `origin`.
    ///
    /// `window` must be at least [`SLOTS`] nanoseconds (the configs enforce far more).
    pub(crate) fn new(origin: Instant, window: Duration) -> Self {
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Ticker {
            origin,
            slot_nanos: (nanos / SLOTS as u64).max(1),
            recent: AtomicU64::new(0),
        }
    }

    /// The tick `now` falls in; instants before the origin count as tick 0.
    pub(crate) fn tick(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let recent = self.recent.load(Ordering::Relaxed);
        let start = recent.saturating_mul(self.slot_nanos);
        if nanos >= start && nanos - start < self.slot_nanos {
            return recent;
        }
        let tick = nanos / self.slot_nanos;
        self.recent.store(tick, Ordering::Relaxed);
        tick
    }
}

fn pack(tag: u32, value: i32) -> u64 {
    (u64::from(tag) << 32) | u64::from(value as u32)
}

fn unpack(word: u64) -> (u32, i32) {
    ((word >> 32) as u32, word as u32 as i32)
}

/// How many ticks `tag` lies behind `tick`; negative when the slot was written for a
/// later tick than `tick` (a concurrent writer that read the clock after us).
fn age(tick: u64, tag: u32) -> i64 {
    i64::from((tick as u32).wrapping_sub(tag) as i32)
}

fn saturating_value(sum: i64) -> i32 {
    sum.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Overflow {
    Saturate,
    Refuse,
}

/// The ring of slots. Values are in whatever unit the owner chooses (milli-tokens,
/// request counts); they saturate at ±2³¹ per slot.
#[derive(Debug)]
pub(crate) struct SlotRing {
    slots: [AtomicU64; SLOTS],
    /// The latest tick for which every expired slot has been cleared.
    swept: AtomicU64,
}

impl SlotRing {
    pub(crate) fn new() -> Self {
        SlotRing {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            swept: AtomicU64::new(0),
        }
    }

    /// Clears every slot that has left the window at `tick` and returns the sum of
    /// the values cleared (so an owner keeping a running total can subtract it).
    ///
    /// Cheap when nothing expired: one load, no write.
    pub(crate) fn expire(&self, tick: u64) -> i64 {
        if self.swept.load(Ordering::Acquire) >= tick {
            return 0;
        }
        let mut expired = 0i64;
        for slot in &self.slots {
            let mut word = slot.load(Ordering::Acquire);
            loop {
                let (tag, value) = unpack(word);
                if value == 0 || age(tick, tag) < SLOTS as i64 {
                    break;
                }
                match slot.compare_exchange_weak(
                    word,
                    pack(tag, 0),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        expired += i64::from(value);
                        break;
                    }
                    Err(current) => word = current,
                }
            }
        }
        // Published only once the sweep is done, so a thread that sees `tick` here
        // knows no expired value for `tick` is left in the ring.
        self.swept.fetch_max(tick, Ordering::AcqRel);
        expired
    }

    /// Adds `amount` to the slot of `tick` and returns by how much the window's total
    /// changed: `amount`, less what saturation cut off, less the value displaced if
    /// the slot still held an expired tick (nothing is displaced when
    /// [`SlotRing::expire`] ran for `tick` first, as every caller does, except for a
    /// writer that stalled for a whole window between reading the clock and writing).
    /// An owner keeping a running total adds this, so the total stays exactly the
    /// ring's sum.
    pub(crate) fn add(&self, tick: u64, amount: i64) -> i64 {
        self.update(tick, amount, Overflow::Saturate)
            .unwrap_or_default()
    }

    /// Like [`SlotRing::add`], but changes nothing and returns `None` when the slot
    /// cannot hold the whole `amount` (for withdrawals: a partly recorded withdrawal
    /// would be a partly free retry).
    pub(crate) fn try_add(&self, tick: u64, amount: i64) -> Option<i64> {
        self.update(tick, amount, Overflow::Refuse)
    }

    /// Takes `amount` back out of the slot of `tick` (a refund of an event recorded
    /// there), and returns whether it did. Only when the slot still belongs to `tick`
    /// and holds at least `amount`: an event that has left the window (its slot was
    /// cleared or reused) no longer counts and is not taken back, so a refund never
    /// takes out more than the window holds. The caller names an event it recorded
    /// itself and has not taken back before (values are per-slot sums: the ring cannot
    /// tell one event from another).
    pub(crate) fn take_back(&self, tick: u64, amount: i64) -> bool {
        let slot = &self.slots[(tick % SLOTS as u64) as usize];
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (tag, value) = unpack(word);
            if tag != tick as u32 || i64::from(value) < amount {
                return false;
            }
            // In range: `value - amount` lies between 0 and `value`.
            let new = (i64::from(value) - amount) as i32;
            match slot.compare_exchange_weak(
                word,
                pack(tag, new),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(current) => word = current,
            }
        }
    }

    fn update(&self, tick: u64, amount: i64, overflow: Overflow) -> Option<i64> {
        let slot = &self.slots[(tick % SLOTS as u64) as usize];
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (tag, value) = unpack(word);
            // Same tick, or a later one written by a thread that read the clock after
            // us: our event joins it (it then expires slightly late). An older tick
            // has expired: our event replaces it.
            let (tag, base) = if age(tick, tag) <= 0 {
                (tag, i64::from(value))
            } else {
                (tick as u32, 0)
            };
            let wanted = base + amount;
            let new = saturating_value(wanted);
            if overflow == Overflow::Refuse && i64::from(new) != wanted {
                return None;
            }
            let change = i64::from(new) - i64::from(value);
            match slot.compare_exchange_weak(
                word,
                pack(tag, new),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(change),
                Err(current) => word = current,
            }
        }
    }

    /// The sum of the values still in the window at `tick`.
    pub(crate) fn sum(&self, tick: u64) -> i64 {
        self.slots
            .iter()
            .map(|slot| unpack(slot.load(Ordering::Acquire)))
            .filter(|&(tag, _)| age(tick, tag) < SLOTS as i64)
            .map(|(_, value)| i64::from(value))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_in_the_window_for_exactly_slots_ticks() {
        let ring = SlotRing::new();
        assert_eq!(ring.add(3, 5), 5);
        for tick in 3..3 + SLOTS as u64 {
            assert_eq!(ring.expire(tick), 0, "tick {tick}");
            assert_eq!(ring.sum(tick), 5, "tick {tick}");
        }
        let leaving = 3 + SLOTS as u64;
        assert_eq!(ring.sum(leaving), 0);
        assert_eq!(ring.expire(leaving), 5);
        assert_eq!(
            ring.expire(leaving),
            0,
            "an expired value is taken out once"
        );
    }

    #[test]
    fn values_in_one_slot_add_up_and_saturate() {
        let ring = SlotRing::new();
        ring.add(0, 7);
        ring.add(0, -2);
        assert_eq!(ring.sum(0), 5);
        assert_eq!(
            ring.add(1, i64::from(i32::MAX) - 3),
            i64::from(i32::MAX) - 3
        );
        assert_eq!(ring.add(1, 10), 3, "only what fits is reported as added");
        assert_eq!(ring.sum(1), 5 + i64::from(i32::MAX));
    }

    #[test]
    fn try_add_refuses_what_a_slot_cannot_hold_whole() {
        let ring = SlotRing::new();
        assert_eq!(
            ring.try_add(0, i64::from(i32::MIN) + 5),
            Some(i64::from(i32::MIN) + 5)
        );
        assert_eq!(ring.try_add(0, -6), None);
        assert_eq!(ring.sum(0), i64::from(i32::MIN) + 5, "left unchanged");
        assert_eq!(ring.try_add(0, -5), Some(-5));
    }

    #[test]
    fn a_writer_on_an_unswept_slot_takes_the_expired_value_out() {
        let ring = SlotRing::new();
        ring.add(2, 4);
        // Same slot index a whole window later, without expire() first.
        assert_eq!(ring.add(2 + SLOTS as u64, 1), 1 - 4);
        assert_eq!(ring.sum(2 + SLOTS as u64), 1);
        assert_eq!(ring.expire(2 + SLOTS as u64), 0);
    }

    #[test]
    fn a_later_tick_in_a_slot_is_not_expired_by_an_earlier_reader() {
        let ring = SlotRing::new();
        ring.add(12, 3);
        // A thread that read the clock at tick 11 must neither expire nor drop it.
        assert_eq!(ring.expire(11), 0);
        assert_eq!(ring.sum(11), 3);
        assert_eq!(ring.add(2, 1), 1, "joins the later tick's slot");
        assert_eq!(ring.sum(12), 4);
    }

    #[test]
    fn take_back_removes_only_what_its_slot_still_holds() {
        let ring = SlotRing::new();
        ring.add(4, 3000);
        assert!(ring.take_back(4, 1000));
        assert_eq!(ring.sum(4), 2000);
        assert!(!ring.take_back(4, 2001), "more than the slot holds");
        assert!(!ring.take_back(5, 1000), "another tick's slot");
        assert!(
            !ring.take_back(4 + SLOTS as u64, 1000),
            "the same slot index, a window later"
        );
        assert_eq!(ring.sum(4), 2000, "refusals change nothing");
        // Once the slot's tick has left the window, nothing of it is taken back.
        assert_eq!(ring.expire(4 + SLOTS as u64), 2000);
        assert!(!ring.take_back(4, 1000));
        ring.add(4 + SLOTS as u64, 1000);
        assert!(
            !ring.take_back(4, 1000),
            "the slot now belongs to a later tick"
        );
        assert_eq!(ring.sum(4 + SLOTS as u64), 1000);
    }

    #[test]
    fn a_long_idle_gap_expires_everything() {
        let ring = SlotRing::new();
        for tick in 0..SLOTS as u64 {
            ring.add(tick, 1);
        }
        assert_eq!(ring.expire(1_000_000), SLOTS as i64);
        assert_eq!(ring.sum(1_000_000), 0);
    }

    #[test]
    fn ticker_cuts_the_window_into_equal_slots() {
        let origin = Instant::now();
        let ticker = Ticker::new(origin, Duration::from_secs(10));
        assert_eq!(ticker.tick(origin), 0);
        assert_eq!(ticker.tick(origin + Duration::from_millis(999)), 0);
        assert_eq!(ticker.tick(origin + Duration::from_millis(1000)), 1);
        assert_eq!(ticker.tick(origin + Duration::from_secs(25)), 25);
        // The remembered tick never answers for an instant outside it.
        assert_eq!(ticker.tick(origin + Duration::from_millis(24_999)), 24);
        assert_eq!(ticker.tick(origin + Duration::from_millis(25_000)), 25);
        assert_eq!(ticker.tick(origin), 0);
    }
}
