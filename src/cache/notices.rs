//! How a running proxy learns of `mediaproxy cache purge|clear` run from a shell: the command leaves a
//! notice file in `<cache>/notices/` naming the entries it deleted, and the proxy reads and deletes
//! the notices once a second. Deleting the files alone is already safe (a lookup that finds the file
//! gone refetches), but without the notice the index would go on counting the entries that nobody
//! looks up again: `/metrics` would show a cache that is not there, and eviction would make room for it.
//!
//! A notice is written to a temporary name and renamed into place, so the proxy never reads half of
//! one. With no proxy running, notices wait; the next start reads them after its index has loaded
//! (forgetting an entry only when its file is really gone, so a stale notice is harmless).

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::store::KeyHash;
use super::Cache;

/// A notice line that means "every entry": `cache clear`.
const ALL: &str = "*";
const EVERY: Duration = Duration::from_secs(1);
/// A notice still being written after this long belongs to a command that died.
const STALE_TMP: Duration = Duration::from_secs(60);

fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("notices")
}

/// Creates `<cache>/notices` owned like the cache directory itself: an admin running the command as
/// root must not leave a directory the proxy (the service user) cannot delete notices from.
pub(super) fn create(cache_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir(cache_dir);
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let owner = std::fs::metadata(cache_dir)?;
    if let Err(e) = std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid())) {
        tracing::debug!(error = %e, "could not give the notices directory to the cache's owner");
    }
    Ok(())
}

/// Leaves a notice for a running proxy that these entries (or, with `all`, every entry) were deleted.
/// Best effort: without it a proxy still serves correctly, only its gauges lag.
pub(super) fn leave(cache_dir: &Path, hashes: &[KeyHash], all: bool) {
    if hashes.is_empty() && !all {
        return;
    }
    let dir = dir(cache_dir);
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(
        "{}-{}-{seq}",
        std::process::id(),
        crate::unix_time::now_ms()
    );
    let tmp = dir.join(format!("{name}.tmp"));
    let write = || -> std::io::Result<()> {
        create(cache_dir)?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        if all {
            writeln!(out, "{ALL}")?;
        }
        for hash in hashes {
            writeln!(out, "{hash:032x}")?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, dir.join(format!("{name}.deleted")))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "could not leave a notice for a running proxy");
    }
}

impl Cache {
    /// Reads and deletes the notices left by `cache purge|clear`; blocking (run on the blocking pool).
    /// Returns how many entries the index stopped counting.
    /// `applied`: notices read already that could not be deleted (never read twice).
    fn apply_notices(&self, applied: &mut HashSet<OsString>) -> usize {
        if !self.index.loaded() {
            return 0; // the load counts what is there; notices wait for it to finish
        }
        let Ok(entries) = std::fs::read_dir(dir(self.store.root())) else {
            return 0;
        };
        let mut forgotten = 0;
        let mut all = false;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "deleted") {
                // A `.tmp` left by a command killed mid-write: nobody will rename it any more.
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TMP));
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            if applied.contains(&entry.file_name()) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for line in text.lines() {
                if line == ALL {
                    all = true;
                } else if let Ok(hash) = u128::from_str_radix(line, 16) {
                    forgotten += usize::from(self.index.forget_deleted(hash));
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a cache notice (read once, ignored from now on): check the owner of the notices directory");
                applied.insert(entry.file_name());
            }
        }
        if all {
            forgotten += self.index.forget_missing();
        }
        forgotten
    }
}

/// Applies notices once a second for as long as the proxy runs (the caller owns the task).
pub fn watch(cache: Arc<Cache>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = create(cache.store.root()) {
            tracing::warn!(error = %e, "cannot create the cache's notices directory: `mediaproxy cache purge|clear` will not show in /metrics until a restart");
        }
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applied = HashSet::new();
        loop {
            tick.tick().await;
            let cache = cache.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let n = cache.apply_notices(&mut applied);
                (n, applied)
            })
            .await;
            let Ok((n, kept)) = pass else {
                return; // the pass panicked: stop rather than loop on it
            };
            applied = kept;
            match n {
                0 => {}
                n => tracing::info!(
                    entries = n,
                    "entries deleted by `mediaproxy cache purge|clear` no longer counted"
                ),
            }
        }
    })
}
