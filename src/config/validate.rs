//! Semantic checks the TOML parser cannot make (required keys per upstream type, URLs, secrets,
//! prefixes), each error naming the key as an admin would write it: `upstream[2].bucket`.

use std::path::Path;

use url::Url;

use super::file::{FileCopy, FileServer, FileUpstream};
use super::{
    CacheBuster, ConfigError, Copy, Reads, Secret, Server, Tls, UpstreamConfig, UpstreamKind,
};

pub(super) fn validate_server(s: FileServer, base: &Path) -> Result<Server, ConfigError> {
    if s.listen.is_empty() {
        return Err(ConfigError::invalid(
            "server.listen",
            None,
            "at least one address is needed",
        ));
    }
    let p = &s.path_prefix;
    if !p.is_empty()
        && (!p.starts_with('/') || p.ends_with('/') || p.contains("//") || p.contains(".."))
    {
        return Err(ConfigError::invalid(
            "server.path_prefix",
            None,
            format!(
                "{p:?} must be empty or look like \"/storage\" (leading slash, no trailing slash)"
            ),
        ));
    }
    let allow_prefixes = allow_prefixes(&s.allow_prefixes)?;
    let cache_buster = match (s.cache_buster_header, s.cache_buster_secret_file) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "server.cache_buster_secret_file",
                None,
                "is required with cache_buster_header (the file holding Mastodon's CACHE_BUSTER_SECRET)",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "server.cache_buster_header",
                None,
                "is required with cache_buster_secret_file (Mastodon's CACHE_BUSTER_SECRET_HEADER)",
            ))
        }
        (Some(header), Some(file)) => {
            let header = http::HeaderName::from_bytes(header.trim().as_bytes()).map_err(|_| {
                ConfigError::invalid(
                    "server.cache_buster_header",
                    None,
                    format!("{header:?} is not a valid HTTP header name"),
                )
            })?;
            let secret = read_secret("server.cache_buster_secret_file", base, &file)?;
            Some(CacheBuster { header, secret })
        }
    };
    Ok(Server {
        allow_prefixes,
        cache_buster,
        listen: s.listen,
        path_prefix: s.path_prefix,
        admin_listen: s.admin_listen,
        // Like secret files: read with the config, so relative to it (an absolute path stays as it is).
        tls: s.tls.map(|t| Tls {
            cert: base.join(t.cert),
            key: base.join(t.key),
        }),
        header_read_timeout: s.header_read_timeout.0,
        send_timeout: s.send_timeout.0,
        shutdown_timeout: s.shutdown_timeout.0,
        access_log: s.access_log,
    })
}

/// `"media_attachments"` and `"/media_attachments/"` both mean the directory; `"/"` alone allows every
/// key (for servers other than Mastodon).
fn allow_prefixes(raw: &[String]) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "server.allow_prefixes";
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            KEY,
            None,
            "an empty list would refuse every key; remove the line for Mastodon's prefixes, or write [\"/\"] to serve every key",
        ));
    }
    raw.iter()
        .map(|p| {
            let trimmed = p.trim().trim_start_matches('/');
            if p.trim().is_empty() {
                return Err(ConfigError::invalid(
                    KEY,
                    None,
                    "an empty prefix; write \"/\" to serve every key",
                ));
            }
            if trimmed.is_empty() {
                return Ok(String::new());
            }
            let dir = trimmed.trim_end_matches('/');
            if dir
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
            {
                return Err(ConfigError::invalid(
                    KEY,
                    None,
                    format!("{p:?} is not a key prefix like \"media_attachments/\""),
                ));
            }
            Ok(format!("{dir}/"))
        })
        .collect()
}

/// Secret files are read relative to the config file, with surrounding whitespace stripped.
fn read_secret(key: &str, base: &Path, file: &Path) -> Result<Secret, ConfigError> {
    let path = base.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::invalid(key, None, format!("cannot read {}: {e}", path.display()))
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o007 != 0) {
            tracing::warn!(
                key,
                path = %path.display(),
                "the secret file is readable by every user: chmod 0600 (or 0640, group of the service user)"
            );
        }
    }
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(ConfigError::invalid(
            key,
            None,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret(secret))
}

pub(super) fn validate_upstream(
    n: usize,
    u: FileUpstream,
    base: &Path,
) -> Result<UpstreamConfig, ConfigError> {
    let key = |k: &str| format!("upstream[{n}].{k}");
    let bad = |k: &str, msg: String| ConfigError::invalid(key(k), None, msg);
    let required = |k: &str, v: Option<String>| {
        v.filter(|s| !s.trim().is_empty())
            .ok_or_else(|| bad(k, "is required".into()))
    };

    let name = required("name", u.name)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name == "local"
    {
        return Err(bad(
            "name",
            format!("{name:?}: use letters, digits, '-', '_', '.' (and not \"local\")"),
        ));
    }
    let parse_url = |k: &str, raw: String| -> Result<Url, ConfigError> {
        // `https://user:password@host` must not reach a log line through an error message.
        let v = if raw.contains('@') {
            "(a URL with credentials)".to_string()
        } else {
            raw.clone()
        };
        let url = Url::parse(&raw).map_err(|e| bad(k, format!("{v:?} is not a URL ({e})")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                k,
                "credentials belong in access_key_id / secret_access_key_file, not in the URL"
                    .into(),
            ));
        }
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad(
                k,
                format!("{v:?} must be an http:// or https:// URL with a host"),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(k, format!("{v:?} must not have a query or fragment")));
        }
        Ok(url)
    };
    let kind = match u.kind.as_deref() {
        Some("http") => {
            for (k, set) in [
                ("endpoint", u.endpoint.is_some()),
                ("bucket", u.bucket.is_some()),
                ("region", u.region.is_some()),
                ("access_key_id", u.access_key_id.is_some()),
                ("secret_access_key", u.secret_access_key.is_some()),
                ("secret_access_key_file", u.secret_access_key_file.is_some()),
                ("reads", u.reads.is_some()),
                ("acl", u.acl.is_some()),
                ("copy_missing", u.copy_missing),
            ] {
                if set {
                    return Err(bad(k, "only applies to type = \"s3\"".into()));
                }
            }
            UpstreamKind::Http {
                url: parse_url("url", required("url", u.url)?)?,
            }
        }
        Some("s3") => {
            let credentials = match (
                u.access_key_id,
                u.secret_access_key,
                u.secret_access_key_file,
            ) {
                (None, None, None) => None,
                (Some(_), Some(_), Some(_)) => {
                    return Err(bad(
                        "secret_access_key_file",
                        "give either secret_access_key or secret_access_key_file, not both".into(),
                    ))
                }
                (Some(id), Some(secret), None) => Some((id, Secret(secret))),
                (Some(id), None, Some(file)) => Some((
                    id,
                    read_secret(&key("secret_access_key_file"), base, &file)?,
                )),
                (None, _, _) => {
                    return Err(bad(
                        "access_key_id",
                        "is required when a secret access key is given".into(),
                    ))
                }
                (Some(_), None, None) => {
                    return Err(bad(
                        "secret_access_key",
                        "access_key_id is set: give secret_access_key or secret_access_key_file"
                            .into(),
                    ))
                }
            };
            let reads = match u.reads.as_deref() {
                None | Some("signed") => Reads::Signed,
                Some("anonymous") => Reads::Anonymous,
                Some(other) => {
                    return Err(bad(
                        "reads",
                        format!("{other:?}: expected \"signed\" or \"anonymous\""),
                    ))
                }
            };
            UpstreamKind::S3 {
                reads,
                endpoint: parse_url("endpoint", required("endpoint", u.endpoint)?)?,
                bucket: required("bucket", u.bucket)?,
                region: u
                    .region
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "us-east-1".into()),
                path_style: u.path_style,
                credentials,
            }
        }
        Some(other) => {
            return Err(bad(
                "type",
                format!("{other:?}: expected \"s3\" or \"http\""),
            ))
        }
        None => return Err(bad("type", "is required (\"s3\" or \"http\")".into())),
    };
    let prefix = u.prefix.trim_matches('/').to_string();
    if prefix.split('/').any(|s| s == ".." || s == ".") {
        return Err(bad(
            "prefix",
            format!("{:?} must not contain . or .. segments", u.prefix),
        ));
    }
    const CANNED: [&str; 7] = [
        "private",
        "public-read",
        "public-read-write",
        "authenticated-read",
        "aws-exec-read",
        "bucket-owner-read",
        "bucket-owner-full-control",
    ];
    let acl = u.acl.filter(|a| !a.is_empty());
    if let Some(a) = &acl {
        if !CANNED.contains(&a.as_str()) {
            return Err(bad(
                "acl",
                format!("{a:?}: expected a canned ACL such as \"public-read\" or \"private\" (Mastodon's S3_PERMISSION)"),
            ));
        }
    }
    Ok(UpstreamConfig {
        name,
        kind,
        prefix,
        acl,
        copy_missing: u.copy_missing,
        connect_timeout: u.connect_timeout.0,
        first_byte_timeout: u.first_byte_timeout.0,
        read_timeout: u.read_timeout.0,
    })
}

pub(super) fn validate_copy(c: FileCopy) -> Result<Copy, ConfigError> {
    for (key, value) in [
        ("copy.workers", c.workers),
        ("copy.queue", c.queue),
        ("copy.remember", c.remember),
    ] {
        if value == 0 {
            return Err(ConfigError::invalid(key, None, "must be at least 1"));
        }
    }
    // S3's own limits: parts of at least 5 MiB (but the last) and at most 5 GiB.
    const MIN_PART: u64 = 5 << 20;
    const MAX_PART: u64 = 5 << 30;
    if !(MIN_PART..=MAX_PART).contains(&c.part_size.0) {
        return Err(ConfigError::invalid(
            "copy.part_size",
            None,
            "must be between 5MiB and 5GiB (S3's part size limits)",
        ));
    }
    if c.multipart_threshold.0 < c.part_size.0 || c.multipart_threshold.0 > MAX_PART {
        return Err(ConfigError::invalid(
            "copy.multipart_threshold",
            None,
            "must be at least copy.part_size and at most 5GiB (the largest single PUT)",
        ));
    }
    Ok(Copy {
        workers: c.workers,
        queue: c.queue,
        remember: c.remember,
        multipart_threshold: c.multipart_threshold.0,
        part_size: c.part_size.0,
    })
}
