//! The plain-TCP stream under an HTTP/1.1 connection: every write goes to the socket as usual, except
//! the slices of file-backed bodies ([`crate::zerocopy`]), which go with `sendfile(2)` from the file.
//! hyper frames the response as always (it hands the head and the body over as separate slices of one
//! vectored write), so this changes how bytes reach the socket, never which bytes.

use std::io;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::zerocopy::{self, FileSlice};

/// One `sendfile` moves at most this much, so one large body does not keep the worker from others.
const MAX_SEND: usize = 1 << 20;

pub struct SendfileStream {
    inner: TcpStream,
}

impl SendfileStream {
    pub fn new(inner: TcpStream) -> SendfileStream {
        SendfileStream { inner }
    }

    /// Runs the non-blocking `syscall` once the socket is writable, again after each `WouldBlock`.
    fn poll_syscall(
        &self,
        cx: &mut Context<'_>,
        mut syscall: impl FnMut() -> rustix::io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            match self
                .inner
                .try_io(Interest::WRITABLE, || syscall().map_err(io::Error::from))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_sendfile(&self, cx: &mut Context<'_>, slice: FileSlice) -> Poll<io::Result<usize>> {
        // SAFETY: the descriptor belongs to the body this slice is part of, which hyper holds until
        // the write returns.
        let file = unsafe { BorrowedFd::borrow_raw(slice.fd) };
        let sent = ready!(self.poll_syscall(cx, || {
            let mut offset = slice.offset;
            rustix::fs::sendfile(
                &self.inner,
                file,
                Some(&mut offset),
                slice.len.min(MAX_SEND),
            )
        }));
        Poll::Ready(match sent {
            // Past the end of the file: it shrank after its length was sent in the head. An error
            // aborts the connection, so no short body passes for a whole one.
            Ok(0) => {
                zerocopy::shrank();
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while being sent",
                ))
            }
            Ok(n) => {
                zerocopy::SENT.inc_by(n as u64);
                Ok(n)
            }
            Err(e) => Err(e),
        })
    }

    /// Writes the slices before a file slice (the response head) with `MSG_MORE`: the kernel holds
    /// them for the `sendfile` that follows at once, so head and body leave in the same packets
    /// (nginx's `tcp_nopush`): one packet less per response, and on loopback one delivery less.
    fn poll_write_more(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
        self.poll_syscall(cx, || {
            let mut control = SendAncillaryBuffer::default();
            sendmsg(
                &self.inner,
                bufs,
                &mut control,
                SendFlags::MORE | SendFlags::NOSIGNAL,
            )
        })
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match zerocopy::lookup(buf) {
            Some(slice) => self.poll_sendfile(cx, slice),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    /// The slices before the first file slice go in one `writev`; a file slice first in line goes with
    /// `sendfile`. Either way the count written is of the slices' bytes, in order, as the caller expects.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .enumerate()
            .find_map(|(i, b)| zerocopy::lookup(b).map(|slice| (i, slice)));
        match first {
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            Some((0, slice)) => self.poll_sendfile(cx, slice),
            Some((i, _)) => self.poll_write_more(cx, &bufs[..i]),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
