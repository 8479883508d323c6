//! What `/readyz` says: whether the proxy is ready (listeners bound, config loaded, not stopping), and
//! how each upstream is doing (`ok`, `failing` or `unresolved`), from real traffic and from a light
//! background probe, with the objects it lost. A desynchronizing bucket shows here, and in
//! `mediaproxy_upstream_lost_objects_total`, before users report broken media.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use crate::upstream::UpstreamError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Stopping = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing asked yet.
    Unknown,
    Ok,
    Failing,
    Unresolved,
}

struct Upstream {
    state: State,
    detail: String,
    lost: u64,
    /// When a failure of this upstream was last logged, and how many since went unlogged.
    logged_at: Option<std::time::Instant>,
    unlogged: u64,
}

/// A failing upstream (a wrong secret, a bucket down) is logged once per this interval, with a count,
/// not once per request.
pub const FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Keys whose loss was logged, per process: each is logged once (bounded, then counted only).
const LOGGED_LOSSES: usize = 10_000;

#[derive(Default)]
pub struct Health {
    phase: AtomicU8,
    upstreams: Mutex<HashMap<String, Upstream>>,
    logged: Mutex<std::collections::HashSet<(String, String)>>,
}

impl Health {
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    fn with(&self, name: &str, f: impl FnOnce(&mut Upstream)) {
        let mut ups = self.upstreams.lock().expect("health lock");
        let up = ups.entry(name.to_string()).or_insert(Upstream {
            state: State::Unknown,
            detail: String::new(),
            lost: 0,
            logged_at: None,
            unlogged: 0,
        });
        f(up);
    }

    /// The upstream answered (found or not found).
    pub fn answered(&self, name: &str) {
        self.with(name, |u| {
            u.state = State::Ok;
            u.detail.clear();
        });
    }

    pub fn failed(&self, name: &str, e: &UpstreamError) {
        let unresolved = matches!(e, UpstreamError::Request(m) if m.contains("dns error"));
        self.with(name, |u| {
            u.state = if unresolved {
                State::Unresolved
            } else {
                State::Failing
            };
            u.detail = e.to_string();
        });
    }

    /// Whether to log this failure of `name` now: `Some(n)` with the failures not logged since the last
    /// line, `None` to count it silently.
    pub fn log_failure(&self, name: &str) -> Option<u64> {
        let mut out = None;
        self.with(name, |u| match u.logged_at {
            Some(at) if at.elapsed() < FAILURE_LOG_EVERY => u.unlogged += 1,
            _ => {
                out = Some(u.unlogged);
                u.unlogged = 0;
                u.logged_at = Some(std::time::Instant::now());
            }
        });
        out
    }

    /// `name` answered 404 for a key it had served before (the cache entry says it filled it): the
    /// bucket lost the object. Returns whether this key's loss is new (to log it once).
    pub fn lost(&self, name: &str, key: &str) -> bool {
        self.with(name, |u| u.lost += 1);
        let mut logged = self.logged.lock().expect("health lock");
        logged.len() < LOGGED_LOSSES && logged.insert((name.to_string(), key.to_string()))
    }

    /// `/readyz`: ready or not, and one line per upstream in config order:
    /// `NAME ok|failing|unresolved[ detail]`.
    pub fn render(&self, names: &[String]) -> (bool, String) {
        let phase = self.phase();
        let mut out = match phase {
            Phase::Starting => "starting\n".to_string(),
            Phase::Ready => "ready\n".to_string(),
            Phase::Stopping => "stopping\n".to_string(),
        };
        let ups = self.upstreams.lock().expect("health lock");
        for name in names {
            let (state, mut detail, lost) = match ups.get(name) {
                Some(u) => (u.state, u.detail.clone(), u.lost),
                None => (State::Unknown, String::new(), 0),
            };
            let word = match state {
                State::Unknown => {
                    detail = "not asked yet".into();
                    "ok"
                }
                State::Ok => "ok",
                State::Failing => "failing",
                State::Unresolved => "unresolved",
            };
            if lost > 0 {
                let sep = if detail.is_empty() { "" } else { "; " };
                detail = format!("lost_objects={lost}{sep}{detail}");
            }
            let line = if detail.is_empty() {
                format!("{name} {word}\n")
            } else {
                format!("{name} {word} {detail}\n")
            };
            out.push_str(&line);
        }
        (phase == Phase::Ready, out)
    }
}
