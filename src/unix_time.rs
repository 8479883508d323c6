//! Unix time, as entries, tombstones and HTTP dates store it: one definition for every module.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch of `t` (0 for times before it).
pub fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now() -> u64 {
    secs(SystemTime::now())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
