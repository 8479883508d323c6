//! How entry files are fanned out into directories, decided when a cache is opened from what its
//! directory holds, so an upgrade neither moves nor loses entries.
//!
//! New caches use `v2/ab/c/<hash>`: 4,096 leaf directories, as many as nginx's `levels=1:2` (here two
//! hex digits, then one). Caches made by releases before it use `v1/ab/cd/<hash>`, 65,536 directories,
//! and keep it. On ext4 a directory costs at least a 4 KiB block: 256 MiB of them for `v1`'s, against
//! 16–64 MiB for `v2`'s (their entries need more blocks per directory as the cache grows). And a young
//! `v1` cache made a new directory on 85 % of its stores (`mkdir`, 12–17 µs on ext4, plus the failed
//! `rename` before it), against 7 % for nginx.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `v1/ab/cd/<hash>`: caches made before `v2` existed.
    V1,
    /// `v2/ab/c/<hash>`: new caches.
    V2,
}

impl Layout {
    pub const ALL: [Layout; 2] = [Layout::V1, Layout::V2];

    pub fn dir_name(self) -> &'static str {
        match self {
            Layout::V1 => "v1",
            Layout::V2 => "v2",
        }
    }

    /// Hex digits of the second directory level: `ab/cd/` or `ab/c/`.
    pub(super) fn second_level_digits(self) -> usize {
        match self {
            Layout::V1 => 2,
            Layout::V2 => 1,
        }
    }

    /// `v1` if the cache has a `v1/` with anything in it (a cache of an earlier release, or one an
    /// earlier release went back to using), else `v2`. A `v1/` that cannot be read is an error, not
    /// an empty cache: taking it for one would leave its entries uncounted beside a new `v2/`.
    pub fn of(root: &Path) -> io::Result<Layout> {
        Ok(if has_any(&root.join("v1"))? {
            Layout::V1
        } else {
            Layout::V2
        })
    }
}

fn has_any(dir: &Path) -> io::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut d) => Ok(d.next().transpose().map_err(|e| at(dir, e))?.is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(at(dir, e)),
    }
}

/// The error, naming the path it is about (an admin reads "…/v1: Not a directory", not the bare error).
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// With `v1` in use, moves a `v2/` that holds anything out of the way and deletes it (and what an
/// earlier start left to delete) on a thread of its own.
///
/// Such a directory exists only after going back to an earlier release and forward again: `v1/` is
/// used then, and `v2/` is stale. Its entries are not counted against `max_size`, and may include
/// what was purged meanwhile (an earlier release's `cache purge` reaches `v1/` only), which must never
/// be served again if the layout in use ever changed back. The rename is atomic; the delete may take
/// a while on a large cache, so it runs beside the proxy, and a delete cut short by a restart goes
/// on at the next start.
pub(super) fn retire_stale(root: &Path, used: Layout) -> io::Result<()> {
    // Only `v2/` is ever retired: `v1/` is chosen whenever it holds anything, and one that fills
    // between that choice and here belongs to an earlier release running on the same directory.
    let dir = root.join(Layout::V2.dir_name());
    if used == Layout::V1 && has_any(&dir)? {
        let to = root.join(format!("{STALE}{}", crate::unix_time::now_ms()));
        match fs::rename(&dir, &to) {
            Ok(()) => tracing::warn!(
                dir = %dir.display(),
                "the cache holds entries of a layout it no longer uses (after going back to an earlier release): deleting them"
            ),
            // Another process starting on the same directory moved it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&dir, e)),
        }
    }
    let stale: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| at(root, e))?
        .filter_map(Result::ok)
        .filter(|e| is_stale(&e.file_name().to_string_lossy()))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    if !stale.is_empty() {
        std::thread::Builder::new()
            .name("mediaproxy-stale".into())
            .spawn(move || {
                for dir in stale {
                    match fs::remove_dir_all(&dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), error = %e, "could not delete a stale cache layout")
                        }
                    }
                }
            })?;
    }
    Ok(())
}

/// `stale-v2-<ms>`, and nothing else: `cache.dir` may be shared with files of the admin's.
fn is_stale(name: &str) -> bool {
    name.strip_prefix(STALE)
        .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
}

/// Names of directories being deleted: `stale-v2-<ms>`.
const STALE: &str = "stale-v2-";
