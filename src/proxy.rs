//! One request, top to bottom: Mastodon's cache buster → method → key → allowed prefixes → sources (via
//! `resolve`) → one responder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use http::{Method, Request, Response, StatusCode};

use crate::resolve::{self, Outcome};
use crate::respond::{self, RequestInfo, ResponseBody};
use crate::runtime::Runtime;
use crate::{key, upstream};

/// `sendfile`: the request came over a plain HTTP/1.1 connection, whose file bodies go to the socket
/// with `sendfile` (see [`crate::zerocopy`]), so a file that may change in place can be mapped for it.
pub async fn handle<B>(
    rt: Arc<Runtime>,
    req: Request<B>,
    sendfile: bool,
) -> Response<ResponseBody> {
    let resp = answer(&rt, &req, sendfile).await;
    rt.metrics
        .request(resp.status(), resp.headers().get("x-cache"));
    tracing::debug!(method = %req.method(), path = %req.uri().path(), status = resp.status().as_u16(), "request");
    resp
}

async fn answer<B>(rt: &Arc<Runtime>, req: &Request<B>, sendfile: bool) -> Response<ResponseBody> {
    let key = key::parse(req.uri().path(), &rt.config.server.path_prefix);
    if let Some(resp) = cache_buster(rt, req, &key).await {
        return resp;
    }
    let method = match *req.method() {
        Method::GET => upstream::Method::Get,
        Method::HEAD => upstream::Method::Head,
        Method::OPTIONS => return respond::preflight(),
        // Nothing else is forwarded: a proxy in front of a bucket must never become a way to write to it.
        _ => return respond::error(StatusCode::METHOD_NOT_ALLOWED),
    };
    let key = match key {
        Ok(key) => key,
        Err(e) => {
            tracing::debug!(path = %req.uri().path(), error = %e, "refused path");
            return refused(e);
        }
    };
    if !key.is_allowed(&rt.config.server.allow_prefixes) {
        // Before any source is asked: a user archive in the same bucket must not even cost a GET.
        tracing::debug!(%key, "key outside server.allow_prefixes");
        return respond::error(StatusCode::NOT_FOUND);
    }
    let range = match method {
        upstream::Method::Get => respond::forwardable_range(req.headers()),
        upstream::Method::Head => None,
    };
    match resolve::lookup(rt, &key, method, range, sendfile).await {
        Outcome::Found(obj) => {
            let served_by = served_by(rt, &obj.meta);
            let mut resp = respond::build(
                obj,
                &RequestInfo {
                    method: req.method(),
                    headers: req.headers(),
                },
            );
            if let Some(name) = served_by {
                resp.extensions_mut().insert(ServedBy(name));
            }
            resp
        }
        Outcome::NotFound(source) => {
            // HIT when a negative entry answered, MISS when the sources were asked.
            let source = source.unwrap_or(crate::object::Source::Miss);
            let mut resp = respond::error(StatusCode::NOT_FOUND);
            resp.headers_mut().insert(
                respond::x_cache(),
                http::HeaderValue::from_static(source.x_cache()),
            );
            resp
        }
        Outcome::Failed => respond::error(StatusCode::BAD_GATEWAY),
    }
}

/// The upstream that answered a miss, for the access log (its name in the config in force).
#[derive(Clone)]
pub struct ServedBy(pub String);

fn served_by(rt: &Runtime, meta: &crate::object::Meta) -> Option<String> {
    if meta.source != crate::object::Source::Miss {
        return None;
    }
    let origin = meta.origin.as_deref()?;
    rt.upstreams
        .iter()
        .find(|u| &*u.origin == origin)
        .map(|u| u.name.clone())
}

/// Mastodon's cache buster (`CACHE_BUSTER_ENABLED`): a GET or PURGE carrying the configured header with
/// the right secret purges and tombstones the key. `None`: not a bust, serve the request as usual (a
/// wrong or missing secret included, so no client without it can hide media).
async fn cache_buster<B>(
    rt: &Runtime,
    req: &Request<B>,
    key: &Result<key::Key, key::KeyError>,
) -> Option<Response<ResponseBody>> {
    let buster = rt.config.server.cache_buster.as_ref()?;
    if !(req.method() == Method::GET || req.method().as_str() == "PURGE") {
        return None;
    }
    let given = req.headers().get(&buster.header)?;
    // Digests first: equal lengths, so not even the secret's length shows in the timing.
    let given = Sha256::digest(given.as_bytes());
    let secret = Sha256::digest(buster.secret.expose().as_bytes());
    if !bool::from(given.as_slice().ct_eq(secret.as_slice())) {
        rt.metrics.bust("refused");
        warn_refused_bust();
        return None;
    }
    let key = match key {
        Ok(key) => key,
        Err(e) => return Some(refused(*e)),
    };
    match rt
        .cache
        .bust(key.as_str(), rt.config.cache.tombstone_ttl)
        .await
    {
        Ok(()) => {
            rt.metrics.bust("ok");
            tracing::info!(%key, "busted by Mastodon: purged, asked only of the write upstream from now on");
            Some(respond::done())
        }
        Err(e) => {
            rt.metrics.bust("error");
            tracing::error!(%key, error = %e, "bust purged the cache, but its tombstone could not be saved: it lasts until restart");
            Some(respond::error(StatusCode::INTERNAL_SERVER_ERROR))
        }
    }
}

/// A wrong secret is most likely Mastodon's and the admin's config disagreeing, which silently turns
/// every bust into a plain read: say so, at most once a minute (anyone can send the header).
fn warn_refused_bust() {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::unix_time::now();
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("a request carried the cache buster header with a wrong secret and was served as a read; if it came from Mastodon, CACHE_BUSTER_SECRET and server.cache_buster_secret_file differ");
    }
}

fn refused(e: key::KeyError) -> Response<ResponseBody> {
    respond::error(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST))
}
