//! A connection's watchdog: what nginx's `send_timeout` and `keepalive_timeout` do, for HTTP/2 as well.
//!
//! [`super::stall::StallGuard`] sees a socket write that makes no progress. That is not enough for
//! HTTP/2: a client that sets its stream windows to zero and keeps answering PINGs never blocks a write,
//! yet each of its up to 256 streams holds a response body (and its open file) for as long as it likes.
//! So every response body here carries a [`Clock`] saying whether hyper is waiting on us (the body is
//! being produced: the upstream's pace is the upstream timeouts' business) or we are waiting on hyper
//! (a chunk was handed over, or the body was never polled because the client's window is shut). When a
//! body waits on the client and no body of the connection has moved for `send_timeout`, the connection
//! is closed, as nginx does. A connection with no open stream for the idle limit is asked to close
//! gracefully (GOAWAY for HTTP/2).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// `handed_ms` while hyper is waiting on the body, not on the client.
const PRODUCING: u64 = u64::MAX;

/// The streams (requests with their response bodies) open on one connection.
pub struct Streams {
    start: Instant,
    /// A wake-up at every request, for a connection asked to close.
    arrived: tokio::sync::Notify,
    open: Mutex<Vec<Weak<Clock>>>,
    /// When the last stream closed (or the connection opened), in ms since `start`.
    last_closed_ms: AtomicU64,
    /// When a response body on this connection last moved (hyper took a chunk), in ms since `start`.
    last_progress_ms: AtomicU64,
}

/// One stream: created with its request, carried by its response body, dropped with it.
pub struct Clock {
    streams: Arc<Streams>,
    /// When the body last handed hyper a chunk (or was created) and has not been polled since, in ms
    /// since the connection's start; [`PRODUCING`] otherwise.
    handed_ms: AtomicU64,
}

/// What the watchdog should do with the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// No stream open for at least the idle limit: close gracefully.
    Idle,
    /// A response body has waited on the client for `send_timeout`: close now.
    Stalled,
}

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            start: Instant::now(),
            arrived: tokio::sync::Notify::new(),
            open: Mutex::new(Vec::new()),
            last_closed_ms: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Bytes reached the socket: the client is reading this connection. (Body polls alone miss it
    /// while every stream's last step sits in HTTP/2's flow-control buffers.)
    pub fn wrote(&self) {
        self.last_progress_ms
            .fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// Returns once a request is in progress on the connection (at once if one is).
    pub async fn busy(&self) {
        loop {
            let notified = self.arrived.notified();
            if self.in_progress() {
                return;
            }
            notified.await;
        }
    }

    fn in_progress(&self) -> bool {
        let open = self.open.lock().expect("streams lock");
        open.iter().any(|w| w.strong_count() > 0)
    }

    /// A request arrived: its clock runs until its response body is dropped.
    pub fn opened(self: &Arc<Streams>) -> Arc<Clock> {
        self.arrived.notify_waiters();
        let clock = Arc::new(Clock {
            streams: self.clone(),
            handed_ms: AtomicU64::new(PRODUCING),
        });
        let mut open = self.open.lock().expect("streams lock");
        // Dead entries are pruned here, so the list stays as long as the streams really open.
        if open.len() >= 8 {
            open.retain(|w| w.strong_count() > 0);
        }
        open.push(Arc::downgrade(&clock));
        clock
    }

    pub fn verdict(&self, send_timeout: Duration, idle: Duration) -> Verdict {
        let now = self.now_ms();
        let mut open = self.open.lock().expect("streams lock");
        open.retain(|w| w.strong_count() > 0);
        let send_ms = send_timeout.as_millis() as u64;
        // Streams share the connection: while any of them moves, the client is reading, and one it
        // starves (a paused video beside the page's images) is its choice, as with nginx, whose
        // send_timeout is the connection's.
        let moving = now.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)) < send_ms;
        let stalled = !moving
            && open.iter().filter_map(Weak::upgrade).any(|c| {
                let handed = c.handed_ms.load(Ordering::Relaxed);
                handed != PRODUCING && now.saturating_sub(handed) >= send_ms
            });
        if stalled {
            return Verdict::Stalled;
        }
        let idle_ms = idle.as_millis() as u64;
        if open.is_empty()
            && now.saturating_sub(self.last_closed_ms.load(Ordering::Relaxed)) >= idle_ms
        {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

impl Clock {
    /// A response is handed to hyper: from now on it waits on the client until polled.
    fn handed(&self) {
        self.handed_ms
            .store(self.streams.now_ms(), Ordering::Relaxed);
    }

    /// hyper took a chunk (or the end): the client is reading this connection.
    fn moved(&self) {
        let now = self.streams.now_ms();
        self.handed_ms.store(now, Ordering::Relaxed);
        self.streams
            .last_progress_ms
            .fetch_max(now, Ordering::Relaxed);
    }

    fn producing(&self) {
        self.handed_ms.store(PRODUCING, Ordering::Relaxed);
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        let now = self.streams.now_ms();
        self.streams
            .last_closed_ms
            .fetch_max(now, Ordering::Relaxed);
    }
}

/// The most a watched body hands hyper at once. hyper polls the body again once the previous chunk got
/// send capacity, so each poll means about this much progress: `send_timeout` asks a client to take
/// 64 KiB per period (1 KiB/s at the default 60 s), where nginx asks for one write. Smaller steps cost
/// throughput (16 KiB: -15 % on a 100 MiB HTTP/2 download; 64 KiB: within the noise).
const STEP: usize = 64 * 1024;

/// A response body on the clock of its stream. Only HTTP/2 bodies are timed here: over HTTP/1 a client
/// that stops reading blocks the socket's writes, which [`super::stall::StallGuard`] sees byte by byte.
pub struct Watched<B> {
    inner: B,
    clock: Arc<Clock>,
    timed: bool,
    /// The request's access-log line, written when the body is dropped (with the bytes that left).
    log: Option<Box<super::access::Entry>>,
    /// Body bytes handed to hyper, for `mediaproxy_sent_bytes_total` and the access log.
    sent: u64,
    metrics: Arc<crate::metrics::Metrics>,
    /// What is left of the last chunk polled from `inner`, handed over [`STEP`] at a time.
    rest: Bytes,
}

impl<B> Watched<B> {
    /// The response is handed to hyper: from now on it waits on the client until polled.
    pub fn new(
        inner: B,
        clock: Arc<Clock>,
        timed: bool,
        log: Option<Box<super::access::Entry>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Watched<B> {
        if timed {
            clock.handed();
        }
        Watched {
            inner,
            clock,
            timed,
            log,
            sent: 0,
            metrics,
            rest: Bytes::new(),
        }
    }

    fn step(&mut self) -> Bytes {
        let n = self.rest.len().min(STEP);
        self.rest.split_to(n)
    }
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        self.metrics.sent(self.sent);
        if let Some(log) = self.log.as_mut() {
            log.bytes = self.sent; // written as the entry drops, right after this
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if !this.timed {
            let poll = Pin::new(&mut this.inner).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &poll {
                this.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            return poll;
        }
        if !this.rest.is_empty() {
            this.clock.moved();
            let step = this.step();
            this.sent += step.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(step))));
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match poll {
            Poll::Pending => {
                this.clock.producing();
                Poll::Pending
            }
            // Handed over (or ended): until hyper polls again, it is the client's turn.
            Poll::Ready(Some(Ok(frame))) => {
                this.clock.moved();
                match frame.into_data() {
                    Ok(data) => {
                        this.rest = data;
                        let step = this.step();
                        this.sent += step.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(step))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                }
            }
            other => {
                this.clock.moved();
                other
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_never_polled_is_stalled_after_send_timeout() {
        let streams = Streams::new();
        let clock = streams.opened();
        assert_eq!(
            streams.verdict(Duration::ZERO, Duration::from_secs(60)),
            Verdict::Fine,
            "a request being answered is not waiting on the client"
        );
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let _body = Watched::new(
            http_body_util::Empty::<Bytes>::new(),
            clock,
            true,
            None,
            metrics,
        );
        assert_eq!(
            streams.verdict(Duration::ZERO, Duration::from_secs(60)),
            Verdict::Stalled
        );
        assert_eq!(
            streams.verdict(Duration::from_secs(60), Duration::from_secs(60)),
            Verdict::Fine
        );
    }

    #[test]
    fn idle_once_every_stream_closed() {
        let streams = Streams::new();
        let clock = streams.opened();
        assert_eq!(
            streams.verdict(Duration::from_secs(60), Duration::ZERO),
            Verdict::Fine
        );
        drop(clock);
        assert_eq!(
            streams.verdict(Duration::from_secs(60), Duration::ZERO),
            Verdict::Idle
        );
        assert_eq!(
            streams.verdict(Duration::from_secs(60), Duration::from_secs(60)),
            Verdict::Fine
        );
    }
}
