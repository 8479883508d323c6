//! The order in which sources are asked: local roots, the disk cache, then upstreams in config order.
//! Also the one place that decides what "not found" means versus "failed": a bucket that answers 404
//! is telling the truth about itself only, so the next one is still asked; a bucket that errors is
//! skipped and remembered, so that a key nobody could confirm missing becomes a 502 (or a stale copy),
//! never a 404 that clients and caches would believe.

use std::sync::Arc;

use futures_util::StreamExt;
use http::HeaderValue;

use crate::cache::{
    fill_failed_at, Cached, FillGuard, Flight, Joined, Lookup, BACKGROUND_FILL_LIMIT,
};
use crate::key::Key;
use crate::object::{Body, Meta, Object, Source};
use crate::respond::RangeSpec;
use crate::runtime::Runtime;
use crate::upstream::{Fetched, Method};

pub enum Outcome {
    Found(Object),
    /// None has it; `Some(source)` when that answer came from the cache (a negative entry).
    NotFound(Option<Source>),
    /// None has it, and at least one upstream could not answer.
    Failed,
}

pub async fn lookup(
    rt: &Arc<Runtime>,
    key: &Key,
    method: Method,
    range: Option<&HeaderValue>,
) -> Outcome {
    let outcome = find(rt, key, method, range).await;
    if let Outcome::Found(obj) = &outcome {
        queue_copy(rt, key, &obj.meta);
    }
    outcome
}

/// Lazy copy: an object that came from a bucket below the `copy_missing` target, straight from it or
/// through a cache entry it filled (or an entry too old to say), is queued for a copy into the target.
/// Queueing never waits; local files are never copied (`migrate --from local` is their backup).
fn queue_copy(rt: &Runtime, key: &Key, meta: &Meta) {
    if meta.source == Source::Local {
        return;
    }
    let Some(target) = rt.copy_target() else {
        return;
    };
    if let Some(origin) = meta.origin.as_deref() {
        let at_or_above = rt
            .upstreams
            .iter()
            .take_while(|u| !std::ptr::eq(*u, target))
            .chain([target]);
        if at_or_above.into_iter().any(|u| &*u.origin == origin) {
            return;
        }
    }
    rt.copier.enqueue(&target.origin, key);
}

async fn find(
    rt: &Arc<Runtime>,
    key: &Key,
    method: Method,
    range: Option<&HeaderValue>,
) -> Outcome {
    if let Some(obj) = rt.roots.open(key) {
        return Outcome::Found(obj);
    }
    let stale = match rt.cache.lookup(key.as_str(), rt.policy()).await {
        Lookup::Fresh(cached) => return from_cache(cached, Source::Hit),
        Lookup::Stale(cached) => Some(cached),
        Lookup::Miss => None,
    };
    if rt.upstreams.is_empty() {
        // Nothing to fill from (the embedded default, or every bucket removed from the config): an
        // expired copy is still the best answer; no negative entries for every missing file.
        return match stale {
            Some(Cached::Found(mut obj)) => {
                obj.meta.source = Source::Stale;
                Outcome::Found(obj)
            }
            _ => Outcome::NotFound(None),
        };
    }
    if method == Method::Get {
        match rt.cache.flight(key.as_str()) {
            Flight::Leader(guard) if starts_past_zero(range) => {
                // A seek into a video: answer the range now, and fill the whole object beside it,
                // rather than making the client wait for every byte before its range.
                background_fill(rt.clone(), key.clone(), guard);
            }
            Flight::Leader(guard) => {
                // A fill may have committed between our lookup and taking the lead.
                if let Lookup::Fresh(cached) = rt.cache.lookup(key.as_str(), rt.policy()).await {
                    drop(guard);
                    return from_cache(cached, Source::Hit);
                }
                return fill(rt, key, guard, stale).await;
            }
            // A seek that joins a running fill is answered like a leader's seek, with a ranged GET
            // at once, rather than after waiting for the fill to reach its first byte.
            Flight::Follower(_) if starts_past_zero(range) => {}
            Flight::Follower(follower) => match follower.join(rt.config.cache.lock_timeout).await {
                Joined::Streaming(obj) => {
                    return Outcome::Found(resume_on_fill_failure(rt.clone(), key.clone(), obj))
                }
                Joined::Finished => {
                    if let Lookup::Fresh(cached) = rt.cache.lookup(key.as_str(), rt.policy()).await
                    {
                        return from_cache(cached, Source::Hit);
                    }
                }
                Joined::GaveUp => {}
            },
        }
    }
    // HEAD, a follower's seek, or a follower whose fill failed or timed out: ask upstreams directly,
    // without filling.
    match ask(rt, key, method, range).await {
        Asked::Found(obj) => Outcome::Found(obj),
        Asked::NotFound => Outcome::NotFound(None),
        Asked::Failed => serve_stale(rt, key, stale),
    }
}

/// The leader of a fill: fetch the whole object (whatever the client's Range), tee it into the cache.
async fn fill(rt: &Arc<Runtime>, key: &Key, guard: FillGuard, stale: Option<Cached>) -> Outcome {
    match ask(rt, key, Method::Get, None).await {
        Asked::Found(obj) => Outcome::Found(resume_on_fill_failure(
            rt.clone(),
            key.clone(),
            guard.tee(obj),
        )),
        Asked::NotFound => {
            guard.not_found();
            Outcome::NotFound(None)
        }
        Asked::Failed => serve_stale(rt, key, stale),
    }
}

fn starts_past_zero(range: Option<&HeaderValue>) -> bool {
    let spec = range
        .and_then(|r| r.to_str().ok())
        .and_then(RangeSpec::parse);
    !matches!(
        spec,
        None | Some(RangeSpec::FromTo(0, _)) | Some(RangeSpec::From(0))
    )
}

/// A seek-triggered fill has no client from the start: it takes one of the cache's background-fill
/// permits (`cache.background_fills`, the same bound as fills whose client left), or none is made.
fn background_fill(rt: Arc<Runtime>, key: Key, guard: FillGuard) {
    let Some(permit) = rt.cache.background_permit() else {
        tracing::debug!(%key, "cache.background_fills in use; answering the seek without filling");
        return;
    };
    tokio::spawn(async move {
        let work = async {
            match ask(&rt, &key, Method::Get, None).await {
                Asked::Found(obj) => guard.fill(obj, permit).await,
                Asked::NotFound => guard.not_found(),
                Asked::Failed => {}
            }
        };
        if tokio::time::timeout(BACKGROUND_FILL_LIMIT, work)
            .await
            .is_err()
        {
            tracing::warn!(%key, "background fill abandoned after {BACKGROUND_FILL_LIMIT:?}");
        }
    });
}

/// A fill may fail part-way (the upstream dies mid-body, or, for followers, the disk fills up): then the
/// rest of the body comes from the upstreams, a ranged GET from where the client stopped, so the client
/// gets the whole object if any upstream can still give it.
fn resume_on_fill_failure(rt: Arc<Runtime>, key: Key, obj: Object) -> Object {
    let Object { meta, body } = obj;
    let (stream, len) = match (body, meta.len) {
        (Body::Stream { stream, offset: 0 }, Some(len)) => (stream, len),
        (body, _) => return Object { meta, body },
    };
    let same = Arc::new((meta.origin.clone(), meta.etag.clone()));
    let state = Some((stream, rt, key));
    let resumed = futures_util::stream::unfold(state, move |state| {
        let same = same.clone();
        async move {
            let (mut stream, rt, key) = state?;
            loop {
                let at = match stream.next().await {
                    None => return None,
                    Some(Ok(bytes)) => return Some((Ok(bytes), Some((stream, rt, key)))),
                    Some(Err(e)) => match fill_failed_at(&e) {
                        Some(at) => at,
                        None => return Some((Err(e), None)),
                    },
                };
                match resume_from(&rt, &key, at, len, &same.0, &same.1).await {
                    Some(rest) => {
                        tracing::info!(%key, at, "fill failed; the rest comes from the upstreams");
                        stream = rest;
                    }
                    None => {
                        let e = std::io::Error::other(format!(
                        "the cache fill failed at byte {at} and no upstream could resume the same object"
                    ));
                        return Some((Err(e), None));
                    }
                }
            }
        }
    });
    Object {
        meta,
        body: Body::Stream {
            stream: Box::pin(resumed),
            offset: 0,
        },
    }
}

/// The rest of the object from byte `at`, only if it is provably the same object: from the upstream
/// that served the start, with `If-Match` on its ETag; from another, only with the same length and the
/// same plain-MD5 ETag. Otherwise `None`: an aborted connection beats mixed bytes.
async fn resume_from(
    rt: &Runtime,
    key: &Key,
    at: u64,
    len: u64,
    origin: &Option<Arc<str>>,
    etag: &Option<String>,
) -> Option<crate::object::ByteStream> {
    let range = HeaderValue::from_str(&format!("bytes={at}-")).expect("ascii");
    let md5 = etag.as_deref().and_then(crate::copy::plain_md5);
    for up in rt.chain(key) {
        let same_upstream = origin.as_deref() == Some(&*up.origin);
        if !same_upstream && md5.is_none() {
            continue; // nothing to prove another bucket's copy is the same object
        }
        let if_match = if same_upstream { etag.as_deref() } else { None };
        let Ok(Fetched::Found(Object { meta, body })) =
            up.fetch_if(Method::Get, key, Some(&range), if_match).await
        else {
            continue;
        };
        let Body::Stream { stream, offset } = body else {
            continue;
        };
        let proven = same_upstream || meta.etag.as_deref().and_then(crate::copy::plain_md5) == md5;
        if offset == at && meta.len == Some(len) && proven {
            return Some(stream);
        }
    }
    None
}

/// Varnish's grace, nginx's `proxy_cache_use_stale error timeout`: every upstream failed, so an expired
/// copy beats a 502.
/// Not for a key Mastodon busted after the stale copy was read: that copy is what it took back.
fn serve_stale(rt: &Runtime, key: &Key, stale: Option<Cached>) -> Outcome {
    match stale {
        // Only an object: an expired 404 is no answer when nobody could confirm it (502, as the
        // README says).
        Some(cached @ Cached::Found(_))
            if !rt
                .cache
                .tombstoned(key.as_str(), rt.config.cache.tombstone_ttl) =>
        {
            from_cache(cached, Source::Stale)
        }
        _ => Outcome::Failed,
    }
}

fn from_cache(cached: Cached, source: Source) -> Outcome {
    match cached {
        Cached::Found(mut obj) => {
            obj.meta.source = source;
            Outcome::Found(obj)
        }
        Cached::NotFound => Outcome::NotFound(Some(source)),
    }
}

enum Asked {
    Found(Object),
    NotFound,
    Failed,
}

async fn ask(rt: &Runtime, key: &Key, method: Method, range: Option<&HeaderValue>) -> Asked {
    let mut failed = false;
    for up in rt.chain(key) {
        match up.fetch(method, key, range).await {
            Ok(Fetched::Found(obj)) => {
                rt.metrics.upstream_result(&up.name, "found");
                return Asked::Found(obj);
            }
            Ok(Fetched::NotFound) => {
                rt.metrics.upstream_result(&up.name, "not_found");
                if rt.copy_target().is_some_and(|t| std::ptr::eq(t, up)) {
                    // Its copy can skip asking the target again.
                    rt.copier.target_lacks(&up.origin, key);
                }
            }
            Err(e) => {
                rt.metrics.upstream_result(&up.name, "error");
                tracing::warn!(upstream = %up.name, %key, error = %e, "upstream failed, trying the next");
                failed = true;
            }
        }
    }
    if failed {
        Asked::Failed
    } else {
        Asked::NotFound
    }
}
