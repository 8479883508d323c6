//! Listing an `s3` upstream (ListObjectsV2, signed), for `migrate` and `verify` when no other key source
//! is given: one page per call, so a caller holds one page (at most 1,000 keys) at a time.

use rusty_s3::S3Action;

use super::write::{refused, write_timeout};
use super::{xml_tag, Upstream, WriteError};

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
            .text()
            .await
            .map_err(|e| WriteError::Transport(super::error_chain(&e)))?;
        let own = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        // Read leniently, by tag: servers differ in what they include (s3s-fs sends no ETag).
        let mut objects = Vec::new();
        for part in body.split("<Contents>").skip(1) {
            let part = part.split("</Contents>").next().unwrap_or(part);
            let (Some(name), Some(size)) = (xml_tag(part, "Key"), xml_tag(part, "Size")) else {
                return Err(WriteError::Refused {
                    status: 200,
                    code: "unreadable listing (an entry without Key or Size)".into(),
                });
            };
            let Some(key) = unescape(&name)
                .strip_prefix(own.as_str())
                .map(str::to_string)
            else {
                continue;
            };
            objects.push(Listed {
                key,
                size: size.trim().parse().unwrap_or(0),
                etag: xml_tag(part, "ETag")
                    .map(|e| unescape(&e))
                    .unwrap_or_default(),
            });
        }
        let truncated = xml_tag(&body, "IsTruncated").is_some_and(|t| t.trim() == "true");
        let next = xml_tag(&body, "NextContinuationToken")
            .map(|t| unescape(&t))
            .filter(|t| truncated && !t.is_empty());
        if truncated && next.is_none() {
            // A server that speaks only ListObjects V1: stopping here would look like the end.
            return Err(WriteError::Refused {
                status: 200,
                code:
                    "a truncated listing without a continuation token (ListObjectsV2 unsupported?)"
                        .into(),
            });
        }
        Ok(Page { objects, next })
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

/// XML's five entities and numeric references, as S3 escapes keys in a listing.
fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find(';') else {
            break;
        };
        let entity = &rest[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescape_entities() {
        assert_eq!(
            super::unescape("a&amp;b&lt;&#233;&#x41;&bogus;"),
            "a&b<éA&bogus;"
        );
    }
}
