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
    /// A chunk that arrived while merging but would have taken the merged one past [`COALESCE`]: the
    /// next chunk starts with it.
    held: Option<Bytes>,
    error: Option<io::Error>,
    done: bool,
}

impl Coalesce {
    pub fn new(inner: ByteStream) -> Coalesce {
        Coalesce {
            inner,
            held: None,
            error: None,
            done: false,
        }
    }

    /// The next chunk of the inner stream, skipping empty ones; `None` at its end or error.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        while !self.done {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => {}
                Poll::Ready(Some(Ok(chunk))) => return Poll::Ready(Some(chunk)),
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    self.error = Some(e);
                }
                Poll::Ready(None) => self.done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(None)
    }
}

impl Stream for Coalesce {
    type Item = io::Result<Bytes>;

    /// A chunk that arrives alone goes on as it is; only chunks already there together are copied
    /// into one, in a buffer of exactly their size (no reallocation, one copy, and nothing held beyond
    /// the bytes: a queue of merged chunks costs what it holds).
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let first = match self.held.take() {
            Some(held) => held,
            None => match self.poll_inner(cx) {
                Poll::Ready(Some(chunk)) => chunk,
                Poll::Ready(None) => return Poll::Ready(self.error.take().map(Err)),
                Poll::Pending => return Poll::Pending,
            },
        };
        if first.len() >= COALESCE {
            return Poll::Ready(Some(Ok(first)));
        }
        let mut more: Vec<Bytes> = Vec::new();
        let mut len = first.len();
        while let Poll::Ready(Some(chunk)) = self.poll_inner(cx) {
            if len + chunk.len() > COALESCE {
                self.held = Some(chunk);
                break;
            }
            len += chunk.len();
            more.push(chunk);
            if len == COALESCE {
                break;
            }
        }
        if more.is_empty() {
            return Poll::Ready(Some(Ok(first)));
        }
        let mut merged = BytesMut::with_capacity(len);
        merged.extend_from_slice(&first);
        more.iter().for_each(|c| merged.extend_from_slice(c));
        Poll::Ready(Some(Ok(merged.freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn stream_of(items: Vec<io::Result<Bytes>>) -> Coalesce {
        Coalesce::new(Box::pin(futures_util::stream::iter(items)))
    }

    #[tokio::test]
    async fn chunks_ready_together_merge_up_to_the_limit_and_never_past_it() {
        let piece = Bytes::from(vec![7u8; 24 * 1024]);
        let items = (0..5).map(|_| Ok(piece.clone())).collect();
        let lens: Vec<usize> = stream_of(items)
            .map(|c| c.expect("no error").len())
            .collect()
            .await;
        // 24 + 24 KiB fit in 64 KiB; a third would not, so it starts the next chunk.
        assert_eq!(lens, vec![48 * 1024, 48 * 1024, 24 * 1024]);
    }

    #[tokio::test]
    async fn a_merged_chunk_holds_no_more_memory_than_its_bytes() {
        let items = (0..3).map(|_| Ok(Bytes::from(vec![3u8; 100]))).collect();
        let merged = stream_of(items).next().await.unwrap().unwrap();
        assert_eq!(merged.len(), 300);
        let owned = merged.try_into_mut().expect("the only handle");
        assert_eq!(owned.capacity(), 300, "sized to the bytes, not to COALESCE");
    }

    #[tokio::test]
    async fn a_chunk_that_arrives_alone_is_passed_on_without_a_copy() {
        let only = Bytes::from(vec![1u8; 1000]);
        let ptr = only.as_ptr();
        let mut s = stream_of(vec![Ok(only)]);
        let got = s.next().await.expect("a chunk").expect("no error");
        assert_eq!(got.as_ptr(), ptr);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn an_error_comes_after_the_bytes_that_preceded_it() {
        let items = vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::new()),
            Ok(Bytes::from_static(b"def")),
            Err(io::Error::other("reset")),
        ];
        let mut s = stream_of(items);
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"abcdef");
        assert!(s.next().await.unwrap().is_err());
        assert!(s.next().await.is_none());
    }
}
