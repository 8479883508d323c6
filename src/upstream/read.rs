//! Reading an object: one GET or HEAD through [`super::h1`], and what its answer means. A 404 is a
//! missing key unless the bucket itself is missing; a 403 is a missing key for an anonymous reader,
//! and a credentials failure only when S3's error code says so; a 416 without the object's length asks
//! for it with a HEAD.

use http::{HeaderMap, HeaderValue, StatusCode};

use super::coalesce::Coalesce;
use super::{h1, xml_tag, Fetched, Kind, Method, Upstream, UpstreamError, CREDENTIAL_CODES};
use crate::config::Reads;
use crate::key::Key;
use crate::object::{Body, Meta, Object, Source};

impl Upstream {
    /// Asks for `key`. `range` is the client's Range header, forwarded so a seek into a video costs the
    /// bucket only the bytes asked for.
    pub async fn fetch(
        &self,
        method: Method,
        key: &Key,
        range: Option<&HeaderValue>,
    ) -> Result<Fetched, UpstreamError> {
        self.fetch_if(method, key, range, None).await
    }

    /// With `If-Match: etag` when given: an object that changed since answers 412, an error (S3's
    /// GetObject has no `If-Range`, so this is how a resumed body proves it continues the same object).
    pub async fn fetch_if(
        &self,
        method: Method,
        key: &Key,
        range: Option<&HeaderValue>,
        if_match: Option<&str>,
    ) -> Result<Fetched, UpstreamError> {
        let if_match = match if_match.map(HeaderValue::from_str).transpose() {
            Ok(v) => v,
            Err(_) => return Err(UpstreamError::Protocol("an ETag unfit for If-Match".into())),
        };
        let target = self.target(method, key);
        let extra = h1::Extra {
            range,
            if_match: if_match.as_ref(),
        };
        let send = self.reader.send(method == Method::Head, &target, extra);
        let resp = match tokio::time::timeout(self.first_byte_timeout, send).await {
            Err(_) => return Err(UpstreamError::Timeout(self.first_byte_timeout)),
            Ok(Err(e)) => return Err(UpstreamError::Request(e)),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status;
        match status {
            // S3 answers 416 with an error document and no `Content-Range: bytes */len`; the responder
            // needs the length to say so, so ask for it.
            StatusCode::RANGE_NOT_SATISFIABLE
                if !resp.headers.contains_key(http::header::CONTENT_RANGE) =>
            {
                match method {
                    Method::Get => {
                        // Read the short error document: its connection is then free for the HEAD.
                        drop(resp.text_prefix(8192).await);
                        Box::pin(self.fetch(Method::Head, key, None)).await
                    }
                    // A HEAD has no range to be unsatisfiable: asking again would never end.
                    Method::Head => Err(UpstreamError::Protocol(
                        "416 to a HEAD, without the object's length".into(),
                    )),
                }
            }
            StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                self.to_object(method, resp).map(Fetched::Found)
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => self.not_found(method, resp).await,
            StatusCode::FORBIDDEN => self.forbidden(method, key, resp).await,
            _ => Err(UpstreamError::Status(status)),
        }
    }

    /// A 404 tells of a missing key, unless its S3 error code says the whole bucket is missing (a wrong
    /// bucket, endpoint or prefix): then every key would become a cached 404, so it is a failure.
    async fn not_found(
        &self,
        method: Method,
        resp: h1::Response,
    ) -> Result<Fetched, UpstreamError> {
        if method == Method::Head {
            return Ok(Fetched::NotFound); // no body to tell; `check` asks the bucket itself
        }
        let body = resp.text_prefix(8192).await;
        match xml_tag(&body, "Code").as_deref() {
            Some("NoSuchBucket") => Err(UpstreamError::NoSuchBucket),
            _ => Ok(Fetched::NotFound),
        }
    }

    /// A public bucket answers 403 for a key it lacks or an object whose ACL is private (what nginx's
    /// anonymous `proxy_pass` gets too), and so does S3 for a signed request without `s3:ListBucket`;
    /// but a bad signature is a broken upstream, not a missing object.
    async fn forbidden(
        &self,
        method: Method,
        key: &Key,
        resp: h1::Response,
    ) -> Result<Fetched, UpstreamError> {
        if matches!(
            self.kind,
            Kind::Http { .. }
                | Kind::S3 {
                    reads: Reads::Anonymous,
                    ..
                }
        ) {
            return Ok(Fetched::NotFound);
        }
        let resp = match method {
            Method::Get => resp,
            // A HEAD answer has no body to say why: ask for one byte to read the error code.
            Method::Head => {
                static FIRST_BYTE: HeaderValue = HeaderValue::from_static("bytes=0-0");
                let target = self.target(Method::Get, key);
                let extra = h1::Extra {
                    range: Some(&FIRST_BYTE),
                    if_match: None,
                };
                let get = self.reader.send(false, &target, extra);
                match tokio::time::timeout(self.first_byte_timeout, get).await {
                    Ok(Ok(r)) if r.status == StatusCode::FORBIDDEN => r,
                    Ok(Ok(r)) if r.status.is_success() || r.status == StatusCode::NOT_FOUND => {
                        return Ok(Fetched::NotFound)
                    }
                    // The follow-up failed: nobody learned that the key is missing.
                    Ok(Ok(r)) => return Err(UpstreamError::Status(r.status)),
                    Ok(Err(e)) => return Err(UpstreamError::Request(e)),
                    Err(_) => return Err(UpstreamError::Timeout(self.first_byte_timeout)),
                }
            }
        };
        let body = resp.text_prefix(8192).await;
        let code = xml_tag(&body, "Code").unwrap_or_default();
        if CREDENTIAL_CODES.contains(&code.as_str()) {
            Err(UpstreamError::Auth(code))
        } else {
            Ok(Fetched::NotFound)
        }
    }

    fn to_object(&self, method: Method, resp: h1::Response) -> Result<Object, UpstreamError> {
        let status = resp.status;
        let headers = &resp.headers;
        let content_length = header_u64(headers, http::header::CONTENT_LENGTH);
        let (len, offset) = match status {
            StatusCode::PARTIAL_CONTENT => {
                let (start, _end, total) = content_range(headers).ok_or_else(|| {
                    UpstreamError::Protocol("206 without a usable Content-Range".into())
                })?;
                // Without the total the responder could not tell a part from the whole.
                let total = total.ok_or_else(|| {
                    UpstreamError::Protocol("206 without the object's length".into())
                })?;
                (Some(total), start)
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let total = headers
                    .get(http::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| {
                        UpstreamError::Protocol("416 without a usable Content-Range".into())
                    })?;
                (Some(total), 0)
            }
            _ => (content_length, 0),
        };
        let meta = Meta {
            len,
            content_type: header_str(headers, http::header::CONTENT_TYPE),
            last_modified: header_str(headers, http::header::LAST_MODIFIED)
                .and_then(|s| httpdate::parse_http_date(&s).ok()),
            etag: header_str(headers, http::header::ETAG),
            source: Source::Miss,
            origin: Some(self.origin.clone()),
            cache_control: header_str(headers, http::header::CACHE_CONTROL),
            content_disposition: header_str(headers, http::header::CONTENT_DISPOSITION),
        };
        let body = if method == Method::Head || status == StatusCode::RANGE_NOT_SATISFIABLE {
            Body::Empty
        } else {
            let stream = resp.into_stream();
            Body::Stream {
                stream: Box::pin(Coalesce::new(Box::pin(stream))),
                offset,
            }
        };
        Ok(Object { meta, body })
    }
}

pub(super) fn header_str(h: &HeaderMap, name: http::header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub(super) fn header_u64(h: &HeaderMap, name: http::header::HeaderName) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
pub(super) fn content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = h.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let v = v.trim().strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (s, e): (u64, u64) = (s.trim().parse().ok()?, e.trim().parse().ok()?);
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    (s <= e).then_some((s, e, total))
}
