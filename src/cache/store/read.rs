//! Reading one entry: opened by the path its key derives, its trailer parsed, its key and checksum
//! checked before a byte is served; and its last read noted in the file's atime.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use rustix::fs::{Mode, OFlags};

use super::trailer::{check_key, parse_trailer};
use super::{hash_key, mtime_stamp, relative_path, EntryFile, KeyHash, Loaded, Store, StoreError};
use super::{SMALL, TRAILER};
use crate::object::read_at;

/// An entry's last read is kept in its file's atime, so `inactive` and the LRU order hold across a
/// restart. Written explicitly (mounts are often `noatime` or `relatime`), at most once an hour per entry:
/// one `futimens` that leaves the mtime, and so the checksum memo, alone. It is a metadata write, so it
/// runs on the blocking pool (a stalled disk must not stall a hit), at most [`NOTES_IN_FLIGHT`] at once:
/// on a disk that stopped answering, the rest are skipped rather than piling up threads.
pub fn note_read(file: &File, accessed: i64) {
    const EVERY: i64 = 3600;
    let now = SystemTime::now();
    if (crate::unix_time::secs(now) as i64).saturating_sub(accessed) < EVERY {
        return;
    }
    if NOTES.fetch_add(1, Ordering::Relaxed) >= NOTES_IN_FLIGHT {
        NOTES.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let Ok(file) = file.try_clone() else {
        NOTES.fetch_sub(1, Ordering::Relaxed);
        return;
    };
    let note = move || {
        if let Err(e) = file.set_times(fs::FileTimes::new().set_accessed(now)) {
            tracing::debug!(error = %e, "could not record a cache entry's last read");
        }
        NOTES.fetch_sub(1, Ordering::Relaxed);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(note)),
        Err(_) => note(), // outside the server (tools, tests): nothing to stall
    }
}

static NOTES: AtomicUsize = AtomicUsize::new(0);
const NOTES_IN_FLIGHT: usize = 16;

impl Store {
    /// `Ok(None)` when there is no entry. A corrupt or foreign entry is an error (the caller drops it).
    pub fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        match self.open_entry(key)? {
            Some(e) => Self::load_opened(e.file, e.size, key, true).map(Some),
            None => Ok(None),
        }
    }

    /// Opens the entry's file and returns it with its size, so the caller can decide where to do the
    /// (possibly long) verification of a large entry.
    pub fn open_entry(&self, key: &str) -> io::Result<Option<EntryFile>> {
        let hash = hash_key(key);
        let opened = match &self.entries {
            Some(dir) => rustix::fs::openat(
                dir.as_ref(),
                relative_path(self.layout, hash).as_str(),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map(File::from)
            .map_err(io::Error::from),
            None => File::open(self.path(hash)),
        };
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let md = file.metadata()?;
        Ok(Some(EntryFile {
            size: md.len(),
            stamp: mtime_stamp(&md),
            accessed: md.atime(),
            ino: md.ino(),
            file,
        }))
    }

    /// True when [`Store::load_opened`] is one read and a CRC of at most [`SMALL`] bytes.
    pub fn is_small(size: u64) -> bool {
        size <= SMALL + 4096
    }

    /// `verify`: check the body's CRC32C (skipped only for a file this process already verified and
    /// that has not been written since, see `Index::trusted`).
    pub fn load_opened(
        file: File,
        size: u64,
        key: &str,
        verify: bool,
    ) -> Result<Loaded, StoreError> {
        if size < TRAILER {
            return Err(StoreError::Corrupt("shorter than its trailer"));
        }
        if Self::is_small(size) {
            let buf = read_at(&file, 0, size as usize)?;
            let t = parse_trailer(&buf[..], size, &file)?;
            check_key(&t.meta, key)?;
            let body = buf.slice(..t.body_len as usize);
            if verify && t.checksum(crate::checksum::crc32c(&body)) != t.crc {
                return Err(StoreError::Corrupt("checksum mismatch"));
            }
            let meta = t.meta;
            return Ok(Loaded::Bytes(meta, body, file));
        }
        let tail = read_at(&file, size - TRAILER, TRAILER as usize)?;
        let t = parse_trailer(&tail[..], size, &file)?;
        check_key(&t.meta, key)?;
        if !verify {
            return Ok(Loaded::File(t.meta, file));
        }
        let mut sum = 0u32;
        let mut pos = 0u64;
        while pos < t.body_len {
            let n = (t.body_len - pos).min(crate::object::CHUNK as u64) as usize;
            let chunk = read_at(&file, pos, n)?;
            sum = crate::checksum::crc32c_append(sum, &chunk);
            pos += n as u64;
        }
        if t.checksum(sum) != t.crc {
            return Err(StoreError::Corrupt("checksum mismatch"));
        }
        Ok(Loaded::File(t.meta, file))
    }

    /// The key an entry's file holds, read from its trailer without checking the body: for
    /// `mediaproxy cache purge --prefix`.
    pub fn entry_key(&self, hash: KeyHash) -> Option<String> {
        let file = File::open(self.path(hash)).ok()?;
        let size = file.metadata().ok()?.len();
        if size < TRAILER {
            return None;
        }
        let tail = read_at(&file, size - TRAILER, TRAILER as usize).ok()?;
        parse_trailer(&tail[..], size, &file)
            .ok()
            .map(|t| t.meta.key)
    }
}
