//! One fill per key, and the fill itself: an upstream body written to the cache at the upstream's pace,
//! whatever its first client does.
//!
//! Like nginx's `proxy_cache_lock`: the first request for an uncached key leads the fill; others that
//! arrive meanwhile wait for it (up to `lock_timeout`) and are then served from the cache, so 50
//! concurrent requests cost the bucket one GET. A follower whose wait times out goes to the upstream
//! itself, without filling.
//!
//! The fill runs in its own task, like nginx's buffering to a temp file: it reads the upstream and writes
//! the entry as fast as both allow, and hands each chunk to the leader's client through a short queue.
//! A client that falls behind (a phone on a slow link, an HTTP/2 stream whose window stays shut) misses
//! chunks from the queue and reads them back from the file being written instead, so it neither slows
//! the fill nor holds the key's lock, and memory stays bounded. A client that leaves does not stop the
//! fill either (within [`BACKGROUND_FILL_LIMIT`]), so the bytes already paid for are kept. If the disk
//! write fails, the fill stops being one (followers are released) and the client gets the rest of the
//! body straight from the upstream, at its own pace.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::follow::FillFailed;
pub use super::follow::Follower;
use super::store::{self, hash_key, EntryMeta, EntryWriter, KeyHash};
use super::Cache;
use crate::object::{read_at, Body, ByteStream, Meta, Object, Source};

/// How long a fill may go on after its client left (or, for a fill without a client, at all).
pub const BACKGROUND_FILL_LIMIT: Duration = Duration::from_secs(300);
/// Chunks queued for the leader's client before it counts as behind and reads from the file.
const CLIENT_QUEUE: usize = 16;
/// Largest read from the file for a client that is behind.
const FILE_CHUNK: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    Done,
    Failed,
}

/// What followers watch: the fill's status and how many bytes of the body are on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Progress {
    pub status: Status,
    pub written: u64,
    /// The body is being written and [`Flight::body`] is set: followers can stream it.
    pub streaming: bool,
}

/// One fill in flight, shared by its leader and followers.
pub(super) struct Shared {
    pub progress: watch::Sender<Progress>,
    pub body: OnceLock<Growing>,
    /// Mastodon busted the key while this fill ran: what it fetched must not become an entry.
    /// Read and written under the `Flights` lock.
    voided: AtomicBool,
}

/// The entry being written, as a follower reads it.
pub(super) struct Growing {
    pub meta: Meta,
    pub file: File,
}

#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<KeyHash, Arc<Shared>>>,
}

pub enum Flight {
    Leader(FillGuard),
    Follower(Follower),
}

impl Flights {
    pub fn join(&self, cache: Arc<Cache>, key: &str) -> Flight {
        let hash = hash_key(key);
        let mut running = self.running.lock().expect("flights lock");
        if let Some(shared) = running.get(&hash) {
            if shared.progress.borrow().status == Status::Running {
                return Flight::Follower(Follower::new(shared.clone()));
            }
        }
        let shared = Arc::new(Shared {
            progress: watch::Sender::new(Progress {
                status: Status::Running,
                written: 0,
                streaming: false,
            }),
            body: OnceLock::new(),
            voided: AtomicBool::new(false),
        });
        running.insert(hash, shared.clone());
        Flight::Leader(FillGuard {
            cache,
            key: key.to_string(),
            hash,
            shared,
            status: Status::Failed,
        })
    }
}

impl Flights {
    /// The fill running for `hash` (if any) will not be stored, and later requests do not join it: they
    /// start a new one under the rules in force after the bust.
    pub fn void(&self, hash: KeyHash) {
        let mut running = self.running.lock().expect("flights lock");
        if let Some(shared) = running.remove(&hash) {
            shared.voided.store(true, Ordering::Relaxed);
        }
    }

    /// Waits (up to `timeout`) for the fill of `hash` to end, if one is running.
    pub async fn wait(&self, hash: KeyHash, timeout: Duration) {
        let rx = {
            let running = self.running.lock().expect("flights lock");
            match running.get(&hash) {
                Some(shared) => shared.progress.subscribe(),
                None => return,
            }
        };
        let mut rx = rx;
        let _ = tokio::time::timeout(timeout, rx.wait_for(|p| p.status != Status::Running)).await;
    }

    /// Runs `store` (the commit of a fill's result) unless the fill was voided. Under the lock `void`
    /// takes, so a bust either comes before (nothing is stored) or after (it purges what was stored).
    fn unless_voided<T>(&self, shared: &Shared, store: impl FnOnce() -> T) -> Option<T> {
        let _running = self.running.lock().expect("flights lock");
        (!shared.voided.load(Ordering::Relaxed)).then(store)
    }
}

/// The leader's claim on a key. Dropping it without a result releases followers as "failed".
pub struct FillGuard {
    cache: Arc<Cache>,
    key: String,
    hash: KeyHash,
    shared: Arc<Shared>,
    status: Status,
}

impl FillGuard {
    pub fn not_found(mut self) {
        let cache = self.cache.clone();
        // Written outside the flights lock; only the rename happens under it.
        let stored = cache.sealed_not_found(&self.key).and_then(|sealed| {
            cache
                .flights
                .unless_voided(&self.shared, || {
                    cache.index.publish(self.hash, sealed, true)
                })
                .unwrap_or(Ok(0))
        });
        if let Err(e) = stored {
            cache.write_failed(&self.key, &e);
        }
        self.status = Status::Done;
    }

    /// Starts filling from a full upstream response and returns what the client reads: the same bytes,
    /// from memory while it keeps up, from the entry's file when it falls behind. Anything that cannot
    /// be cached as a whole (unknown length, a partial body) passes through untouched.
    pub fn tee(self, obj: Object) -> Object {
        let Object { meta, body } = obj;
        let (len, stream) = match (meta.len, body) {
            (Some(len), Body::Stream { stream, offset: 0 }) if len <= self.cache.max_object => {
                (len, stream)
            }
            // Larger than `cache.max_object_size`: it would push out everything else, at every
            // request. It streams through; followers (released) ask the upstream themselves.
            (_, body) => return Object { meta, body },
        };
        let (writer, file) = match self.writer() {
            Some(w) => w,
            None => {
                return Object {
                    meta,
                    body: Body::Stream { stream, offset: 0 },
                }
            }
        };
        let entry = self.entry_meta(&meta, len);
        self.share_body(&meta, &file);
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let ended = Arc::new(Mutex::new(Ended::Running));
        let reserved = self.cache.index.reserve(len);
        tokio::spawn(run(
            self,
            (stream, writer, entry),
            (Some(tx), None),
            ended.clone(),
            reserved,
        ));
        let reader = Reader {
            rx,
            file,
            ended,
            pos: 0,
            len,
            pending: None,
        };
        Object {
            meta,
            body: Body::Stream {
                stream: Box::pin(reader),
                offset: 0,
            },
        }
    }

    /// Fills from a full upstream response with no client reading it (a seek was answered with a
    /// ranged GET); returns when the fill has ended.
    pub async fn fill(self, obj: Object, permit: OwnedSemaphorePermit) {
        let Object { meta, body } = obj;
        let (Some(len), Body::Stream { stream, offset: 0 }) = (meta.len, body) else {
            return;
        };
        if len > self.cache.max_object {
            return;
        }
        let Some((writer, file)) = self.writer() else {
            return;
        };
        self.share_body(&meta, &file);
        let entry = self.entry_meta(&meta, len);
        let reserved = self.cache.index.reserve(len);
        run(
            self,
            (stream, writer, entry),
            (None, Some(permit)),
            Arc::default(),
            reserved,
        )
        .await;
    }

    fn entry_meta(&self, meta: &Meta, len: u64) -> EntryMeta {
        EntryMeta {
            key: self.key.clone(),
            status: 200,
            len,
            content_type: meta.content_type.clone(),
            etag: meta.etag.clone(),
            last_modified: meta.last_modified.map(store::to_unix),
            stored_at_ms: store::unix_now_ms(),
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

    fn writer(&self) -> Option<(EntryWriter, File)> {
        let opened = self
            .cache
            .store()
            .writer()
            .and_then(|w| w.reader().map(|r| (w, r)));
        match opened {
            Ok(pair) => Some(pair),
            Err(e) => {
                self.cache.write_failed(&self.key, &e);
                None
            }
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut running = self.cache.flights.running.lock().expect("flights lock");
        if running
            .get(&self.hash)
            .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
        {
            running.remove(&self.hash);
        }
        drop(running);
        let status = self.status;
        self.shared.progress.send_modify(|p| p.status = status);
    }
}

/// How a fill ended, for a client that fell behind and must know whether the file holds the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Ended {
    #[default]
    Running,
    /// The whole body was read and written.
    Complete,
    /// The upstream failed, or the fill was abandoned.
    Failed,
}

/// The fill task: upstream → file (→ the client's queue), then the commit that makes the entry visible.
/// `client`: the leader's client's queue, or a background-fill permit taken beforehand (a seek's fill).
/// `reserved`: the length counted against `max_size` while the fill runs.
async fn run(
    guard: FillGuard,
    (mut upstream, writer, entry): (ByteStream, EntryWriter, EntryMeta),
    (mut client, mut permit): (
        Option<mpsc::Sender<(u64, Bytes)>>,
        Option<OwnedSemaphorePermit>,
    ),
    ended: Arc<Mutex<Ended>>,
    reserved: super::index::Reserved,
) {
    let cache = guard.cache.clone();
    let mut reserved = Some(reserved);
    let mut guard = Some(guard);
    let mut writer = Some(writer);
    let mut left_at = client.is_none().then(Instant::now);
    let mut pos = 0u64;
    let outcome = loop {
        let chunk = match upstream.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(_)) => break Ended::Failed,
            None if pos == entry.len => break Ended::Complete,
            None => break Ended::Failed,
        };
        let offset = pos;
        pos += chunk.len() as u64;
        if let Some(w) = writer.as_mut() {
            match w.write(&chunk) {
                Ok(()) => {
                    if let Some(g) = &guard {
                        g.shared.progress.send_modify(|p| p.written = pos);
                    }
                }
                Err(e) => {
                    cache.write_failed(&entry.key, &e);
                    writer = None; // deletes the partial file
                    guard = None; // followers: failed; they resume from the upstreams themselves
                }
            }
        }
        if let Some(tx) = &client {
            let gone = if writer.is_some() {
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
        if let Some(left) = left_at {
            if writer.is_none() {
                break Ended::Failed;
            }
            // Nobody reads this fill any more: it goes on only within `cache.background_fills`.
            if permit.is_none() {
                match cache.background_permit() {
                    Some(p) => permit = Some(p),
                    None => {
                        cache.counters.fills_cancelled.inc();
                        tracing::debug!(key = %entry.key, "fill cancelled: its client left and cache.background_fills are in use");
                        break Ended::Failed;
                    }
                }
            }
            if left.elapsed() > BACKGROUND_FILL_LIMIT {
                tracing::warn!(key = %entry.key, "fill abandoned {BACKGROUND_FILL_LIMIT:?} after its client left");
                break Ended::Failed;
            }
        }
    };
    // Released before the entry is published, which counts its real size.
    reserved.take();
    if outcome == Ended::Complete {
        if let (Some(w), Some(g)) = (writer.take(), guard.as_mut()) {
            let hash = g.hash;
            // Sealed outside the flights lock; only the rename happens under it.
            let stored = w.seal(cache.store(), &entry).and_then(|sealed| {
                cache
                    .flights
                    .unless_voided(&g.shared, || cache.index.publish(hash, sealed, false))
                    // Voided: waiting followers find no entry and ask the upstreams under the new rules.
                    .unwrap_or(Ok(0))
            });
            match stored {
                Ok(_) => g.status = Status::Done,
                Err(e) => cache.write_failed(&entry.key, &e),
            }
        }
    }
    // Order matters: the client, seeing its queue closed, reads `ended` to learn whether to finish from
    // the file. Then followers are released (the guard drops), and a failed fill's file is deleted.
    *ended.lock().expect("fill state") = outcome;
    drop(client);
    drop(guard);
    drop(writer);
}

/// The leader's client's body: chunks from the fill's queue, and from the file for whatever it missed.
struct Reader {
    rx: mpsc::Receiver<(u64, Bytes)>,
    /// The entry's file as it is written; still readable after a commit renames it or a failure unlinks it.
    file: File,
    ended: Arc<Mutex<Ended>>,
    /// The next byte this client needs.
    pos: u64,
    len: u64,
    /// A chunk from the queue that lies ahead of `pos` (the client missed the ones before it).
    pending: Option<(u64, Bytes)>,
}

impl Reader {
    fn read_back(&mut self, up_to: u64) -> io::Result<Bytes> {
        let n = (up_to - self.pos).min(FILE_CHUNK) as usize;
        let bytes = read_at(&self.file, self.pos, n)?;
        self.pos += n as u64;
        Ok(bytes)
    }
}

impl Stream for Reader {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.pos >= this.len {
                return Poll::Ready(None);
            }
            if let Some((offset, chunk)) = this.pending.take() {
                let end = offset + chunk.len() as u64;
                if end <= this.pos {
                    continue; // already read from the file
                }
                if offset <= this.pos {
                    let rest = chunk.slice((this.pos - offset) as usize..);
                    this.pos = end;
                    return Poll::Ready(Some(Ok(rest)));
                }
                // Everything before a queued chunk was written before it was queued.
                this.pending = Some((offset, chunk));
                return Poll::Ready(Some(this.read_back(offset)));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(queued)) => this.pending = Some(queued),
                Poll::Ready(None) => {
                    if *this.ended.lock().expect("fill state") == Ended::Complete {
                        return Poll::Ready(Some(this.read_back(this.len)));
                    }
                    // The upstream failed mid-body: say how far this client got, so it can be resumed.
                    let at = this.pos;
                    this.pos = this.len; // ends the body after this error
                    return Poll::Ready(Some(Err(io::Error::other(FillFailed { at }))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
