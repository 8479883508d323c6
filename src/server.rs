//! Listeners, TLS, timeouts, signals: everything about sockets and process life, no business logic.
//!
//! Accept loops feed one channel; the main loop owns the graceful-shutdown handle and the reload, so
//! SIGHUP swaps the runtime between two requests and SIGTERM drains connections before exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::cache::{Cache, CacheError};
use crate::config::{Config, Tls};
use crate::copy::{Copier, CopierError};
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeError};

mod access;
mod connection;
mod listeners;
mod notify;
mod probe;
mod reload;
mod sendfile;
mod stall;
mod streams;
pub(crate) use connection::Conn;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Copy(#[from] CopierError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("socket activation: {0}")]
    Activation(String),
}

/// Runs until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP (the embedded default has none).
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), ServerError> {
    // First of all: a SIGTERM during start-up (a restart right after a start) must stop the process
    // cleanly, not kill it with connections accepted.
    let mut hup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    let metrics = Arc::new(Metrics::new());
    let server_cfg = config.server.clone();
    // The admin listener first: `/readyz` says 503 while the rest starts.
    let admin_parts = Arc::new(std::sync::OnceLock::new());
    let mut admin_task = None;
    if let Some(addr) = server_cfg.admin_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        tracing::info!(%addr, "admin listening");
        admin_task = Some(tokio::spawn(admin::serve(
            listener,
            metrics.clone(),
            admin_parts.clone(),
        )));
    }
    let cache = Cache::open(
        &config.cache,
        open_files_within_limit(config.cache.open_files),
        metrics.cache.clone(),
    )?;
    // What only a restart changes is compared against this at each reload.
    let started_with = config.clone();
    let copier = Copier::open(&config.cache.dir, &config.copy, metrics.copy.clone())?;
    let shared = Arc::new(ArcSwap::from_pointee(Runtime::new(
        config,
        metrics.clone(),
        cache.clone(),
        copier.clone(),
    )?));
    let copy_thread = copier
        .start(shared.clone())
        .map_err(|e| ServerError::Copy(CopierError::thread(e)))?;

    let (tx, mut accepted) = mpsc::channel::<TcpStream>(1024);
    let mut accept_tasks = Vec::new();
    for (listener, addr) in listeners::media(&server_cfg.listen).await? {
        tracing::info!(%addr, tls = server_cfg.tls.is_some(), "listening");
        accept_tasks.push(tokio::spawn(accept_loop(listener, tx.clone())));
    }
    drop(tx);
    let _ = admin_parts.set(admin::Parts {
        cache: cache.clone(),
        copier: copier.clone(),
        runtime: shared.clone(),
    });

    let conns = ArcSwap::from_pointee(Conn::new(&server_cfg)?);

    // Each connection holds a receiver: the drain at shutdown flips it and waits for them all to drop.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    metrics.health.set_phase(crate::health::Phase::Ready);
    notify::ready();
    let prober = probe::spawn(shared.clone());
    let pinger = notify::spawn_pinger(metrics.clone(), copier.clone());
    let notices = crate::cache::watch_notices(cache.clone());

    loop {
        tokio::select! {
            Some(stream) = accepted.recv() => {
                // The settings in force when the connection arrives (a reload replaces them).
                let conn = conns.load_full();
                tokio::spawn(conn.serve(stream, shared.clone(), stop_rx.clone()));
            }
            _ = hup.recv() => reload::reload(&shared, &conns, config_path.as_deref(), &started_with, &metrics, (&cache, &copier)),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!(
        connections = stop.receiver_count() - 1,
        "stopping: no new connections, finishing responses"
    );
    metrics.health.set_phase(crate::health::Phase::Stopping);
    notify::stopping();
    prober.abort();
    for task in accept_tasks {
        task.abort();
        let _ = task.await;
    }
    // Connections accepted but not yet served: their clients sent (or are sending) a request to this
    // process, which answers it before it goes. Under socket activation everything not accepted yet
    // waits in the socket's backlog for the next process.
    accepted.close();
    while let Ok(stream) = accepted.try_recv() {
        let conn = conns.load_full();
        tokio::spawn(conn.serve(stream, shared.clone(), stop_rx.clone()));
    }
    // As reloaded: the admin may have raised it for a long upload window.
    let shutdown_timeout = shared.load().config.server.shutdown_timeout;
    let _ = stop.send(true);
    drop(stop_rx);
    if tokio::time::timeout(shutdown_timeout, stop.closed())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?shutdown_timeout, "connections still open at shutdown timeout; closing them");
    }
    // Copies in flight stop here; their keys have no `-` line in the journal, so they are copied
    // again after the restart, like the keys still waiting.
    let _ = tokio::task::spawn_blocking(move || copy_thread.stop()).await;
    copier.flush().await;
    if let Some(task) = admin_task {
        task.abort();
    }
    pinger.abort();
    notices.abort();
    tracing::info!("stopped");
    Ok(())
}

async fn accept_loop(listener: TcpListener, tx: mpsc::Sender<TcpStream>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(crate) fn tls_acceptor(tls: &Tls) -> Result<TlsAcceptor, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("server.tls.cert {}: {e}", tls.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| ServerError::Tls(format!("server.tls.key {}: {e}", tls.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("server.tls: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Kept-open cache entries count against `RLIMIT_NOFILE`, whose soft value is often 1024: raise it to the
/// hard limit (as Go's runtime does at start) and keep at most half of it for cache entries, leaving the
/// rest for connections.
fn open_files_within_limit(wanted: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise the open-file limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let allowed = usize::try_from(soft / 2).unwrap_or(usize::MAX);
    if wanted > allowed {
        tracing::warn!(
            wanted,
            allowed,
            "cache.open_files is above half the open-file limit (LimitNOFILE); keeping fewer open"
        );
    }
    wanted.min(allowed)
}
