//! A persistent set of keys with the time each was added, bounded in age and in count: Mastodon's busts
//! (tombstones, `cache.dir/tombstones`) and the keys already copied to the copy target
//! (`cache.dir/copied`). Both must outlive restarts and stay small at a million keys:
//!
//! - on disk: a header, then 16-byte records (key id, time, CRC32C of both), appended and fdatasync'ed
//!   before `add` returns; a torn last record is ignored at load; the file is rewritten without expired,
//!   evicted and repeated records when those outnumber the live ones;
//! - in memory, 12 bytes a key ([`Memory`]); past `max` keys, the oldest are dropped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

const MAGIC: &[u8; 8] = b"MPKEYS1\n";
const RECORD: usize = 16;

/// The first 8 bytes of a SHA-256: a collision among a million keys has a chance of about 3e-8, and
/// would only make one more key look busted (asked of the write upstream alone) or copied (one copy
/// fewer, which `migrate`/`verify` would still find).
pub type KeyId = u64;

/// The id of `text` (a key, or a target and a key).
pub fn id_of(text: &str) -> KeyId {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(text.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

pub struct KeySet {
    path: PathBuf,
    /// Past this many keys, the oldest are forgotten.
    max: usize,
    memory: Mutex<Memory>,
    /// The append handle and how many records the file holds; separate from `memory` so lookups never
    /// wait for an fdatasync.
    file: Mutex<(File, u64)>,
}

fn record(id: KeyId, at: u32) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&id.to_le_bytes());
    r[8..12].copy_from_slice(&at.to_le_bytes());
    let crc = crate::checksum::crc32c(&r[..12]);
    r[12..].copy_from_slice(&crc.to_le_bytes());
    r
}

fn parse(r: &[u8]) -> Option<(KeyId, u32)> {
    let crc = u32::from_le_bytes(r[12..16].try_into().ok()?);
    (crate::checksum::crc32c(&r[..12]) == crc).then(|| {
        (
            u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
            u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
        )
    })
}

pub fn unix_now() -> u32 {
    u32::try_from(crate::unix_time::now()).unwrap_or(u32::MAX)
}

impl KeySet {
    /// Loads `dir/name` (creating it), keeping the records still alive under `ttl` (at most `max`, the
    /// newest), and compacts the file when most of it is dead.
    pub fn open(dir: &Path, name: &str, ttl: Duration, max: usize) -> io::Result<KeySet> {
        let path = dir.join(name);
        let now = unix_now();
        let mut memory = Memory::default();
        let mut records = 0u64;
        match File::open(&path) {
            Ok(f) => {
                let mut all = Vec::new();
                let corrupt = read_records(f, &path, &mut all, &mut records)?;
                if corrupt > 0 {
                    tracing::warn!(path = %path.display(), corrupt, "records failed their checksum and were skipped");
                }
                memory = Memory::load(all, ttl, now, max);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let t = KeySet {
            file: Mutex::new((append(&path)?, records)),
            max,
            path,
            memory: Mutex::new(memory),
        };
        t.compact_if_mostly_dead(ttl);
        Ok(t)
    }

    /// Reads `dir/name` without writing to it (for `migrate` beside a running proxy that owns it).
    /// A missing file is an empty set.
    pub fn read_only(dir: &Path, name: &str, ttl: Duration) -> io::Result<Memory> {
        let path = dir.join(name);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Memory::default()),
            Err(e) => return Err(e),
        };
        let mut all = Vec::new();
        read_records(f, &path, &mut all, &mut 0)?;
        let memory = Memory::load(all, ttl, unix_now(), usize::MAX);
        Ok(memory)
    }

    /// Whether `id` was added less than `ttl` ago (and not forgotten past `max`).
    pub fn contains(&self, id: KeyId, ttl: Duration) -> bool {
        let memory = self.memory.lock().expect("key set lock");
        if memory.len() == 0 {
            return false;
        }
        memory.get(id).is_some_and(|at| alive(at, ttl, unix_now()))
    }

    pub fn is_empty(&self) -> bool {
        self.memory.lock().expect("key set lock").len() == 0
    }

    /// Records `id` durably (appended and fdatasync'ed), then in memory. Blocking: call it off the
    /// async runtime. On a write error it is still in memory until the process stops.
    pub fn add(&self, id: KeyId, ttl: Duration) -> io::Result<()> {
        self.append(id, ttl, true)
    }

    /// Like [`KeySet::add`] without the fdatasync: for a set whose last additions may be lost in a
    /// crash at a small cost (the keys copied: a lost one costs one HEAD on the target).
    pub fn add_lazily(&self, id: KeyId, ttl: Duration) -> io::Result<()> {
        self.append(id, ttl, false)
    }

    fn append(&self, id: KeyId, ttl: Duration, sync: bool) -> io::Result<()> {
        let now = unix_now();
        let written = {
            // Memory is updated under the file lock too, so a compaction (which rewrites the file
            // from memory under the same lock) cannot fall between the append and the insert.
            let mut file = self.file.lock().expect("key set file lock");
            let r = file.0.write_all(&record(id, now)).and_then(|()| {
                if sync {
                    file.0.sync_data()
                } else {
                    Ok(())
                }
            });
            match &r {
                Ok(()) => file.1 += 1,
                // A short write (a full disk) would misalign every later record: cut it off.
                Err(_) => {
                    let _ = file.0.set_len(MAGIC.len() as u64 + file.1 * RECORD as u64);
                }
            }
            self.memory
                .lock()
                .expect("key set lock")
                .insert(id, now, ttl, now, self.max);
            r
        };
        written?;
        self.compact_if_mostly_dead(ttl);
        Ok(())
    }

    /// Keys in memory (until the next merge, expired ones included).
    pub fn count(&self) -> usize {
        self.memory.lock().expect("key set lock").len()
    }

    #[cfg(test)]
    /// Heap bytes the in-memory set holds (for the size bound the tests and the docs state).
    pub fn heap_bytes(&self) -> usize {
        self.memory.lock().expect("key set lock").heap_bytes()
    }

    /// Rewrites the file with only the live records once dead and repeated ones are the majority, so
    /// it stays proportional to what one `ttl` (or `max`) keeps. A failure is logged and changes
    /// nothing: the old file, still complete, stays in use.
    fn compact_if_mostly_dead(&self, ttl: Duration) {
        let mut file = self.file.lock().expect("key set file lock");
        let live: Vec<(KeyId, u32)> = {
            let mut m = self.memory.lock().expect("key set lock");
            if file.1 <= 2 * m.len() as u64 + MERGE_AT as u64 {
                return;
            }
            m.merge(ttl, unix_now());
            m.bound(self.max);
            m.records().collect()
        };
        match rewrite(&self.path, &live) {
            Ok(new) => {
                *file = (new, live.len() as u64);
                tracing::info!(path = %self.path.display(), live = live.len(), "key set compacted");
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not compact; the file keeps growing until the next try")
            }
        }
    }
}

/// Parses the file in pieces (never the whole file in memory besides the parsed records); returns how
/// many records failed their checksum. An empty file, or one holding only part of the header, is a
/// crash before the header was synced: no records.
fn read_records(
    mut f: File,
    path: &Path,
    out: &mut Vec<(KeyId, u32)>,
    records: &mut u64,
) -> io::Result<u64> {
    let mut head = [0u8; MAGIC.len()];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if got < head.len() && MAGIC.starts_with(&head[..got]) {
        return Ok(0);
    }
    if &head != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a mediaproxy key set (move it away to start without it)",
                path.display()
            ),
        ));
    }
    let mut reader = io::BufReader::with_capacity(64 * 1024, f);
    let mut r = [0u8; RECORD];
    let mut corrupt = 0;
    loop {
        // A torn last record (a crash mid-append) is shorter than RECORD and ends the file here.
        match reader.read_exact(&mut r) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        *records += 1;
        match parse(&r) {
            Some(rec) => out.push(rec),
            None => corrupt += 1,
        }
    }
    Ok(corrupt)
}

/// Writes a new file holding `live` (tmp, fsync, opened for appending, then renamed into place), so
/// the handle returned is the file now at `path`.
fn rewrite(path: &Path, live: &[(KeyId, u32)]) -> io::Result<File> {
    let tmp = path.with_extension("tmp");
    let mut out = io::BufWriter::new(File::create(&tmp)?);
    out.write_all(MAGIC)?;
    for (id, at) in live {
        out.write_all(&record(*id, *at))?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let handle = OpenOptions::new().append(true).open(&tmp)?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(handle)
}

/// Opens the file for appending, writing the header into a new (or crash-emptied) one.
fn append(path: &Path) -> io::Result<File> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    let len = f.metadata()?.len();
    if len < MAGIC.len() as u64 {
        f.set_len(0)?;
        f.write_all(MAGIC)?;
        f.sync_all()?;
    } else {
        // A torn record at the end would shift every later one: cut the file back to whole records.
        let whole = MAGIC.len() as u64
            + (len.saturating_sub(MAGIC.len() as u64) / RECORD as u64) * RECORD as u64;
        if whole != len {
            f.set_len(whole)?;
        }
    }
    Ok(f)
}

mod memory;
pub use memory::Memory;
use memory::{alive, MERGE_AT};

#[cfg(test)]
mod tests;
