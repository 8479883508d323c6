//! One copy of one key into the target: the engine lazy copy drives (and `migrate` will).
//!
//! 1. If a fill of the key is running, wait for it: its entry is the cheapest source.
//! 2. HEAD the target (signed): there already → done, nothing read. This also narrows the race on
//!    providers that ignore `If-None-Match` on PUT.
//! 3. Source bytes: the complete, verified cache entry unless the target itself filled it; otherwise one
//!    whole-object GET from the first other upstream that has it, spooled to an unlinked file under
//!    `cache.dir/tmp/` (nothing is left behind by a crash) while its MD5 is computed.
//! 4. PUT with `If-None-Match: *` and `Content-MD5`, keeping Content-Type, Cache-Control,
//!    Content-Disposition, with the target's `acl`; 412 means someone else copied it first. Above
//!    `copy.multipart_threshold`: a multipart upload (journaled, each part with its own MD5, completed
//!    with `If-None-Match: *`, aborted on any failure), so no object is ever half there.
//! 5. HEAD again: size, and MD5 when the target's ETag is a plain MD5.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use md5::{Digest, Md5};

use super::uploads::{Open, Uploads};
use crate::cache::Loaded;
use crate::key::Key;
use crate::local::Roots;
use crate::object::{read_at, Body, Object};
use crate::runtime::Runtime;
use crate::upstream::{Fetched, Method, Put, PutRequest, Upstream, WriteError};

/// How long a copy waits for a fill of the same key before fetching on its own.
const FILL_WAIT: Duration = Duration::from_secs(300);
/// Read size when hashing or uploading from a file.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    Copied { bytes: u64 },
    AlreadyThere,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("target: {0}")]
    Target(#[from] WriteError),
    #[error("no upstream has it any more")]
    SourceGone,
    #[error("source: {0}")]
    Source(String),
    #[error("local spool: {0}")]
    Spool(#[from] io::Error),
    #[error("verification failed: {0}")]
    Verify(String),
    /// Mastodon busted the key while it was being copied: not copied (or taken back).
    #[error("busted by Mastodon during the copy")]
    Busted,
}

impl CopyError {
    /// Worth another try after a pause: the target or the source is down or busy, the disk full.
    pub fn retryable(&self) -> bool {
        match self {
            CopyError::Target(e) => e.retryable(),
            CopyError::Source(_) | CopyError::Spool(_) => true,
            CopyError::SourceGone | CopyError::Verify(_) | CopyError::Busted => false,
        }
    }

    /// What the log line names: the bucket's error code where there is one.
    pub fn code(&self) -> &str {
        match self {
            CopyError::Target(e) => e.code(),
            CopyError::SourceGone => "NoSuchKey",
            CopyError::Source(_) => "source failed",
            CopyError::Spool(_) => "spool failed",
            CopyError::Verify(_) => "verification failed",
            CopyError::Busted => "busted",
        }
    }
}

/// The bytes to upload and what to say about them.
struct Source {
    len: u64,
    md5: [u8; 16],
    content_type: Option<String>,
    cache_control: Option<String>,
    content_disposition: Option<String>,
    data: Data,
}

enum Data {
    Bytes(Bytes),
    /// A cache entry's file or an unlinked spool; the body is its first `len` bytes.
    File(Arc<File>),
    /// The source's GET, streamed straight into the PUT: its ETag is a plain MD5, so `Content-MD5` is
    /// known before the first byte and the target checks every byte against it (`BadDigest`), and its
    /// answer's ETag proves it. Not hashed here as well: on the 1 GiB benchmark that cost 2 s of CPU
    /// for no check a target honouring Content-MD5 has not made already. Taken by the PUT.
    Stream(std::sync::Mutex<Option<crate::object::ByteStream>>),
}

/// Where a copy's bytes come from.
pub enum From<'a> {
    /// Lazy copy: the cache entry a read just filled, else the other upstreams (the copy thread's own
    /// clients of the runtime's upstreams) in the order a request asks them (so a tombstoned key finds
    /// none).
    Proxy(&'a Runtime, &'a [Upstream]),
    /// `migrate --from NAME`: that upstream only.
    Upstream(&'a Upstream),
    /// `migrate --from local`: the local roots, with the Content-Type the proxy would serve.
    Local(&'a Roots),
}

/// What every copy needs besides its key: the target, where to spool, when to go multipart, and the
/// journal of multipart uploads.
pub struct Engine<'a> {
    pub target: &'a Upstream,
    pub spool_dir: PathBuf,
    pub multipart_threshold: u64,
    pub part_size: u64,
    pub uploads: Arc<Uploads>,
    /// The target answered 404 for the key a moment ago (the read that queued it): no HEAD before the
    /// PUT, whose `If-None-Match: *` still keeps it from overwriting.
    pub target_lacks: bool,
}

impl Engine<'_> {
    pub async fn copy(&self, from: &From<'_>, key: &Key) -> Result<Copied, CopyError> {
        copy_one(self, from, key).await
    }
}

async fn copy_one(engine: &Engine<'_>, from: &From<'_>, key: &Key) -> Result<Copied, CopyError> {
    let target = engine.target;
    if let From::Proxy(rt, _) = from {
        rt.cache.wait_fill(key.as_str(), FILL_WAIT).await;
    }
    let head = if engine.target_lacks {
        Ok(None)
    } else {
        target.head_signed(key).await
    };
    match head {
        Ok(Some(_)) => return Ok(Copied::AlreadyThere),
        Ok(None) => {}
        // S3 answers 403 for a missing key to credentials without s3:ListBucket: not knowing, rely
        // on the PUT's If-None-Match.
        Err(WriteError::Refused { status: 403, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let src = match from {
        From::Proxy(rt, own) => match from_entry(rt, target, key).await {
            Some((src, true)) => src,
            // An entry from before entries kept Cache-Control and Content-Disposition: ask a source
            // bucket for them (a HEAD; the body still comes from the entry).
            Some((mut src, false)) => {
                if let Some(meta) = head_first(rt.chain_of(key, own), target, key).await {
                    src.cache_control = meta.cache_control;
                    src.content_disposition = meta.content_disposition;
                }
                src
            }
            None => spool_first(rt.chain_of(key, own), engine, key).await?,
        },
        From::Upstream(up) => spool_first(std::slice::from_ref(*up), engine, key).await?,
        From::Local(roots) => from_local(roots, key).await?,
    };
    if busted(from, key) {
        return Err(CopyError::Busted);
    }
    let req = PutRequest {
        key,
        len: src.len,
        md5: src.md5,
        content_type: src.content_type.as_deref(),
        cache_control: src.cache_control.as_deref(),
        content_disposition: src.content_disposition.as_deref(),
        // User archives (direct messages) and imports stay private whatever `acl` says.
        acl: if key.as_str().starts_with("backups/") || key.as_str().starts_with("imports/") {
            Some("private")
        } else {
            target.acl.as_deref()
        },
    };
    let put = match &src.data {
        Data::File(file) if src.len > engine.multipart_threshold => {
            let part = part_size(src.len, engine.part_size);
            put_multipart(target, &req, file, part, &engine.uploads).await?
        }
        _ => match target.put(&req, body(&src.data, 0, src.len)).await {
            // A streamed body cannot be sent again: the whole copy is tried again (a new GET).
            Err(WriteError::Refused { code, .. })
                if code == "BadDigest" && matches!(src.data, Data::Stream(..)) =>
            {
                return Err(CopyError::Source(
                    "the body did not match the source's MD5 on the way".into(),
                ));
            }
            // The body changed on the way (a flipped bit): send it once more.
            Err(WriteError::Refused { code, .. }) if code == "BadDigest" => {
                target.put(&req, body(&src.data, 0, src.len)).await?
            }
            other => other?,
        },
    };
    let put_etag = match put {
        Put::AlreadyThere => return Ok(Copied::AlreadyThere),
        Put::Created(etag) => etag,
    };
    // What we just created, and only that, may be taken back: nothing was there before it.
    let take_back = |why: CopyError| async move {
        if let Err(e) = target.delete(key).await {
            tracing::warn!(%key, error = %e, "could not delete a copy that must not stay");
        }
        why
    };
    if busted(from, key) {
        // Mastodon deleted or hid it while it was being copied.
        return Err(take_back(CopyError::Busted).await);
    }
    if let Err(e) = verify(target, key, &src, put_etag).await {
        return Err(take_back(e).await);
    }
    Ok(Copied::Copied { bytes: src.len })
}

/// The bucket's own ETag for a single PUT is the MD5 of what it stored: equal to ours, the size and
/// the bytes are proven. Otherwise (multipart `-N` ETags, providers with other ETags) a HEAD checks
/// the size, and the MD5 when it is one.
async fn verify(
    target: &Upstream,
    key: &Key,
    src: &Source,
    put_etag: Option<String>,
) -> Result<(), CopyError> {
    let ours = hex(&src.md5);
    if put_etag.as_deref().and_then(plain_md5).as_deref() == Some(ours.as_str()) {
        return Ok(());
    }
    let head = match target.head_signed(key).await {
        Ok(Some(head)) => head,
        Ok(None) => {
            return Err(CopyError::Verify(
                "the target does not have it right after the PUT".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if head.len != src.len {
        return Err(CopyError::Verify(format!(
            "the target holds {} bytes, the source {}",
            head.len, src.len
        )));
    }
    // A multipart object's ETag is `-N`, never a plain MD5: its parts were checked one by one.
    if let Some(etag) = head.etag.as_deref().and_then(plain_md5) {
        if etag != ours {
            return Err(CopyError::Verify(format!(
                "the target's MD5 {etag} is not the source's {ours}"
            )));
        }
    }
    Ok(())
}

/// Whether Mastodon busted the key (lazy copy only: `migrate` skips tombstoned keys up front).
fn busted(from: &From<'_>, key: &Key) -> bool {
    match from {
        From::Proxy(rt, _) => rt
            .cache
            .tombstoned(key.as_str(), rt.config.cache.tombstone_ttl),
        _ => false,
    }
}

/// The first upstream other than the target that has `key`, by HEAD.
async fn head_first(
    upstreams: &[Upstream],
    target: &Upstream,
    key: &Key,
) -> Option<crate::object::Meta> {
    for up in upstreams.iter().filter(|u| u.origin != target.origin) {
        if let Ok(Fetched::Found(obj)) = up.fetch(Method::Head, key, None).await {
            return Some(obj.meta);
        }
    }
    None
}

/// S3 allows 10,000 parts: larger objects get larger parts.
fn part_size(len: u64, configured: u64) -> u64 {
    configured.max(len.div_ceil(10_000))
}

/// Uploads `file`'s first `req.len` bytes in parts. Journaled from before the first part until it is
/// completed or aborted, so a crash leaves nothing a restart does not abort.
async fn put_multipart(
    target: &Upstream,
    req: &PutRequest<'_>,
    file: &Arc<File>,
    part: u64,
    uploads: &Arc<Uploads>,
) -> Result<Put, CopyError> {
    let id = target.create_multipart(req).await?;
    let open = Open {
        origin: target.origin.to_string(),
        id: id.clone(),
        key: req.key.clone(),
    };
    let journal = uploads.clone();
    let journaled = tokio::task::spawn_blocking(move || journal.started(open))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    let result = match journaled {
        Err(e) => Err(CopyError::Spool(e)),
        Ok(()) => upload_parts(target, req, file, part, &id).await,
    };
    // Completed: done. Failed, or someone else's object is there (412): no parts may stay behind.
    if !matches!(result, Ok(Put::Created(_))) {
        if let Err(e) = target.abort_multipart(req.key, &id).await {
            tracing::warn!(key = %req.key, error = %e, "could not abort a multipart upload; it is aborted again at the next start");
            return result;
        }
    }
    uploads.ended(&id);
    result
}

async fn upload_parts(
    target: &Upstream,
    req: &PutRequest<'_>,
    file: &Arc<File>,
    part: u64,
    id: &str,
) -> Result<Put, CopyError> {
    let mut etags = Vec::new();
    let mut pos = 0;
    let data = Data::File(file.clone());
    while pos < req.len {
        let len = part.min(req.len - pos);
        let number = u16::try_from(etags.len() + 1)
            .map_err(|_| CopyError::Verify("more than 10,000 parts".into()))?;
        let f = file.clone();
        let md5 = tokio::task::spawn_blocking(move || md5_of_range(&f, pos, len))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))?;
        let etag = match target
            .upload_part(req.key, id, number, len, md5, body(&data, pos, len))
            .await
        {
            Err(WriteError::Refused { code, .. }) if code == "BadDigest" => {
                target
                    .upload_part(req.key, id, number, len, md5, body(&data, pos, len))
                    .await?
            }
            other => other?,
        };
        etags.push(etag);
        pos += len;
    }
    Ok(target.complete_multipart(req.key, id, &etags).await?)
}

/// The cache entry, unless the target filled it (then the target lost it, and the entry is no better a
/// source than the target was) or it is incomplete, corrupt or absent.
/// With whether the entry knows where it came from (entries of earlier releases do not, nor keep
/// Cache-Control and Content-Disposition).
async fn from_entry(rt: &Runtime, target: &Upstream, key: &Key) -> Option<(Source, bool)> {
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
async fn spool_first(
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
fn streamed(obj: Object, engine: &Engine<'_>) -> Result<Source, Box<Object>> {
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
async fn from_local(roots: &Roots, key: &Key) -> Result<Source, CopyError> {
    let Some(Object { meta, body }) = roots.open(key) else {
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

async fn spool_body(dir: &Path, key: &Key, obj: Object) -> Result<Source, CopyError> {
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

fn md5_of_file(file: &File, len: u64) -> io::Result<[u8; 16]> {
    md5_of_range(file, 0, len)
}

fn md5_of_range(file: &File, start: u64, len: u64) -> io::Result<[u8; 16]> {
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
fn body(data: &Data, start: u64, len: u64) -> reqwest::Body {
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

fn hex(md5: &[u8; 16]) -> String {
    md5.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_md5_etags_only() {
        assert_eq!(
            plain_md5("\"D41D8CD98F00B204E9800998ECF8427E\"").as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
        assert_eq!(plain_md5("\"d41d8cd98f00b204e9800998ecf8427e-3\""), None);
        assert_eq!(plain_md5("\"abc\""), None);
    }

    #[test]
    fn retry_policy() {
        let refused = |status, code: &str| {
            CopyError::Target(WriteError::Refused {
                status,
                code: code.into(),
            })
        };
        assert!(refused(503, "SlowDown").retryable());
        assert!(refused(500, "").retryable());
        assert!(refused(429, "").retryable());
        assert!(refused(409, "ConditionalRequestConflict").retryable());
        assert!(!refused(403, "AccessDenied").retryable());
        assert!(!refused(403, "InvalidAccessKeyId").retryable());
        assert!(!refused(404, "NoSuchBucket").retryable());
        assert!(CopyError::Target(WriteError::Transport("refused".into())).retryable());
        assert!(!CopyError::SourceGone.retryable());
    }
}
