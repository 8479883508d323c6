//! Which entries exist, how big they are and when they were last read, in memory, for eviction: least
//! recently used beyond `max_size`, and anything not read for `inactive`. Evicting deletes the file.
//!
//! An exact LRU list keyed by 16-byte key hashes (measured ≈ 80 bytes an entry, so a million entries
//! stay far under 200 MB; moka, tried first, took ≈ 310 bytes an entry). Since the list is in access
//! order, its tail is also the entry idle the longest, so `inactive` is enforced by looking at the tail
//! on every insert and read: no sweeper thread. The index is rebuilt from the directory in a background
//! thread at start; lookups never wait for it, because they open the entry's file directly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;

use super::open::{OpenFiles, Opened};
use super::store::{self, KeyHash, Store};

/// Sizes are counted in whole file-system blocks: a flood of tiny negative entries (404s for random
/// keys) would otherwise take 20 times more disk than the index believes.
fn on_disk(size: u64) -> u64 {
    size.div_ceil(4096).max(1) * 4096
}

#[derive(Clone, Copy)]
struct Slot {
    size: u64,
    /// Unix seconds of the last read (or of the store).
    last_read: u64,
    /// The file's mtime (ns) when this process last verified its checksum; 0: not verified.
    verified: i64,
}

struct Inner {
    lru: LruCache<KeyHash, Slot>,
    bytes: u64,
}

#[derive(Clone)]
pub struct Index {
    inner: Arc<Mutex<Inner>>,
    store: Store,
    /// Descriptors of recently read small entries; dropped here whenever their file goes.
    open: Arc<OpenFiles>,
    max_size: u64,
    inactive: u64,
}

impl Index {
    pub fn new(store: Store, max_size: u64, inactive: Duration, open_files: usize) -> Index {
        Index {
            inner: Arc::new(Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            })),
            store,
            open: Arc::new(OpenFiles::new(open_files)),
            max_size,
            inactive: inactive.as_secs(),
        }
    }

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
                    found.push((store::to_unix(last_read), hash, size));
                });
                found.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
                let n = found.len();
                for (stored, hash, size) in found {
                    index.admit_cold(hash, size, stored);
                }
                index.enforce();
                match result {
                    Ok(()) => tracing::info!(entries = n, elapsed = ?started.elapsed(), "cache index loaded"),
                    Err(e) => tracing::warn!(error = %e, "cache index load stopped early"),
                }
            })
            .expect("spawning a thread");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit_cold(&self, hash: KeyHash, size: u64, last_read: u64) {
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

    /// The kept-open entry for `hash`, if any (still to be checked with [`Opened::read_current`]).
    pub fn opened(&self, hash: KeyHash) -> Option<Arc<Opened>> {
        self.open.get(hash)
    }

    pub fn keep_open(&self, hash: KeyHash, opened: Opened) {
        self.open.put(hash, opened);
    }

    /// The kept descriptor no longer matches the directory: forget it (the entry itself may be fine).
    pub fn close(&self, hash: KeyHash) {
        self.open.drop_entry(hash);
    }

    /// True when this process verified the entry's checksum and the file has not been written since
    /// (any write changes its mtime): a hit then skips the CRC, which was a sixth of a hit's CPU.
    /// A restart, a refill or a write to the file means verifying again.
    pub fn trusted(&self, hash: KeyHash, stamp: i64) -> bool {
        self.lock()
            .lru
            .peek(&hash)
            .is_some_and(|s| s.verified != 0 && s.verified == stamp)
    }

    /// Records a read (`verified`: the mtime at which the checksum was just checked); adds entries the
    /// background load has not reached yet.
    pub fn touch(&self, hash: KeyHash, size: u64, verified: Option<i64>) {
        let size = on_disk(size);
        let now = store::unix_now();
        let mut inner = self.lock();
        match inner.lru.get_mut(&hash) {
            Some(slot) => {
                slot.last_read = now;
                if let Some(v) = verified {
                    slot.verified = v;
                }
            }
            None => {
                let slot = Slot {
                    size,
                    last_read: now,
                    verified: verified.unwrap_or(0),
                };
                inner.lru.push(hash, slot);
                inner.bytes += size;
            }
        }
        let victims = self.victims(&mut inner, now);
        drop(inner);
        self.delete(victims);
    }

    /// A new or replaced entry of `size` bytes on disk; evicts at once so the directory stays under the cap.
    pub fn insert(&self, hash: KeyHash, size: u64) {
        let size = on_disk(size);
        let now = store::unix_now();
        let mut inner = self.lock();
        if let Some((_, old)) = inner.lru.push(
            hash,
            Slot {
                size,
                last_read: now,
                verified: 0,
            },
        ) {
            // `push` returns the replaced value for the same key (its file was replaced by the rename).
            inner.bytes -= old.size;
        }
        self.open.drop_entry(hash);
        inner.bytes += size;
        let victims = self.victims(&mut inner, now);
        drop(inner);
        self.delete(victims);
    }

    /// Drops the entry and its file.
    pub fn remove(&self, hash: KeyHash) {
        self.forget(hash);
        self.store.remove(hash);
    }

    /// The file is already gone (purged by `mediaproxy cache purge`, say).
    pub fn forget(&self, hash: KeyHash) {
        let mut inner = self.lock();
        if let Some(slot) = inner.lru.pop(&hash) {
            inner.bytes -= slot.size;
        }
        drop(inner);
        self.open.drop_entry(hash);
    }

    fn enforce(&self) {
        let mut inner = self.lock();
        let victims = self.victims(&mut inner, store::unix_now());
        drop(inner);
        self.delete(victims);
    }

    /// Pops from the cold end while over `max_size` or idle past `inactive`.
    fn victims(&self, inner: &mut Inner, now: u64) -> Vec<KeyHash> {
        let mut out = Vec::new();
        while let Some((_, slot)) = inner.lru.peek_lru() {
            let idle = now.saturating_sub(slot.last_read) > self.inactive;
            if inner.bytes <= self.max_size && !idle {
                break;
            }
            let Some((hash, slot)) = inner.lru.pop_lru() else {
                break;
            };
            inner.bytes -= slot.size;
            out.push(hash);
        }
        out
    }

    /// File deletion happens outside the lock: it is I/O.
    fn delete(&self, victims: Vec<KeyHash>) {
        for hash in victims {
            // Closed too, or the unlinked file would keep its blocks until the descriptor is pushed out.
            self.open.drop_entry(hash);
            self.store.remove(hash);
        }
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.bytes, inner.lru.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(store: &Store, key: &str, len: usize) -> KeyHash {
        let meta = store::EntryMeta {
            key: key.into(),
            status: 200,
            len: len as u64,
            content_type: None,
            etag: None,
            last_modified: None,
            stored_at_ms: store::unix_now_ms(),
        };
        let mut w = store.writer().unwrap();
        w.write(&vec![1u8; len]).unwrap();
        w.commit(store, &meta).unwrap();
        store::hash_key(key)
    }

    #[test]
    fn evicts_least_recently_used_beyond_max_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::new(store.clone(), 10_000, Duration::from_secs(3600), 16);
        // Each entry takes one 4 KiB block: two fit under 10,000 bytes, a third evicts one.
        let a = entry(&store, "a", 4000);
        index.insert(a, 4000);
        let b = entry(&store, "b", 4000);
        index.insert(b, 4000);
        index.touch(a, 4000, None); // a is now more recent than b
        let c = entry(&store, "c", 4000);
        index.insert(c, 4000);
        assert!(store.path(a).exists(), "recently read survives");
        assert!(!store.path(b).exists(), "least recently used is evicted");
        assert!(store.path(c).exists());
        assert_eq!(index.usage(), (8192, 2));
    }

    #[test]
    fn drops_inactive_entries_and_reloads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::new(store.clone(), u64::MAX, Duration::from_secs(3600), 16);
        let old = entry(&store, "old", 10);
        index.admit_cold(old, 100, store::unix_now() - 7200);
        let fresh = entry(&store, "fresh", 10);
        index.insert(fresh, 100);
        assert!(!store.path(old).exists(), "idle past `inactive`");
        assert!(store.path(fresh).exists());

        let reloaded = Index::new(store.clone(), u64::MAX, Duration::from_secs(3600), 16);
        reloaded.load_in_background();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reloaded.usage().1 != 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn restart_drops_entries_idle_past_inactive_whatever_the_directory_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut old = Vec::new();
        for i in 0..20 {
            let h = entry(&store, &format!("k{i}"), 10);
            if i % 2 == 0 {
                let f = std::fs::File::options()
                    .write(true)
                    .open(store.path(h))
                    .unwrap();
                // Stored and last read two hours ago.
                let then = std::time::SystemTime::now() - Duration::from_secs(7200);
                f.set_times(
                    std::fs::FileTimes::new()
                        .set_accessed(then)
                        .set_modified(then),
                )
                .unwrap();
                old.push(h);
            }
        }
        let index = Index::new(store.clone(), u64::MAX, Duration::from_secs(3600), 16);
        index.load_in_background();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while index.usage().1 != 10 {
            assert!(std::time::Instant::now() < deadline, "{:?}", index.usage());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(old.iter().all(|h| !store.path(*h).exists()));
    }
}
