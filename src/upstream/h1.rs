//! The HTTP/1.1 client that reads objects: one GET or HEAD at a time per connection, the body read
//! from the socket by whoever polls it, as nginx's upstream module does.
//!
//! A cold miss is mostly a bucket read, and reading it through reqwest cost a task for every
//! connection (each body chunk handed from it to the reader through a channel), a tower stack of
//! redirect and retry layers, and a URL parse per request: measured on one core, ~20 µs of CPU per
//! 30–80 KB GET above this client, a sixth of what a miss costs nginx in all. Writes, listings and
//! probes stay on reqwest: they are rare, and they need its multipart and streaming uploads.
//!
//! What it keeps from reqwest: a host name resolved per connection (never at start-up), the bundled
//! Mozilla roots and *ring* for TLS, `TCP_NODELAY`, no environment proxy, idle connections kept for
//! 60 s, a connect timeout (DNS, TCP and TLS together) and a timeout on every read of the body. What it
//! adds: a pooled connection the bucket closed while idle is seen before it is used, and a request
//! that fails on a reused connection before any byte of an answer is sent again once on a new one
//! (GET and HEAD are idempotent; hyper's pool does the same). It speaks HTTP/1.1 only, as nginx's
//! `proxy_pass` does: ALPN offers `http/1.1`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::HeaderValue;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use url::Url;

mod response;
pub use response::Response;

/// How long an unused connection is kept, as reqwest's pool did.
const IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per upstream: enough for a burst of misses, not a descriptor leak.
const MAX_IDLE: usize = 256;

pub struct Client {
    scheme: Scheme,
    address: Address,
    /// `host[:port]` as the `Host` header carries it (a presigned URL signs exactly this).
    host_header: String,
    user_agent: &'static str,
    connect_timeout: Duration,
    read_timeout: Duration,
    /// Oldest check-in first: connections are pushed at the end, stamped with a time read under the
    /// lock (so stamps only grow along the list), and taken from the end. [`expired_prefix`] relies on
    /// it.
    idle: Mutex<Vec<Idle>>,
}

#[derive(Clone)]
enum Scheme {
    Http,
    Https(tokio_rustls::TlsConnector, ServerName<'static>),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection, plain or TLS. A TLS stream is boxed: it is ten times the size of a socket.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One request's extra headers: the client's Range and a resumed body's If-Match.
#[derive(Default)]
pub struct Extra<'a> {
    pub range: Option<&'a HeaderValue>,
    pub if_match: Option<&'a HeaderValue>,
}

impl Client {
    /// A client for every URL on `base`'s scheme, host and port (an upstream has exactly one).
    pub fn new(
        base: &Url,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Client, String> {
        let host = base.host_str().ok_or("a URL without a host")?;
        let scheme = match base.scheme() {
            "http" => Scheme::Http,
            "https" => {
                let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| format!("{host}: {e}"))?;
                Scheme::Https(tokio_rustls::TlsConnector::from(TLS.clone()), name)
            }
            other => return Err(format!("a {other}:// URL")),
        };
        let address = Address::of(base)?;
        let host_header = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Ok(Client {
            scheme,
            address,
            host_header,
            user_agent: concat!("mediaproxy/", env!("CARGO_PKG_VERSION")),
            connect_timeout,
            read_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends a GET (or HEAD) of `target`, a path and query already escaped, on this client's host, and
    /// reads the answer's head. The body is the caller's to read, or to drop, which closes the
    /// connection unless the body was read to its end.
    pub async fn send(
        self: &Arc<Self>,
        head: bool,
        target: &str,
        extra: Extra<'_>,
    ) -> Result<Response, String> {
        let request = self.request(head, target, &extra);
        if let Some(conn) = self.checkout() {
            match self.exchange(conn, head, &request).await {
                Ok(resp) => return Ok(resp),
                // The bucket closed it as we reused it: nothing was answered, ask on a new one.
                Err(Exchange::Unanswered(_)) => {}
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        let conn = self.connect().await?;
        match self.exchange(conn, head, &request).await {
            Ok(resp) => Ok(resp),
            Err(Exchange::Unanswered(e) | Exchange::Failed(e)) => Err(e),
        }
    }

    fn request(&self, head: bool, target: &str, extra: &Extra<'_>) -> Vec<u8> {
        let mut r = Vec::with_capacity(160 + target.len());
        r.extend_from_slice(if head { b"HEAD " } else { b"GET " });
        r.extend_from_slice(target.as_bytes());
        r.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        r.extend_from_slice(self.host_header.as_bytes());
        r.extend_from_slice(b"\r\nuser-agent: ");
        r.extend_from_slice(self.user_agent.as_bytes());
        r.extend_from_slice(b"\r\naccept: */*\r\n");
        if let Some(range) = extra.range {
            r.extend_from_slice(b"range: ");
            r.extend_from_slice(range.as_bytes());
            r.extend_from_slice(b"\r\n");
        }
        if let Some(etag) = extra.if_match {
            r.extend_from_slice(b"if-match: ");
            r.extend_from_slice(etag.as_bytes());
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"\r\n");
        r
    }

    async fn exchange(
        self: &Arc<Self>,
        mut conn: Conn,
        head: bool,
        request: &[u8],
    ) -> Result<Response, Exchange> {
        let written = async {
            conn.write_all(request).await?;
            conn.flush().await
        };
        if let Err(e) = written.await {
            return Err(Exchange::Unanswered(format!("connection error: {e}")));
        }
        response::read_head(conn, head, self.read_timeout, Arc::downgrade(self)).await
    }

    /// The most recently used idle connection still open, if any.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if since.elapsed() < IDLE && conn.is_idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Takes back a connection whose answer was read to its end, and closes those idle too long.
    pub(crate) fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: a time read before it could be older than a racing check-in's.
        let now = Instant::now();
        let expired = expired_prefix(&idle, |i| i.since, now);
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since: now });
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let connect = async {
            let tcp = self.address.connect(self.connect_timeout).await?;
            let _ = tcp.set_nodelay(true);
            keep_alive(&tcp);
            match &self.scheme {
                Scheme::Http => Ok(Conn::Plain(tcp)),
                Scheme::Https(tls, name) => tls
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| Conn::Tls(Box::new(s)))
                    .map_err(|e| format!("tls handshake failed: {e}")),
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(conn) => conn,
            Err(_) => Err(format!(
                "connect timed out after {:?}",
                self.connect_timeout
            )),
        }
    }
}

/// Why an exchange failed: `Unanswered` when the request may never have reached the bucket.
pub(crate) enum Exchange {
    Unanswered(String),
    Failed(String),
}

/// Where a connection goes: an address as written, or a name resolved at each connection, so a bucket
/// whose address changes, or a proxy started before DNS works, needs no restart.
enum Address {
    Ip(SocketAddr),
    Name(String, u16),
}

impl Address {
    fn of(url: &Url) -> Result<Address, String> {
        let port = url.port_or_known_default().ok_or("a URL without a port")?;
        Ok(match url.host() {
            Some(url::Host::Ipv4(ip)) => Address::Ip(SocketAddr::from((ip, port))),
            Some(url::Host::Ipv6(ip)) => Address::Ip(SocketAddr::from((ip, port))),
            Some(url::Host::Domain(name)) => Address::Name(name.to_string(), port),
            None => return Err("a URL without a host".into()),
        })
    }

    /// Tries each address the name resolves to, in order, each with its share of `timeout`: an IPv6
    /// address whose route drops packets must not use it all before the IPv4 one is tried.
    async fn connect(&self, timeout: Duration) -> Result<TcpStream, String> {
        let addrs: Vec<SocketAddr> = match self {
            Address::Ip(a) => vec![*a],
            Address::Name(name, port) => tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|e| format!("dns error: {e}"))?
                .collect(),
        };
        let share = timeout / addrs.len().max(1) as u32;
        let mut last = None;
        for a in addrs {
            match tokio::time::timeout(share, TcpStream::connect(a)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = Some(format!("tcp connect error: {e}")),
                Err(_) => last = Some(format!("connect timed out after {share:?}")),
            }
        }
        Err(last.unwrap_or_else(|| "dns error: no addresses".into()))
    }
}

/// TCP keepalive as reqwest set it (15 s idle, 15 s apart, 3 probes) and a 30 s limit on unacknowledged
/// data: a connection a firewall dropped while pooled is found dead instead of waited on.
fn keep_alive(tcp: &TcpStream) {
    use rustix::net::sockopt;
    let _ = sockopt::set_socket_keepalive(tcp, true);
    let _ = sockopt::set_tcp_keepidle(tcp, Duration::from_secs(15));
    let _ = sockopt::set_tcp_keepintvl(tcp, Duration::from_secs(15));
    let _ = sockopt::set_tcp_keepcnt(tcp, 3);
    let _ = sockopt::set_tcp_user_timeout(tcp, 30_000);
}

/// TLS as reqwest had it here: the bundled Mozilla roots, *ring*, TLS 1.2 and 1.3; HTTP/1.1 by ALPN.
static TLS: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    Arc::new(client_config(roots))
});

fn client_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[cfg(test)]
impl Client {
    /// The same client trusting `roots` only, for tests against a certificate made on the spot.
    pub(crate) fn with_roots(
        base: &Url,
        roots: rustls::RootCertStore,
        timeout: Duration,
    ) -> Result<Client, String> {
        let mut c = Client::new(base, timeout, timeout)?;
        if let Scheme::Https(_, name) = &c.scheme {
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(roots)));
            c.scheme = Scheme::Https(tls, name.clone());
        }
        Ok(c)
    }

    pub(crate) fn idle_connections(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// How many of `idle` (oldest check-in first, see [`Client::idle`]) have been idle for [`IDLE`] or
/// longer at `now`: the expired ones are the list's start, so a check-in reads the clock once, not once
/// per idle connection (up to [`MAX_IDLE`] of them after a burst).
fn expired_prefix<T>(idle: &[T], since: impl Fn(&T) -> Instant, now: Instant) -> usize {
    idle.partition_point(|i| now.saturating_duration_since(since(i)) >= IDLE)
}

impl Conn {
    /// True when the bucket has neither closed nor written anything since the connection went idle:
    /// a readable idle connection is either closed or out of step, and not to be used. A TLS stream is
    /// asked itself, not its socket: bytes rustls already took off the socket count too.
    fn is_idle_and_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self {
            Conn::Plain(s) => matches!(s.poll_peek(&mut cx, &mut buf), Poll::Pending),
            Conn::Tls(s) => matches!(
                Pin::new(s.as_mut()).poll_read(&mut cx, &mut buf),
                Poll::Pending
            ),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests;
