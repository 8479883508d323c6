//! The order in which sources are asked: local roots, the disk cache, then upstreams in config order.
//! Also the one place that decides what "not found" means versus "failed": a bucket that answers 404
//! is telling the truth about itself only, so the next one is still asked; a bucket that errors is
//! skipped and remembered, so that a key nobody could confirm missing becomes a 502 (or a stale copy),
//! never a 404 that clients and caches would believe.

use std::sync::Arc;

use http::HeaderValue;

use futures_util::future::BoxFuture;

use crate::cache::{Answer, Cached, Flight, Joined, Lookup, Origin};
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

/// `sendfile`: the request's connection sends file bodies with `sendfile` (see [`crate::zerocopy`]).
pub async fn lookup(
    rt: &Arc<Runtime>,
    key: &Key,
    method: Method,
    range: Option<&HeaderValue>,
    sendfile: bool,
) -> Outcome {
    let outcome = find(rt, key, method, range, sendfile).await;
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
    sendfile: bool,
) -> Outcome {
    let sendfile = sendfile && method == Method::Get;
    if let Some(obj) = rt.roots.open(key, sendfile) {
        return Outcome::Found(obj);
    }
    let stale = match rt.cache.lookup(key.as_str(), rt.policy(), sendfile).await {
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
    let filled_by = match &stale {
        Some(Cached::Found(obj)) => obj.meta.origin.clone(),
        _ => None,
    };
    // A HEAD fills like a GET (nginx turns it into a GET upstream too): the next HEAD or GET is a hit.
    // Its client reads no body, so it fills only within `cache.background_fills`.
    {
        let origin = || -> Arc<dyn Origin> {
            Arc::new(Chain {
                rt: rt.clone(),
                key: key.clone(),
                filled_by: filled_by.clone(),
            })
        };
        match rt.cache.lead(key.as_str(), rt.policy()).await {
            Flight::Cached(cached) => return from_cache(cached, Source::Hit),
            Flight::Leader(guard) if starts_past_zero(range) => {
                // A seek into a video: answer the range now, and fill the whole object beside it,
                // rather than making the client wait for every byte before its range.
                guard.fill_in_background(&rt.cache, origin());
            }
            Flight::Leader(guard) if method == Method::Head => {
                match guard.fill_for_head(&rt.cache, origin()).await {
                    Ok(Answer::Found(obj)) => return Outcome::Found(obj),
                    Ok(Answer::NotFound) => return Outcome::NotFound(None),
                    Ok(Answer::Failed) => return serve_stale(rt, key, stale),
                    // Every background fill in use: a plain HEAD, nothing filled (the guard is
                    // dropped, so followers ask for themselves).
                    Err(_guard) => {}
                }
            }
            Flight::Leader(guard) => {
                return match guard.fill_for_client(origin()).await {
                    Answer::Found(obj) => Outcome::Found(obj),
                    Answer::NotFound => Outcome::NotFound(None),
                    Answer::Failed => serve_stale(rt, key, stale),
                }
            }
            // A seek that joins a running fill is answered like a leader's seek, with a ranged GET
            // at once, rather than after waiting for the fill to reach its first byte.
            Flight::Follower(_) if starts_past_zero(range) => {}
            Flight::Follower(follower) => {
                match follower
                    .follow(rt.config.cache.lock_timeout, origin())
                    .await
                {
                    Joined::Streaming(obj) => return Outcome::Found(obj),
                    Joined::Finished => {
                        if let Lookup::Fresh(cached) =
                            rt.cache.lookup(key.as_str(), rt.policy(), sendfile).await
                        {
                            return from_cache(cached, Source::Hit);
                        }
                    }
                    Joined::GaveUp => {}
                }
            }
        }
    }
    // A seek that joined a fill, a follower whose fill failed or timed out, or a HEAD with every
    // background fill in use: ask upstreams directly, without filling.
    match ask(rt, key, method, range, filled_by.as_deref()).await {
        Answer::Found(obj) => Outcome::Found(obj),
        Answer::NotFound => Outcome::NotFound(None),
        Answer::Failed => serve_stale(rt, key, stale),
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

/// The upstreams in order, as a fill's [`Origin`] for one key.
struct Chain {
    rt: Arc<Runtime>,
    key: Key,
    /// The upstream that filled the expired entry, if any (see [`ask`]).
    filled_by: Option<Arc<str>>,
}

impl Origin for Chain {
    fn fetch(&self) -> BoxFuture<'_, Answer> {
        Box::pin(ask(
            &self.rt,
            &self.key,
            Method::Get,
            None,
            self.filled_by.as_deref(),
        ))
    }

    fn resume<'a>(
        &'a self,
        at: u64,
        len: u64,
        meta: &'a Meta,
    ) -> BoxFuture<'a, Option<crate::object::ByteStream>> {
        Box::pin(resume_from(&self.rt, &self.key, at, len, meta))
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
    started: &Meta,
) -> Option<crate::object::ByteStream> {
    let range = HeaderValue::from_str(&format!("bytes={at}-")).expect("ascii");
    let etag = &started.etag;
    let md5 = etag.as_deref().and_then(crate::copy::plain_md5);
    for up in rt.chain(key) {
        let same_upstream = started.origin.as_deref() == Some(&*up.origin);
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

/// Asks the upstreams in order. `filled_by`: the origin of the expired cache entry for the key, if
/// any: that upstream served the key before, so a 404 from it now is an object it lost.
async fn ask(
    rt: &Runtime,
    key: &Key,
    method: Method,
    range: Option<&HeaderValue>,
    filled_by: Option<&str>,
) -> Answer {
    let mut failed = false;
    for up in rt.chain(key) {
        let asked = std::time::Instant::now();
        let answer = up.fetch(method, key, range).await;
        rt.metrics
            .upstream_duration(&up.name, asked.elapsed().as_secs_f64());
        match answer {
            Ok(Fetched::Found(obj)) => {
                rt.metrics.upstream_result(&up.name, "found");
                rt.metrics.health.answered(&up.name);
                return Answer::Found(obj);
            }
            Ok(Fetched::NotFound) => {
                rt.metrics.upstream_result(&up.name, "not_found");
                rt.metrics.health.answered(&up.name);
                if filled_by == Some(&*up.origin) {
                    rt.metrics.lost_object(&up.name, key.as_str());
                }
                if rt.copy_target().is_some_and(|t| std::ptr::eq(t, up)) {
                    // Its copy can skip asking the target again.
                    rt.copier.target_lacks(&up.origin, key);
                }
            }
            Err(e) => {
                rt.metrics.upstream_result(&up.name, "error");
                rt.metrics.upstream_error(&up.name, e.reason());
                rt.metrics.health.failed(&up.name, &e);
                match rt.metrics.health.log_failure(&up.name) {
                    Some(0) => {
                        tracing::warn!(upstream = %up.name, %key, error = %e, "upstream failed, trying the next")
                    }
                    Some(more) => {
                        tracing::warn!(upstream = %up.name, %key, error = %e, more, "upstream failed, trying the next (and `more` failures since the last line)")
                    }
                    None => {
                        tracing::debug!(upstream = %up.name, %key, error = %e, "upstream failed, trying the next")
                    }
                }
                failed = true;
            }
        }
    }
    if failed {
        Answer::Failed
    } else {
        Answer::NotFound
    }
}
