//! Where a copy's bytes come from, and how they are read: the cache entry a read filled, one GET
//! streamed into the PUT (when the source's ETag is the MD5 that `Content-MD5` needs) or spooled to an
//! unlinked file, or a local file; with the MD5 each needs and the upload body each gives.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use md5::{Digest, Md5};

use super::one::{CopyError, Engine, CHUNK};
use crate::cache::Loaded;
use crate::key::Key;
use crate::local::Roots;
use crate::object::{read_at, Body, Object};
use crate::runtime::Runtime;
use crate::upstream::{Fetched, Method, Upstream};

/// The bytes to upload and what to say about them.
pub(super) struct Source {
    pub(super) len: u64,
    pub(super) md5: [u8; 16],
    pub(super) content_type: Option<String>,
    pub(super) cache_control: Option<String>,
    pub(super) content_disposition: Option<String>,
    pub(super) data: Data,
}

pub(super) enum Data {
    Bytes(Bytes),
    /// A cache entry's file or an unlinked spool; the body is its first `len` bytes.
    File(Arc<File>),
    /// The source's GET, streamed straight into the PUT: its ETag is a plain MD5, so `Content-MD5` is
    /// known before the first byte and the target checks every byte against it (`BadDigest`), and its
    /// answer's ETag proves it. Not hashed here as well: on the 1 GiB benchmark that cost 2 s of CPU
    /// for no check a target honouring Content-MD5 has not made already. Taken by the PUT.
    Stream(std::sync::Mutex<Option<crate::object::ByteStream>>),
}

/// The cache entry, unless the target filled it (then the target lost it, and the entry is no better a
/// source than the target was) or it is incomplete, corrupt or absent.
/// With whether the entry knows where it came from (entries of earlier releases do not, nor keep
/// Cache-Control and Content-Disposition).
pub(super) async fn from_entry(
    rt: &Runtime,
    target: &Upstream,
    key: &Key,
) -> Option<(Source, bool)> {
    let cache = rt.cache.clone();
    let k = key.as_str().to_string();
    let origin = target.origin.clone();
    tokio::task::spawn_blocking(move || {
        let (meta, data) = match cache.entry_for_copy(&k)? {
            Loaded::Bytes(meta, bytes, _) => (meta, Data::Bytes(bytes)),
            Loaded::File(meta, file) => (meta, Data::File(Arc::new(file))),
        };
        if meta.origin.as_deref() == Some(&*origin) {
            return None;
        }
        let md5 = match &data {
            Data::Bytes(b) => Md5::digest(b).into(),
            Data::File(f) => md5_of_file(f, meta.len).ok()?,
            Data::Stream(..) => return None,
        };
        if meta
            .etag
            .as_deref()
            .and_then(plain_md5)
            .is_some_and(|e| e != hex(&md5))
        {
            tracing::warn!(key = %k, "cache entry does not match its bucket's MD5; fetching it again");
            return None;
        }
        let known = meta.origin.is_some();
        let src = Source {
            len: meta.len,
            md5,
            content_type: meta.content_type,
            cache_control: meta.cache_control,
            content_disposition: meta.content_disposition,
            data,
        };
        Some((src, known))
    })
    .await
    .ok()
    .flatten()
}

/// One whole-object GET from the first of `upstreams` other than the target that has the key, written
/// to an unlinked file.
pub(super) async fn spool_first(
    upstreams: &[Upstream],
    engine: &Engine<'_>,
    key: &Key,
) -> Result<Source, CopyError> {
    let mut failed = None;
    for up in upstreams
        .iter()
        .filter(|u| u.origin != engine.target.origin)
    {
        match up.fetch(Method::Get, key, None).await {
            Ok(Fetched::Found(obj)) => {
                return match streamed(obj, engine) {
                    Ok(src) => Ok(src),
                    Err(obj) => spool_body(&engine.spool_dir, key, *obj).await,
                }
            }
            Ok(Fetched::NotFound) => {}
            Err(e) => failed = Some(format!("{}: {e}", up.name)),
        }
    }
    Err(failed.map_or(CopyError::SourceGone, CopyError::Source))
}

/// A single-PUT object whose source ETag is a plain MD5 needs no spool: `Content-MD5` is that ETag,
/// the body streams from the GET into the PUT, and the target refuses it (`BadDigest`) if a byte
/// differs. Anything else goes back to be spooled.
pub(super) fn streamed(obj: Object, engine: &Engine<'_>) -> Result<Source, Box<Object>> {
    let md5 = obj
        .meta
        .etag
        .as_deref()
        .and_then(plain_md5)
        .and_then(|hex| {
            let mut out = [0u8; 16];
            for (i, b) in out.iter_mut().enumerate() {
                *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(out)
        });
    match (md5, obj.meta.len, obj.body) {
        (Some(md5), Some(len), Body::Stream { stream, offset: 0 })
            if len <= engine.multipart_threshold =>
        {
            Ok(Source {
                len,
                md5,
                content_type: obj.meta.content_type,
                cache_control: obj.meta.cache_control,
                content_disposition: obj.meta.content_disposition,
                data: Data::Stream(std::sync::Mutex::new(Some(stream))),
            })
        }
        (_, _, body) => Err(Box::new(Object {
            meta: obj.meta,
            body,
        })),
    }
}

/// A local file: uploaded straight from the root (its MD5 read first), typed as the proxy serves it.
pub(super) async fn from_local(roots: &Roots, key: &Key) -> Result<Source, CopyError> {
    let Some(Object { meta, body }) = roots.open(key, false) else {
        return Err(CopyError::SourceGone);
    };
    let (Body::File(file), Some(len)) = (body, meta.len) else {
        return Err(CopyError::Source("not a regular file".into()));
    };
    let file = Arc::new(file);
    let f = file.clone();
    let md5 = tokio::task::spawn_blocking(move || md5_of_range(&f, 0, len))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))?;
    Ok(Source {
        len,
        md5,
        content_type: meta.content_type,
        cache_control: None,
        content_disposition: None,
        data: Data::File(file),
    })
}

pub(super) async fn spool_body(dir: &Path, key: &Key, obj: Object) -> Result<Source, CopyError> {
    let Object { meta, body } = obj;
    let Body::Stream {
        mut stream,
        offset: 0,
    } = body
    else {
        return Err(CopyError::Source("the upstream sent no whole body".into()));
    };
    // Named for the key and this process, so two copies never share a spool.
    let path = dir.join(format!(
        "copy-{:016x}-{}.part",
        crate::keyset::id_of(key.as_str()),
        std::process::id()
    ));
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // Unlinked at once: a crash or a kill leaves nothing to clean up.
    std::fs::remove_file(&path)?;
    let mut md5 = Md5::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| CopyError::Source(e.to_string()))?;
        file.write_all(&chunk)?;
        md5.update(&chunk);
        len += chunk.len() as u64;
    }
    if meta.len.is_some_and(|l| l != len) {
        return Err(CopyError::Source(format!(
            "the body ended at {len} of {} bytes",
            meta.len.unwrap_or(0)
        )));
    }
    let md5: [u8; 16] = md5.finalize().into();
    if let Some(etag) = meta.etag.as_deref().and_then(plain_md5) {
        if etag != hex(&md5) {
            return Err(CopyError::Source(format!(
                "the body's MD5 {} is not its ETag {etag}",
                hex(&md5)
            )));
        }
    }
    Ok(Source {
        len,
        md5,
        content_type: meta.content_type,
        cache_control: meta.cache_control,
        content_disposition: meta.content_disposition,
        data: Data::File(Arc::new(file)),
    })
}

pub(super) fn md5_of_file(file: &File, len: u64) -> io::Result<[u8; 16]> {
    md5_of_range(file, 0, len)
}

pub(super) fn md5_of_range(file: &File, start: u64, len: u64) -> io::Result<[u8; 16]> {
    let mut md5 = Md5::new();
    let mut pos = start;
    while pos < start + len {
        let n = (start + len - pos).min(CHUNK as u64) as usize;
        md5.update(read_at(file, pos, n)?);
        pos += n as u64;
    }
    Ok(md5.finalize().into())
}

/// `len` bytes from `start` as an upload body, from memory or from the file in chunks on the blocking
/// pool (so memory stays flat with object size).
pub(super) fn body(data: &Data, start: u64, len: u64) -> reqwest::Body {
    match data {
        // Once only: a second PUT of a streamed source is a new copy attempt (a new GET).
        Data::Stream(stream) => match stream.lock().expect("stream lock").take() {
            Some(s) => reqwest::Body::wrap_stream(s),
            None => reqwest::Body::from(Bytes::new()),
        },
        Data::Bytes(b) => reqwest::Body::from(b.slice(start as usize..(start + len) as usize)),
        Data::File(file) => {
            let state = (file.clone(), start, start + len);
            let chunks = futures_util::stream::unfold(state, |(file, pos, len)| async move {
                if pos >= len {
                    return None;
                }
                let n = (len - pos).min(CHUNK as u64) as usize;
                let f = file.clone();
                let read = tokio::task::spawn_blocking(move || read_at(&f, pos, n))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                Some((read, (file, pos + n as u64, len)))
            });
            reqwest::Body::wrap_stream(chunks)
        }
    }
}

/// The hex MD5 in an ETag that is one (`"d41d8cd98f00b204e9800998ecf8427e"`); not a multipart `-N` one.
pub fn plain_md5(etag: &str) -> Option<String> {
    let e = etag.trim().trim_start_matches("W/").trim_matches('"');
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then(|| e.to_ascii_lowercase())
}

pub(super) fn hex(md5: &[u8; 16]) -> String {
    md5.iter().map(|b| format!("{b:02x}")).collect()
}
