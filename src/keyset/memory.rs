//! A key set's keys in memory, 12 bytes a key: sorted arrays of key ids and times, binary-searched,
//! plus a small map of recent additions merged into them every [`MERGE_AT`] additions (an O(n) merge
//! per 4,096 busts instead of an insertion into a sorted array per bust). Past `max` keys, a merge drops
//! the oldest. The file that makes them persistent is [`super::KeySet`]'s.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use super::KeyId;

/// Recent busts kept in a hash map before they are merged into the sorted arrays (an O(n) merge).
pub(super) const MERGE_AT: usize = 4096;

/// The keys of a set, in memory.
#[derive(Default)]
pub struct Memory {
    ids: Vec<KeyId>,
    /// Unix seconds of the bust, parallel to `ids`.
    times: Vec<u32>,
    recent: HashMap<KeyId, u32, BuildHasherDefault<IdHasher>>,
}

/// Key ids are already uniform hashes: use them as they are.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Memory {
    /// The keys of `all` (records as read from a file, in any order, a key possibly repeated) still
    /// alive under `ttl`, each with its newest time; at most `max`, the newest.
    pub(super) fn load(mut all: Vec<(KeyId, u32)>, ttl: Duration, now: u32, max: usize) -> Memory {
        let mut memory = Memory::default();
        // Sorted by id then time: the last of each run of one id is its newest addition.
        all.sort_unstable();
        let mut i = 0;
        while i < all.len() {
            let id = all[i].0;
            while i + 1 < all.len() && all[i + 1].0 == id {
                i += 1;
            }
            if alive(all[i].1, ttl, now) {
                memory.ids.push(id);
                memory.times.push(all[i].1);
            }
            i += 1;
        }
        drop(all);
        memory.bound(max);
        memory.ids.shrink_to_fit();
        memory.times.shrink_to_fit();
        memory
    }

    /// Whether `id` is in the set (loaded alive; for a read-only copy of a set).
    pub fn contains(&self, id: KeyId) -> bool {
        self.get(id).is_some()
    }

    pub(super) fn get(&self, id: KeyId) -> Option<u32> {
        if let Some(t) = self.recent.get(&id) {
            return Some(*t);
        }
        self.ids.binary_search(&id).ok().map(|i| self.times[i])
    }

    pub(super) fn insert(&mut self, id: KeyId, at: u32, ttl: Duration, now: u32, max: usize) {
        self.recent.insert(id, at);
        if self.recent.len() >= MERGE_AT.min(max) {
            self.merge(ttl, now);
            self.bound(max);
        }
    }

    /// Forgets the oldest keys beyond `max`.
    pub(super) fn bound(&mut self, max: usize) {
        if self.ids.len() <= max {
            return;
        }
        let mut times = self.times.clone();
        let cut = self.ids.len() - max;
        let (_, oldest_kept, _) = times.select_nth_unstable(cut);
        let oldest_kept = *oldest_kept;
        let mut keep = 0;
        let mut dropped = 0;
        for i in 0..self.ids.len() {
            // Ties at the cut keep the set a little over `max` rather than dropping by id order.
            if self.times[i] < oldest_kept && dropped < cut {
                dropped += 1;
                continue;
            }
            self.ids[keep] = self.ids[i];
            self.times[keep] = self.times[i];
            keep += 1;
        }
        self.ids.truncate(keep);
        self.times.truncate(keep);
    }

    /// Folds the recent busts into the sorted arrays, dropping expired ones; a key busted again keeps
    /// its newest time.
    pub(super) fn merge(&mut self, ttl: Duration, now: u32) {
        let mut recent: Vec<(KeyId, u32)> = self.recent.drain().collect();
        recent.sort_unstable();
        let old_ids = std::mem::take(&mut self.ids);
        let old_times = std::mem::take(&mut self.times);
        let mut ids = Vec::with_capacity(old_ids.len() + recent.len());
        let mut times = Vec::with_capacity(ids.capacity());
        let mut old = old_ids.into_iter().zip(old_times).peekable();
        let mut new = recent.into_iter().peekable();
        loop {
            let next = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => old.next(),
                (None, Some(_)) => new.next(),
                (Some(o), Some(n)) if o.0 < n.0 => old.next(),
                (Some(o), Some(n)) if o.0 > n.0 => new.next(),
                (Some(_), Some(_)) => {
                    old.next();
                    new.next()
                }
            };
            let (id, at) = next.expect("peeked");
            if alive(at, ttl, now) {
                ids.push(id);
                times.push(at);
            }
        }
        ids.shrink_to_fit();
        times.shrink_to_fit();
        self.ids = ids;
        self.times = times;
    }

    #[cfg(test)]
    pub(super) fn ids(&self) -> &[KeyId] {
        &self.ids
    }

    /// Heap bytes held (for the size bound the tests and the docs state).
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        self.ids.capacity() * 8
            + self.times.capacity() * 4
            + self.recent.capacity() * (std::mem::size_of::<(KeyId, u32)>() + 1)
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len() + self.recent.len()
    }

    pub(super) fn records(&self) -> impl Iterator<Item = (KeyId, u32)> + '_ {
        self.ids
            .iter()
            .copied()
            .zip(self.times.iter().copied())
            .chain(self.recent.iter().map(|(id, at)| (*id, *at)))
    }
}

pub(super) fn alive(at: u32, ttl: Duration, now: u32) -> bool {
    u64::from(now.saturating_sub(at)) < ttl.as_secs()
}
