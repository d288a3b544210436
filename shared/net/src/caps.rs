//! Per-peer caps: how much of a shared pool one peer may hold at once.
//!
//! What it is: [`PeerCaps`] counts what each key holds (a verified SPIFFE
//! ID's connections or streams, a source address's handshakes in progress)
//! and hands out one [`PeerSlot`] per admitted unit, which gives the unit
//! back when dropped. A global semaphore bounds a pool; these caps stop one
//! peer from taking all of it, across as many connections as it opens.
//!
//! Who drives it: the hub gateway and the spoke's data tunnel, where they
//! accept connections and streams. What it must not do: block, wait, or
//! keep a key that holds nothing: the map holds only keys with at least one
//! slot out, so its size is bounded by the slots the caller's global limits
//! let out.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

/// A cap per key on units held at once. Cloning shares the counts.
pub struct PeerCaps<K: Hash + Eq + Clone> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    cap: usize,
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Clone for PeerCaps<K> {
    fn clone(&self) -> Self {
        PeerCaps {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> fmt::Debug for PeerCaps<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCaps")
            .field("cap", &self.inner.cap)
            .field("peers", &self.peers())
            .finish()
    }
}

/// The key already holds as many units as the cap allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this peer already holds {cap} at once (the per-peer cap)")]
pub struct CapReached {
    /// The cap that was reached.
    pub cap: usize,
}

/// One unit held by a key; dropping it gives the unit back.
pub struct PeerSlot<K: Hash + Eq + Clone> {
    inner: Arc<Inner<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> fmt::Debug for PeerSlot<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSlot").finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> PeerCaps<K> {
    /// At most `cap` units per key at once (0 refuses every unit).
    pub fn new(cap: usize) -> PeerCaps<K> {
        PeerCaps {
            inner: Arc::new(Inner {
                cap,
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The cap per key.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// One more unit for `key`, or [`CapReached`] when it holds the cap.
    pub fn try_acquire(&self, key: &K) -> Result<PeerSlot<K>, CapReached> {
        let cap = self.inner.cap;
        // The critical sections below cannot panic, so a poisoned lock still
        // holds consistent counts.
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = held.get(key).copied().unwrap_or(0);
        if n >= cap {
            return Err(CapReached { cap });
        }
        held.insert(key.clone(), n + 1);
        Ok(PeerSlot {
            inner: self.inner.clone(),
            key: key.clone(),
        })
    }

    /// Units `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Keys holding at least one unit.
    pub fn peers(&self) -> usize {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl<K: Hash + Eq + Clone> Drop for PeerSlot<K> {
    fn drop(&mut self) {
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_the_cap_and_no_more() {
        let caps = PeerCaps::new(2);
        let a1 = caps.try_acquire(&"a").expect("first");
        let _a2 = caps.try_acquire(&"a").expect("second");
        assert_eq!(caps.try_acquire(&"a").err(), Some(CapReached { cap: 2 }));
        // another key is not affected
        let _b1 = caps.try_acquire(&"b").expect("b");
        assert_eq!(caps.held(&"a"), 2);
        assert_eq!(caps.peers(), 2);
        drop(a1);
        assert_eq!(caps.held(&"a"), 1);
        let _a3 = caps.try_acquire(&"a").expect("a slot was given back");
        assert!(caps.try_acquire(&"a").is_err());
    }

    #[test]
    fn a_key_holding_nothing_leaves_the_map() {
        let caps = PeerCaps::new(3);
        let slots: Vec<_> = (0..3)
            .map(|_| caps.try_acquire(&7u32).expect("slot"))
            .collect();
        assert_eq!(caps.peers(), 1);
        // refusals do not add keys
        for k in 100..200u32 {
            let s = caps.try_acquire(&k).expect("slot");
            drop(s);
        }
        assert!(caps.try_acquire(&7).is_err());
        assert_eq!(caps.peers(), 1);
        drop(slots);
        assert_eq!(caps.peers(), 0);
        assert_eq!(caps.held(&7), 0);
    }

    #[test]
    fn a_zero_cap_refuses_everything() {
        let caps: PeerCaps<u8> = PeerCaps::new(0);
        assert!(caps.try_acquire(&1).is_err());
        assert_eq!(caps.peers(), 0);
    }

    #[test]
    fn clones_share_the_counts() {
        let caps = PeerCaps::new(1);
        let other = caps.clone();
        let _s = caps.try_acquire(&"x").expect("slot");
        assert!(other.try_acquire(&"x").is_err());
    }

    /// Random acquire/release sequences against a plain model: the counts
    /// always match, no key ever exceeds the cap, and the map holds exactly
    /// the keys with units out.
    #[test]
    fn random_sequences_match_the_model() {
        for seed in 1..=50u64 {
            let mut x = seed;
            let mut next = move || {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let cap = (next() % 5) as usize;
            let caps = PeerCaps::new(cap);
            let mut slots: Vec<(u8, PeerSlot<u8>)> = Vec::new();
            let mut model: HashMap<u8, usize> = HashMap::new();
            for _ in 0..2_000 {
                let key = (next() % 6) as u8;
                if next() % 3 == 0 && !slots.is_empty() {
                    let i = (next() as usize) % slots.len();
                    let (k, s) = slots.swap_remove(i);
                    drop(s);
                    let n = model.entry(k).or_default();
                    *n -= 1;
                    if *n == 0 {
                        model.remove(&k);
                    }
                } else {
                    let n = model.get(&key).copied().unwrap_or(0);
                    match caps.try_acquire(&key) {
                        Ok(s) => {
                            assert!(n < cap, "seed {seed}: admitted past the cap");
                            slots.push((key, s));
                            *model.entry(key).or_default() += 1;
                        }
                        Err(e) => {
                            assert_eq!(n, cap, "seed {seed}: refused under the cap");
                            assert_eq!(e.cap, cap);
                        }
                    }
                }
                assert_eq!(caps.peers(), model.len(), "seed {seed}");
                for k in 0..6u8 {
                    assert_eq!(caps.held(&k), model.get(&k).copied().unwrap_or(0));
                }
            }
        }
    }
}
