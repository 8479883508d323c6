//! One fill per key, and the fill itself: an upstream body written to the cache at the upstream's pace,
//! whatever its first client does.
//!
//! Like nginx's `proxy_cache_lock`: the first request for an uncached key leads the fill; others that
//! arrive meanwhile follow it ([`super::follow`]), so 50 concurrent requests cost the bucket one GET.
//!
//! The fill runs in its own task, like nginx's buffering to a temp file: it reads the upstream and writes
//! the entry as fast as both allow, on the blocking pool (a slow disk delays this fill, not the async
//! workers serving hits), batching whatever the upstream has ready into one write. Each batch then goes
//! to the leader's client through a short queue; a client that falls behind reads back from the file
//! ([`super::growing`]), so it neither slows the fill nor holds the key's lock. A client that leaves
//! does not stop the fill either (within `cache.background_fills` and [`BACKGROUND_FILL_LIMIT`]), so the
//! bytes already paid for are kept. If the disk write fails, the fill stops being one (followers are
//! released) and the client gets the rest of the body straight from the upstream, at its own pace.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::flights::{Growing, Shared, Status};
use super::growing;
use super::index::Reserved;
use super::store::{EntryMeta, EntryWriter, KeyHash};
use super::Cache;
use crate::object::{Body, ByteStream, Meta, Object, Source, CHUNK};

/// How long a fill may go on after its client left (or, for a fill without a client, at all).
pub const BACKGROUND_FILL_LIMIT: Duration = Duration::from_secs(300);
/// Batches queued for the leader's client before it counts as behind and reads from the file.
const CLIENT_QUEUE: usize = 16;

/// The leader's claim on a key. Dropping it without a result releases followers as "failed".
pub struct FillGuard {
    cache: Arc<Cache>,
    key: String,
    hash: KeyHash,
    shared: Arc<Shared>,
    status: Status,
}

/// A fill ready to run: the entry's file is open and its length reserved.
struct Prepared {
    guard: FillGuard,
    upstream: ByteStream,
    writer: EntryWriter,
    entry: EntryMeta,
    reserved: Reserved,
}

impl FillGuard {
    pub(super) fn new(
        cache: Arc<Cache>,
        key: &str,
        hash: KeyHash,
        shared: Arc<Shared>,
    ) -> FillGuard {
        FillGuard {
            cache,
            key: key.to_string(),
            hash,
            shared,
            status: Status::Failed,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The entry turned out to be in the cache already: followers look it up instead of fetching.
    pub(super) fn found_cached(mut self) {
        self.status = Status::Done;
    }

    /// No upstream has the key: a negative entry, unless a bust voided the fill.
    pub async fn not_found(mut self) {
        let cache = self.cache.clone();
        let (key, hash, shared) = (self.key.clone(), self.hash, self.shared.clone());
        let stored = tokio::task::spawn_blocking(move || {
            let stored = cache
                .sealed_not_found(&key)
                .and_then(|sealed| cache.index.publish(hash, sealed, true, || shared.voided()));
            if let Err(e) = stored {
                cache.write_failed(&key, &e);
            }
        })
        .await;
        if stored.is_ok() {
            self.status = Status::Done;
        }
    }

    /// Starts filling from a full upstream response and returns what the client reads: the same bytes,
    /// from memory while it keeps up, from the entry's file when it falls behind (its body may end in
    /// [`growing::FillFailed`]). Anything that cannot be cached as a whole (unknown length, a partial
    /// body, too large, no room) passes through untouched.
    pub async fn tee(self, obj: Object) -> Object {
        let (p, meta, file) = match self.prepare(obj).await {
            Ok(prepared) => prepared,
            Err(passed) => return passed,
        };
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let stream = growing::stream(file, p.entry.len, p.guard.shared.clone(), Some(rx));
        tokio::spawn(run(p, Some(tx), None));
        Object {
            meta,
            body: Body::Stream { stream, offset: 0 },
        }
    }

    /// Fills from a full upstream response with no client reading it (a seek was answered with a
    /// ranged GET), under a background-fill permit; returns when the fill has ended.
    pub async fn fill(self, obj: Object, permit: OwnedSemaphorePermit) {
        if let Ok((p, _, _)) = self.prepare(obj).await {
            run(p, None, Some(permit)).await;
        }
    }

    /// The fill, the object's metadata and a descriptor of the file being written (for readers); or the
    /// object back, untouched, when it is not to be cached.
    async fn prepare(self, obj: Object) -> Result<(Prepared, Meta, File), Object> {
        let Object { meta, body } = obj;
        let (len, upstream) = match (meta.len, body) {
            (Some(len), Body::Stream { stream, offset: 0 }) if len <= self.cache.max_object => {
                (len, stream)
            }
            // Larger than `cache.max_object_size`: it would push out everything else, at every
            // request. It streams through; followers (released) ask the upstream themselves.
            (_, body) => return Err(Object { meta, body }),
        };
        let passed = |upstream| Object {
            meta: meta.clone(),
            body: Body::Stream {
                stream: upstream,
                offset: 0,
            },
        };
        let Some(reserved) = self.cache.index.try_reserve(len) else {
            self.cache.counters.fills_cancelled.inc();
            tracing::debug!(key = %self.key, len, "fills in flight hold their share of cache.max_size; streaming through uncached");
            return Err(passed(upstream));
        };
        let cache = self.cache.clone();
        let opened = tokio::task::spawn_blocking(move || {
            cache
                .store()
                .writer()
                .and_then(|w| w.reader().map(|r| (w, r)))
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let (writer, file) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                self.cache.write_failed(&self.key, &e);
                return Err(passed(upstream));
            }
        };
        self.share_body(&meta, &file);
        let entry = self.entry_meta(&meta, len);
        let prepared = Prepared {
            guard: self,
            upstream,
            writer,
            entry,
            reserved,
        };
        Ok((prepared, meta, file))
    }

    fn entry_meta(&self, meta: &Meta, len: u64) -> EntryMeta {
        EntryMeta {
            key: self.key.clone(),
            status: 200,
            len,
            content_type: meta.content_type.clone(),
            etag: meta.etag.clone(),
            last_modified: meta.last_modified.map(crate::unix_time::secs),
            stored_at_ms: crate::unix_time::now_ms(),
            origin: meta.origin.as_deref().map(str::to_string),
            cache_control: meta.cache_control.clone(),
            content_disposition: meta.content_disposition.clone(),
        }
    }

    /// Lets followers stream the body from the file as it is written.
    fn share_body(&self, meta: &Meta, file: &File) {
        let Ok(file) = file.try_clone() else {
            return; // followers then wait for the end, as before
        };
        let mut meta = meta.clone();
        // Followers cost the upstream nothing: counted as hits, as nginx counts requests served after
        // waiting on its cache lock, so hit ratios on dashboards mean what they say.
        meta.source = Source::Hit;
        if self.shared.body.set(Growing { meta, file }).is_ok() {
            self.shared.progress.send_modify(|p| p.streaming = true);
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.cache.flights.release(self.hash, &self.shared);
        let status = self.status;
        self.shared.progress.send_modify(|p| p.status = status);
    }
}

/// What a trip to the blocking pool with a batch left behind.
enum Written {
    More(EntryWriter),
    /// The last batch: the entry was sealed and published (`true`), or that failed (logged).
    Published(bool),
}

/// Seals the entry and renames it into place, unless a bust voided the fill (waiting followers then
/// find no entry and ask the upstreams anew). Blocking.
fn seal_and_publish(
    cache: &Cache,
    w: EntryWriter,
    hash: KeyHash,
    shared: &Shared,
    entry: &EntryMeta,
) -> bool {
    let stored = w
        .seal(cache.store(), entry)
        .and_then(|sealed| cache.index.publish(hash, sealed, false, || shared.voided()));
    if let Err(e) = &stored {
        cache.write_failed(&entry.key, e);
    }
    stored.is_ok()
}

/// How a batch of the upstream's body ended.
enum Next {
    More,
    /// The upstream's body ended: complete if every byte came.
    End,
    Failed,
}

/// The fill task: upstream → file (→ the client's queue), then the commit that makes the entry visible.
/// `client`: the leader's client's queue; `permit`: a background-fill permit taken beforehand (a seek's
/// fill), or taken here when the client leaves.
async fn run(
    p: Prepared,
    mut client: Option<mpsc::Sender<(u64, Bytes)>>,
    mut permit: Option<OwnedSemaphorePermit>,
) {
    let Prepared {
        guard,
        mut upstream,
        writer,
        entry,
        reserved,
        ..
    } = p;
    let cache = guard.cache.clone();
    let mut guard = Some(guard);
    let mut reserved = Some(reserved);
    let mut writer = Some(writer);
    let mut left_at = client.is_none().then(Instant::now);
    let mut pos = 0u64;
    // Set once the last batch's trip sealed and published the entry (whether it was stored).
    let mut published: Option<bool> = None;
    let complete = loop {
        // One chunk, then whatever else the upstream already has, up to one CHUNK: one trip to the
        // blocking pool per batch.
        let mut batch = Vec::new();
        let mut size = 0;
        let mut next = Next::More;
        match upstream.next().await {
            Some(Ok(chunk)) => {
                size += chunk.len();
                batch.push(chunk);
            }
            Some(Err(_)) => break false,
            None => break pos == entry.len,
        }
        while size < CHUNK {
            match upstream.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    size += chunk.len();
                    batch.push(chunk);
                }
                Some(Some(Err(_))) => {
                    next = Next::Failed;
                    break;
                }
                Some(None) => {
                    next = Next::End;
                    break;
                }
                None => break, // the batch is what is ready now
            }
        }
        if let Some(w) = writer.take() {
            let chunks = batch.clone();
            // The last batch of a complete body is sealed and published in the same trip to the
            // blocking pool: a cold miss of a small object then costs two trips, not three.
            let last = matches!(next, Next::End) && pos + size as u64 == entry.len;
            let publish = match (&guard, last) {
                (Some(g), true) => Some((cache.clone(), g.hash, g.shared.clone(), entry.clone())),
                _ => None,
            };
            // Released before the entry is published, which counts its real size.
            let release = reserved.take_if(|_| publish.is_some());
            let written = tokio::task::spawn_blocking(move || {
                let mut w = w;
                chunks.iter().try_for_each(|c| w.write(c))?;
                drop(release);
                // Dropping `w` on an error deletes the partial file, here off the workers.
                Ok(match publish {
                    Some((c, hash, shared, entry)) => {
                        Written::Published(seal_and_publish(&c, w, hash, &shared, &entry))
                    }
                    None => Written::More(w),
                })
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match written {
                Ok(Written::More(w)) => {
                    writer = Some(w);
                    if let Some(g) = &guard {
                        let end = pos + size as u64;
                        g.shared.progress.send_modify(|p| p.written = end);
                    }
                }
                Ok(Written::Published(stored)) => {
                    published = Some(stored);
                    if let Some(g) = &guard {
                        let end = pos + size as u64;
                        g.shared.progress.send_modify(|p| p.written = end);
                    }
                }
                Err(e) => {
                    cache.write_failed(&entry.key, &e);
                    guard = None; // followers: failed; they resume from the upstreams themselves
                }
            }
        }
        for chunk in batch {
            let offset = pos;
            pos += chunk.len() as u64;
            let Some(tx) = &client else { continue };
            let gone = if writer.is_some() || published.is_some() {
                // Behind is fine: what the queue cannot take, the client reads back from the file.
                matches!(
                    tx.try_send((offset, chunk)),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            } else {
                // Nothing on disk from here on: the client gets every chunk, at its own pace.
                tx.send((offset, chunk)).await.is_err()
            };
            if gone {
                client = None;
                left_at = Some(Instant::now());
            }
        }
        if published.is_some() {
            break true;
        }
        if let Some(left) = left_at {
            if writer.is_none() {
                break false;
            }
            // Followers still streaming it from the file: it has clients, whoever left.
            if guard
                .as_ref()
                .is_some_and(|g| g.shared.progress.receiver_count() > 0)
            {
                left_at = Some(Instant::now());
            } else {
                // Nobody reads this fill any more: it goes on only within `cache.background_fills`.
                if permit.is_none() {
                    match cache.background_permit() {
                        Some(p) => permit = Some(p),
                        None => {
                            cache.counters.fills_cancelled.inc();
                            tracing::debug!(key = %entry.key, "fill cancelled: its client left and cache.background_fills are in use");
                            break false;
                        }
                    }
                }
                if left.elapsed() > BACKGROUND_FILL_LIMIT {
                    tracing::warn!(key = %entry.key, "fill abandoned {BACKGROUND_FILL_LIMIT:?} after its client left");
                    break false;
                }
            }
        }
        match next {
            Next::More => {}
            Next::End => break pos == entry.len,
            Next::Failed => break false,
        }
    };
    // Released before the entry is published, which counts its real size.
    drop(reserved);
    if !complete || (writer.is_none() && published.is_none()) {
        cache.counters.fill("failed");
    }
    if complete {
        let stored = match (published, writer.take(), guard.as_ref()) {
            (Some(stored), _, _) => Some(stored),
            (None, Some(w), Some(g)) => {
                let (c, hash, shared) = (cache.clone(), g.hash, g.shared.clone());
                let entry = entry.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    seal_and_publish(&c, w, hash, &shared, &entry)
                })
                .await;
                Some(stored.unwrap_or(false))
            }
            _ => None,
        };
        if let (Some(stored), Some(g)) = (stored, guard.as_mut()) {
            if stored && g.shared.voided() {
                cache.counters.fill("voided");
            } else if stored {
                cache.counters.fill("stored");
                g.status = Status::Done;
            } else {
                cache.counters.fill("failed");
            }
        }
    }
    // Order matters: the client, seeing its queue closed, finishes from the file or learns the fill
    // failed from the status the guard leaves. A failed fill's file is deleted off the workers.
    drop(client);
    drop(guard);
    if let Some(w) = writer {
        tokio::task::spawn_blocking(move || drop(w));
    }
}
