//! Lazy copy: every object served from a bucket below the `copy_missing` target is copied into it, so a
//! bucket switch needs no offline sync.
//!
//! - `queue`: the bounded, deduplicated, journaled queue requests feed without ever waiting.
//! - `one`: the copy engine for one key (source from the cache entry or one GET, conditional PUT,
//!   verification); `migrate` drives the same engine.
//! - `worker`: a worker's loop and the retry policy.
//! - here: the copy thread and its workers, and the set of keys known to be in the target already
//!   (`cache.dir/copied`, a [`KeySet`]), so that hits on entries filled from the old bucket stop queueing
//!   once their copy is done.
//!
//! Copying never touches a client's response.

mod one;
mod queue;
mod source;
mod uploads;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

pub use one::{Copied, CopyError, Engine, From};
use queue::{Pushed, Queue};
pub use source::plain_md5;
pub use uploads::{Open, Uploads};

use crate::config;
use crate::key::Key;
use crate::keyset::{self, KeySet};
use crate::metrics::CopyCounters;
use crate::runtime::Runtime;
use crate::upstream::Upstream;

/// The copy thread's nice value: below serving, which runs at the process's own.
const COPY_NICE: i32 = 19;
/// The journal is written at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How long a target's 404 spares the copy its HEAD.
const LACKING_FOR: Duration = Duration::from_secs(10);
/// A key whose copy failed for good is not queued again for this long (at most this many remembered).
const FAILED_FOR: Duration = Duration::from_secs(600);
const FAILED_KEPT: usize = 10_000;
/// How long a key stays remembered as copied (the bound on count is `copy.remember`).
const REMEMBER_FOR: Duration = Duration::from_secs(365 * 86400);

pub struct Copier {
    queue: Queue,
    copied: KeySet,
    /// The copy thread's own upstream clients, for the runtime they were built from.
    own: Mutex<Option<OwnUpstreams>>,
    /// Keys whose copy failed for good lately: not queued again on every read for a while.
    failed: Mutex<lru::LruCache<keyset::KeyId, Instant>>,
    /// Keys the target answered 404 for lately (the reads that queue copies).
    lacking: Mutex<lru::LruCache<keyset::KeyId, Instant>>,
    warned: Mutex<Instant>,
    uploads: Arc<Uploads>,
    /// Multipart uploads a previous process left open, aborted when the workers start.
    left_open: std::sync::Mutex<Vec<Open>>,
    wake: Notify,
    counters: CopyCounters,
    workers: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("copy state in {dir}: {source}")]
pub struct CopierError {
    dir: String,
    source: std::io::Error,
}

impl CopierError {
    pub fn thread(source: std::io::Error) -> CopierError {
        CopierError {
            dir: "(the copy thread)".into(),
            source,
        }
    }
}

impl Copier {
    /// Replays the queue's journal and loads the set of copied keys, both under `dir` (`cache.dir`).
    pub fn open(
        dir: &std::path::Path,
        cfg: &config::Copy,
        counters: CopyCounters,
    ) -> Result<Arc<Copier>, CopierError> {
        let error = |source| CopierError {
            dir: dir.display().to_string(),
            source,
        };
        let queue = Queue::open(dir, cfg.queue).map_err(error)?;
        let copied = KeySet::open(dir, "copied", REMEMBER_FOR, cfg.remember).map_err(error)?;
        let (uploads, left_open) = Uploads::open(dir).map_err(error)?;
        Ok(Arc::new(Copier {
            queue,
            copied,
            own: Mutex::new(None),
            failed: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(FAILED_KEPT).expect("non-zero"),
            )),
            lacking: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(cfg.queue.max(1)).expect("non-zero"),
            )),
            warned: Mutex::new(Instant::now() - Duration::from_secs(3600)),
            uploads: Arc::new(uploads),
            left_open: std::sync::Mutex::new(left_open),
            wake: Notify::new(),
            counters,
            workers: cfg.workers,
        }))
    }

    /// Queues `key` for a copy into the target named by its `origin`, unless it is known to be there,
    /// already queued, or being copied. Never waits for anything.
    pub fn enqueue(&self, target_origin: &str, key: &Key) {
        let id = copied_id(target_origin, key);
        if self.copied.contains(id, REMEMBER_FOR) || self.failed_lately(id) {
            return;
        }
        match self.queue.push(key) {
            Pushed::Member => return,
            Pushed::Queued => {}
            Pushed::DroppedOldest(old) => {
                self.counters.dropped.inc();
                // Once a minute at most: a full queue drops on every read.
                let mut warned = self.warned.lock().expect("warned");
                if warned.elapsed() > Duration::from_secs(60) {
                    *warned = Instant::now();
                    tracing::warn!(dropped = %old, "copy queue full (copy.queue): the oldest keys are dropped (mediaproxy_copy_dropped_total); `migrate` copies them later");
                }
            }
        }
        self.counters.queued.inc();
        self.wake.notify_one();
    }

    pub fn depth(&self) -> usize {
        self.queue.depth()
    }

    /// Starts the copy thread: the workers and the journal writer on a runtime of their own, in a
    /// thread at a lower priority (nice +10), so copying takes only the CPU that serving leaves idle
    /// and never slows a response; with upstream clients of its own, since a connection belongs to
    /// the runtime that opened it.
    pub fn start(
        self: &Arc<Copier>,
        runtime: Arc<ArcSwap<Runtime>>,
    ) -> std::io::Result<CopyThread> {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("mediaproxy-copy".into())
            .spawn(move || {
                // Linux: the calling thread only; the blocking pool's threads, started from here, inherit it.
                if let Err(e) = rustix::process::setpriority_process(None, COPY_NICE) {
                    tracing::debug!(error = %e, "could not lower the copy thread's priority");
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!(error = %e, "copy thread: no runtime; nothing is copied"),
                };
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..me.workers {
                        tasks.spawn(me.clone().work(runtime.clone()));
                    }
                    let flusher = me.clone();
                    tasks.spawn(async move {
                        loop {
                            tokio::time::sleep(FLUSH_EVERY).await;
                            flusher.flush().await;
                        }
                    });
                    let left = std::mem::take(&mut *me.left_open.lock().expect("left open lock"));
                    if !left.is_empty() {
                        tasks.spawn(me.clone().abort_left_open(left, runtime.clone()));
                    }
                    // Journaled keys from before a restart are copied at once.
                    me.wake.notify_waiters();
                    let _ = stopped.wait_for(|s| *s).await;
                    tasks.abort_all();
                });
            })?;
        Ok(CopyThread {
            stop,
            thread: Some(thread),
        })
    }

    /// The upstreams as the copy thread's own clients, rebuilt when a reload changed the runtime.
    fn own_upstreams(&self, rt: &Arc<Runtime>) -> Option<Arc<Vec<Upstream>>> {
        let mut own = self.own.lock().expect("own upstreams lock");
        if let Some((for_rt, ups)) = own.as_ref() {
            if Arc::ptr_eq(for_rt, rt) {
                return Some(ups.clone());
            }
        }
        let ups = rt
            .config
            .upstreams
            .iter()
            .map(Upstream::new)
            .collect::<Result<Vec<_>, _>>();
        let ups = match ups {
            Ok(ups) => Arc::new(ups),
            Err(e) => {
                // The serving runtime built the same clients, so this is not expected to happen.
                tracing::error!(error = %e, "copy thread: cannot build upstream clients");
                return None;
            }
        };
        *own = Some((rt.clone(), ups.clone()));
        Some(ups)
    }

    /// Writes what the journal still lacks (on SIGTERM, after the workers were stopped).
    pub async fn flush(self: &Arc<Copier>) {
        let me = self.clone();
        let flushed = tokio::task::spawn_blocking(move || me.queue.flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "could not write the copy queue's journal");
        }
    }

    /// Aborts the multipart uploads a crash left open, in whichever upstream (by origin) they were.
    async fn abort_left_open(self: Arc<Copier>, left: Vec<Open>, runtime: Arc<ArcSwap<Runtime>>) {
        let rt = runtime.load_full();
        let Some(own) = self.own_upstreams(&rt) else {
            return;
        };
        for open in left {
            let Some(up) = own.iter().find(|u| *u.origin == *open.origin) else {
                tracing::warn!(key = %open.key, origin = %open.origin, "a multipart upload left open by a crash is in a bucket no longer configured; abort it by hand");
                self.uploads.ended(&open.id);
                continue;
            };
            match up.abort_multipart(&open.key, &open.id).await {
                Ok(()) => {
                    tracing::info!(key = %open.key, upstream = %up.name, "aborted a multipart upload left open by a crash");
                    self.uploads.ended(&open.id);
                }
                Err(e) => {
                    tracing::warn!(key = %open.key, upstream = %up.name, error = %e, "could not abort a multipart upload left open; trying again at the next start")
                }
            }
        }
    }

    /// The target answered 404 for `key` just now.
    pub fn target_lacks(&self, target_origin: &str, key: &Key) {
        let id = copied_id(target_origin, key);
        self.lacking
            .lock()
            .expect("lacking lock")
            .put(id, Instant::now());
    }

    /// Whether the target said 404 for `id` within the last few seconds (taken: once per copy).
    fn lacked_lately(&self, id: keyset::KeyId) -> bool {
        let at = self.lacking.lock().expect("lacking lock").pop(&id);
        at.is_some_and(|at| at.elapsed() < LACKING_FOR)
    }

    fn failed_lately(&self, id: keyset::KeyId) -> bool {
        let mut failed = self.failed.lock().expect("failed lock");
        match failed.get(&id) {
            Some(at) if at.elapsed() < FAILED_FOR => true,
            Some(_) => {
                failed.pop(&id);
                false
            }
            None => false,
        }
    }
}

fn copied_id(target_origin: &str, key: &Key) -> keyset::KeyId {
    keyset::id_of(&format!("{target_origin}\n{}", key.as_str()))
}

/// The copy thread's clients and the runtime (config) they were built from.
type OwnUpstreams = (Arc<Runtime>, Arc<Vec<Upstream>>);

/// The running copy thread; [`CopyThread::stop`] ends it (copies in flight are abandoned: their keys
/// have no `-` line in the journal, so they are copied again after a restart).
pub struct CopyThread {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CopyThread {
    /// Blocking: call it off the async runtime.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
