//! Eviction: least recently used beyond `max_size`, anything not read for `inactive`; deleting the
//! files on the blocking pool, under the path lock.

use super::*;

impl Index {
    pub(super) fn enforce(&self) {
        let mut inner = self.lock();
        let victims = self.victims(&mut inner, crate::unix_time::now());
        drop(inner);
        self.delete(victims);
    }

    /// The oldest negative entries while they take more than their share; then from the cold end while
    /// over `max_size` or idle past `inactive`.
    pub(super) fn victims(&self, inner: &mut Inner, now: u64) -> Vec<KeyHash> {
        let mut out = Vec::new();
        while inner.negative_bytes > self.max_size / NEGATIVE_SHARE {
            let Some((hash, ())) = inner.negatives.peek_lru().map(|(h, u)| (*h, *u)) else {
                break;
            };
            inner.take(hash);
            out.push(hash);
        }
        while let Some((_, slot)) = inner.lru.peek_lru() {
            let idle = now.saturating_sub(slot.last_read) > self.inactive;
            if inner.bytes <= self.max_size && !idle {
                break;
            }
            let Some((hash, slot)) = inner.lru.pop_lru() else {
                break;
            };
            inner.uncount(hash, slot);
            out.push(hash);
        }
        out
    }

    /// Each unlink happens under the lock, after checking the key was not published again since it was
    /// chosen (see [`Index::publish`]); the lock is taken per file, so hits interleave with a long eviction.
    /// Deletes evicted entries' files: on the blocking pool when called from async code (an eviction
    /// can follow any hit or fill, and an unlink waits for the disk), at once otherwise.
    pub(super) fn delete(&self, victims: Vec<KeyHash>) {
        if victims.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let index = self.clone();
                drop(rt.spawn_blocking(move || index.delete_now(victims)));
            }
            Err(_) => self.delete_now(victims),
        }
    }

    pub(super) fn delete_now(&self, victims: Vec<KeyHash>) {
        for hash in victims {
            let paths = self.lock_paths();
            // Published again since it was chosen: that file is the new entry.
            if self.lock().lru.contains(&hash) {
                continue;
            }
            if self.store.remove(hash) {
                self.evictions.inc();
            }
            drop(paths);
            // Closed too, or the unlinked file would keep its blocks until the descriptor is pushed out.
            self.open.drop_entry(hash);
        }
    }
}
