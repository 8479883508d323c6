//! Merges the small chunks a bucket sends into larger ones.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use crate::object::ByteStream;

/// Buckets often send bodies in small chunks (s3s-fs: 4 KiB). Whatever is already available is merged
/// into chunks of up to [`COALESCE`] bytes, so the client socket and the cache file see a few large
/// writes instead of many small ones; nothing waits for more data than has arrived.
pub const COALESCE: usize = 64 * 1024;

pub struct Coalesce {
    inner: ByteStream,
    buf: BytesMut,
    error: Option<io::Error>,
    done: bool,
}

impl Coalesce {
    pub fn new(inner: ByteStream) -> Coalesce {
        Coalesce {
            inner,
            buf: BytesMut::new(),
            error: None,
            done: false,
        }
    }
}

impl Stream for Coalesce {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        while !self.done && self.buf.len() < COALESCE {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if self.buf.is_empty() && chunk.len() >= COALESCE {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    if self.buf.is_empty() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    self.error = Some(e);
                }
                Poll::Ready(None) => self.done = true,
                Poll::Pending if self.buf.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if self.buf.is_empty() {
            return Poll::Ready(None);
        }
        let chunk = self.buf.split().freeze();
        Poll::Ready(Some(Ok(chunk)))
    }
}
