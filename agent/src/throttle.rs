//! Throttled reports: at most one log line per (reason, who) per interval, carrying how many
//! like it were held back, so a flood of refusals stays visible without flooding the log.
//!
//! ```text
//!  refusal ──▶ Throttle::admit(reason, who, now) ──Some(held_back)──▶ warn!(…, held_back)
//!                                               └─None (counted for the next line)
//! ```
//!
//! Memory is bounded: at most [`MAX_KEYS`] (reason, who) pairs are tracked; past that, further
//! identities share one overflow entry per reason.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Most (reason, who) pairs tracked at once.
pub const MAX_KEYS: usize = 4096;
/// The `who` of the overflow entry once [`MAX_KEYS`] is reached.
pub const OVERFLOW: &str = "(many)";
/// The default interval between two lines for the same (reason, who).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Entry {
    last: Instant,
    held_back: u64,
}

/// One line per (reason, who) per interval.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    entries: Mutex<HashMap<(&'static str, String), Entry>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

impl Throttle {
    /// A throttle letting one line per (reason, who) through every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to log an event of `reason` about `who` at `now`: `Some(n)` to log it now (with
    /// `n` like events held back since the last line), `None` to hold it back.
    pub fn admit(&self, reason: &'static str, who: &str, now: Instant) -> Option<u64> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut key = (reason, who.to_owned());
        if entries.len() >= MAX_KEYS && !entries.contains_key(&key) {
            let interval = self.interval;
            entries.retain(|_, e| now.saturating_duration_since(e.last) < interval);
            if entries.len() >= MAX_KEYS {
                key.1 = OVERFLOW.to_owned();
            }
        }
        match entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut slot) => {
                let e = slot.get_mut();
                if now.saturating_duration_since(e.last) < self.interval {
                    e.held_back += 1;
                    return None;
                }
                e.last = now;
                Some(std::mem::take(&mut e.held_back))
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Entry {
                    last: now,
                    held_back: 0,
                });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_and_identity_per_interval() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit("no_link", "a/n1", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                t.admit("no_link", "a/n1", t0 + Duration::from_secs(i)),
                None
            );
        }
        assert_eq!(
            t.admit("no_link", "b/n1", t0),
            Some(0),
            "another identity has its own line"
        );
        assert_eq!(
            t.admit("bad_header", "a/n1", t0),
            Some(0),
            "another reason has its own line"
        );
        assert_eq!(
            t.admit("no_link", "a/n1", t0 + Duration::from_secs(10)),
            Some(5),
            "the next line carries what was held back"
        );
        assert_eq!(
            t.admit("no_link", "a/n1", t0 + Duration::from_secs(11)),
            None
        );
    }

    #[test]
    fn memory_is_bounded_by_an_overflow_entry() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            assert_eq!(t.admit("flood", &format!("id-{i}"), t0), Some(0));
        }
        assert_eq!(
            t.admit("flood", "one-more", t0),
            Some(0),
            "the first overflowing identity opens the overflow line"
        );
        assert_eq!(t.admit("flood", "and-another", t0), None);
        assert!(t.entries.lock().unwrap().len() <= MAX_KEYS + 1);
        // Once the old entries have aged out, new identities get their own lines again.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(t.admit("flood", "fresh", later), Some(0));
        assert!(t.entries.lock().unwrap().len() <= 2);
    }
}
