//! What every source (local root, cache, upstream) hands to the responder: metadata plus a body.
//!
//! Keeping one shape for all sources is what lets `respond` apply Range, conditional and header rules
//! once, so a local file, a cache hit and an upstream miss can never disagree on them.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;

/// The largest read from a file, and the largest write batch: one size for every path that streams
/// a file (responses, fills, followers, copies, checksums), big enough to amortize a syscall or a trip
/// to the blocking pool, small enough that memory stays flat per response.
pub const CHUNK: usize = 256 * 1024;

pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>;

/// Where the bytes came from; shown to clients as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Hit,
    Miss,
    Stale,
}

impl Source {
    pub fn x_cache(self) -> &'static str {
        match self {
            Source::Local => "LOCAL",
            Source::Hit => "HIT",
            Source::Miss => "MISS",
            Source::Stale => "STALE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Meta {
    /// Length of the whole object; `None` only when an HTTP upstream streamed without a length.
    pub len: Option<u64>,
    pub content_type: Option<String>,
    pub last_modified: Option<SystemTime>,
    /// As sent on the wire, quotes included (`"abc"` or `W/"abc"`).
    pub etag: Option<String>,
    pub source: Source,
    /// The bucket that holds (or filled) it, as [`crate::upstream::Upstream::origin`] names it: by
    /// endpoint, bucket and prefix, since upstream names change at a bucket switch. `None` for local
    /// files and for cache entries written before entries remembered it.
    pub origin: Option<Arc<str>>,
    /// Kept so that a copy into another bucket keeps them (Mastodon sets a year-long Cache-Control).
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
}

pub enum Body {
    /// Nothing to send (HEAD from an upstream, or an upstream's 416).
    Empty,
    /// The whole object in memory (small cache entries, read and verified in one go).
    Bytes(Bytes),
    /// A regular file holding the object from offset 0; the responder reads only the range it serves.
    File(File),
    /// Bytes arriving from elsewhere. `offset` is the position in the object of the first byte the
    /// stream yields (non-zero when the upstream already applied a Range).
    Stream { stream: ByteStream, offset: u64 },
}

pub struct Object {
    pub meta: Meta,
    pub body: Body,
}

/// `count` bytes at `start`, into a buffer that is never zeroed first (it is about to be overwritten).
pub fn read_at(file: &File, start: u64, count: usize) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(count);
    while buf.len() < count {
        let want = count - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        let n = rustix::io::pread(file, spare, start + (count - want) as u64)?
            .0
            .len();
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being served",
            ));
        }
        // SAFETY: pread initialized the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Ok(Bytes::from(buf))
}
