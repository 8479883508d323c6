//! Which entries exist and how big they are, in memory, for eviction: least recently used beyond
//! `max_size`, and anything not read for `inactive`. Evicting an entry deletes its file.
//!
//! The index holds 16-byte key hashes and sizes only, so a million entries fit well under 200 MB. It
//! is rebuilt from the directory in a background thread at start; lookups never wait for it, because
//! they open the entry's file directly.

use std::sync::Arc;
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::store::{self, KeyHash, Store};

pub struct Index {
    entries: moka::sync::Cache<KeyHash, u64>,
    store: Store,
}

/// Sizes are accounted in KiB so entries up to 4 TiB fit moka's u32 weights.
fn weight(size: u64) -> u32 {
    size.div_ceil(1024).max(1).min(u32::MAX as u64) as u32
}

impl Index {
    pub fn new(store: Store, max_size: u64, inactive: Duration) -> Index {
        let on_disk = store.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity((max_size / 1024).max(1))
            .weigher(|_, size: &u64| weight(*size))
            .time_to_idle(inactive)
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |hash: Arc<KeyHash>, _size, cause| {
                // Replaced: the same key was stored again, and its file is already the new one.
                if cause != RemovalCause::Replaced {
                    on_disk.remove(*hash);
                }
            })
            .build();
        Index { entries, store }
    }

    pub fn load_in_background(&self) {
        let entries = self.entries.clone();
        let store = self.store.clone();
        std::thread::Builder::new()
            .name("cache-index-load".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let mut n = 0u64;
                let result = store::walk(&store, |hash, size, _| {
                    entries.entry(hash).or_insert(size);
                    n += 1;
                });
                entries.run_pending_tasks();
                match result {
                    Ok(()) => tracing::info!(entries = n, elapsed = ?started.elapsed(), "cache index loaded"),
                    Err(e) => tracing::warn!(error = %e, "cache index load stopped early"),
                }
            })
            .expect("spawning a thread");
    }

    /// Records a read (for LRU and `inactive`); adds entries the background load has not reached yet.
    pub fn touch(&self, hash: KeyHash, size: u64) {
        if self.entries.get(&hash).is_none() {
            self.entries.insert(hash, size);
        }
    }

    pub fn insert(&self, hash: KeyHash, size: u64) {
        self.entries.insert(hash, size);
        // Evict now rather than at moka's next housekeeping, so the directory stays under the cap.
        self.entries.run_pending_tasks();
    }

    /// Drops the entry and (through the listener) its file.
    pub fn remove(&self, hash: KeyHash) {
        self.entries.invalidate(&hash);
    }

    /// The file is already gone (purged by `mediaproxy cache purge`, say).
    pub fn forget(&self, hash: KeyHash) {
        if self.entries.contains_key(&hash) {
            self.entries.invalidate(&hash);
        }
    }

    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (
            self.entries.weighted_size() * 1024,
            self.entries.entry_count(),
        )
    }
}
