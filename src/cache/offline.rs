//! `mediaproxy cache stats|purge|clear`: they work on the directory, not on a running proxy's memory,
//! so they work whether or not one is running.

use super::notices;
use super::store::{self, hash_key, Store};

/// What `mediaproxy cache stats` prints.
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub oldest: Option<std::time::SystemTime>,
}

/// Reads the directory, not a running proxy's memory, so it works whether or not one is running.
pub fn stats(dir: &std::path::Path) -> std::io::Result<Stats> {
    let store = Store::attach(dir);
    let mut s = Stats {
        entries: 0,
        bytes: 0,
        oldest: None,
    };
    if !store.entries_dir().exists() {
        return Ok(s);
    }
    store::walk(&store, |_, size, mtime, _| {
        s.entries += 1;
        s.bytes += size;
        s.oldest = Some(s.oldest.map_or(mtime, |o| o.min(mtime)));
    })?;
    Ok(s)
}

/// Deletes the entries for `keys`; a running proxy sees the file gone at its next lookup and refetches,
/// and stops counting it within a second (a notice, see `notices`).
/// Returns, per key, whether there was an entry.
pub fn purge(dir: &std::path::Path, keys: &[crate::key::Key]) -> Vec<bool> {
    let store = Store::attach(dir);
    let hashes: Vec<_> = keys.iter().map(|k| hash_key(k.as_str())).collect();
    let removed: Vec<bool> = hashes.iter().map(|h| store.remove(*h)).collect();
    let gone: Vec<_> = hashes
        .iter()
        .zip(&removed)
        .filter_map(|(h, r)| r.then_some(*h))
        .collect();
    notices::leave(dir, &gone, false);
    removed
}

/// Deletes every entry (a running proxy keeps serving and refills as media is read).
pub fn clear(dir: &std::path::Path) -> std::io::Result<u64> {
    let store = Store::attach(dir);
    let v1 = store.entries_dir();
    if !v1.exists() {
        return Ok(0);
    }
    let mut n = 0;
    let mut hashes = Vec::new();
    store::walk(&store, |hash, _, _, _| hashes.push(hash))?;
    for hash in hashes {
        if store.remove(hash) {
            n += 1;
        }
    }
    notices::leave(dir, &[], true);
    Ok(n)
}

/// Deletes the entries whose key starts with `prefix` (a takedown: `accounts/avatars/000/000/042/`);
/// returns their keys.
pub fn purge_prefix(dir: &std::path::Path, prefix: &str) -> std::io::Result<Vec<String>> {
    let store = Store::attach(dir);
    if !store.entries_dir().exists() {
        return Ok(Vec::new());
    }
    let mut hashes = Vec::new();
    store::walk(&store, |hash, _, _, _| hashes.push(hash))?;
    let mut purged = Vec::new();
    let mut gone = Vec::new();
    for hash in hashes {
        if let Some(key) = store.entry_key(hash).filter(|k| k.starts_with(prefix)) {
            if store.remove(hash) {
                purged.push(key);
                gone.push(hash);
            }
        }
    }
    notices::leave(dir, &gone, false);
    purged.sort();
    Ok(purged)
}
