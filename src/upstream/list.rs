//! Listing an `s3` upstream (ListObjectsV2, signed), for `migrate` and `verify` when no other key source
//! is given: one page per call, so a caller holds one page (at most 1,000 keys) at a time.

use rusty_s3::actions::ListObjectsV2;
use rusty_s3::S3Action;

use super::write::{refused, write_timeout};
use super::{Upstream, WriteError};

/// One page of a listing, keys with this upstream's `prefix` removed.
pub struct Page {
    pub objects: Vec<Listed>,
    /// Ask again with this to get the next page; `None` on the last one.
    pub next: Option<String>,
}

pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: String,
}

impl Upstream {
    /// The page after `start_after` (a key, for a resumed run) or `token` (the previous page's `next`),
    /// of the keys under `prefix` (a key prefix, below this upstream's own `prefix`).
    pub async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        token: Option<&str>,
    ) -> Result<Page, WriteError> {
        let (bucket, creds) = self.s3()?;
        let mut action = bucket.list_objects_v2(creds);
        let full_prefix = self.object_prefix(prefix);
        if !full_prefix.is_empty() {
            action.with_prefix(full_prefix.clone());
        }
        if let Some(t) = token {
            action.with_continuation_token(t.to_string());
        } else if let Some(after) = start_after {
            action.with_start_after(self.object_prefix(after));
        }
        action.with_max_keys(1000);
        let url = action.sign(super::SIGN_TTL);
        let resp = self.send(self.client.get(url), write_timeout(0)).await?;
        if !resp.status().is_success() {
            return Err(refused(resp.status(), resp).await);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| WriteError::Transport(super::error_chain(&e)))?;
        let parsed = ListObjectsV2::parse_response(&body).map_err(|e| WriteError::Refused {
            status: 200,
            code: format!("unreadable listing: {e}"),
        })?;
        let own = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let objects = parsed
            .contents
            .into_iter()
            .filter_map(|c| {
                Some(Listed {
                    key: c.key.strip_prefix(own.as_str())?.to_string(),
                    size: c.size,
                    etag: c.etag,
                })
            })
            .collect();
        Ok(Page {
            objects,
            next: parsed.next_continuation_token.filter(|t| !t.is_empty()),
        })
    }

    /// `prefix` (part of a key) as an object name in the bucket.
    fn object_prefix(&self, prefix: &str) -> String {
        if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        }
    }
}
