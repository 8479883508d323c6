//! The TOML config an admin writes, turned into typed values.
//!
//! Every mistake is reported with the key at fault (and its line when the TOML parser knows it), because
//! the admin reading the error is usually doing so over SSH after a failed reload, not in an editor.
//! Secrets are read here, once, and only ever travel inside [`Secret`], whose `Debug` hides them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

/// The config used by `mediaproxy serve` without `--config`: enough for a fresh clone to serve something.
pub const DEFAULT_TOML: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[local]
roots = ["./public/system"]

[cache]
dir = "./cache"
"#;

/// Where the config is looked for when neither `--config` nor `$MEDIAPROXY_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/mediaproxy/proxy.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `key` is the dotted path of the offending key, e.g. `upstream[2].bucket`.
    #[error("{}: `{key}`: {msg}", line.map(|l| format!("line {l}")).unwrap_or_else(|| "config".into()))]
    Invalid {
        key: String,
        line: Option<usize>,
        msg: String,
    },
}

impl ConfigError {
    /// With the line of `text` that sets the key at fault (or its table's header), when it has none yet.
    fn at_line_in(self, text: &str) -> Self {
        match self {
            ConfigError::Invalid {
                key,
                line: None,
                msg,
            } => ConfigError::Invalid {
                line: locate(text, &key),
                key,
                msg,
            },
            other => other,
        }
    }

    fn invalid(key: impl Into<String>, line: Option<usize>, msg: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            line,
            msg: msg.into(),
        }
    }
}

/// A value that must never reach a log line, an error message or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    #[cfg(test)]
    pub fn from_test(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub local: Local,
    pub cache: Cache,
    pub upstreams: Vec<UpstreamConfig>,
    pub copy: Copy,
}

/// The lazy copy into the `copy_missing` upstream.
#[derive(Debug, Clone)]
pub struct Copy {
    /// Copies running at once.
    pub workers: usize,
    /// Keys waiting; past it the oldest is dropped (counted), never a request blocked.
    pub queue: usize,
    /// Keys remembered as already in the target (12 bytes each), so reads of them queue nothing;
    /// past it the oldest are forgotten and cost one more HEAD on the target when read again.
    pub remember: usize,
    /// Objects larger than this are copied as multipart uploads of `part_size` parts.
    pub multipart_threshold: u64,
    pub part_size: u64,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    /// Empty, or `/segment[/segment…]` without a trailing slash.
    pub path_prefix: String,
    pub admin_listen: Option<SocketAddr>,
    pub tls: Option<Tls>,
    /// Also bounds how long an idle connection is held: HTTP/1 keep-alive (hyper starts the clock while
    /// waiting) and HTTP/2 with no open stream (closed with GOAWAY).
    pub header_read_timeout: Duration,
    /// A response that makes no progress for this long closes the connection (nginx's send_timeout):
    /// a blocked socket write, or an HTTP/2 stream whose window stays shut.
    pub send_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Key prefixes served (each ending in `/`; an empty string allows every key). Anything else is 404
    /// from every source, so private objects in the same bucket (user archives) never leak.
    pub allow_prefixes: Vec<String>,
    pub cache_buster: Option<CacheBuster>,
    /// One line per request on stderr (journald), like nginx's access log; a reload turns it on or off.
    pub access_log: bool,
}

/// Mastodon's `CACHE_BUSTER_SECRET_HEADER` and `CACHE_BUSTER_SECRET`: a request carrying both purges
/// and tombstones its key.
#[derive(Debug, Clone)]
pub struct CacheBuster {
    pub header: http::HeaderName,
    pub secret: Secret,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Local {
    pub roots: Vec<PathBuf>,
    /// Local files kept open (and mapped) between hits, like nginx's `open_file_cache`; 0: none.
    pub open_files: usize,
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    pub max_size: u64,
    /// Larger objects stream through without a cache entry (default `max_size / 8`).
    pub max_object_size: u64,
    /// Fills that no client reads any more, at once; the next is cancelled (counted).
    pub background_fills: usize,
    pub inactive: Duration,
    pub ttl_ok: Duration,
    pub ttl_error: Duration,
    /// How long a request waits for another request's fill of the same key before asking upstreams itself.
    pub lock_timeout: Duration,
    /// Small entries whose descriptor (and parsed metadata) stay open between hits, like nginx's
    /// `open_file_cache`: a hit on one costs an `fstat` and a `pread` instead of a path walk. 0: none.
    pub open_files: usize,
    /// How long a key Mastodon busted is asked only of the upstream it writes to (a migration window).
    pub tombstone_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: UpstreamKind,
    /// Key prefix inside the bucket, without leading or trailing slash.
    pub prefix: String,
    pub copy_missing: bool,
    /// Canned ACL sent with copies into this upstream (Mastodon's `S3_PERMISSION`).
    pub acl: Option<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// Longest pause between two body chunks before the transfer counts as failed.
    pub read_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum UpstreamKind {
    Http {
        url: Url,
    },
    S3 {
        endpoint: Url,
        bucket: String,
        region: String,
        path_style: bool,
        credentials: Option<(String, Secret)>,
        reads: Reads,
    },
}

/// How an `s3` upstream reads (writes are always signed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// Signed GET/HEAD: sees every object, private ones included (a bucket with no public access).
    Signed,
    /// Unsigned GET/HEAD: the bucket's ACLs decide, as for any browser, so what Mastodon made private
    /// (suspended accounts, user archives) stays private.
    Anonymous,
}

impl UpstreamKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            UpstreamKind::Http { .. } => "http",
            UpstreamKind::S3 { .. } => "s3",
        }
    }
}

mod file;
mod lines;
mod validate;

use file::FileConfig;
use lines::{locate, toml_error};
use validate::{validate_copy, validate_server, validate_upstream};

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// `[cache]` and `server.path_prefix` alone, for `mediaproxy cache …`: the file must parse, but no
    /// secret file is read, so an admin who may not read the bucket's secret can still purge.
    pub fn load_cache_only(path: &Path) -> Result<(Cache, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| toml_error(&text, &e))?;
        let cache = cache_section(file.cache).map_err(|e| e.at_line_in(&text))?;
        Ok((cache, file.server.path_prefix))
    }

    /// The config file to use: `given` (`--config`), else `$MEDIAPROXY_CONFIG` (even if it names no
    /// file: loading it then says so), else [`DEFAULT_PATH`] if it exists; `None`: none of them.
    pub fn find(given: Option<PathBuf>) -> Option<PathBuf> {
        given
            .or_else(|| {
                std::env::var_os("MEDIAPROXY_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            // An error (a directory the user may not search) counts as there: loading then says why.
            .or_else(|| {
                Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.try_exists().unwrap_or(true))
            })
    }

    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_TOML, Path::new(".")).expect("the embedded default config is valid")
    }

    /// `base` is the directory relative secret files are read from (the config file's own).
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        Config::validate(file, base).map_err(|e| e.at_line_in(text))
    }

    /// The checks the TOML parser cannot make; errors name the key only ([`Config::parse`] finds its line).
    fn validate(file: FileConfig, base: &Path) -> Result<Config, ConfigError> {
        let server = validate_server(file.server, base)?;
        if file.local.roots.iter().any(|r| r.as_os_str().is_empty()) {
            return Err(ConfigError::invalid(
                "local.roots",
                None,
                "a root must not be empty",
            ));
        }
        let cache = cache_section(file.cache)?;

        let mut upstreams: Vec<UpstreamConfig> = Vec::new();
        for (i, up) in file.upstream.into_iter().enumerate() {
            let up = validate_upstream(i + 1, up, base)?;
            if upstreams.iter().any(|u| u.name == up.name) {
                return Err(ConfigError::invalid(
                    format!("upstream[{}].name", i + 1),
                    None,
                    format!(
                        "duplicate upstream name {:?}; names must be unique",
                        up.name
                    ),
                ));
            }
            upstreams.push(up);
        }
        if let Some(extra) = upstreams.iter().filter(|u| u.copy_missing).nth(1) {
            let n = upstreams
                .iter()
                .position(|u| std::ptr::eq(u, extra))
                .expect("in the list");
            return Err(ConfigError::invalid(
                format!("upstream[{}].copy_missing", n + 1),
                None,
                format!(
                    "only one upstream can be the copy target; {:?} is already",
                    upstreams
                        .iter()
                        .find(|u| u.copy_missing)
                        .expect("first")
                        .name
                ),
            ));
        }
        let copy = validate_copy(file.copy)?;

        Ok(Config {
            server,
            local: Local {
                roots: file.local.roots,
                open_files: file.local.open_files,
            },
            cache,
            upstreams,
            copy,
        })
    }
}

#[cfg(test)]
mod tests;

fn cache_section(c: file::FileCache) -> Result<Cache, ConfigError> {
    let cache = Cache {
        dir: c.dir,
        max_size: c.max_size.0,
        max_object_size: c.max_object_size.map_or(c.max_size.0 / 8, |s| s.0),
        background_fills: c.background_fills.max(1),
        inactive: c.inactive.0,
        ttl_ok: c.ttl_ok.0,
        ttl_error: c.ttl_error.0,
        lock_timeout: c.lock_timeout.0,
        open_files: c.open_files,
        tombstone_ttl: c.tombstone_ttl.0,
    };
    if cache.max_object_size > cache.max_size / 2 {
        // Fills in flight may hold half of max_size; a larger object could never be cached.
        return Err(ConfigError::invalid(
            "cache.max_object_size",
            None,
            format!(
                "{} is more than half of cache.max_size ({}); larger objects stream through uncached",
                bytesize::ByteSize(cache.max_object_size),
                bytesize::ByteSize(cache.max_size)
            ),
        ));
    }
    Ok(cache)
}
