//! Local files kept open between hits, mapped, with their metadata built: nginx's `open_file_cache` for
//! the local roots. A hit then costs one `fstat` instead of resolving the key's path again (`openat2`
//! walking half a dozen directories with their permission checks), a `mmap` and the metadata.
//!
//! Only for responses sent with `sendfile` (see [`crate::zerocopy`]): the mapping is never read by this
//! process, so a file Mastodon rewrites in place cannot raise SIGBUS here. A kept file is checked with
//! one `fstat` at most every [`CHECK_EVERY`] (and at once after any file shrank under a `sendfile`): a
//! file deleted or renamed over has no links left, a
//! rewritten one a new size or mtime; then the path is resolved again. So a file deleted is served for
//! at most that long after (nginx keeps serving from its `open_file_cache` for `open_file_cache_valid`,
//! 60 s by default). An entry is also resolved again once it is [`VALID`] old (up to half as long
//! again, spread per file), so that a file appearing in an earlier root, or a permission change, is
//! seen within that time.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::object::{Body, Meta, Object};
use crate::zerocopy::Mapping;

pub const VALID: Duration = Duration::from_secs(10);
/// A syscall per hit is a tenth of a hit's CPU: one check a second per file is enough.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

struct Kept {
    map: Arc<Mapping>,
    meta: Meta,
    /// (inode, size, mtime in ns) when opened.
    stamp: (u64, u64, i64),
    at: Instant,
    /// [`VALID`] plus up to half of it again, different for each file: files opened together (a burst
    /// after a start or a reload) are not all resolved again in the same instant, which put thousands
    /// of opens and mappings in one stretch of hits and doubled their p99.
    valid: Duration,
    /// When it was last checked, in ms after `at`.
    checked_ms: AtomicU64,
    /// [`crate::zerocopy::shrinks`] at the last check.
    shrinks: AtomicU64,
}

pub struct KeptFiles {
    lru: Option<Mutex<LruCache<Box<str>, Arc<Kept>>>>,
}

fn stamp(md: &std::fs::Metadata) -> (u64, u64, i64) {
    (
        md.ino(),
        md.len(),
        md.mtime().saturating_mul(1_000_000_000) + md.mtime_nsec(),
    )
}

impl KeptFiles {
    pub fn new(capacity: usize) -> KeptFiles {
        KeptFiles {
            lru: std::num::NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c))),
        }
    }

    /// The LRU, with the least recently used entries past their validity closed first: a file deleted
    /// and never asked for again must not stay open (its blocks pinned) until thousands of others push
    /// it out.
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, LruCache<Box<str>, Arc<Kept>>>> {
        let mut lru = self
            .lru
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))?;
        for _ in 0..4 {
            match lru.peek_lru() {
                Some((_, k)) if k.at.elapsed() >= k.valid => drop(lru.pop_lru()),
                _ => break,
            }
        }
        Some(lru)
    }

    /// The kept file for `key`, if it is still the one kept; a stale one is dropped.
    pub fn get(&self, key: &str) -> Option<Object> {
        let kept = self.lock()?.get(key).cloned()?;
        let age = kept.at.elapsed();
        let age_ms = age.as_millis() as u64;
        // A file that shrank under a `sendfile` anywhere makes every kept file checked again at once,
        // so its next request sees the new length instead of failing the same way.
        let shrinks = crate::zerocopy::shrinks();
        let fresh = age_ms.saturating_sub(kept.checked_ms.load(Ordering::Relaxed))
            < CHECK_EVERY.as_millis() as u64
            && kept.shrinks.load(Ordering::Relaxed) == shrinks;
        let current = age < kept.valid
            && (fresh
                || kept.map.file().metadata().is_ok_and(|md| {
                    let same = md.nlink() > 0 && stamp(&md) == kept.stamp;
                    if same {
                        kept.checked_ms.store(age_ms, Ordering::Relaxed);
                        kept.shrinks.store(shrinks, Ordering::Relaxed);
                    }
                    same
                }));
        if !current {
            // Closed once the last response using it is done.
            let _dropped = self.lock().and_then(|mut lru| lru.pop(key));
            return None;
        }
        Some(Object {
            meta: kept.meta.clone(),
            body: Body::Bytes(kept.map.bytes(0, kept.map.len())),
        })
    }

    pub fn keep(&self, key: &str, map: Arc<Mapping>, meta: Meta, md: &std::fs::Metadata) {
        let kept = Arc::new(Kept {
            map,
            meta,
            stamp: stamp(md),
            at: Instant::now(),
            valid: VALID + spread(key, VALID / 2),
            checked_ms: AtomicU64::new(0),
            shrinks: AtomicU64::new(crate::zerocopy::shrinks()),
        });
        // A displaced entry is closed after the lock is released.
        let displaced = self.lock().and_then(|mut lru| lru.push(key.into(), kept));
        drop(displaced);
    }
}

/// A duration in `0..max`, fixed for `key` (its hash), so entries opened together expire apart.
fn spread(key: &str, max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::LazyLock<std::collections::hash_map::RandomState> =
        std::sync::LazyLock::new(std::collections::hash_map::RandomState::new);
    let mut h = SEED.build_hasher();
    h.write(key.as_bytes());
    let max_ms = max.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_opened_together_are_resolved_again_apart() {
        let valid: Vec<Duration> = (0..1000)
            .map(|i| {
                VALID
                    + spread(
                        &format!("media_attachments/files/{i}/original/a.png"),
                        VALID / 2,
                    )
            })
            .collect();
        assert!(valid.iter().all(|v| *v >= VALID && *v < VALID + VALID / 2));
        let seconds: std::collections::HashSet<u64> = valid.iter().map(|v| v.as_secs()).collect();
        assert_eq!(seconds.len(), 5, "spread over all five seconds past VALID");
        let key = "media_attachments/files/1/original/a.png";
        assert_eq!(spread(key, VALID), spread(key, VALID), "fixed per file");
    }
}
