//! What systemd hears from the service (`Type=notify`): `READY=1` once the listeners are bound and the
//! config loaded, `RELOADING=1`/`READY=1` around a reload, `STOPPING=1`, a one-line `STATUS=`, and
//! `WATCHDOG=1` from a task of the async runtime itself, so a wedged runtime stops pinging and systemd
//! restarts it (`WatchdogSec=`). Without `NOTIFY_SOCKET` every call is a no-op.
//!
//! Sent without blocking: a datagram socket whose reader stopped reading (its queue holds 10
//! messages by default) would otherwise stall the task that notifies, which is the main loop. A
//! message that does not fit is dropped; the next status or ping follows shortly.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use crate::copy::Copier;
use crate::metrics::Metrics;

pub fn ready() {
    send("READY=1");
}

pub fn reloading() {
    // MONOTONIC_USEC lets systemd (Type=notify-reload) match the reload it asked for.
    let usec = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = usec.tv_sec as u128 * 1_000_000 + usec.tv_nsec as u128 / 1_000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

pub fn stopping() {
    send("STOPPING=1");
}

fn send(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        use std::os::linux::net::SocketAddrExt;
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        socket.send_to_addr(message.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::debug!(error = %e, "systemd notification not sent");
    }
}

/// `WATCHDOG_USEC` when it is meant for this process (`WATCHDOG_PID`, if set, is ours).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog (at half its interval, as systemd asks) and refreshes `STATUS=`, until the
/// returned task is aborted. Without a watchdog, `STATUS=` alone every 10 s.
pub fn spawn_pinger(metrics: Arc<Metrics>, copier: Arc<Copier>) -> tokio::task::JoinHandle<()> {
    let watchdog = watchdog_interval();
    let every = watchdog.map_or(Duration::from_secs(10), |w| {
        (w / 2).min(Duration::from_secs(10))
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let status = summary(&metrics, &copier);
            match watchdog {
                Some(_) => send(&format!("WATCHDOG=1\nSTATUS={status}")),
                None => send(&format!("STATUS={status}")),
            }
        }
    })
}

/// One line for `systemctl status`: what the proxy has done since it started.
fn summary(metrics: &Metrics, copier: &Copier) -> String {
    let (requests, hits, misses) = metrics.totals();
    let looked_up = hits + misses;
    let ratio = if looked_up == 0 {
        "no cache lookups yet".to_string()
    } else {
        format!("{:.1}% cache hits", hits as f64 * 100.0 / looked_up as f64)
    };
    format!(
        "{requests} requests, {ratio}, copy queue {}",
        copier.depth()
    )
}
