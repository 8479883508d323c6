//! Where the media listeners come from: the sockets systemd hands over (socket activation, the
//! `LISTEN_FDS` protocol), or `[server] listen`.
//!
//! With socket activation the listening socket belongs to systemd and outlives the process: during a
//! `systemctl restart` or a binary upgrade, connections wait in its backlog while the old process
//! finishes what it accepted, and the new one accepts them. Nothing is refused in between.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};

use tokio::net::TcpListener;

use super::ServerError;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The listeners to accept media connections on, each with its address.
pub async fn media(listen: &[SocketAddr]) -> Result<Vec<(TcpListener, SocketAddr)>, ServerError> {
    if let Some(fds) = passed_fds()? {
        if !listen.is_empty() {
            tracing::info!(
                "socket activation: serving the sockets systemd passed; server.listen is not bound"
            );
        }
        return fds.into_iter().map(from_fd).collect();
    }
    let mut out = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: *addr,
                source,
            })?;
        out.push((listener, *addr));
    }
    Ok(out)
}

/// The descriptors passed to this very process (`LISTEN_PID` is ours), if any.
fn passed_fds() -> Result<Option<Vec<RawFd>>, ServerError> {
    let Ok(pid) = std::env::var("LISTEN_PID") else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None); // meant for another process (inherited environment)
    }
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<RawFd>().ok())
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| ServerError::Activation("LISTEN_FDS is missing or not 1..64".into()))?;
    Ok(Some((FIRST_FD..FIRST_FD + count).collect()))
}

fn from_fd(fd: RawFd) -> Result<(TcpListener, SocketAddr), ServerError> {
    use rustix::io::{fcntl_setfd, FdFlags};
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours) and nothing else in
    // the process owns it; it is taken exactly once.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let bad = |why: String| ServerError::Activation(format!("passed descriptor {fd}: {why}"));
    let addr = std.local_addr().map_err(|e| {
        bad(format!(
            "not a TCP socket ({e}); use ListenStream= with an address"
        ))
    })?;
    let _ = fcntl_setfd(&std, FdFlags::CLOEXEC);
    std.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
    let listener = TcpListener::from_std(std).map_err(|e| bad(e.to_string()))?;
    Ok((listener, addr))
}
