//! What went wrong asking an upstream, and the word `/metrics` files it under.

use std::time::Duration;

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// DNS, refused or reset connection, TLS: the request never got an answer.
    #[error("request failed: {0}")]
    Request(String),
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("answered HTTP {0}")]
    Status(StatusCode),
    /// A signed request the bucket rejected: wrong keys, clock skew, wrong region.
    #[error("refused our credentials: {0}")]
    Auth(String),
    #[error("unusable response: {0}")]
    Protocol(String),
    /// The bucket itself does not exist (S3's `NoSuchBucket`): a wrong bucket, endpoint or prefix.
    #[error("NoSuchBucket: the bucket does not exist (check bucket, endpoint, path_style)")]
    NoSuchBucket,
}

impl UpstreamError {
    /// A word for `/metrics` (`mediaproxy_upstream_errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Request(text) if text.contains("dns error") => "dns",
            UpstreamError::Request(text)
                if text.contains("tcp connect error") || text.contains("Connection refused") =>
            {
                "connect"
            }
            UpstreamError::Request(text) if text.contains("timed out") => "timeout",
            UpstreamError::Request(_) => "transfer",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Status(s) if s.is_server_error() => "http_5xx",
            UpstreamError::Status(s) if s.is_client_error() => "http_4xx",
            UpstreamError::Status(_) => "http_other",
            UpstreamError::Auth(_) => "credentials",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::NoSuchBucket => "no_such_bucket",
        }
    }
}
