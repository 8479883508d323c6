//! One accepted connection, from TLS handshake to close: the settings it is served with, and the loop
//! that drives it under its watchdog ([`super::streams`]) and the process's drain.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::access::Entry;
use super::stall::StallGuard;
use super::streams::{Streams, Verdict, Watched};
use super::ServerError;
use crate::proxy;
use crate::runtime::Runtime;

/// What a new connection is served with, from `[server]`: rebuilt by a reload, so a renewed
/// certificate or a changed timeout applies to the next connection.
pub(crate) struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    send_timeout: Duration,
}

impl Conn {
    pub(crate) fn new(server: &crate::config::Server) -> Result<Conn, ServerError> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(server.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(server.header_read_timeout)
            .max_concurrent_streams(256);
        Ok(Conn {
            builder: Arc::new(builder),
            tls: server.tls.as_ref().map(super::tls_acceptor).transpose()?,
            header_read_timeout: server.header_read_timeout,
            send_timeout: server.send_timeout,
        })
    }

    /// Serves `stream` until it closes, the watchdog closes it, or `stop` turns true (then gracefully:
    /// in-flight responses finish, within `send_timeout` of no progress each). Holding `stop` is what
    /// the drain at shutdown counts.
    pub(crate) async fn serve(
        self: Arc<Conn>,
        stream: TcpStream,
        shared: Arc<arc_swap::ArcSwap<Runtime>>,
        stop: watch::Receiver<bool>,
    ) {
        let client = stream.peer_addr().ok();
        let result = match self.tls.clone() {
            None => {
                let stream = super::sendfile::SendfileStream::new(stream);
                self.drive(stream, client, shared, stop, true).await
            }
            Some(acceptor) => {
                let accepted =
                    tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream)).await;
                match accepted {
                    Ok(Ok(tls)) => self.drive(tls, client, shared, stop, false).await,
                    Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!("TLS handshake timed out"),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    async fn drive<I>(
        &self,
        io: I,
        client: Option<std::net::SocketAddr>,
        shared: Arc<arc_swap::ArcSwap<Runtime>>,
        mut stop: watch::Receiver<bool>,
        plain: bool,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let streams = Streams::new();
        let on_conn = streams.clone();
        let stopping = stop.clone();
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let rt = shared.load_full();
            let clock = on_conn.opened();
            let timed = req.version() == http::Version::HTTP_2;
            // Its file bodies go to the socket with sendfile (see `zerocopy`).
            let sendfile = plain && !timed;
            let stopping = stopping.clone();
            let log = rt
                .config
                .server
                .access_log
                .then(|| Box::new(Entry::new(client, req.method(), req.uri().path())));
            async move {
                let metrics = rt.metrics.clone();
                let mut resp = proxy::handle(rt, req, sendfile).await;
                if !timed && *stopping.borrow() {
                    // The process is stopping: say so, so the client opens its next connection (to
                    // the next process) instead of reusing this one as it closes.
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                let log = log.map(|mut log| {
                    log.answered(&resp);
                    log
                });
                Ok::<_, Infallible>(resp.map(|body| Watched::new(body, clock, timed, log, metrics)))
            }
        });
        let io = TokioIo::new(StallGuard::new(io, self.send_timeout, streams.clone()));
        let conn = self.builder.serve_connection(io, service).into_owned();
        tokio::pin!(conn);
        let (send_timeout, idle) = (self.send_timeout, self.header_read_timeout);
        let mut tick = tokio::time::interval(watch_interval(send_timeout, idle));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Asked to close (the process is stopping), then closing. A connection is closed while a
        // request is in progress on it (hyper answers it with `Connection: close`), or after
        // CLOSE_GRACE with none: a client whose request is on its way to this process (a connection
        // accepted just before the stop, or a keep-alive client sending its next request) gets an
        // answer instead of a closed connection.
        let mut asked_at = stop.borrow().then(tokio::time::Instant::now);
        let mut closing = false;
        loop {
            let grace = asked_at.map(|at| at + CLOSE_GRACE);
            tokio::select! {
                result = conn.as_mut() => return result,
                changed = stop.changed(), if asked_at.is_none() => {
                    if changed.is_err() || *stop.borrow() {
                        asked_at = Some(tokio::time::Instant::now());
                    }
                }
                _ = streams.busy(), if asked_at.is_some() && !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = tokio::time::sleep_until(grace.unwrap_or_else(tokio::time::Instant::now)), if grace.is_some() && !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = tick.tick() => match streams.verdict(send_timeout, idle) {
                    Verdict::Stalled => {
                        tracing::debug!("a response made no progress for send_timeout; closing the connection");
                        return Ok(()); // dropping the connection closes it, every stream with it
                    }
                    Verdict::Idle if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ => {}
                },
            }
        }
    }
}

/// How long a connection with no request in progress stays open once the process is stopping, for a
/// request already on its way.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How often a connection's watchdog looks: a fraction of the shorter limit, so each is enforced within
/// about a quarter of its length, and never a busy loop.
fn watch_interval(send_timeout: Duration, idle: Duration) -> Duration {
    (send_timeout.min(idle) / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}
