//! Which fills are running, one per key (nginx's `proxy_cache_lock`): the first request for an uncached
//! key leads the fill ([`super::fill`]); requests that arrive meanwhile follow it ([`super::follow`]).
//! A bust voids the fill in flight, so what it fetched is never stored.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use super::fill::FillGuard;
use super::follow::Follower;
use super::memfill::MemBody;
use super::store::{hash_key, KeyHash};
use super::{Cache, Cached};
use crate::object::Meta;

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
    /// The body is being written and [`Shared::body`] is set: followers can stream it.
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
    pub body: GrowingBody,
}

pub(super) enum GrowingBody {
    /// The file being written.
    File(File),
    /// A small body, in memory until it is whole ([`super::memfill`]).
    Memory(Arc<MemBody>),
}

#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<KeyHash, Arc<Shared>>>,
}

pub enum Flight {
    Leader(FillGuard),
    Follower(Follower),
    /// A fill committed between the caller's lookup and its taking the lead: serve this instead.
    Cached(Cached),
}

impl Flights {
    pub(super) fn join(&self, cache: Arc<Cache>, key: &str) -> Flight {
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
        Flight::Leader(FillGuard::new(cache, key, hash, shared))
    }

    /// The leader is done with `hash`: later requests start a fill of their own.
    pub(super) fn release(&self, hash: KeyHash, shared: &Arc<Shared>) {
        let mut running = self.running.lock().expect("flights lock");
        if running.get(&hash).is_some_and(|s| Arc::ptr_eq(s, shared)) {
            running.remove(&hash);
        }
    }

    /// The fill running for `hash` (if any) will not be stored, and later requests do not join it: they
    /// start a new one under the rules in force after the bust.
    pub fn void(&self, hash: KeyHash) {
        let mut running = self.running.lock().expect("flights lock");
        if let Some(shared) = running.remove(&hash) {
            shared.voided.store(true, Ordering::SeqCst);
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
}

impl Shared {
    /// Whether a bust voided this fill. Read by the publish under the index's path lock, which the
    /// bust's purge takes after setting it: a bust either comes before the check (nothing is stored)
    /// or its purge comes after the rename (it deletes what was stored).
    pub(super) fn voided(&self) -> bool {
        self.voided.load(Ordering::SeqCst)
    }
}
