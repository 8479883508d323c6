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
            None => self.drive(stream, client, shared, stop).await,
            Some(acceptor) => {
                let accepted =
                    tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream)).await;
                match accepted {
                    Ok(Ok(tls)) => self.drive(tls, client, shared, stop).await,
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
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let streams = Streams::new();
        let on_conn = streams.clone();
        let service = service_fn(move |req| {
            let rt = shared.load_full();
            let clock = on_conn.opened();
            let timed = req.version() == http::Version::HTTP_2;
            let log = rt
                .config
                .server
                .access_log
                .then(|| Box::new(Entry::new(client, req.method(), req.uri().path())));
            async move {
                let metrics = rt.metrics.clone();
                let resp = proxy::handle(rt, req).await;
                let log = log.map(|mut log| {
                    log.answered(&resp);
                    log
                });
                Ok::<_, Infallible>(resp.map(|body| Watched::new(body, clock, timed, log, metrics)))
            }
        });
        let io = TokioIo::new(StallGuard::new(io, self.send_timeout));
        let conn = self.builder.serve_connection(io, service).into_owned();
        tokio::pin!(conn);
        let (send_timeout, idle) = (self.send_timeout, self.header_read_timeout);
        let mut tick = tokio::time::interval(watch_interval(send_timeout, idle));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Asked to close (the process is stopping), and closing: a connection accepted just before the
        // stop is closed only once its first request is in (hyper then answers it with
        // `Connection: close`), since its client sent that request to this process.
        let mut asked = *stop.borrow();
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => return result,
                changed = stop.changed(), if !asked => {
                    asked = changed.is_err() || *stop.borrow();
                }
                _ = streams.first_request(), if asked && !closing => {
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

/// How often a connection's watchdog looks: a fraction of the shorter limit, so each is enforced within
/// about a quarter of its length, and never a busy loop.
fn watch_interval(send_timeout: Duration, idle: Duration) -> Duration {
    (send_timeout.min(idle) / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}
