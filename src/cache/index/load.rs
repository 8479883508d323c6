//! Rebuilding the index from the cache directory at start, in a background thread: lookups never wait
//! for it (they open the entry's file while it runs), and whether it walked the whole directory.

use super::*;

impl Index {
    pub fn load_in_background(&self) {
        let index = self.clone();
        std::thread::Builder::new()
            .name("cache-index-load".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                // Admitted most recently read first, each to the cold end, so the longest idle end up coldest: the LRU tail
                // is then also the longest idle, which is what `inactive` checks. Entries read since
                // start are already in and stay warmer. (24 bytes per entry while loading.)
                let mut found: Vec<(u64, KeyHash, u64)> = Vec::new();
                let result = store::walk(&index.store, |hash, size, _, last_read| {
                    found.push((crate::unix_time::secs(last_read), hash, size));
                });
                found.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
                let n = found.len();
                for (stored, hash, size) in found {
                    index.admit_cold(hash, size, stored);
                }
                index.enforce();
                index
                    .complete
                    .store(result.is_ok(), std::sync::atomic::Ordering::Release);
                index
                    .loaded
                    .store(true, std::sync::atomic::Ordering::Release);
                match result {
                    Ok(()) => tracing::info!(entries = n, elapsed = ?started.elapsed(), "cache index loaded"),
                    Err(e) => tracing::warn!(error = %e, "cache index load stopped early"),
                }
            })
            .expect("spawning a thread");
    }

    pub(super) fn admit_cold(&self, hash: KeyHash, size: u64, last_read: u64) {
        let size = on_disk(size);
        let mut inner = self.lock();
        if inner.lru.contains(&hash) {
            return;
        }
        inner.lru.push(
            hash,
            Slot {
                size,
                last_read,
                verified: 0,
            },
        );
        inner.lru.demote(&hash);
        inner.bytes += size;
    }

    /// Whether the load from the directory at start has finished.
    pub fn loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether every entry on disk is counted: the load walked the whole directory (one that stopped
    /// at an error, say out of descriptors, leaves entries only a lookup of the file finds).
    pub fn complete(&self) -> bool {
        self.complete.load(std::sync::atomic::Ordering::Acquire)
    }
}
