//! The hit path: a key's entry read, checked and classified by its TTL. A kept-open small entry is
//! served from its descriptor after one `fstat`; otherwise the entry's file is opened by the path its
//! key derives (so hits work while the index still loads after a restart), a small entry is one `pread`
//! and a hardware CRC done right on the worker like a local file, and a large one is checksummed end to
//! end on the blocking pool once per change of its file (concurrent first hits wait for one verdict).
//! A corrupt entry is dropped and counted, and the request becomes a miss.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::open;
use super::store::{self, hash_key, EntryMeta, KeyHash, Loaded, Store, StoreError};
use super::{Cache, Cached, Lookup, Policy};
use crate::object::{Body, Meta, Object, Source};
use crate::zerocopy::Mapping;

impl Cache {
    /// Reads an entry; a corrupt one is dropped (and counted) so it is refetched.
    /// `sendfile`: the body will go out with `sendfile` (a plain HTTP/1.1 GET), so it may be a mapping
    /// of the entry; otherwise it is read as before (no worker faults in a file's pages, and a disk
    /// error fails one response, not the process).
    pub async fn lookup(&self, key: &str, policy: Policy, sendfile: bool) -> Lookup {
        let hash = hash_key(key);
        if let Some(opened) = self.index.opened(hash) {
            // Collisions of 128-bit hashes aside, the key check keeps a file from serving another key.
            match opened.read_current(sendfile) {
                Some(bytes) if opened.meta.key == key => {
                    self.index.touch(hash, opened.size, None);
                    return classify(opened.meta.clone(), Body::Bytes(bytes), policy);
                }
                _ => self.index.close(hash),
            }
        }
        // Once the index counts every entry on disk, a key it does not know has no file: a cold miss
        // costs no failed open. (An entry another process wrote since, say the one a restart replaced,
        // is then fetched again and renamed over the same bytes.)
        if self.index.complete() && !self.index.knows(hash) {
            return Lookup::Miss;
        }
        // Small entries are one pread and a hardware CRC, done right here like a local file; large ones
        // are checksummed end to end before serving, which is real work for the blocking pool.
        let mut checked = None;
        let mut file_size = 0;
        let mut stamp = 0;
        let mut ino = 0;
        let loaded = match self.store.open_entry(key) {
            Ok(Some(store::EntryFile {
                file,
                size,
                stamp: mtime,
                accessed,
                ino: inode,
            })) => {
                store::note_read(&file, accessed);
                ino = inode;
                file_size = size;
                stamp = mtime;
                let verify = !self.index.trusted(hash, stamp);
                checked = verify.then_some(stamp);
                if Store::is_small(size) || !verify {
                    Store::load_opened(file, size, key, verify).map(Some)
                } else {
                    match self.verify_large(hash, key, file, size, stamp).await {
                        Some((r, verified)) => {
                            checked = verified.then_some(stamp);
                            r.map(Some)
                        }
                        None => return Lookup::Miss,
                    }
                }
            }
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Io(e)),
        };
        let loaded = match loaded {
            Ok(Some(l)) => l,
            Ok(None) => {
                self.index.forget(hash);
                return Lookup::Miss;
            }
            Err(StoreError::Corrupt(why)) => {
                tracing::warn!(key, why, "corrupt cache entry dropped; refetching");
                self.counters.corrupt.inc();
                self.index.remove(hash, ino);
                return Lookup::Miss;
            }
            Err(StoreError::Io(e)) => {
                tracing::warn!(key, error = %e, "cache entry unreadable");
                return Lookup::Miss;
            }
        };
        self.index.touch(hash, file_size, checked);
        match loaded {
            Loaded::Bytes(meta, bytes, file) => {
                // Verified just now or earlier by this process at this very mtime.
                let opened = open::Opened::new(file, meta.clone(), file_size, stamp);
                self.index.keep_open(hash, opened);
                classify(meta, Body::Bytes(bytes), policy)
            }
            Loaded::File(meta, file) if sendfile => {
                // SAFETY: the cache never writes an entry in place (see `zerocopy`).
                let body = match unsafe { Mapping::new(file, meta.len as usize) } {
                    Ok(map) => Body::Bytes(map.bytes(0, map.len())),
                    Err((_, file)) => Body::File(file),
                };
                classify(meta, body, policy)
            }
            Loaded::File(meta, file) => classify(meta, Body::File(file), policy),
        }
    }

    /// Loads a large entry, checksumming it end to end on the blocking pool unless another request
    /// for it has just done so (it waited for that one's turn); `None` if the pool failed. The flag
    /// says whether this call checked the checksum.
    async fn verify_large(
        &self,
        hash: KeyHash,
        key: &str,
        file: std::fs::File,
        size: u64,
        stamp: i64,
    ) -> Option<(Result<Loaded, StoreError>, bool)> {
        let gate = self
            .verifying
            .lock()
            .expect("verifying lock")
            .entry(hash)
            .or_default()
            .clone();
        // Removes the gate once nobody waits on it, however this call ends (a client that leaves
        // cancels it at the await).
        struct Release<'a>(&'a Cache, KeyHash, Arc<tokio::sync::Mutex<()>>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let mut verifying = self.0.verifying.lock().expect("verifying lock");
                if Arc::strong_count(&self.2) <= 2 {
                    verifying.remove(&self.1);
                }
            }
        }
        let release = Release(self, hash, gate);
        let turn = release.2.lock().await;
        let verify = !self.index.trusted(hash, stamp);
        let k = key.to_string();
        let loaded =
            tokio::task::spawn_blocking(move || Store::load_opened(file, size, &k, verify)).await;
        if verify {
            self.counters.verifications.inc();
        }
        if let Ok(Ok(_)) = &loaded {
            if verify {
                // Trusted before the next in line looks.
                self.index.touch(hash, size, Some(stamp));
            }
        }
        drop(turn);
        drop(release);
        loaded.ok().map(|r| (r, verify))
    }
}

/// Applies the TTLs to a verified entry.
fn classify(meta: EntryMeta, body: Body, policy: Policy) -> Lookup {
    let ttl = if meta.status == 200 {
        policy.ttl_ok
    } else {
        policy.ttl_error
    };
    let fresh = meta.age() < ttl;
    let cached = if meta.status == 200 {
        Cached::Found(Object {
            meta: Meta {
                len: Some(meta.len),
                content_type: meta.content_type,
                last_modified: meta
                    .last_modified
                    .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                etag: meta.etag,
                source: if fresh { Source::Hit } else { Source::Stale },
                origin: meta.origin.map(Into::into),
                cache_control: meta.cache_control,
                content_disposition: meta.content_disposition,
            },
            body,
        })
    } else {
        Cached::NotFound
    };
    if fresh {
        Lookup::Fresh(cached)
    } else {
        Lookup::Stale(cached)
    }
}
