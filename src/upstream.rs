//! One upstream bucket: a public HTTP base URL or an S3 bucket reached with SigV4-signed requests.
//!
//! An upstream answers one question per call — "do you have this key?" — as `Found`, `NotFound` or an
//! error. Which upstream to ask next, and what to make of a failure, is `resolve`'s business.
//! Host names are resolved per connection by the HTTP client, never at start-up, so a proxy booted
//! before DNS works still serves local files (the nginx `proxy_pass` boot failure admins hit).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rusty_s3::{Bucket, BucketError, Credentials, S3Action, UrlStyle};
use url::Url;

use crate::config::{Reads, UpstreamConfig, UpstreamKind};
use crate::key::Key;
use crate::object::{Body, Meta, Object, Source};

mod coalesce;
mod error;
mod h1;
mod list;
mod multipart;
mod probe;
mod write;
use coalesce::Coalesce;
pub use error::UpstreamError;
pub use list::{Listed, Page};
pub use probe::{Probed, CREDENTIAL_CODES};
pub use write::{Head, Put, PutRequest, WriteError};

/// The builder every HTTP client of ours starts from. reqwest comes without a crypto provider of its
/// own (no aws-lc-rs): install *ring* as the process default first (a no-op once done), as the server's
/// TLS uses it. Trusted roots are the bundled Mozilla set, never the host's store, so a bucket's
/// certificate is judged the same on every machine.
pub fn http_client() -> reqwest::ClientBuilder {
    static ROOTS: LazyLock<Vec<reqwest::Certificate>> = LazyLock::new(|| {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter_map(|der| reqwest::Certificate::from_der(der).ok())
            .collect()
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().tls_certs_only(ROOTS.iter().cloned())
}

/// The bucket at the URLs rusty-s3 0.8 gave it, which configs were written against. The endpoint's
/// path is a base the bucket resolves against, so a last segment without a trailing `/` is dropped
/// (0.11 keeps it whole); a virtual-host bucket's name is lowercased, as any host is (0.11 refuses
/// one with capitals).
fn s3_bucket(
    endpoint: &Url,
    name: &str,
    region: &str,
    path_style: bool,
) -> Result<Bucket, BucketError> {
    let endpoint = endpoint.join("./").unwrap_or_else(|_| endpoint.clone());
    let (style, name) = if path_style {
        (UrlStyle::Path, name.to_string())
    } else {
        (UrlStyle::VirtualHost, name.to_ascii_lowercase())
    };
    Bucket::new(endpoint, style, name, region.to_string())
}

/// How long a presigned URL stays valid: only long enough to be used at once.
const SIGN_TTL: Duration = Duration::from_secs(300);

/// Everything but RFC 3986 unreserved characters and `/` is escaped in a key on the wire.
const KEY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

pub enum Fetched {
    Found(Object),
    NotFound,
}

pub struct Upstream {
    pub name: String,
    /// Which bucket this is, whatever its name: `s3 ENDPOINT BUCKET/PREFIX` or `http URL/PREFIX`.
    /// Cache entries remember it, so a bucket switch that renames upstreams still knows where an
    /// entry came from.
    pub origin: Arc<str>,
    /// Canned ACL for copies written here.
    pub acl: Option<String>,
    kind: Kind,
    prefix: String,
    /// Reads objects (GET, HEAD): see `h1` for why not reqwest.
    reader: Arc<h1::Client>,
    /// Writes, listings, probes.
    client: reqwest::Client,
    first_byte_timeout: Duration,
}

enum Kind {
    Http {
        base: Url,
    },
    S3 {
        bucket: Bucket,
        credentials: Option<Credentials>,
        reads: Reads,
    },
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let client = http_client()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            // Environment proxies are for people, not for a service talking to its own buckets.
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("mediaproxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpstreamError::Request(error_chain(&e)))?;
        let kind = match &cfg.kind {
            UpstreamKind::Http { url } => {
                let mut base = url.clone();
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                Kind::Http { base }
            }
            UpstreamKind::S3 {
                endpoint,
                bucket,
                region,
                path_style,
                credentials,
                reads,
            } => {
                let bucket = s3_bucket(endpoint, bucket, region, *path_style)
                    .map_err(|e| UpstreamError::Protocol(format!("bucket: {e}")))?;
                let credentials = credentials
                    .as_ref()
                    .map(|(id, secret)| Credentials::new(id.clone(), secret.expose().to_string()));
                Kind::S3 {
                    bucket,
                    credentials,
                    reads: *reads,
                }
            }
        };
        let base = match &kind {
            Kind::Http { base } => base,
            Kind::S3 { bucket, .. } => bucket.base_url(),
        };
        let reader = h1::Client::new(base, cfg.connect_timeout, cfg.read_timeout)
            .map_err(UpstreamError::Protocol)?;
        Ok(Upstream {
            reader: Arc::new(reader),
            origin: origin(cfg).into(),
            acl: cfg.acl.clone(),
            name: cfg.name.clone(),
            kind,
            prefix: cfg.prefix.clone(),
            client,
            first_byte_timeout: cfg.first_byte_timeout,
        })
    }

    fn object_name(&self, key: &Key) -> String {
        if self.prefix.is_empty() {
            key.as_str().to_string()
        } else {
            format!("{}/{}", self.prefix, key.as_str())
        }
    }

    /// The URL to ask, signed when the bucket needs it. Never log it: it carries the signature.
    fn url(&self, method: Method, key: &Key) -> Url {
        let object = self.object_name(key);
        match &self.kind {
            Kind::Http { base } => {
                let path = utf8_percent_encode(&object, KEY_ESCAPE).to_string();
                base.join(&path).unwrap_or_else(|_| base.clone())
            }
            Kind::S3 {
                bucket,
                credentials,
                reads,
            } => {
                // Unsigned, the bucket answers as it would a browser: private objects stay private.
                let credentials = match reads {
                    Reads::Signed => credentials.as_ref(),
                    Reads::Anonymous => None,
                };
                match method {
                    Method::Get => bucket.get_object(credentials, &object).sign(SIGN_TTL),
                    Method::Head => bucket.head_object(credentials, &object).sign(SIGN_TTL),
                }
            }
        }
    }

    /// What a read asks for: the path and query of [`Self::url`], built without parsing a URL for a
    /// plain bucket (a miss is mostly this request; parsing was ~1 % of its CPU). Never log it.
    fn target(&self, method: Method, key: &Key) -> String {
        match &self.kind {
            Kind::Http { base } => {
                let object = self.object_name(key);
                let mut target = String::with_capacity(base.path().len() + object.len() + 16);
                target.push_str(base.path());
                target.extend(utf8_percent_encode(&object, KEY_ESCAPE));
                target
            }
            Kind::S3 { .. } => {
                let url = self.url(method, key);
                url[url::Position::BeforePath..url::Position::AfterQuery].to_string()
            }
        }
    }

    /// The host and port a connection goes to, for `check`.
    pub fn authority(&self) -> (String, u16) {
        let url = match &self.kind {
            Kind::Http { base } => base.clone(),
            Kind::S3 { bucket, .. } => bucket.base_url().clone(),
        };
        (
            url.host_str().unwrap_or_default().to_string(),
            url.port_or_known_default().unwrap_or(80),
        )
    }

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

fn origin(cfg: &UpstreamConfig) -> String {
    match &cfg.kind {
        UpstreamKind::Http { url } => {
            format!("http {}/{}", url.as_str().trim_end_matches('/'), cfg.prefix)
        }
        UpstreamKind::S3 {
            endpoint, bucket, ..
        } => format!(
            "s3 {} {bucket}/{}",
            endpoint.as_str().trim_end_matches('/'),
            cfg.prefix
        ),
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// reqwest's Display hides the cause, and its URL would carry the signature: give the chain, no URL.
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    if parts.is_empty() {
        let what = if e.is_connect() {
            "connection failed"
        } else if e.is_body() {
            "body transfer failed"
        } else {
            "request failed"
        };
        parts.push(what.to_string());
    }
    parts.join(": ")
}

async fn read_prefix(mut resp: reqwest::Response, max: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < max {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn xml_tag(body: &str, tag: &str) -> Option<String> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(body[start..end].to_string())
}

fn header_str(h: &HeaderMap, name: http::header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn header_u64(h: &HeaderMap, name: http::header::HeaderName) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
fn content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
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

#[cfg(test)]
mod tests;
