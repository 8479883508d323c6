//! Where a small fill's one store runs: on the worker, as nginx writes its cache, while the disk keeps
//! up; in the blocking pool for a while after a store that did not.
//!
//! A small fill is stored in one go (create, one `writev`, rename, publish): on a disk that keeps up,
//! tens of microseconds. Handing that to the blocking pool and back cost more than the store itself:
//! a futex wake, two context switches and a runtime wake, ~15-30 µs of CPU per cold miss. But a worker
//! blocked on a stalled disk stalls every connection it serves, so:
//! - one store at a time runs on a worker: while it runs, stores on other workers go to the pool, so a
//!   device that hangs holds at most one worker, however many workers reach a store;
//! - a store slower than [`SLOW`] sends the stores that follow to the pool for [`AWAY`]: a disk that
//!   stalls costs a worker one slow store per [`AWAY`], not one per miss.
//!
//! Small cache hits are already read on the worker the same way (one `pread`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A store slower than this is the disk not keeping up (page-cache writes of ≤ 512 KiB take well under
/// a millisecond; this is writeback throttling or a stalled device).
pub const SLOW: Duration = Duration::from_millis(5);
/// How long stores stay off the workers after a slow one.
pub const AWAY: Duration = Duration::from_secs(10);

pub struct Pace {
    epoch: Instant,
    /// Milliseconds since `epoch` until which stores go to the blocking pool.
    away_until: AtomicU64,
    /// A store is running on a worker.
    busy: AtomicBool,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            epoch: Instant::now(),
            away_until: AtomicU64::new(0),
            busy: AtomicBool::new(false),
        }
    }
}

/// The one store allowed on a worker; dropping it lets the next one run there.
pub struct Inline<'a>(&'a Pace);

impl Drop for Inline<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl Pace {
    /// The right to run the next store on this worker: none while the disk is lately slow or another
    /// worker's store is running.
    pub fn inline(&self) -> Option<Inline<'_>> {
        if self.now_ms() < self.away_until.load(Ordering::Relaxed) {
            return None;
        }
        let free = self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed);
        free.is_ok().then_some(Inline(self))
    }

    /// Notes how long a store took, wherever it ran.
    pub fn took(&self, elapsed: Duration) {
        if elapsed > SLOW {
            let until = self.now_ms() + AWAY.as_millis() as u64;
            if self.away_until.swap(until, Ordering::Relaxed) <= self.now_ms() {
                tracing::info!(
                    ?elapsed,
                    "a cache store was slow; small stores leave the workers for {AWAY:?}"
                );
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Runs `store` on this worker or in the blocking pool, as the disk's pace says, and notes its time.
pub async fn run<T: Send + 'static>(
    cache: &super::Cache,
    store: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let timed = move || {
        let started = Instant::now();
        let out = store();
        (out, started.elapsed())
    };
    let (out, elapsed) = if let Some(_inline) = cache.pace.inline() {
        timed()
    } else {
        tokio::task::spawn_blocking(timed).await.ok()?
    };
    cache.pace.took(elapsed);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slow_store_sends_the_next_ones_off_the_worker_for_a_while() {
        let pace = Pace::default();
        assert!(pace.inline().is_some());
        pace.took(Duration::from_micros(300));
        assert!(
            pace.inline().is_some(),
            "a store at the page cache's pace stays"
        );
        pace.took(SLOW + Duration::from_millis(1));
        assert!(pace.inline().is_none(), "after a slow store, the pool");
        // As if AWAY had passed.
        pace.away_until.store(pace.now_ms(), Ordering::Relaxed);
        assert!(pace.inline().is_some(), "and back once it has passed");
    }

    #[test]
    fn one_store_at_a_time_runs_on_a_worker() {
        let pace = Pace::default();
        let first = pace.inline().expect("the disk keeps up");
        assert!(
            pace.inline().is_none(),
            "a second worker's store goes to the pool while the first runs (it may be hung)"
        );
        drop(first);
        assert!(pace.inline().is_some());
    }
}
