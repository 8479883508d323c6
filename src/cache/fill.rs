//! One fill per key, and the tee that writes a body to the cache while it streams to the first client.
//!
//! Like nginx's `proxy_cache_lock`: the first request for an uncached key leads the fill; others that
//! arrive meanwhile wait for it (up to `lock_timeout`) and are then served from the cache, so 50
//! concurrent requests cost the bucket one GET. A follower whose wait times out goes to the upstream
//! itself, without filling.
//!
//! The fill is driven by the leader's client. If that client goes away, the rest of the body is still
//! read into the cache in a background task, bounded in time, so a seek or an aborted video load does
//! not waste the bytes already paid for.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::store::{self, hash_key, EntryMeta, EntryWriter, KeyHash};
use super::Cache;
use crate::object::{Body, ByteStream, Object};

/// How long a fill may go on after its client left.
const BACKGROUND_FILL_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    Done,
    Failed,
}

#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<KeyHash, watch::Receiver<Status>>>,
}

pub enum Flight {
    Leader(FillGuard),
    Follower(Follower),
}

pub struct Follower(watch::Receiver<Status>);

impl Follower {
    /// True when the fill finished (successfully or not) within `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.0.wait_for(|s| *s != Status::Running))
            .await
            .is_ok()
    }
}

impl Flights {
    pub fn join(&self, cache: Arc<Cache>, key: &str) -> Flight {
        let hash = hash_key(key);
        let mut running = self.running.lock().expect("flights lock");
        if let Some(rx) = running.get(&hash) {
            if *rx.borrow() == Status::Running {
                return Flight::Follower(Follower(rx.clone()));
            }
        }
        let (tx, rx) = watch::channel(Status::Running);
        running.insert(hash, rx);
        Flight::Leader(FillGuard {
            cache,
            key: key.to_string(),
            hash,
            tx,
            status: Status::Failed,
        })
    }
}

/// The leader's claim on a key. Dropping it without a result releases followers as "failed".
pub struct FillGuard {
    cache: Arc<Cache>,
    key: String,
    hash: KeyHash,
    tx: watch::Sender<Status>,
    status: Status,
}

impl FillGuard {
    pub fn not_found(mut self) {
        self.cache.store_not_found(&self.key);
        self.status = Status::Done;
    }

    /// Wraps a full upstream response so its body is written to the cache as the client reads it.
    /// Anything that cannot be cached as a whole (unknown length, a partial body) passes through.
    pub fn tee(self, obj: Object) -> Object {
        let Object { meta, body } = obj;
        let (len, stream) = match (meta.len, body) {
            (Some(len), Body::Stream { stream, offset: 0 }) => (len, stream),
            (_, body) => return Object { meta, body },
        };
        let writer = match self.cache.store().writer() {
            Ok(w) => Some(w),
            Err(e) => {
                self.cache.write_failed(&self.key, &e);
                None
            }
        };
        let entry = EntryMeta {
            key: self.key.clone(),
            status: 200,
            len,
            content_type: meta.content_type.clone(),
            etag: meta.etag.clone(),
            last_modified: meta.last_modified.map(store::to_unix),
            stored_at_ms: store::unix_now_ms(),
        };
        let tee = Tee {
            inner: Some(stream),
            writer,
            entry: Some(entry),
            guard: Some(self),
        };
        Object {
            meta,
            body: Body::Stream {
                stream: Box::pin(tee),
                offset: 0,
            },
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut running = self.cache.flights.running.lock().expect("flights lock");
        if running
            .get(&self.hash)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            running.remove(&self.hash);
        }
        drop(running);
        let _ = self.tx.send(self.status);
    }
}

struct Tee {
    inner: Option<ByteStream>,
    writer: Option<EntryWriter>,
    entry: Option<EntryMeta>,
    guard: Option<FillGuard>,
}

impl Tee {
    fn write(&mut self, chunk: &Bytes) {
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.write(chunk) {
                if let Some(g) = &self.guard {
                    g.cache.write_failed(&g.key, &e);
                }
                self.writer = None;
            }
        }
    }

    /// The body ended cleanly: make the entry visible if it is complete.
    fn finish(&mut self) {
        let (Some(writer), Some(entry), Some(mut guard)) =
            (self.writer.take(), self.entry.take(), self.guard.take())
        else {
            return;
        };
        if writer.written() != entry.len {
            return; // a short body is never cached (the client got an error from the length check)
        }
        match writer.commit(guard.cache.store(), &entry) {
            Ok(size) => {
                guard.cache.index.insert(guard.hash, size);
                guard.status = Status::Done;
            }
            Err(e) => guard.cache.write_failed(&guard.key, &e),
        }
    }
}

impl Stream for Tee {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.write(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.inner = None;
                self.writer = None; // deletes the partial file
                self.guard = None; // followers: failed
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.inner = None;
                self.finish();
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Tee {
    /// The client left before the end: finish the fill in the background, within a bound.
    fn drop(&mut self) {
        let (Some(mut inner), Some(_)) = (self.inner.take(), self.writer.as_ref()) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = Tee {
            inner: None,
            writer: self.writer.take(),
            entry: self.entry.take(),
            guard: self.guard.take(),
        };
        handle.spawn(async move {
            let drained = tokio::time::timeout(BACKGROUND_FILL_LIMIT, async {
                while let Some(chunk) = inner.next().await {
                    match chunk {
                        Ok(c) => {
                            rest.write(&c);
                            if rest.writer.is_none() {
                                return false;
                            }
                        }
                        Err(_) => return false,
                    }
                }
                true
            })
            .await;
            if drained == Ok(true) {
                rest.finish();
            }
        });
    }
}
