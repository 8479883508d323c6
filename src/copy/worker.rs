//! A copy worker: takes keys off the queue one at a time and copies each with the runtime in force
//! when it picks the key (a reload that changes the target or turns `copy_missing` off applies to
//! queued keys too), retrying what is worth retrying, and remembering what is done.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::FutureExt;

use super::{copied_id, Copied, Copier, CopyError, Engine, From, REMEMBER_FOR};
use crate::key::Key;
use crate::runtime::Runtime;

/// Pauses between attempts of a copy that failed in a way worth retrying: over two minutes in all, so
/// a target that is down for a minute loses nothing.
const BACKOFF: [u64; 7] = [1, 2, 4, 8, 16, 32, 60];

impl Copier {
    pub(super) async fn work(self: Arc<Copier>, runtime: Arc<ArcSwap<Runtime>>) {
        loop {
            let Some(key) = self.queue.pop() else {
                // Bounded, so a missed wake-up costs a second, never a stuck queue.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            };
            // A bug in one copy must not stop the worker, nor leave its key a member for ever.
            let copy = AssertUnwindSafe(self.copy_with_retries(&runtime, &key)).catch_unwind();
            if copy.await.is_err() {
                self.counters.failed.inc();
                tracing::error!(%key, "copy panicked; the key was dropped");
            }
            self.queue.finish(&key);
        }
    }

    async fn copy_with_retries(self: &Arc<Self>, runtime: &ArcSwap<Runtime>, key: &Key) {
        // The last attempt has no pause after it.
        let pauses = BACKOFF.iter().map(|s| Some(Duration::from_secs(*s)));
        for (attempt, pause) in pauses.chain([None]).enumerate() {
            let rt = runtime.load_full();
            if rt.copy_target().is_none() {
                tracing::info!(%key, "copy_missing is off now: queued copy dropped");
                return;
            }
            if rt
                .cache
                .tombstoned(key.as_str(), rt.config.cache.tombstone_ttl)
            {
                tracing::debug!(%key, "busted by Mastodon: not copied");
                return;
            }
            let Some(own) = self.own_upstreams(&rt) else {
                self.counters.failed.inc();
                return;
            };
            let target = &own[rt.write_upstream];
            let engine = Engine {
                target,
                spool_dir: rt.cache.store().tmp_dir(),
                multipart_threshold: rt.config.copy.multipart_threshold,
                part_size: rt.config.copy.part_size,
                uploads: self.uploads.clone(),
                target_lacks: attempt == 0 && self.lacked_lately(copied_id(&target.origin, key)),
            };
            match engine.copy(&From::Proxy(&rt, &own), key).await {
                Ok(done) => {
                    match done {
                        Copied::Copied { bytes } => {
                            self.counters.copied.inc();
                            self.counters.bytes.inc_by(bytes);
                            tracing::info!(%key, target = %target.name, bytes, "copied");
                        }
                        Copied::AlreadyThere => {
                            self.counters.skipped.inc();
                        }
                    }
                    self.remember(&target.origin, key).await;
                    return;
                }
                Err(CopyError::Busted) => {
                    tracing::debug!(%key, "busted by Mastodon during its copy: not copied");
                    return;
                }
                Err(e) if e.retryable() && pause.is_some() => {
                    tracing::debug!(%key, target = %target.name, error = %e, attempt, "copy failed; retrying");
                    tokio::time::sleep(pause.unwrap_or_default()).await;
                }
                Err(e) => {
                    self.counters.failed.inc();
                    tracing::warn!(%key, target = %target.name, code = e.code(), error = %e, "copy failed");
                    let id = copied_id(&target.origin, key);
                    self.failed
                        .lock()
                        .expect("failed lock")
                        .put(id, Instant::now());
                    return;
                }
            }
        }
    }

    async fn remember(self: &Arc<Self>, target_origin: &str, key: &Key) {
        let id = copied_id(target_origin, key);
        let me = self.clone();
        // One small append (no fdatasync: a record a crash loses costs one HEAD), on the blocking pool.
        let r = tokio::task::spawn_blocking(move || me.copied.add_lazily(id, REMEMBER_FOR))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not record a copied key; it may be checked again");
        }
    }
}
