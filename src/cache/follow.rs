//! Followers of a fill: requests for a key whose fill is already running.
//!
//! nginx's `proxy_cache_lock` makes them wait for the whole fill, and past `proxy_cache_lock_timeout`
//! each goes to the upstream itself: for a video that takes longer than that to arrive, a burst of
//! requests becomes a burst of full GETs. Here, as with Varnish's streaming of a busy object, a
//! follower streams the body from the entry's file as the fill writes it, so a burst costs one GET
//! whatever the object's size, and `lock_timeout` only bounds the wait for the upstream's first answer.
//!
//! If the fill fails part-way (the upstream died, the disk filled up), the follower's body ends with a
//! [`FillFailed`] error that says how far it got, so the caller can resume from the upstreams with a
//! ranged GET instead of cutting the client off.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::fill::{Progress, Shared, Status};
use crate::object::{read_at, Body, Object};

/// Largest read from the file per chunk.
const CHUNK: u64 = 256 * 1024;

pub struct Follower(Arc<Shared>);

/// What a follower found.
pub enum Joined {
    /// The fill is writing the body: stream it (the object's body may end in [`FillFailed`]).
    Streaming(Object),
    /// The fill finished: the entry is in the cache (or a negative entry is).
    Finished,
    /// The fill failed, or gave no answer within the lock timeout: ask the upstreams directly.
    GaveUp,
}

/// The fill stopped before the end; the follower has the body up to `at`.
#[derive(Debug, thiserror::Error)]
#[error("the cache fill failed at byte {at}")]
pub struct FillFailed {
    pub at: u64,
}

impl Follower {
    pub(super) fn new(shared: Arc<Shared>) -> Follower {
        Follower(shared)
    }

    /// Waits (up to `timeout`) until the fill either streams a body or ends.
    pub async fn join(self, timeout: Duration) -> Joined {
        let mut rx = self.0.progress.subscribe();
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|p| p.streaming || p.status != Status::Running),
        )
        .await;
        let progress = match waited {
            Ok(Ok(p)) => *p,
            _ => return Joined::GaveUp,
        };
        match progress {
            Progress {
                status: Status::Done,
                ..
            } => Joined::Finished,
            Progress {
                status: Status::Running,
                streaming: true,
                ..
            } => match self.stream() {
                Some(obj) => Joined::Streaming(obj),
                None => Joined::GaveUp,
            },
            _ => Joined::GaveUp,
        }
    }

    fn stream(self) -> Option<Object> {
        let growing = self.0.body.get()?;
        let file = growing.file.try_clone().ok()?;
        let len = growing.meta.len?;
        let meta = growing.meta.clone();
        let rx = self.0.progress.subscribe();
        // The follower holds the `Shared` (and so the sender): `changed` never ends early, and the
        // fill always leaves a final status (its guard sets one even on a panic).
        let state = Some((self.0, rx, file, 0u64));
        let stream = futures_util::stream::unfold(state, move |state| async move {
            let (shared, mut rx, file, pos) = state?;
            if pos >= len {
                return None;
            }
            loop {
                let p = *rx.borrow_and_update();
                if pos < p.written {
                    let n = (p.written - pos).min(CHUNK);
                    return Some(match read_at(&file, pos, n as usize) {
                        Ok(bytes) => (Ok(bytes), Some((shared, rx, file, pos + n))),
                        Err(e) => (Err(e), None),
                    });
                }
                if p.status == Status::Failed || (p.status == Status::Done && p.written < len) {
                    return Some((Err(io::Error::other(FillFailed { at: pos })), None));
                }
                if rx.changed().await.is_err() {
                    return Some((Err(io::Error::other(FillFailed { at: pos })), None));
                }
            }
        });
        Some(Object {
            meta,
            body: Body::Stream {
                stream: Box::pin(stream),
                offset: 0,
            },
        })
    }
}

/// The position a follower's body stopped at, if it stopped because the fill failed.
pub fn fill_failed_at(e: &io::Error) -> Option<u64> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FillFailed>())
        .map(|f| f.at)
}
