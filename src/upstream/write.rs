//! Writes to an `s3` upstream, for copies: a conditional PUT that never overwrites, the signed HEAD that
//! decides whether a copy is needed and verifies one, and the DELETE of `check`'s probe object.
//!
//! Every header the bucket should honour is signed (AWS refuses an unsigned `x-amz-acl`, and an unsigned
//! `Content-Type` fails the signature): rusty-s3 presigns with the headers it is given.

use std::time::Duration;

use http::StatusCode;
use rusty_s3::S3Action;

use super::{error_chain, header_str, header_u64, read_prefix, xml_tag, Kind, Upstream};
use crate::key::Key;

/// What a PUT is asked to store, besides the body.
pub struct PutRequest<'a> {
    pub key: &'a Key,
    pub len: u64,
    pub md5: [u8; 16],
    pub content_type: Option<&'a str>,
    pub cache_control: Option<&'a str>,
    pub content_disposition: Option<&'a str>,
    /// A canned ACL (`x-amz-acl`), e.g. Mastodon's `S3_PERMISSION`.
    pub acl: Option<&'a str>,
}

impl PutRequest<'_> {
    /// The headers the bucket stores with the object (all signed).
    pub(super) fn stored_headers(&self) -> Vec<(&'static str, String)> {
        [
            ("content-type", self.content_type),
            ("cache-control", self.cache_control),
            ("content-disposition", self.content_disposition),
            ("x-amz-acl", self.acl),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v.to_string())))
        .collect()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    /// With the ETag the bucket answered (for a single PUT, the MD5 of what it stored).
    Created(Option<String>),
    /// `If-None-Match: *` failed: the key exists (another proxy or `migrate` got there first).
    AlreadyThere,
}

/// What the target says about a key (signed, whatever `reads` is: a copy must see private objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub len: u64,
    pub etag: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("only type = \"s3\" upstreams can be written to")]
    NotWritable,
    /// No answer: DNS, refused or reset connection, TLS, a timeout.
    #[error("request failed: {0}")]
    Transport(String),
    /// The bucket answered with an error; `code` is S3's error code when it sent one.
    #[error("HTTP {status} {code}")]
    Refused { status: u16, code: String },
}

impl WriteError {
    /// Worth trying again later: the bucket is down, slow, rate-limiting, or raced another writer.
    /// (`BadDigest`, the body damaged on the way, is retried once at once by the copy itself.)
    pub fn retryable(&self) -> bool {
        match self {
            WriteError::NotWritable => false,
            WriteError::Transport(_) => true,
            WriteError::Refused { status, code } => {
                *status >= 500
                    || *status == 429
                    || *status == 408
                    || code == "SlowDown"
                    || code == "ConditionalRequestConflict"
                    || code == "RequestTimeout"
            }
        }
    }

    pub fn code(&self) -> &str {
        match self {
            WriteError::Refused { code, .. } if !code.is_empty() => code,
            WriteError::Refused { .. } => "HTTP error",
            WriteError::Transport(_) => "unreachable",
            WriteError::NotWritable => "not writable",
        }
    }
}

/// How long a write may take: a minute, plus a second per 256 KiB of body (a slow uplink still finishes).
pub(super) fn write_timeout(len: u64) -> Duration {
    Duration::from_secs(60 + len / (256 * 1024))
}

impl Upstream {
    pub(super) fn s3(
        &self,
    ) -> Result<(&rusty_s3::Bucket, Option<&rusty_s3::Credentials>), WriteError> {
        match &self.kind {
            Kind::S3 {
                bucket,
                credentials,
                ..
            } => Ok((bucket, credentials.as_ref())),
            Kind::Http { .. } => Err(WriteError::NotWritable),
        }
    }

    /// Signed HEAD: `None` when the bucket does not have the key.
    pub async fn head_signed(&self, key: &Key) -> Result<Option<Head>, WriteError> {
        let (bucket, creds) = self.s3()?;
        let url = bucket
            .head_object(creds, &self.object_name(key))
            .sign(super::SIGN_TTL);
        let resp = self.send(self.client.head(url), write_timeout(0)).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(Head {
                len: header_u64(resp.headers(), http::header::CONTENT_LENGTH).unwrap_or(0),
                etag: header_str(resp.headers(), http::header::ETAG),
            })),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(WriteError::Refused {
                status: s.as_u16(),
                code: String::new(),
            }),
        }
    }

    /// PUT with `If-None-Match: *`: a key that exists is never overwritten (412 → `AlreadyThere`), and
    /// `Content-MD5` makes the bucket refuse a body damaged on the way.
    pub async fn put(&self, req: &PutRequest<'_>, body: reqwest::Body) -> Result<Put, WriteError> {
        use base64::Engine;
        let (bucket, creds) = self.s3()?;
        let object = self.object_name(req.key);
        let mut action = bucket.put_object(creds, &object);
        let md5 = base64::engine::general_purpose::STANDARD.encode(req.md5);
        let mut headers: Vec<(&str, String)> =
            vec![("content-md5", md5), ("if-none-match", "*".to_string())];
        headers.extend(req.stored_headers());
        for (name, value) in &headers {
            action.headers_mut().insert(*name, value.clone());
        }
        let url = action.sign(super::SIGN_TTL);
        let mut put = self
            .client
            .put(url)
            .header(http::header::CONTENT_LENGTH, req.len);
        for (name, value) in headers {
            put = put.header(name, value);
        }
        let resp = self.send(put.body(body), write_timeout(req.len)).await?;
        match resp.status() {
            s if s.is_success() => Ok(Put::Created(header_str(resp.headers(), http::header::ETAG))),
            StatusCode::PRECONDITION_FAILED => Ok(Put::AlreadyThere),
            s => Err(refused(s, resp).await),
        }
    }

    /// Deletes `key` (only `check`'s own probe object).
    pub async fn delete(&self, key: &Key) -> Result<(), WriteError> {
        let (bucket, creds) = self.s3()?;
        let url = bucket
            .delete_object(creds, &self.object_name(key))
            .sign(super::SIGN_TTL);
        let resp = self.send(self.client.delete(url), write_timeout(0)).await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(refused(s, resp).await),
        }
    }

    pub(super) async fn send(
        &self,
        req: reqwest::RequestBuilder,
        within: Duration,
    ) -> Result<reqwest::Response, WriteError> {
        match tokio::time::timeout(within, req.send()).await {
            Err(_) => Err(WriteError::Transport(format!(
                "no answer within {within:?}"
            ))),
            Ok(Err(e)) => Err(WriteError::Transport(error_chain(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

pub(super) async fn refused(status: StatusCode, resp: reqwest::Response) -> WriteError {
    let body = read_prefix(resp, 8192).await;
    WriteError::Refused {
        status: status.as_u16(),
        code: xml_tag(&body, "Code").unwrap_or_default(),
    }
}
