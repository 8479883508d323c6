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
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::source::{
    body, from_entry, from_local, hex, md5_of_range, plain_md5, spool_first, Data, Source,
};
use super::uploads::{Open, Uploads};
use crate::key::Key;
use crate::local::Roots;
use crate::runtime::Runtime;
use crate::upstream::{Fetched, Method, Put, PutRequest, Upstream, WriteError};

/// How long a copy waits for a fill of the same key before fetching on its own.
const FILL_WAIT: Duration = Duration::from_secs(300);
pub(super) use crate::object::CHUNK;

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
