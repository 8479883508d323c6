//! Fills of small objects (up to [`super::store::SMALL`], which is most of a Mastodon server's media:
//! thumbnails, avatars, images) held in memory until they are whole, then written, sealed and
//! published in one trip to the blocking pool.
//!
//! A fill that writes as it goes costs a trip to the blocking pool to create its file and one per
//! batch; on a cold miss of a 30-80 KB image those trips (a thread woken, two context switches, the
//! worker woken back: four per miss) took about a third of the proxy's CPU. nginx writes its temp file
//! inline in its event loop; here the disk never runs on the async workers, but a small fill goes
//! there once. (Stores on the workers were tried: one worker blocked on a frozen disk left the others
//! parked with nobody polling for I/O, and every request stalled; see
//! `fills::small_fills_on_a_stalled_cache_disk_hold_up_no_worker`.)
//!
//! Readers (the fill's own client and its followers) take the chunks from memory as they arrive, so a
//! follower streams a small object as it does a large one. The chunk that completes the body is held
//! back until the entry is stored (or failed to be): a client that has the whole body finds the entry
//! on disk, as after a large fill. The bytes held this way are bounded by
//! [`BUDGET`] across all fills (each body is one allocation of its exact length): past it, small fills
//! write as they go like large ones. A reader that is
//! slow keeps its object's memory (at most [`super::store::SMALL`]) until it is done with it.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::fill::{may_go_on_unread, seal_and_publish, Prepared};
use super::flights::{Progress, Shared, Status};
use super::growing::{stream_of, ChunkReader, FillFailed};
use crate::object::ByteStream;

/// Bytes of small fills held in memory at once, across all fills. A burst of cold misses beyond it
/// (a few hundred 80 KB images at the same instant) writes the rest as it goes.
pub const BUDGET: usize = 32 * 1024 * 1024;

/// The chunks of a small body as they arrive; its share of [`BUDGET`] is returned when the last
/// reader drops it.
pub(super) struct MemBody {
    chunks: Mutex<Vec<Bytes>>,
    _budget: OwnedSemaphorePermit,
}

impl MemBody {
    /// A body of `len` bytes, if [`BUDGET`] has room for it.
    pub(super) fn reserve(budget: &Arc<Semaphore>, len: u64) -> Option<Arc<MemBody>> {
        let permits = u32::try_from(len).ok()?.max(1);
        let permit = budget.clone().try_acquire_many_owned(permits).ok()?;
        Some(Arc::new(MemBody {
            chunks: Mutex::new(Vec::new()),
            _budget: permit,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Bytes>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, i: usize) -> Option<Bytes> {
        self.lock().get(i).cloned()
    }
}

/// Reads bytes `0..len` of a small body as its fill receives them; if the fill stops short, the
/// stream ends in [`FillFailed`] saying how far it got (the caller resumes from an upstream).
pub(super) fn stream(body: Arc<MemBody>, len: u64, shared: Arc<Shared>) -> ByteStream {
    let reader = Reader {
        progress: shared.progress.subscribe(),
        _shared: shared,
        body,
        len,
        next: 0,
        pos: 0,
    };
    stream_of(reader)
}

struct Reader {
    progress: watch::Receiver<Progress>,
    /// Keeps the progress sender alive, so the progress only ends with a final status.
    _shared: Arc<Shared>,
    body: Arc<MemBody>,
    len: u64,
    /// Index of the next chunk.
    next: usize,
    pos: u64,
}

impl ChunkReader for Reader {
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.pos >= self.len {
                return None;
            }
            // Seen before looking at the chunks: a chunk pushed after the look changes the progress
            // after this, so the wait below wakes for it.
            let status = self.progress.borrow_and_update().status;
            if let Some(chunk) = self.body.get(self.next) {
                self.next += 1;
                self.pos += chunk.len() as u64;
                return Some(Ok(chunk));
            }
            if status != Status::Running || self.progress.changed().await.is_err() {
                return Some(Err(io::Error::other(FillFailed { at: self.pos })));
            }
        }
    }
}

/// The fill of a small body: upstream → memory (readers take it from there), then one trip to the
/// blocking pool that writes, seals and publishes the entry. `permit`: a background-fill permit
/// taken beforehand (a fill no client reads), or taken here when the last reader leaves.
pub(super) async fn run(p: Prepared, body: Arc<MemBody>, mut permit: Option<OwnedSemaphorePermit>) {
    let Prepared {
        guard,
        mut upstream,
        entry,
        reserved,
    } = p;
    let cache = guard.cache.clone();
    let shared = guard.shared.clone();
    let mut left_at = permit.is_some().then(Instant::now);
    let mut pos = 0u64;
    // The body's one allocation, of its exact length: each chunk is copied in once and handed on as a
    // slice of it, so the memory held is what the budget counts (an upstream chunk can be a slice of a
    // much larger read buffer, which holding it would keep alive).
    let mut buf = BytesMut::with_capacity(entry.len as usize);
    // The chunk that completes the body: readers get it only once the entry is stored (or failed to
    // be), so a client that has the whole body finds the entry on disk, as with a large fill.
    let mut last = None;
    let complete = loop {
        match upstream.next().await {
            Some(Ok(chunk)) if pos + chunk.len() as u64 <= entry.len => {
                pos += chunk.len() as u64;
                buf.extend_from_slice(&chunk);
                let chunk = buf.split().freeze();
                if pos == entry.len {
                    // The Content-Length is reached: hyper's framing ends the body here.
                    last = Some(chunk);
                    break true;
                }
                body.lock().push(chunk);
                shared.progress.send_modify(|p| p.written = pos);
            }
            // More than its Content-Length: not the object it said it was.
            Some(Ok(_)) | Some(Err(_)) => break false,
            None => break pos == entry.len,
        }
        if shared.progress.receiver_count() > 0 {
            left_at = None;
            continue;
        }
        let left = *left_at.get_or_insert_with(Instant::now);
        if !may_go_on_unread(&cache, &entry.key, left, &mut permit) {
            break false;
        }
    };
    drop(upstream);
    let mut guard = guard;
    if !complete {
        cache.counters.fill("failed");
        return; // the guard's drop tells readers the fill failed where it stopped
    }
    let mut chunks = body.lock().clone();
    chunks.extend(last.clone());
    let (c, hash, s) = (cache.clone(), guard.hash, shared.clone());
    let stored = tokio::task::spawn_blocking(move || {
        let writer = c.store().writer();
        // Released before the entry is published, which counts its real size.
        drop(reserved);
        match writer {
            // The whole body and the trailer in one write.
            Ok(w) => seal_and_publish(&c, w, &chunks, hash, &s, &entry),
            Err(e) => {
                c.write_failed(&entry.key, &e);
                false
            }
        }
    })
    .await
    .unwrap_or(false);
    if let Some(chunk) = last {
        body.lock().push(chunk);
        shared.progress.send_modify(|p| p.written = pos);
    }
    if stored && shared.voided() {
        cache.counters.fill("voided");
    } else if stored {
        cache.counters.fill("stored");
        guard.status = Status::Done;
    } else {
        cache.counters.fill("failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_fills_in_memory_stay_within_the_budget() {
        let budget = Arc::new(Semaphore::new(BUDGET));
        let each = super::super::store::SMALL;
        let held: Vec<_> = (0..BUDGET as u64 / each)
            .map(|_| MemBody::reserve(&budget, each).expect("within the budget"))
            .collect();
        assert!(
            MemBody::reserve(&budget, 1).is_none(),
            "past the budget, a fill writes as it goes"
        );
        drop(held);
        assert!(
            MemBody::reserve(&budget, each).is_some(),
            "returned on drop"
        );
    }
}
