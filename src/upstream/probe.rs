//! What `check` asks a bucket, raw: the status and S3 error code of a HeadBucket and of a one-byte GET
//! of a probe key. The proxy itself folds these into found, not found or failed; `check` needs the
//! codes to tell an admin which of a wrong key, a wrong bucket and a missing permission it is.

use http::StatusCode;

use rusty_s3::S3Action;

use super::write::{write_timeout, WriteError};
use super::{read_prefix, xml_tag, Kind, Method, Upstream};
use crate::config::Reads;
use crate::key::Key;

/// The S3 error codes that mean the credentials themselves were refused (not a missing object or a
/// missing permission): the proxy treats them as a failing upstream, `check` as a failed probe.
pub const CREDENTIAL_CODES: &[&str] = &[
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "NotSignedUp",
    "AccountProblem",
    "InvalidSecurity",
    "RequestTimeTooSkewed",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "AuthorizationQueryParametersError",
];

pub struct Probed {
    pub status: StatusCode,
    /// The S3 error code of an error answer, when its body has one.
    pub code: Option<String>,
}

impl Upstream {
    /// HeadBucket, signed when the upstream has credentials; `None` for an `http` upstream (no bucket
    /// to ask). A HEAD answer has no body: 404 is a missing bucket, 403 a refusal whose reason the
    /// probe GET tells.
    pub async fn head_bucket(&self) -> Result<Option<StatusCode>, WriteError> {
        let Kind::S3 {
            bucket,
            credentials,
            ..
        } = &self.kind
        else {
            return Ok(None);
        };
        let url = bucket
            .head_bucket(credentials.as_ref())
            .sign(super::SIGN_TTL);
        let resp = self.send(self.client.head(url), write_timeout(0)).await?;
        Ok(Some(resp.status()))
    }

    /// Whether reads are signed (an `s3` upstream with credentials and `reads = "signed"`).
    pub fn reads_signed(&self) -> bool {
        matches!(
            &self.kind,
            Kind::S3 {
                credentials: Some(_),
                reads: Reads::Signed,
                ..
            }
        )
    }

    /// The first byte of `key`, asked exactly as the proxy asks (signed or not).
    pub async fn probe_get(&self, key: &Key) -> Result<Probed, WriteError> {
        let req = self
            .client
            .get(self.url(Method::Get, key))
            .header(http::header::RANGE, "bytes=0-0");
        let resp = self.send(req, write_timeout(0)).await?;
        let status = resp.status();
        let code = if status.is_client_error() || status.is_server_error() {
            xml_tag(&read_prefix(resp, 8192).await, "Code")
        } else {
            None
        };
        Ok(Probed { status, code })
    }
}
