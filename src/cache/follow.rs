//! Followers of a fill: requests for a key whose fill is already running.
//!
//! nginx's `proxy_cache_lock` makes them wait for the whole fill, and past `proxy_cache_lock_timeout`
//! each goes to the upstream itself: for a video that takes longer than that to arrive, a burst of
//! requests becomes a burst of full GETs. Here, as with Varnish's streaming of a busy object, a
//! follower streams the body from the entry's file as the fill writes it ([`super::growing`]), so a
//! burst costs one GET whatever the object's size, and `lock_timeout` only bounds the wait for the
//! upstream's first answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::flights::{GrowingBody, Progress, Shared, Status};
use super::growing;
use super::memfill;
use crate::object::{Body, Object};

/// Subscribed to the fill's progress from the moment it joins (under the flights lock): a fill whose
/// own client left counts it as a reader at once, and does not cancel itself in the instant between.
pub struct Follower(Arc<Shared>, watch::Receiver<Progress>);

/// What a follower found.
pub enum Joined {
    /// The fill is writing the body: stream it (the body may end in [`growing::FillFailed`]).
    Streaming(Object),
    /// The fill finished: the entry is in the cache (or a negative entry is).
    Finished,
    /// The fill failed, or gave no answer within the lock timeout: ask the upstreams directly.
    GaveUp,
}

impl Follower {
    pub(super) fn new(shared: Arc<Shared>) -> Follower {
        let rx = shared.progress.subscribe();
        Follower(shared, rx)
    }

    /// Waits (up to `timeout`) until the fill either streams a body or ends.
    pub async fn join(mut self, timeout: Duration) -> Joined {
        let waited = tokio::time::timeout(
            timeout,
            self.1
                .wait_for(|p| p.streaming || p.status != Status::Running),
        )
        .await;
        let Some(progress) = waited.ok().and_then(|r| r.ok().map(|p| *p)) else {
            return Joined::GaveUp;
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
        let len = growing.meta.len?;
        let meta = growing.meta.clone();
        let stream = match &growing.body {
            GrowingBody::File(file) => growing::stream(file.try_clone().ok()?, len, self.0, None),
            GrowingBody::Memory(body) => memfill::stream(body.clone(), len, self.0),
        };
        Some(Object {
            meta,
            body: Body::Stream { stream, offset: 0 },
        })
    }
}
