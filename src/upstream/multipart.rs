//! Multipart uploads, for copies of large objects: create, upload parts (each with its own
//! `Content-MD5`), complete with `If-None-Match: *` (so a multipart copy never overwrites either), or
//! abort. S3 keeps the parts of an upload nobody completes or aborts (and bills them), so the caller
//! journals upload ids and aborts what a crash left open.

use http::StatusCode;
use rusty_s3::S3Action;

use super::write::{refused, write_timeout};
use super::{read_prefix, xml_tag, Put, PutRequest, Upstream, WriteError};
use crate::key::Key;

impl Upstream {
    /// Starts an upload that will hold what `req` describes (type, cache headers, ACL).
    pub async fn create_multipart(&self, req: &PutRequest<'_>) -> Result<String, WriteError> {
        let (bucket, creds) = self.s3()?;
        let object = self.object_name(req.key);
        let mut action = bucket.create_multipart_upload(creds, &object);
        let headers = req.stored_headers();
        for (name, value) in &headers {
            action.headers_mut().insert(*name, value.clone());
        }
        let mut post = self.client.post(action.sign(super::SIGN_TTL));
        for (name, value) in headers {
            post = post.header(name, value);
        }
        let resp = self.send(post, write_timeout(0)).await?;
        if !resp.status().is_success() {
            return Err(refused(resp.status(), resp).await);
        }
        let body = read_prefix(resp, 64 * 1024).await;
        xml_tag(&body, "UploadId")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| WriteError::Refused {
                status: 200,
                code: "no UploadId in the answer".into(),
            })
    }

    /// Uploads part `number` (1-based); returns its ETag for the completion.
    pub async fn upload_part(
        &self,
        key: &Key,
        upload_id: &str,
        number: u16,
        len: u64,
        md5: [u8; 16],
        body: reqwest::Body,
    ) -> Result<String, WriteError> {
        use base64::Engine;
        let (bucket, creds) = self.s3()?;
        let object = self.object_name(key);
        let mut action = bucket.upload_part(creds, &object, number, upload_id);
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5);
        action.headers_mut().insert("content-md5", md5.clone());
        let put = self
            .client
            .put(action.sign(super::SIGN_TTL))
            .header(http::header::CONTENT_LENGTH, len)
            .header("content-md5", md5)
            .body(body);
        let resp = self.send(put, write_timeout(len)).await?;
        if !resp.status().is_success() {
            return Err(refused(resp.status(), resp).await);
        }
        resp.headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| WriteError::Refused {
                status: 200,
                code: "no ETag for an uploaded part".into(),
            })
    }

    /// Completes the upload unless the key exists by then (`If-None-Match: *`: 412 → `AlreadyThere`,
    /// and the caller aborts the upload).
    pub async fn complete_multipart(
        &self,
        key: &Key,
        upload_id: &str,
        etags: &[String],
    ) -> Result<Put, WriteError> {
        let (bucket, creds) = self.s3()?;
        let object = self.object_name(key);
        let mut action = bucket.complete_multipart_upload(
            creds,
            &object,
            upload_id,
            etags.iter().map(String::as_str),
        );
        action.headers_mut().insert("if-none-match", "*");
        let url = action.sign(super::SIGN_TTL);
        let body = action.body();
        let post = self
            .client
            .post(url)
            .header("if-none-match", "*")
            .body(body);
        let resp = self.send(post, write_timeout(0)).await?;
        match resp.status() {
            StatusCode::PRECONDITION_FAILED => Ok(Put::AlreadyThere),
            s if s.is_success() => {
                // S3 may answer 200 and still report an error in the body.
                let body = read_prefix(resp, 64 * 1024).await;
                match xml_tag(&body, "Code") {
                    Some(code) if body.contains("<Error>") => {
                        Err(WriteError::Refused { status: 200, code })
                    }
                    _ => Ok(Put::Created(None)),
                }
            }
            s => Err(refused(s, resp).await),
        }
    }

    pub async fn abort_multipart(&self, key: &Key, upload_id: &str) -> Result<(), WriteError> {
        let (bucket, creds) = self.s3()?;
        let object = self.object_name(key);
        let url = bucket
            .abort_multipart_upload(creds, &object, upload_id)
            .sign(super::SIGN_TTL);
        let resp = self.send(self.client.delete(url), write_timeout(0)).await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(refused(s, resp).await),
        }
    }
}
