//! The disk cache between local roots and upstreams: what keeps media up when a bucket "desynchronizes"
//! and keeps its egress bill down. It knows nothing of upstream kinds: it stores bodies it is handed.
//!
//! - `store`: one file per entry, atomic rename, checksummed (crash and corruption safety).
//! - `index`: in-memory LRU/size/inactivity accounting over the files; eviction deletes files.
//! - `flights`: one fill per key (cache lock); a bust voids the fill in flight.
//! - `fill`: how a fill starts, run at the upstream's pace, streamed to its first client;
//!   `memfill` holds a small body in memory until whole, `filefill` writes a large one as it arrives.
//! - `lookup`: the hit path (read, check, classify by TTL).
//! - `follow`: requests that arrive during a fill stream the body from the file being written.
//! - `growing`: the one reader of an entry being written, for the fill's client and its followers.
//! - `lead`: the fill policy (fills that outlive their client, background fills, resume), over an
//!   [`Origin`] the caller supplies, since the cache knows nothing of upstreams.
//! - `offline`: `mediaproxy cache stats|purge|clear`, on the directory, proxy running or not;
//!   `notices`: how a running proxy learns of them.
//! - tombstones (a [`KeySet`]): keys Mastodon busted (deleted or made private), beside the entries.

mod filefill;
mod fill;
mod flights;
mod follow;
mod growing;
mod index;
mod lead;
mod lookup;
mod memfill;
mod notices;
mod offline;
mod open;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::CacheCounters;
use crate::object::Object;

use crate::keyset::{self, KeySet};
pub use fill::{FillGuard, BACKGROUND_FILL_LIMIT};
pub use flights::Flight;
pub use follow::Joined;
pub use growing::fill_failed_at;
use index::Index;
pub use lead::{Answer, Origin};
pub use notices::watch as watch_notices;
pub use offline::{clear, purge, purge_prefix, stats, Stats};
use store::{hash_key, KeyHash, Store};
pub use store::{EntryMeta, Loaded};

/// The TTLs in force (from the runtime config, so a reload changes them).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ttl_ok: Duration,
    pub ttl_error: Duration,
}

pub enum Lookup {
    /// Within its TTL: serve it.
    Fresh(Cached),
    /// Expired: ask upstreams, but keep it in case they all fail (stale-if-error).
    Stale(Cached),
    Miss,
}

pub enum Cached {
    Found(Object),
    /// A negative entry: every upstream said 404 when it was stored.
    NotFound,
}

#[derive(Debug, thiserror::Error)]
#[error("cache directory {dir}: {source}")]
pub struct CacheError {
    dir: String,
    source: std::io::Error,
}

pub struct Cache {
    store: Store,
    index: Index,
    flights: flights::Flights,
    counters: CacheCounters,
    tombstones: KeySet,
    /// Objects larger than this are never stored (`cache.max_object_size`).
    max_object: u64,
    /// Fills that no client reads (a seek's, or one whose client left): `cache.background_fills`.
    background: Arc<tokio::sync::Semaphore>,
    /// Bytes of small fills held in memory until whole ([`memfill::BUDGET`]).
    memory_fills: Arc<tokio::sync::Semaphore>,
    /// One checksum pass per large entry at a time: concurrent first hits after a restart wait for
    /// the first one's verdict instead of each reading the whole file.
    verifying: Mutex<HashMap<KeyHash, Arc<tokio::sync::Mutex<()>>>>,
}

impl Cache {
    /// Opens (creating) `dir`, deletes half-written fills from a crash, and starts loading the index in
    /// the background.
    /// `open_files`: `cfg.open_files` within the process's descriptor limit.
    pub fn open(
        cfg: &crate::config::Cache,
        open_files: usize,
        counters: CacheCounters,
    ) -> Result<Arc<Cache>, CacheError> {
        let dir = cfg.dir.as_path();
        let error = |source| CacheError {
            dir: dir.display().to_string(),
            source,
        };
        let store = Store::open(dir).map_err(error)?;
        let tombstones =
            KeySet::open(dir, "tombstones", cfg.tombstone_ttl, usize::MAX).map_err(error)?;
        let mut index = Index::new(store.clone(), cfg.max_size, cfg.inactive, open_files);
        index.count_evictions_in(counters.evictions.clone());
        index.load_in_background();
        Ok(Arc::new(Cache {
            store,
            index,
            flights: flights::Flights::default(),
            counters,
            tombstones,
            max_object: cfg.max_object_size,
            background: Arc::new(tokio::sync::Semaphore::new(cfg.background_fills)),
            memory_fills: Arc::new(tokio::sync::Semaphore::new(memfill::BUDGET)),
            verifying: Mutex::default(),
        }))
    }

    /// Mastodon's cache buster: the key is tombstoned (durably, before this returns), any fill of it
    /// in flight is voided, and its entry, positive or negative, is deleted. An error means the
    /// tombstone could not be written to disk: it still applies until the process stops.
    pub async fn bust(
        self: &Arc<Cache>,
        key: &str,
        tombstone_ttl: Duration,
    ) -> std::io::Result<()> {
        let hash = hash_key(key);
        let id = keyset::id_of(key);
        let cache = self.clone();
        let recorded = tokio::task::spawn_blocking(move || cache.tombstones.add(id, tombstone_ttl))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        // In this order: a request arriving now sees the tombstone, so it cannot start a fill from an
        // older upstream after the void; what a voided fill would have stored is never stored.
        self.flights.void(hash);
        let index = self.index.clone();
        let _ = tokio::task::spawn_blocking(move || index.purge(hash)).await;
        recorded
    }

    /// Waits (up to `timeout`) for a fill of `key` in flight to end: a copy then reads its entry instead
    /// of asking the old bucket a second time.
    pub async fn wait_fill(&self, key: &str, timeout: Duration) {
        self.flights.wait(hash_key(key), timeout).await
    }

    /// The complete, verified entry for `key` if there is one (a copy's source). Blocking.
    pub fn entry_for_copy(&self, key: &str) -> Option<Loaded> {
        match self.store.load(key) {
            Ok(Some(Loaded::Bytes(meta, bytes, file))) if meta.status == 200 => {
                Some(Loaded::Bytes(meta, bytes, file))
            }
            Ok(Some(Loaded::File(meta, file))) if meta.status == 200 => {
                Some(Loaded::File(meta, file))
            }
            _ => None,
        }
    }

    /// A place among the fills no client reads, if one is free.
    pub fn background_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.background.clone().try_acquire_owned().ok()
    }

    /// Whether Mastodon busted `key` less than `ttl` ago.
    pub fn tombstoned(&self, key: &str, ttl: Duration) -> bool {
        self.tombstones.contains(keyset::id_of(key), ttl)
    }

    pub fn tombstone_count(&self) -> usize {
        self.tombstones.count()
    }

    /// Joins or leads the one fill for `key` (nginx's `proxy_cache_lock`). A leader first looks
    /// again if a fill may have committed between the caller's lookup and its taking the lead (the
    /// index counts every entry this process publishes; a cold miss skips the second look).
    pub async fn lead(self: &Arc<Cache>, key: &str, policy: Policy) -> Flight {
        match self.flights.join(self.clone(), key) {
            Flight::Leader(guard) if !self.index.knows(guard.hash) => Flight::Leader(guard),
            Flight::Leader(guard) => match self.lookup(key, policy, false).await {
                Lookup::Fresh(cached) => {
                    guard.found_cached();
                    Flight::Cached(cached)
                }
                _ => Flight::Leader(guard),
            },
            other => other,
        }
    }

    /// Remembers that no upstream has `key`.
    /// A negative entry for `key`, written and sealed, for the fill's leader to publish (unless a bust
    /// voided the fill): no upstream has the key.
    fn sealed_not_found(&self, key: &str) -> std::io::Result<store::Sealed> {
        let meta = EntryMeta {
            key: key.to_string(),
            status: 404,
            len: 0,
            content_type: None,
            etag: None,
            last_modified: None,
            stored_at_ms: crate::unix_time::now_ms(),
            origin: None,
            cache_control: None,
            content_disposition: None,
        };
        self.store.writer().and_then(|w| w.seal(&self.store, &meta))
    }

    fn write_failed(&self, key: &str, e: &std::io::Error) {
        self.counters.write_errors.inc();
        tracing::warn!(key, error = %e, "cache write failed; the client is served from the upstream");
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bytes and entries the index accounts for (after a restart, once it has loaded).
    pub fn usage(&self) -> (u64, u64) {
        self.index.usage()
    }

    pub fn open_files(&self) -> usize {
        self.index.open_count()
    }
}

#[cfg(test)]
mod tests;
