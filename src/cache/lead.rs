//! The fill policy in one place: who fills, how long a fill outlives its client, how many fills no
//! client reads may run, and how a body whose fill failed part-way is finished from the upstreams.
//!
//! The cache knows nothing of upstreams: the caller hands it an [`Origin`], the questions a fill asks
//! of the world beyond the cache. The leader's upstream request runs in its own task, so a client that
//! leaves before the upstream's headers does not take the fill down with it (its followers would each
//! go to the bucket: a stampede that one impatient client could trigger at will).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;

use super::fill::{FillGuard, BACKGROUND_FILL_LIMIT};
use super::follow::{Follower, Joined};
use super::growing::fill_failed_at;
use super::Cache;
use crate::object::{Body, ByteStream, Meta, Object};

/// What the upstreams said to a fill's question.
pub enum Answer {
    Found(Object),
    /// None has it: a negative entry is stored.
    NotFound,
    /// None has it and at least one could not answer: nothing is stored.
    Failed,
}

/// The questions a fill asks beyond the cache, for one key.
pub trait Origin: Send + Sync + 'static {
    /// The whole object.
    fn fetch(&self) -> BoxFuture<'_, Answer>;
    /// The rest of the object described by `meta` (`len` bytes in all) from byte `at`, only if it is
    /// provably the same object; `None` otherwise (an aborted connection beats mixed bytes).
    fn resume<'a>(&'a self, at: u64, len: u64, meta: &'a Meta)
        -> BoxFuture<'a, Option<ByteStream>>;
}

impl FillGuard {
    /// Leads the fill for a client: the object's body as the fill writes it, finished from the
    /// upstreams if the fill fails part-way. The fill goes on if the client leaves, before the
    /// upstream's headers as after them (then within `cache.background_fills`).
    pub async fn fill_for_client(self, origin: Arc<dyn Origin>) -> Answer {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The task that asks the upstream then runs the fill. If this request goes away the task does
        // not: the answer it sends is dropped, and the fill goes on by its own rules.
        tokio::spawn(async move {
            match origin.fetch().await {
                Answer::Found(obj) => {
                    let (obj, fill) = self.tee(obj).await;
                    // Moved: a fill that outlives its client must not keep the config it started
                    // under (its upstreams and their connections) alive after a reload.
                    let _ = tx.send(Answer::Found(resumable(obj, origin)));
                    if let Some(fill) = fill {
                        fill.run().await;
                    }
                }
                Answer::NotFound => {
                    self.not_found().await;
                    let _ = tx.send(Answer::NotFound);
                }
                Answer::Failed => drop(tx.send(Answer::Failed)),
            }
        });
        rx.await.unwrap_or(Answer::Failed)
    }

    /// A HEAD on a miss, filled like a GET (nginx turns the HEAD into a GET upstream too), so the next
    /// HEAD or GET is a hit. No client reads the body, so only with one of the `cache.background_fills`
    /// permits: `Err(self)` when none is free (the caller asks with a plain HEAD instead). Answers as
    /// soon as the upstream's headers are in; the fill goes on in its task.
    pub async fn fill_for_head(
        self,
        cache: &Cache,
        origin: Arc<dyn Origin>,
    ) -> Result<Answer, FillGuard> {
        let Some(permit) = cache.background_permit() else {
            return Err(self);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let key = self.key().to_string();
            let work = async {
                match origin.fetch().await {
                    Answer::Found(obj) => {
                        let head = Object {
                            meta: obj.meta.clone(),
                            body: Body::Empty,
                        };
                        let _ = tx.send(Answer::Found(head));
                        self.fill(obj, permit).await
                    }
                    Answer::NotFound => {
                        self.not_found().await;
                        let _ = tx.send(Answer::NotFound);
                    }
                    Answer::Failed => drop(tx.send(Answer::Failed)),
                }
            };
            if tokio::time::timeout(BACKGROUND_FILL_LIMIT, work)
                .await
                .is_err()
            {
                tracing::warn!(%key, "fill after a HEAD abandoned after {BACKGROUND_FILL_LIMIT:?}");
            }
        });
        Ok(rx.await.unwrap_or(Answer::Failed))
    }

    /// Fills with no client from the start (a seek was answered with a ranged GET): only with one of
    /// the `cache.background_fills` permits, the same bound as fills whose client left.
    pub fn fill_in_background(self, cache: &Cache, origin: Arc<dyn Origin>) {
        let Some(permit) = cache.background_permit() else {
            tracing::debug!(key = %self.key(), "cache.background_fills in use; answering the seek without filling");
            return;
        };
        tokio::spawn(async move {
            let key = self.key().to_string();
            let work = async {
                match origin.fetch().await {
                    Answer::Found(obj) => self.fill(obj, permit).await,
                    Answer::NotFound => self.not_found().await,
                    Answer::Failed => {}
                }
            };
            if tokio::time::timeout(BACKGROUND_FILL_LIMIT, work)
                .await
                .is_err()
            {
                tracing::warn!(%key, "background fill abandoned after {BACKGROUND_FILL_LIMIT:?}");
            }
        });
    }
}

impl Follower {
    /// Follows the fill (up to `timeout` for its first answer); a body that stops with the fill is
    /// finished from the upstreams.
    pub async fn follow(self, timeout: std::time::Duration, origin: Arc<dyn Origin>) -> Joined {
        match self.join(timeout).await {
            Joined::Streaming(obj) => Joined::Streaming(resumable(obj, origin)),
            other => other,
        }
    }
}

/// A body whose fill fails part-way (the upstream died mid-body, or, for followers, the disk filled up)
/// is finished with a ranged GET from where the client stopped, if an upstream can prove it is the
/// same object.
fn resumable(obj: Object, origin: Arc<dyn Origin>) -> Object {
    let Object { meta, body } = obj;
    let (stream, len) = match (body, meta.len) {
        (Body::Stream { stream, offset: 0 }, Some(len)) => (stream, len),
        (body, _) => return Object { meta, body },
    };
    let state = Some((stream, origin, Arc::new(meta.clone())));
    let resumed = futures_util::stream::unfold(state, move |state| async move {
        let (mut stream, origin, meta) = state?;
        loop {
            let at = match stream.next().await {
                None => return None,
                Some(Ok(bytes)) => return Some((Ok(bytes), Some((stream, origin, meta)))),
                Some(Err(e)) => match fill_failed_at(&e) {
                    Some(at) => at,
                    None => return Some((Err(e), None)),
                },
            };
            match origin.resume(at, len, &meta).await {
                Some(rest) => {
                    tracing::info!(at, "fill failed; the rest comes from the upstreams");
                    stream = rest;
                }
                None => {
                    let e = std::io::Error::other(format!(
                        "the cache fill failed at byte {at} and no upstream could resume the same object"
                    ));
                    return Some((Err(e), None));
                }
            }
        }
    });
    Object {
        meta,
        body: Body::Stream {
            stream: Box::pin(resumed),
            offset: 0,
        },
    }
}
