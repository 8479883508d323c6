//! A client that stops reading must not hold a connection (and its upstream transfer) forever: nginx's
//! `send_timeout`. Every write that makes no progress for `timeout` fails the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::streams::Streams;

pub struct StallGuard<T> {
    inner: T,
    timeout: Duration,
    /// Told of writes that moved bytes, for the connection's watchdog: once per [`PROGRESS`] bytes, so
    /// HTTP/2's own PINGs and SETTINGS acks (a few dozen bytes) never count as a client reading.
    streams: Arc<Streams>,
    written: usize,
    /// Armed while a write is blocked; cleared by any progress.
    deadline: Option<Pin<Box<Sleep>>>,
}

/// Bytes written that count as a client reading the connection.
const PROGRESS: usize = 16 * 1024;

impl<T> StallGuard<T> {
    fn progress(&mut self, poll: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n;
            if self.written >= PROGRESS {
                self.written = 0;
                self.streams.wrote();
            }
        }
    }

    pub fn new(inner: T, timeout: Duration, streams: Arc<Streams>) -> StallGuard<T> {
        StallGuard {
            inner,
            timeout,
            streams,
            written: 0,
            deadline: None,
        }
    }

    fn stalled<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(r) => {
                self.deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let deadline = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client stopped reading (send_timeout)",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(&poll);
        self.stalled(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(&poll);
        self.stalled(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.stalled(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
