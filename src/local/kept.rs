//! Local files kept open between hits, mapped, with their metadata built: nginx's `open_file_cache` for
//! the local roots. A hit then costs one `fstat` instead of resolving the key's path again (`openat2`
//! walking half a dozen directories with their permission checks), a `mmap` and the metadata.
//!
//! Only for responses sent with `sendfile` (see [`crate::zerocopy`]): the mapping is never read by this
//! process, so a file Mastodon rewrites in place cannot raise SIGBUS here. Each use is checked with one
//! `fstat`: a file deleted or renamed over has no links left, a rewritten one a new size or mtime; then
//! the path is resolved again. An entry is also resolved again once it is [`VALID`] old, so that a file
//! appearing in an earlier root, or a permission change, is seen within that time (nginx's
//! `open_file_cache_valid`, 60 s by default).

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::object::{Body, Meta, Object};
use crate::zerocopy::Mapping;

pub const VALID: Duration = Duration::from_secs(10);

struct Kept {
    map: Arc<Mapping>,
    meta: Meta,
    /// (inode, size, mtime in ns) when opened.
    stamp: (u64, u64, i64),
    at: Instant,
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

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, LruCache<Box<str>, Arc<Kept>>>> {
        self.lru
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The kept file for `key`, if it is still the one kept; a stale one is dropped.
    pub fn get(&self, key: &str) -> Option<Object> {
        let kept = self.lock()?.get(key).cloned()?;
        let current = kept.at.elapsed() < VALID
            && kept
                .map
                .file()
                .metadata()
                .is_ok_and(|md| md.nlink() > 0 && stamp(&md) == kept.stamp);
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
        });
        // A displaced entry is closed after the lock is released.
        let displaced = self.lock().and_then(|mut lru| lru.push(key.into(), kept));
        drop(displaced);
    }
}
