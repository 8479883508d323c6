//! One fill per key, and how it starts: an upstream body stored in the cache at the upstream's pace,
//! whatever its first client does.
//!
//! Like nginx's `proxy_cache_lock`: the first request for an uncached key leads the fill; others that
//! arrive meanwhile follow it ([`super::follow`]), so 50 concurrent requests cost the bucket one GET.
//!
//! The fill runs in its own task, like nginx's buffering to a temp file, reading the upstream as fast as
//! it sends. A small body is held in memory until whole and then written in one go
//! ([`super::memfill`]); a larger one is written as it arrives ([`super::filefill`]). Either way the
//! client and followers read it as it comes, and a client that leaves does not stop the fill (within
//! `cache.background_fills` and [`BACKGROUND_FILL_LIMIT`]), so the bytes already paid for are kept.

use std::fs::File;

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::filefill;
use super::flights::{Growing, GrowingBody, Shared, Status};
use super::growing;
use super::index::Reserved;
use super::memfill::{self, MemBody};
use super::store::{self, EntryMeta, EntryWriter, KeyHash};
use super::Cache;
use crate::object::{Body, ByteStream, Meta, Object, Source};

/// How long a fill may go on after its client left (or, for a fill without a client, at all).
pub const BACKGROUND_FILL_LIMIT: Duration = Duration::from_secs(300);
/// Batches queued for the leader's client before it counts as behind and reads from the file.
const CLIENT_QUEUE: usize = 16;

/// The leader's claim on a key. Dropping it without a result releases followers as "failed".
pub struct FillGuard {
    pub(super) cache: Arc<Cache>,
    key: String,
    pub(super) hash: KeyHash,
    pub(super) shared: Arc<Shared>,
    pub(super) status: Status,
}

/// A fill ready to run: its length is reserved and the body has a place to go ([`Sink`]).
pub(super) struct Prepared {
    pub guard: FillGuard,
    pub upstream: ByteStream,
    pub entry: EntryMeta,
    pub reserved: Reserved,
}

/// A fill whose client has its body: run it to the end (it goes on if the client leaves, within
/// `cache.background_fills`).
pub(super) enum Running {
    Memory(Prepared, Arc<MemBody>),
    File(Prepared, EntryWriter, mpsc::Sender<(u64, Bytes)>),
}

impl Running {
    pub async fn run(self) {
        match self {
            Running::Memory(p, body) => memfill::run(p, body, None).await,
            Running::File(p, writer, tx) => filefill::run(p, writer, Some(tx), None).await,
        }
    }
}

/// Where a fill puts the body until it is whole.
enum Sink {
    /// Written as it arrives; `reader`: a descriptor of the file being written, for the client.
    File { writer: EntryWriter, reader: File },
    /// A small body, held in memory and written once whole ([`memfill`]).
    Memory(Arc<MemBody>),
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

    /// Starts filling from a full upstream response: what the client reads, the same bytes from memory
    /// while it keeps up, from the entry's file when it falls behind (its body may end in
    /// [`growing::FillFailed`]), and the fill itself, for the caller to run (in the task that fetched:
    /// a task spawned per miss costs more than the fill's own bookkeeping). Anything that cannot be
    /// cached as a whole (unknown length, a partial body, too large, no room) passes through untouched,
    /// with no fill.
    pub(super) async fn tee(self, obj: Object) -> (Object, Option<Running>) {
        let (p, sink, meta) = match self.prepare(obj).await {
            Ok(prepared) => prepared,
            Err(passed) => return (passed, None),
        };
        let (len, shared) = (p.entry.len, p.guard.shared.clone());
        let (stream, running) = match sink {
            Sink::Memory(body) => (
                memfill::stream(body.clone(), len, shared),
                Running::Memory(p, body),
            ),
            Sink::File { writer, reader } => {
                let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
                let stream = growing::stream(reader, len, shared, Some(rx));
                (stream, Running::File(p, writer, tx))
            }
        };
        let obj = Object {
            meta,
            body: Body::Stream { stream, offset: 0 },
        };
        (obj, Some(running))
    }

    /// Fills from a full upstream response with no client reading it (a seek was answered with a
    /// ranged GET), under a background-fill permit; returns when the fill has ended.
    pub async fn fill(self, obj: Object, permit: OwnedSemaphorePermit) {
        match self.prepare(obj).await {
            Ok((p, Sink::Memory(body), _)) => memfill::run(p, body, Some(permit)).await,
            Ok((p, Sink::File { writer, .. }, _)) => {
                filefill::run(p, writer, None, Some(permit)).await
            }
            Err(_) => {}
        }
    }

    /// The fill, where its body goes and the object's metadata; or the object back, untouched, when it
    /// is not to be cached.
    async fn prepare(self, obj: Object) -> Result<(Prepared, Sink, Meta), Object> {
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
        let small = (len <= store::SMALL)
            .then(|| MemBody::reserve(&self.cache.memory_fills, len))
            .flatten();
        let sink = match small {
            Some(body) => Sink::Memory(body),
            None => {
                let cache = self.cache.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    cache
                        .store()
                        .writer()
                        .and_then(|w| w.reader().map(|r| (w, r)))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match opened {
                    Ok((writer, reader)) => Sink::File { writer, reader },
                    Err(e) => {
                        self.cache.write_failed(&self.key, &e);
                        return Err(passed(upstream));
                    }
                }
            }
        };
        self.share_body(&meta, &sink);
        let entry = self.entry_meta(&meta, len);
        let prepared = Prepared {
            guard: self,
            upstream,
            entry,
            reserved,
        };
        Ok((prepared, sink, meta))
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

    /// Lets followers stream the body as it is written (or, for a small one, received).
    fn share_body(&self, meta: &Meta, sink: &Sink) {
        let body = match sink {
            Sink::Memory(body) => GrowingBody::Memory(body.clone()),
            Sink::File { reader, .. } => match reader.try_clone() {
                Ok(file) => GrowingBody::File(file),
                Err(_) => return, // followers then wait for the end, as before
            },
        };
        let mut meta = meta.clone();
        // Followers cost the upstream nothing: counted as hits, as nginx counts requests served after
        // waiting on its cache lock, so hit ratios on dashboards mean what they say.
        meta.source = Source::Hit;
        if self.shared.body.set(Growing { meta, body }).is_ok() {
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

/// Seals the entry and renames it into place, unless a bust voided the fill (waiting followers then
/// find no entry and ask the upstreams anew). Blocking.
/// `rest`: the last of the body, written with the trailer.
pub(super) fn seal_and_publish(
    cache: &Cache,
    w: EntryWriter,
    rest: &[Bytes],
    hash: KeyHash,
    shared: &Shared,
    entry: &EntryMeta,
) -> bool {
    let stored = w
        .seal_with(cache.store(), entry, rest)
        .and_then(|sealed| cache.index.publish(hash, sealed, false, || shared.voided()));
    if let Err(e) = &stored {
        cache.write_failed(&entry.key, e);
    }
    stored.is_ok()
}

/// A fill nobody reads any more (its client left and no follower streams it) goes on only within
/// `cache.background_fills`, taking a permit if it holds none, and for [`BACKGROUND_FILL_LIMIT`] after
/// `left`. False when it must stop now (counted, logged).
pub(super) fn may_go_on_unread(
    cache: &Cache,
    key: &str,
    left: Instant,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> bool {
    if permit.is_none() {
        match cache.background_permit() {
            Some(p) => *permit = Some(p),
            None => {
                cache.counters.fills_cancelled.inc();
                tracing::debug!(%key, "fill cancelled: its client left and cache.background_fills are in use");
                return false;
            }
        }
    }
    if left.elapsed() > BACKGROUND_FILL_LIMIT {
        tracing::warn!(%key, "fill abandoned {BACKGROUND_FILL_LIMIT:?} after its client left");
        return false;
    }
    true
}
