//! Small entries kept open between hits, with their metadata already parsed: nginx's `open_file_cache`
//! for the cache directory. Without it a hit walks `ab/c/<hash>` (dentry lookups and permission
//! checks), parses the JSON metadata and closes the file again: measured a sixth of a hit's CPU.
//!
//! A kept descriptor is checked with one `fstat` before every use: a file unlinked by eviction, by
//! `mediaproxy cache purge|clear` from another process, or replaced by a refill (a rename over it) has no
//! links left, and any write changes its mtime. Either way the descriptor is dropped and the entry is
//! opened again from its path, so what is served is always what the directory holds.
//!
//! Only small entries are kept: a descriptor pins its file's blocks after an unlink, and this bounds
//! what can be pinned that way to `capacity` × [`super::store::SMALL`].

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;

use super::store::{mtime_stamp, note_read, EntryMeta, KeyHash};
use crate::object::read_at;
use crate::zerocopy::Mapping;

/// An entry whose checksum was verified when it was opened.
pub struct Opened {
    body: Kept,
    pub meta: EntryMeta,
    /// The file's size on disk, for the index.
    pub size: u64,
    /// mtime in nanoseconds when verified.
    stamp: i64,
}

/// The body mapped (its bytes then reach a plain HTTP/1.1 socket with `sendfile`; other connections
/// read it), or, where mapping failed, the file to read it from.
enum Kept {
    Mapped(Arc<Mapping>),
    File(File),
}

impl Opened {
    pub fn new(file: File, meta: EntryMeta, size: u64, stamp: i64) -> Opened {
        // SAFETY: the cache never writes an entry in place (see `zerocopy`).
        let body = match unsafe { Mapping::new(file, meta.len as usize) } {
            Ok(map) => Kept::Mapped(map),
            Err((_, file)) => Kept::File(file),
        };
        Opened {
            body,
            meta,
            size,
            stamp,
        }
    }

    fn file(&self) -> &File {
        match &self.body {
            Kept::Mapped(map) => map.file(),
            Kept::File(file) => file,
        }
    }

    /// The body, if the file is still the one verified (linked, unwritten since).
    /// `sendfile`: the body goes out with `sendfile` (see [`crate::zerocopy`]), so the mapping itself is
    /// the body; otherwise it is read into memory, so no worker faults in pages of the file.
    pub fn read_current(&self, sendfile: bool) -> Option<Bytes> {
        let md = self.file().metadata().ok()?;
        if md.nlink() == 0 || mtime_stamp(&md) != self.stamp || md.len() != self.size {
            return None;
        }
        note_read(self.file(), md.atime());
        match &self.body {
            Kept::Mapped(map) if sendfile => Some(map.bytes(0, map.len())),
            _ => read_at(self.file(), 0, self.meta.len as usize).ok(),
        }
    }
}

pub struct OpenFiles {
    lru: Option<Mutex<LruCache<KeyHash, Arc<Opened>>>>,
}

impl OpenFiles {
    pub fn new(capacity: usize) -> OpenFiles {
        OpenFiles {
            lru: std::num::NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c))),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, LruCache<KeyHash, Arc<Opened>>>> {
        self.lru
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn get(&self, hash: KeyHash) -> Option<Arc<Opened>> {
        self.lock()?.get(&hash).cloned()
    }

    pub fn put(&self, hash: KeyHash, opened: Opened) {
        // A displaced descriptor is closed after the lock is released (the guard dies with the statement).
        let displaced = match self.lock() {
            Some(mut lru) => lru.push(hash, Arc::new(opened)),
            None => None,
        };
        drop(displaced);
    }

    pub fn drop_entry(&self, hash: KeyHash) {
        let _old = self.lock().and_then(|mut lru| lru.pop(&hash));
    }

    pub fn len(&self) -> usize {
        self.lock().map_or(0, |lru| lru.len())
    }
}
