//! s3s-fs keeps no ACLs; Mastodon relies on them (`S3_PERMISSION`, suspension making media private). This
//! thin wrapper remembers each object's canned ACL (from `x-amz-acl` on PutObject, or PutObjectAcl) and
//! answers anonymous GET/HEAD of an object that is not `public-read` with 403 AccessDenied, as S3 does.
//! Signed requests pass straight through to s3s-fs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use s3s::access::{S3Access, S3AccessContext};
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

pub type Acls = Arc<Mutex<HashMap<(String, String), String>>>;

pub struct AclFs {
    pub fs: s3s_fs::FileSystem,
    /// s3s-fs's root: a bucket is a directory in it.
    pub root: std::path::PathBuf,
    pub acls: Acls,
    /// Behave like the many S3-compatible providers that ignore `If-None-Match` on PutObject.
    pub ignore_if_none_match: Arc<AtomicBool>,
    /// Answer PUTs with 403 AccessDenied: an access key allowed to read only.
    pub read_only: Arc<AtomicBool>,
    /// An access key without `s3:ListBucket`: HeadBucket answers 403, and so does a signed GET of a
    /// missing key (AccessDenied, not NoSuchKey), as S3 does.
    pub no_list: Arc<AtomicBool>,
    /// An access key without `s3:GetObject`: signed GET/HEAD of objects answer 403 AccessDenied.
    pub no_reads: Arc<AtomicBool>,
    /// Multipart uploads created and neither completed nor aborted (s3s-fs has no
    /// ListMultipartUploads): what a bucket would keep, and bill, forever.
    pub open_uploads: Arc<Mutex<std::collections::HashSet<String>>>,
    /// A pause before each UploadPart: a slow uplink, so a test can kill a copy mid-upload.
    pub part_delay: Arc<Mutex<std::time::Duration>>,
    /// When N > 0, every N-th GetObject answers 503 SlowDown (a provider rate-limiting).
    pub slow_down_every: Arc<std::sync::atomic::AtomicUsize>,
    pub gets: Arc<std::sync::atomic::AtomicUsize>,
}

impl AclFs {
    /// The 403 a signed read gets from a key missing a permission, if it does.
    fn refused_read(&self, bucket: &str, key: &str, signed: bool) -> Option<s3s::S3Error> {
        if !signed {
            return None;
        }
        if self.no_reads.load(Ordering::SeqCst) {
            return Some(s3_error!(AccessDenied));
        }
        let missing = !self.root.join(bucket).join(key).is_file();
        (self.no_list.load(Ordering::SeqCst) && missing).then(|| s3_error!(AccessDenied))
    }

    fn public(&self, bucket: &str, key: &str) -> bool {
        self.acls
            .lock()
            .unwrap()
            .get(&(bucket.to_string(), key.to_string()))
            .is_some_and(|a| a == ObjectCannedACL::PUBLIC_READ)
    }

    fn record(&self, bucket: &str, key: &str, acl: Option<&ObjectCannedACL>) {
        let acl = acl.map_or(ObjectCannedACL::PRIVATE, |a| a.as_str());
        self.acls
            .lock()
            .unwrap()
            .insert((bucket.to_string(), key.to_string()), acl.to_string());
    }
}

/// Lets anonymous GET/HEAD through to [`AclFs`], which decides by ACL; everything else must be signed.
pub struct AnonymousReads;

#[async_trait::async_trait]
impl S3Access for AnonymousReads {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let op = cx.s3_op().name();
        if cx.credentials().is_some() || op == "GetObject" || op == "HeadObject" {
            Ok(())
        } else {
            Err(s3_error!(AccessDenied, "Signature is required"))
        }
    }
}

#[async_trait::async_trait]
impl S3 for AclFs {
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        // s3s-fs answers NoSuchKey for a missing bucket too; S3 says NoSuchBucket.
        if !self.root.join(&req.input.bucket).is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        let every = self.slow_down_every.load(Ordering::SeqCst);
        let n = self.gets.fetch_add(1, Ordering::SeqCst) + 1;
        if every > 0 && n.is_multiple_of(every) {
            return Err(s3_error!(SlowDown));
        }
        if req.credentials.is_none() && !self.public(&req.input.bucket, &req.input.key) {
            return Err(s3_error!(AccessDenied));
        }
        if let Some(e) =
            self.refused_read(&req.input.bucket, &req.input.key, req.credentials.is_some())
        {
            return Err(e);
        }
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        if req.credentials.is_none() && !self.public(&req.input.bucket, &req.input.key) {
            return Err(s3_error!(AccessDenied));
        }
        if let Some(e) =
            self.refused_read(&req.input.bucket, &req.input.key, req.credentials.is_some())
        {
            return Err(e);
        }
        self.fs.head_object(req).await
    }

    async fn put_object(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        if self.read_only.load(Ordering::SeqCst) {
            return Err(s3_error!(AccessDenied));
        }
        unsigned_amz_headers(&req)?;
        if self.ignore_if_none_match.load(Ordering::SeqCst) {
            req.input.if_none_match = None;
        }
        let (bucket, key, acl) = (
            req.input.bucket.clone(),
            req.input.key.clone(),
            req.input.acl.clone(),
        );
        let out = self.fs.put_object(req).await?;
        self.record(&bucket, &key, acl.as_ref());
        Ok(out)
    }

    async fn put_object_acl(
        &self,
        req: S3Request<PutObjectAclInput>,
    ) -> S3Result<S3Response<PutObjectAclOutput>> {
        self.record(&req.input.bucket, &req.input.key, req.input.acl.as_ref());
        Ok(S3Response::new(PutObjectAclOutput::default()))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.fs.delete_objects(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        if self.no_list.load(Ordering::SeqCst) {
            return Err(s3_error!(AccessDenied));
        }
        self.fs.head_bucket(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        if self.read_only.load(Ordering::SeqCst) {
            return Err(s3_error!(AccessDenied));
        }
        let (bucket, key, acl) = (
            req.input.bucket.clone(),
            req.input.key.clone(),
            req.input.acl.clone(),
        );
        let out = self.fs.create_multipart_upload(req).await?;
        if let Some(id) = &out.output.upload_id {
            self.open_uploads.lock().unwrap().insert(id.clone());
        }
        self.record(&bucket, &key, acl.as_ref());
        Ok(out)
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let delay = *self.part_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.fs.upload_part(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.fs.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let id = req.input.upload_id.clone();
        let out = self.fs.complete_multipart_upload(req).await?;
        self.open_uploads.lock().unwrap().remove(&id);
        Ok(out)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let id = req.input.upload_id.clone();
        let out = self.fs.abort_multipart_upload(req).await?;
        self.open_uploads.lock().unwrap().remove(&id);
        Ok(out)
    }
}

/// AWS refuses a request whose `x-amz-*` headers are not all signed (`HeadersNotSigned`); s3s-fs does
/// not check, so this does (presigned requests list what they signed in `X-Amz-SignedHeaders`).
fn unsigned_amz_headers<T>(req: &S3Request<T>) -> S3Result<()> {
    let query = req.uri.query().unwrap_or("");
    let signed = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("X-Amz-SignedHeaders="))
        .map(|v| v.replace("%3B", ";").to_ascii_lowercase())
        .or_else(|| {
            let auth = req.headers.get("authorization")?.to_str().ok()?;
            let list = auth.split("SignedHeaders=").nth(1)?.split(',').next()?;
            Some(list.to_ascii_lowercase())
        })
        .unwrap_or_default();
    let signed: Vec<&str> = signed.split(';').collect();
    for name in req.headers.keys() {
        let name = name.as_str();
        let exempt = ["x-amz-content-sha256", "x-amz-date", "x-amz-security-token"];
        if name.starts_with("x-amz-") && !exempt.contains(&name) && !signed.contains(&name) {
            return Err(s3_error!(AccessDenied, "HeadersNotSigned: {name}"));
        }
    }
    Ok(())
}
