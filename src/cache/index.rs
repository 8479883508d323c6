//! Which entries exist, how big they are and when they were last read, in memory, for eviction: least
//! recently used beyond `max_size`, and anything not read for `inactive`. Evicting deletes the file.
//!
//! An exact LRU list keyed by 16-byte key hashes (measured ≈ 80 bytes an entry, so a million entries
//! stay far under 200 MB; moka, tried first, took ≈ 310 bytes an entry). Since the list is in access
//! order, its tail is also the entry idle the longest, so `inactive` is enforced by looking at the tail
//! on every insert and read: no sweeper thread. The index is rebuilt from the directory in a background
//! thread at start ([`load`]); lookups never wait for it, because they open the entry's file directly.
//! Choosing and deleting victims is [`evict`].

use std::os::unix::fs::MetadataExt;
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
    /// Negative (404) entries stored by this process, oldest first, and their share of `bytes`: capped
    /// at [`NEGATIVE_SHARE`] of `max_size`, so a flood of requests for random keys evicts its own 404s
    /// instead of the media everyone reads.
    negatives: LruCache<KeyHash, ()>,
    negative_bytes: u64,
    /// The part of `bytes` reserved by fills still running: their files in `tmp/`.
    in_flight: u64,
}

/// Negative entries may take at most 1/8 of `max_size`.
const NEGATIVE_SHARE: u64 = 8;

impl Inner {
    /// Stops counting `hash` (its file is gone or about to be).
    fn take(&mut self, hash: KeyHash) -> Option<Slot> {
        let slot = self.lru.pop(&hash)?;
        self.uncount(hash, slot);
        Some(slot)
    }

    fn uncount(&mut self, hash: KeyHash, slot: Slot) {
        self.bytes -= slot.size;
        if self.negatives.pop(&hash).is_some() {
            self.negative_bytes -= slot.size;
        }
    }
}

#[derive(Clone)]
pub struct Index {
    inner: Arc<Mutex<Inner>>,
    /// Held while an entry's path is renamed into place or unlinked, so that a publish and an eviction
    /// of the same key never interleave. Separate from `inner`, which hits take: a disk that stops
    /// answering stalls the holder of this lock (on the blocking pool), never a hit.
    paths: Arc<Mutex<()>>,
    /// Counts the entries evicted (`mediaproxy_cache_evictions_total`).
    evictions: prometheus_client::metrics::counter::Counter,
    store: Store,
    /// Descriptors of recently read small entries; dropped here whenever their file goes.
    open: Arc<OpenFiles>,
    max_size: u64,
    inactive: u64,
    /// Set once the load from the directory at start has finished.
    loaded: Arc<std::sync::atomic::AtomicBool>,
    /// Set once that load has walked the whole directory: then every entry on disk is counted.
    complete: Arc<std::sync::atomic::AtomicBool>,
}

/// A fill's share of `max_size`, held while it runs.
pub struct Reserved {
    inner: Arc<Mutex<Inner>>,
    size: u64,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().expect("index lock");
        inner.bytes = inner.bytes.saturating_sub(self.size);
        inner.in_flight = inner.in_flight.saturating_sub(self.size);
    }
}

/// Fills in flight may hold at most this share of `max_size` in `tmp/`: room is made for them by
/// evicting entries, and beyond it (a stranger starting many large transfers) the next one is not
/// cached at all rather than emptying the cache.
const IN_FLIGHT_SHARE: u64 = 2;

impl Index {
    pub fn new(store: Store, max_size: u64, inactive: Duration, open_files: usize) -> Index {
        Index {
            paths: Arc::default(),
            evictions: Default::default(),
            inner: Arc::new(Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                negatives: LruCache::unbounded(),
                negative_bytes: 0,
                in_flight: 0,
            })),
            store,
            open: Arc::new(OpenFiles::new(open_files)),
            max_size,
            inactive: inactive.as_secs(),
            loaded: Arc::default(),
            complete: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_paths(&self) -> std::sync::MutexGuard<'_, ()> {
        self.paths.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an entry for `hash` is counted (published by this process, or found by the load).
    pub fn knows(&self, hash: KeyHash) -> bool {
        self.lock().lru.contains(&hash)
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
        let now = crate::unix_time::now();
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

    /// A new or replaced entry of `size` bytes on disk, already in place (tests; fills use `publish`).
    #[cfg(test)]
    pub fn insert(&self, hash: KeyHash, size: u64, negative: bool) {
        let mut inner = self.lock();
        let victims = self.insert_locked(&mut inner, hash, size, negative);
        drop(inner);
        self.delete(victims);
    }

    /// Makes a sealed entry visible and counts it, unless `voided()` says a bust came first: one step
    /// under the path lock, so an eviction of the same key cannot fall between the rename and the count
    /// (it never deletes the fresh file in place of the old one), and a bust's purge either precedes
    /// the check or follows the rename. Runs on the blocking pool; hits never wait for it.
    /// `negative`: a 404 entry (see [`NEGATIVE_SHARE`]).
    pub fn publish(
        &self,
        hash: KeyHash,
        sealed: store::Sealed,
        negative: bool,
        voided: impl FnOnce() -> bool,
    ) -> std::io::Result<u64> {
        let paths = self.lock_paths();
        if voided() {
            return Ok(0); // dropping `sealed` deletes its file
        }
        let size = sealed.publish()?;
        let mut inner = self.lock();
        let victims = self.insert_locked(&mut inner, hash, size, negative);
        drop(inner);
        drop(paths);
        self.delete(victims);
        Ok(size)
    }

    fn insert_locked(
        &self,
        inner: &mut Inner,
        hash: KeyHash,
        size: u64,
        negative: bool,
    ) -> Vec<KeyHash> {
        let size = on_disk(size);
        let now = crate::unix_time::now();
        // The file was replaced by the rename: the old entry's count goes.
        inner.take(hash);
        inner.lru.push(
            hash,
            Slot {
                size,
                last_read: now,
                verified: 0,
            },
        );
        inner.bytes += size;
        if negative {
            inner.negatives.push(hash, ());
            inner.negative_bytes += size;
        }
        self.open.drop_entry(hash);
        self.victims(inner, now)
    }

    /// Drops a corrupt entry: the file whose inode is `ino`, unless a refill has replaced it already.
    pub fn remove(&self, hash: KeyHash, ino: u64) {
        let paths = self.lock_paths();
        let path = self.store.path(hash);
        if std::fs::metadata(&path).is_ok_and(|md| md.ino() == ino) {
            self.lock().take(hash);
            self.store.remove(hash);
        }
        drop(paths);
        self.open.drop_entry(hash);
    }

    /// Counts a fill's length against `max_size` while it runs (evicting to make room), or `None` when
    /// the fills in flight already hold their share of it.
    pub fn try_reserve(&self, size: u64) -> Option<Reserved> {
        let size = on_disk(size);
        let mut inner = self.lock();
        if inner.in_flight + size > self.max_size / IN_FLIGHT_SHARE {
            return None;
        }
        inner.bytes += size;
        inner.in_flight += size;
        let victims = self.victims(&mut inner, crate::unix_time::now());
        drop(inner);
        self.delete(victims);
        Some(Reserved {
            inner: self.inner.clone(),
            size,
        })
    }

    /// Deletes the entry for `hash` (a bust), whatever it holds; true if there was one.
    pub fn purge(&self, hash: KeyHash) -> bool {
        let paths = self.lock_paths();
        self.lock().take(hash);
        let removed = self.store.remove(hash);
        drop(paths);
        self.open.drop_entry(hash);
        removed
    }

    /// A lookup found the file gone (purged by `mediaproxy cache purge`, say): stop counting it, unless
    /// a fill has just published a new one.
    pub fn forget(&self, hash: KeyHash) {
        let mut inner = self.lock();
        // Nothing to forget for a key never counted: a cold miss costs no `stat` here.
        if inner.lru.contains(&hash) && !self.store.path(hash).exists() {
            inner.take(hash);
        }
        drop(inner);
        self.open.drop_entry(hash);
    }

    /// Stops counting an entry that `mediaproxy cache purge|clear` deleted (a notice says so). Blocking:
    /// the `stat` runs under the path lock (no publish can slip in between), never under the lock hits
    /// take; only a file that is really gone (`NotFound`, not a permission or I/O error) is forgotten.
    pub fn forget_deleted(&self, hash: KeyHash) -> bool {
        let paths = self.lock_paths();
        let gone = matches!(
            std::fs::symlink_metadata(self.store.path(hash)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound
        );
        let forgotten = gone && self.lock().take(hash).is_some();
        drop(paths);
        self.open.drop_entry(hash);
        forgotten
    }

    /// [`Index::forget_deleted`] for every entry (`mediaproxy cache clear` ran): one `stat` per entry.
    /// The hashes are copied under the index lock first (16 bytes each: a million take a few ms).
    pub fn forget_missing(&self) -> usize {
        let hashes: Vec<KeyHash> = self.lock().lru.iter().map(|(h, _)| *h).collect();
        hashes
            .into_iter()
            .filter(|h| self.forget_deleted(*h))
            .count()
    }

    /// Counts evictions into `counter` (the one registered for `/metrics`).
    pub fn count_evictions_in(&mut self, counter: prometheus_client::metrics::counter::Counter) {
        self.evictions = counter;
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.bytes, inner.lru.len() as u64)
    }
}

mod evict;
mod load;

#[cfg(test)]
mod tests;
