//! The one place that turns an [`Object`] into an HTTP response.
//!
//! Range, conditional requests, HEAD and the header contract (CORS, nosniff, CSP, Cache-Control, X-Cache)
//! are decided here and only here, so a local file, a cache hit and an upstream miss answer a client
//! identically. Headers are built from the object's metadata, never copied from an upstream, which is
//! why `Set-Cookie` and `x-amz-*` cannot leak through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

use crate::object::{Body, ByteStream, Object, CHUNK};

pub mod range;

pub use range::{forwardable_range, RangeSpec};

pub type ResponseBody = UnsyncBoxBody<Bytes, io::Error>;

/// Media keys never change once written (Mastodon uploads with the same header).
const IMMUTABLE: &str = "public, max-age=315576000, immutable";
/// A 404 may turn into an object when a desynchronized bucket catches up: keep client caching short.
const NOT_FOUND_CACHE: &str = "public, max-age=60";
const CSP: &str = "default-src 'none'; form-action 'none'";
const ALLOW: &str = "GET, HEAD, OPTIONS";
/// Up to this size (one chunk) a local file (or range) is read in one call on the worker; above, in
/// chunks on the blocking pool, so a slow disk read of a large video cannot stall other connections.
const SMALL_FILE: u64 = CHUNK as u64;

/// What the responder needs to know of the request.
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

pub fn build(obj: Object, req: &RequestInfo<'_>) -> Response<ResponseBody> {
    let meta = &obj.meta;
    // Room for every header below (and the access log's and server's few): no rehash as it fills.
    let mut h = HeaderMap::with_capacity(16);
    common_headers(&mut h);
    h.insert(x_cache(), HeaderValue::from_static(meta.source.x_cache()));
    let ctype = meta
        .content_type
        .as_deref()
        .unwrap_or("application/octet-stream");
    h.insert(
        header::CONTENT_TYPE,
        value(ctype).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Some(etag) = meta.etag.as_deref().and_then(value) {
        h.insert(header::ETAG, etag);
    }
    if let Some(lm) = meta.last_modified.and_then(http_date) {
        h.insert(header::LAST_MODIFIED, lm);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));

    if not_modified(req.headers, meta.etag.as_deref(), meta.last_modified) {
        h.remove(header::CONTENT_TYPE);
        return response(StatusCode::NOT_MODIFIED, h, empty());
    }

    let Some(len) = meta.len else {
        // Length unknown (a chunked HTTP upstream): no ranges, pass the stream through.
        let body = match obj.body {
            Body::Stream { stream, offset: 0 } if req.method != Method::HEAD => stream_body(stream),
            _ if req.method == Method::HEAD => empty(),
            // A part of an object of unknown size must never pass for the whole of it.
            _ => return error(StatusCode::BAD_GATEWAY),
        };
        return response(StatusCode::OK, h, body);
    };
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));

    let wanted = if req.method == Method::GET {
        range::requested(req.headers, meta.etag.as_deref(), meta.last_modified)
    } else {
        None
    };
    let (status, start, count) = match wanted.map(|r| r.resolve(len)) {
        None => (StatusCode::OK, 0, len),
        Some(Some((s, e))) => {
            h.insert(
                header::CONTENT_RANGE,
                value(&format!("bytes {s}-{e}/{len}")).expect("ascii"),
            );
            (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
        }
        Some(None) => {
            h.insert(
                header::CONTENT_RANGE,
                value(&format!("bytes */{len}")).expect("ascii"),
            );
            h.remove(header::CONTENT_TYPE);
            return response(StatusCode::RANGE_NOT_SATISFIABLE, h, empty());
        }
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if req.method == Method::HEAD || count == 0 {
        return response(status, h, empty());
    }
    match slice(obj.body, start, count) {
        Some(body) => response(status, h, body),
        None => {
            tracing::error!(origin = ?meta.origin, start, count, "source cannot supply the range it was asked for");
            error(StatusCode::BAD_GATEWAY)
        }
    }
}

/// 400, 404, 502…: a short text body and the same security headers as any other answer.
pub fn error(status: StatusCode) -> Response<ResponseBody> {
    let mut h = HeaderMap::new();
    common_headers(&mut h);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let cc = if status == StatusCode::NOT_FOUND {
        NOT_FOUND_CACHE
    } else {
        "no-store"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cc));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
    }
    let text = format!("{}\n", status.canonical_reason().unwrap_or("error"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    response(
        status,
        h,
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
}

/// The answer to a cache bust: done, nothing to show or to cache.
pub fn done() -> Response<ResponseBody> {
    let mut h = HeaderMap::new();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    response(StatusCode::OK, h, empty())
}

/// CORS preflight: media is fetched cross-origin by web clients (Mastodon's own UI on another host).
pub fn preflight() -> Response<ResponseBody> {
    let mut h = HeaderMap::new();
    common_headers(&mut h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Range, If-None-Match, If-Modified-Since, If-Range"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    h.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
    response(StatusCode::NO_CONTENT, h, empty())
}

pub fn x_cache() -> HeaderName {
    HeaderName::from_static("x-cache")
}

fn common_headers(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Content-Length, Content-Range, ETag, X-Cache"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
}

fn response(status: StatusCode, headers: HeaderMap, body: ResponseBody) -> Response<ResponseBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

fn value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

/// `None` outside 1970..=9999 (RFC 9110's IMF-fixdate has four digits for the year): a file touched to
/// 1969 must not take the connection down.
fn http_date(t: SystemTime) -> Option<HeaderValue> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    if secs >= 253_402_300_800 {
        return None;
    }
    HeaderValue::from_bytes(&imf_fixdate(secs)).ok()
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for `secs` after the epoch (before year 10000), written by hand:
/// it is on every response with a Last-Modified, and `httpdate` goes through `fmt` and a `String`.
fn imf_fixdate(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), in eras of 400 years from 0000-03-01.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |out: &mut [u8; 29], at: usize, n: u64| {
        out[at] = b'0' + (n / 10) as u8;
        out[at + 1] = b'0' + (n % 10) as u8;
    };
    two(&mut out, 5, day);
    out[8..11].copy_from_slice(MONTHS[month as usize - 1]);
    two(&mut out, 12, year / 100);
    two(&mut out, 14, year % 100);
    two(&mut out, 17, rem / 3_600);
    two(&mut out, 20, rem / 60 % 60);
    two(&mut out, 23, rem % 60);
    out
}

fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn stream_body(stream: ByteStream) -> ResponseBody {
    StreamBody::new(stream.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// RFC 9110 §13.1.2/§13.1.3: If-None-Match wins; If-Modified-Since is only looked at without it.
fn not_modified(h: &HeaderMap, etag: Option<&str>, last_modified: Option<SystemTime>) -> bool {
    if let Some(inm) = h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = etag else {
            return inm.trim() == "*";
        };
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || weak(t) == weak(etag));
    }
    match (
        h.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok()),
        last_modified,
    ) {
        (Some(ims), Some(lm)) => match httpdate::parse_http_date(ims) {
            Ok(since) => crate::unix_time::secs(lm) <= crate::unix_time::secs(since),
            Err(_) => false,
        },
        _ => false,
    }
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The body for bytes `start..start+count` of the object, or `None` when the source cannot give them.
fn slice(body: Body, start: u64, count: u64) -> Option<ResponseBody> {
    match body {
        Body::Empty => None,
        Body::Bytes(b) => {
            let end = start.checked_add(count)?;
            (end <= b.len() as u64).then(|| {
                let part = b.slice(start as usize..end as usize);
                Full::new(part)
                    .map_err(|never| match never {})
                    .boxed_unsync()
            })
        }
        Body::File(file) => Some(file_body(file, start, count)),
        Body::Stream { stream, offset } => {
            let skip = start.checked_sub(offset)?;
            Some(stream_body(Box::pin(Slice {
                inner: stream,
                skip,
                remaining: count,
            })))
        }
    }
}

fn file_body(file: std::fs::File, start: u64, count: u64) -> ResponseBody {
    if count <= SMALL_FILE {
        // Inline, like nginx without `aio threads`: a page-cached read of a few dozen KB is cheaper
        // than the thread hand-off to the blocking pool.
        let chunk = crate::object::read_at(&file, start, count as usize);
        return stream_body(Box::pin(futures_util::stream::once(async move { chunk })));
    }
    // Chunked positional reads: memory stays at one chunk per response whatever the file's size.
    let stream =
        futures_util::stream::unfold((Some(file), start, count), |(file, pos, left)| async move {
            let file = file.filter(|_| left > 0)?;
            let n = left.min(CHUNK as u64);
            let read = tokio::task::spawn_blocking(move || {
                let r = crate::object::read_at(&file, pos, n as usize);
                (file, r)
            })
            .await;
            Some(match read {
                Ok((file, Ok(bytes))) => (Ok(bytes), (Some(file), pos + n, left - n)),
                Ok((_, Err(e))) => (Err(e), (None, pos, 0)),
                Err(e) => (Err(io::Error::other(e)), (None, pos, 0)),
            })
        });
    stream_body(Box::pin(stream))
}

/// Skips the bytes before the range and stops after it; a source that ends early is an error, so the
/// client's connection is aborted instead of a short body looking complete.
struct Slice {
    inner: ByteStream,
    skip: u64,
    remaining: u64,
}

impl Stream for Slice {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.remaining == 0 {
                return Poll::Ready(None);
            }
            let mut chunk = match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(c))) => c,
                Poll::Ready(Some(Err(e))) => {
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let left = self.remaining;
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("source ended {left} bytes early"),
                    ))));
                }
            };
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                chunk = chunk.slice(n as usize..);
            }
            if chunk.is_empty() {
                continue;
            }
            if chunk.len() as u64 > self.remaining {
                chunk.truncate(self.remaining as usize);
            }
            self.remaining -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(chunk)));
        }
    }
}

#[cfg(test)]
mod tests;
