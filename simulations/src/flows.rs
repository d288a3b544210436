//! The relay's flow table: which client address owns which upstream-facing socket,
//! when each was last active, and the bound on how many there may be.
//!
//! Generic over the flow value so the rules (admission, idle expiry, counters) are
//! tested without sockets; the relay driver stores its sockets and receive tasks here
//! and passes the clock in.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

struct Entry<F> {
    flow: F,
    last_seen: Instant,
}

/// Flows keyed by client, bounded in number, expiring after `idle` without traffic.
pub struct FlowTable<K, F> {
    flows: HashMap<K, Entry<F>>,
    max: usize,
    idle: Duration,
    created: u64,
    expired: u64,
}

impl<K: Eq + Hash + Clone, F> FlowTable<K, F> {
    /// A table of at most `max` flows that expire after `idle` without traffic.
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            flows: HashMap::new(),
            max,
            idle,
            created: 0,
            expired: 0,
        }
    }

    /// The flow of `key`, marking it active at `now`.
    pub fn touch(&mut self, now: Instant, key: &K) -> Option<&F> {
        let entry = self.flows.get_mut(key)?;
        entry.last_seen = entry.last_seen.max(now);
        Some(&entry.flow)
    }

    /// The flow of `key`, without marking it active.
    pub fn get(&self, key: &K) -> Option<&F> {
        self.flows.get(key).map(|e| &e.flow)
    }

    /// True if a new flow would be admitted.
    pub fn has_room(&self) -> bool {
        self.flows.len() < self.max
    }

    /// Adds a flow for `key`, active at `now`; gives it back if the table is full.
    /// Replaces (and returns through `Ok(Some)`) an existing flow of the same key.
    pub fn insert(&mut self, now: Instant, key: K, flow: F) -> Result<Option<F>, F> {
        if !self.flows.contains_key(&key) && !self.has_room() {
            return Err(flow);
        }
        self.created = self.created.saturating_add(1);
        let old = self.flows.insert(
            key,
            Entry {
                flow,
                last_seen: now,
            },
        );
        Ok(old.map(|e| e.flow))
    }

    /// Removes and returns the flows idle for `idle` or longer at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, F)> {
        let idle = self.idle;
        let stale: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        let removed: Vec<(K, F)> = stale
            .into_iter()
            .filter_map(|k| self.flows.remove(&k).map(|e| (k, e.flow)))
            .collect();
        self.expired = self.expired.saturating_add(removed.len() as u64);
        removed
    }

    /// Removes every flow (on shutdown).
    pub fn clear(&mut self) {
        self.flows.clear();
    }

    /// Flows currently open.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True if no flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Flows opened since the start.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// Flows closed for idleness since the start.
    pub fn expired(&self) -> u64 {
        self.expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_max() {
        let now = Instant::now();
        let mut table = FlowTable::new(2, Duration::from_secs(1));
        assert!(matches!(table.insert(now, 1, "a"), Ok(None)));
        assert!(matches!(table.insert(now, 2, "b"), Ok(None)));
        assert!(!table.has_room());
        assert_eq!(table.insert(now, 3, "c"), Err("c"));
        assert_eq!(table.insert(now, 2, "b2"), Ok(Some("b")));
        assert_eq!(table.get(&2), Some(&"b2"));
        assert_eq!(table.len(), 2);
        assert_eq!(table.created(), 3);
    }

    #[test]
    fn idle_flows_expire_and_active_ones_stay() {
        let start = Instant::now();
        let idle = Duration::from_secs(10);
        let mut table = FlowTable::new(10, idle);
        for key in 0..3 {
            assert!(table.insert(start, key, key * 10).is_ok());
        }
        assert_eq!(table.touch(start + Duration::from_secs(8), &1), Some(&10));
        assert!(table.expire(start + Duration::from_secs(9)).is_empty());
        let mut gone = table.expire(start + idle);
        gone.sort_unstable();
        assert_eq!(gone, vec![(0, 0), (2, 20)]);
        assert_eq!(table.get(&1), Some(&10));
        assert_eq!(table.expired(), 2);
        assert_eq!(table.expire(start + Duration::from_secs(18)), vec![(1, 10)]);
        assert!(table.is_empty());
        assert!(table.has_room());
    }

    #[test]
    fn touch_never_moves_backwards() {
        let start = Instant::now();
        let mut table = FlowTable::new(1, Duration::from_secs(1));
        assert!(table.insert(start + Duration::from_secs(5), 1, ()).is_ok());
        table.touch(start, &1);
        assert!(table.expire(start + Duration::from_millis(5500)).is_empty());
        assert_eq!(table.touch(start, &2), None);
    }
}
