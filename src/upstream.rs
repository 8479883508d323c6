//! One upstream bucket: a public HTTP base URL or an S3 bucket reached with SigV4-signed requests.
//!
//! An upstream answers one question per call — "do you have this key?" — as `Found`, `NotFound` or an
//! error. Which upstream to ask next, and what to make of a failure, is `resolve`'s business.
//! Host names are resolved per connection by the HTTP client, never at start-up, so a proxy booted
//! before DNS works still serves local files (the nginx `proxy_pass` boot failure admins hit).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rusty_s3::{Bucket, BucketError, Credentials, S3Action, UrlStyle};
use url::Url;

use crate::config::{Reads, UpstreamConfig, UpstreamKind};
use crate::key::Key;
use crate::object::Object;

mod coalesce;
mod error;
mod h1;
mod list;
mod multipart;
mod probe;
mod read;
mod write;
pub use error::UpstreamError;
pub use list::{Listed, Page};
pub use probe::{Probed, CREDENTIAL_CODES};
use read::{header_str, header_u64};
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

#[cfg(test)]
mod tests;
