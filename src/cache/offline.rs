//! `mediaproxy cache stats|purge|clear`: they work on the directory, not on a running proxy's memory,
//! so they work whether or not one is running.
//!
//! `stats` counts the layout in use (what is served and counted against `max_size`); `purge` and
//! `clear` delete from every layout the directory holds, so a takedown also reaches entries a cache
//! left behind when it went back to an earlier release and forward again.

use super::notices;
use super::store::{self, hash_key, Layout, Store};

/// The cache's stores, one per layout that has a directory, the one in use first.
fn every_layout(dir: &std::path::Path) -> std::io::Result<Vec<Store>> {
    let used = Store::attach(dir)?;
    let in_use = used.layout();
    let others = Layout::ALL
        .into_iter()
        .filter(|l| *l != in_use)
        .map(|l| Store::attach_as(dir, l));
    let mut stores = Vec::new();
    for s in std::iter::once(used).chain(others) {
        // A layout directory that cannot be looked at is an error: a purge must not skip it quietly.
        if s.entries_dir().try_exists()? {
            stores.push(s);
        }
    }
    Ok(stores)
}

/// What `mediaproxy cache stats` prints.
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub oldest: Option<std::time::SystemTime>,
}

/// Reads the directory, not a running proxy's memory, so it works whether or not one is running.
pub fn stats(dir: &std::path::Path) -> std::io::Result<Stats> {
    let store = Store::attach(dir)?;
    let mut s = Stats {
        entries: 0,
        bytes: 0,
        oldest: None,
    };
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
pub fn purge(dir: &std::path::Path, keys: &[crate::key::Key]) -> std::io::Result<Vec<bool>> {
    let stores = every_layout(dir)?;
    let hashes: Vec<_> = keys.iter().map(|k| hash_key(k.as_str())).collect();
    let removed: Vec<bool> = hashes
        .iter()
        .map(|h| stores.iter().fold(false, |any, s| s.remove(*h) | any))
        .collect();
    let gone: Vec<_> = hashes
        .iter()
        .zip(&removed)
        .filter_map(|(h, r)| r.then_some(*h))
        .collect();
    notices::leave(dir, &gone, false);
    Ok(removed)
}

/// Deletes every entry (a running proxy keeps serving and refills as media is read). Returns the
/// number of entry files deleted (a key with an entry in two layouts counts twice).
pub fn clear(dir: &std::path::Path) -> std::io::Result<u64> {
    let stores = every_layout(dir)?;
    if stores.is_empty() {
        return Ok(0); // no cache here: nothing to tell a running proxy, and nothing to create
    }
    let mut n = 0;
    for store in stores {
        let mut hashes = Vec::new();
        store::walk(&store, |hash, _, _, _| hashes.push(hash))?;
        for hash in hashes {
            if store.remove(hash) {
                n += 1;
            }
        }
    }
    notices::leave(dir, &[], true);
    Ok(n)
}

/// Deletes the entries whose key starts with `prefix` (a takedown: `accounts/avatars/000/000/042/`);
/// returns their keys.
pub fn purge_prefix(dir: &std::path::Path, prefix: &str) -> std::io::Result<Vec<String>> {
    let mut purged = Vec::new();
    let mut gone = Vec::new();
    for store in every_layout(dir)? {
        let mut hashes = Vec::new();
        store::walk(&store, |hash, _, _, _| hashes.push(hash))?;
        for hash in hashes {
            if let Some(key) = store.entry_key(hash).filter(|k| k.starts_with(prefix)) {
                if store.remove(hash) {
                    purged.push(key);
                    gone.push(hash);
                }
            }
        }
    }
    notices::leave(dir, &gone, false);
    purged.sort();
    purged.dedup();
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, key: &str) {
        let meta = store::EntryMeta {
            key: key.into(),
            status: 200,
            len: 2,
            content_type: None,
            etag: None,
            last_modified: None,
            stored_at_ms: 0,
            origin: None,
            cache_control: None,
            content_disposition: None,
        };
        let mut w = store.writer().unwrap();
        w.write(b"ok").unwrap();
        w.seal(store, &meta).unwrap().publish().unwrap();
    }

    /// After going back to an earlier release (which fills `v1/`) and forward again, `v2/` holds
    /// entries that are no longer served; a takedown must reach them too, in case the layout in use
    /// ever changes back.
    #[test]
    fn purge_and_clear_reach_a_layout_no_longer_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = Store::open(dir.path()).unwrap();
        assert_eq!(v2.layout(), Layout::V2);
        let (taken_down, other) = ("accounts/avatars/1/a.png", "accounts/avatars/1/b.png");
        put(&v2, taken_down);
        put(&v2, other);
        let v1 = Store::attach_as(dir.path(), Layout::V1);
        std::fs::create_dir_all(v1.path(hash_key(taken_down)).parent().unwrap()).unwrap();
        put(&v1, taken_down);
        put(&v1, other);
        assert_eq!(Store::attach(dir.path()).unwrap().layout(), Layout::V1);

        let key = crate::key::from_raw(taken_down).unwrap();
        assert_eq!(purge(dir.path(), &[key]).unwrap(), vec![true]);
        assert!(!v1.path(hash_key(taken_down)).exists());
        assert!(
            !v2.path(hash_key(taken_down)).exists(),
            "the stale layout too"
        );
        assert_eq!(
            clear(dir.path()).unwrap(),
            2,
            "both copies of the other key"
        );
        assert!(!v2.path(hash_key(other)).exists());
    }
}
