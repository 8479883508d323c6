//! The one reader of an entry while its fill writes it, for the fill's own client and for followers.
//!
//! The fill hands each chunk to its own client through a short queue, after writing it. A reader takes
//! chunks from that queue while it keeps up; whatever it missed (it fell behind and the queue dropped
//! chunks) and everything a follower reads comes back from the file, up to the bytes the fill reports
//! written. Reads from the file run on the blocking pool, so a slow disk stalls this response, not the
//! async workers serving everyone else. When the fill stops short, the body ends in [`FillFailed`]
//! saying how far it got, for the caller to resume from an upstream.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::flights::{Progress, Shared, Status};
use crate::object::{read_at, ByteStream, CHUNK};

/// The fill stopped before the end; the reader has the body up to `at`.
#[derive(Debug, thiserror::Error)]
#[error("the cache fill failed at byte {at}")]
pub struct FillFailed {
    pub at: u64,
}

/// The position a body stopped at, if it stopped because its fill failed.
pub fn fill_failed_at(e: &io::Error) -> Option<u64> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FillFailed>())
        .map(|f| f.at)
}

/// A body being filled, read a chunk at a time (here from the file being written; in [`super::memfill`]
/// from memory): `None` at its end.
pub(super) trait ChunkReader: Send + 'static {
    fn next(&mut self) -> impl std::future::Future<Output = Option<io::Result<Bytes>>> + Send;
}

/// The body `reader` reads, as a stream; nothing follows an error.
pub(super) fn stream_of(reader: impl ChunkReader) -> ByteStream {
    Box::pin(futures_util::stream::unfold(
        Some(reader),
        |reader| async move {
            let mut reader = reader?;
            match reader.next().await {
                None => None,
                Some(Ok(bytes)) => Some((Ok(bytes), Some(reader))),
                Some(Err(e)) => Some((Err(e), None)),
            }
        },
    ))
}

/// Chunks the fill hands its own client, with their offsets in the body.
pub(super) type Queue = mpsc::Receiver<(u64, Bytes)>;

/// Reads bytes `0..len` of the entry being written to `file`. `queue`: the fill's chunks, for its own
/// client. `shared` keeps the fill's progress sender alive for a follower, so the progress only
/// ends with a final status.
pub(super) fn stream(
    file: File,
    len: u64,
    shared: Arc<Shared>,
    queue: Option<Queue>,
) -> ByteStream {
    let reader = Reader {
        file: Arc::new(file),
        len,
        pos: 0,
        progress: shared.progress.subscribe(),
        _shared: shared,
        queue,
        ahead: None,
    };
    stream_of(reader)
}

struct Reader {
    file: Arc<File>,
    len: u64,
    /// The next byte this reader needs.
    pos: u64,
    progress: watch::Receiver<Progress>,
    _shared: Arc<Shared>,
    queue: Option<Queue>,
    /// A chunk from the queue that lies ahead of `pos` (the reader missed the ones before it).
    ahead: Option<(u64, Bytes)>,
}

impl ChunkReader for Reader {
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.pos >= self.len {
                return None;
            }
            if let Some((offset, chunk)) = self.ahead.take() {
                let end = offset + chunk.len() as u64;
                if end <= self.pos {
                    continue; // already read from the file
                }
                if offset <= self.pos {
                    let rest = chunk.slice((self.pos - offset) as usize..);
                    self.pos = end;
                    return Some(Ok(rest));
                }
                // Everything before a queued chunk was written before it was queued.
                self.ahead = Some((offset, chunk));
                return Some(self.read_back(offset).await);
            }
            // In memory first: the queue holds what the file would give, without the read.
            if let Some(queue) = self.queue.as_mut() {
                match queue.try_recv() {
                    Ok(queued) => {
                        self.ahead = Some(queued);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => self.queue = None,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
            let progress = *self.progress.borrow_and_update();
            if self.pos < progress.written {
                return Some(self.read_back(progress.written).await);
            }
            if self.queue.is_none() && progress.status != Status::Running {
                // The fill is over and the file holds no more: it stopped short.
                return Some(Err(io::Error::other(FillFailed { at: self.pos })));
            }
            match self.queue.as_mut() {
                Some(queue) => tokio::select! {
                    queued = queue.recv() => match queued {
                        Some(queued) => self.ahead = Some(queued),
                        None => self.queue = None,
                    },
                    // Cannot fail: this reader holds the fill's `Shared`, and so the sender.
                    _ = self.progress.changed() => {}
                },
                None => {
                    let _ = self.progress.changed().await;
                }
            }
        }
    }
}

impl Reader {
    /// Bytes from `pos` up to `up_to` (at most one chunk), from the file, on the blocking pool.
    async fn read_back(&mut self, up_to: u64) -> io::Result<Bytes> {
        let n = (up_to - self.pos).min(CHUNK as u64) as usize;
        let (file, at) = (self.file.clone(), self.pos);
        let bytes = tokio::task::spawn_blocking(move || read_at(&file, at, n))
            .await
            .map_err(io::Error::other)??;
        self.pos += n as u64;
        Ok(bytes)
    }
}
