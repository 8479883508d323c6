//! The config file exactly as written: serde structs with `deny_unknown_fields`, so the TOML parser
//! itself names unknown keys and bad values with their line. `super` turns these into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) server: FileServer,
    #[serde(default)]
    pub(super) local: FileLocal,
    #[serde(default)]
    pub(super) cache: FileCache,
    #[serde(default)]
    pub(super) upstream: Vec<FileUpstream>,
    #[serde(default)]
    pub(super) copy: FileCopy,
}

#[derive(Deserialize)]
// Missing keys take the values of `Default` below: one list of defaults, not two.
#[serde(default, deny_unknown_fields)]
pub(super) struct FileCopy {
    pub(super) workers: usize,
    pub(super) queue: usize,
    pub(super) remember: usize,
    pub(super) multipart_threshold: SizeValue,
    pub(super) part_size: SizeValue,
}

impl Default for FileCopy {
    fn default() -> Self {
        FileCopy {
            workers: 4,
            queue: 10_000,
            remember: 1_000_000,
            multipart_threshold: SizeValue(64 << 20),
            part_size: SizeValue(16 << 20),
        }
    }
}

#[derive(Deserialize)]
// Missing keys take the values of `Default` below: one list of defaults, not two.
#[serde(default, deny_unknown_fields)]
pub(super) struct FileServer {
    #[serde(deserialize_with = "addresses")]
    pub(super) listen: Vec<SocketAddr>,
    pub(super) path_prefix: String,
    #[serde(deserialize_with = "optional_address")]
    pub(super) admin_listen: Option<SocketAddr>,
    pub(super) tls: Option<FileTls>,
    pub(super) header_read_timeout: DurationValue,
    pub(super) send_timeout: DurationValue,
    pub(super) shutdown_timeout: DurationValue,
    pub(super) allow_prefixes: Vec<String>,
    pub(super) cache_buster_header: Option<String>,
    pub(super) cache_buster_secret_file: Option<PathBuf>,
    pub(super) access_log: bool,
}

/// What Mastodon publishes under `S3_ALIAS_HOST`; `backups/` (user archives) and `imports/` are private.
pub(super) const MASTODON_PREFIXES: [&str; 6] = [
    "media_attachments/",
    "accounts/",
    "custom_emojis/",
    "preview_cards/",
    "preview_card_providers/",
    "site_uploads/",
];

impl Default for FileServer {
    fn default() -> Self {
        FileServer {
            listen: default_listen(),
            path_prefix: String::new(),
            admin_listen: None,
            tls: None,
            header_read_timeout: secs10(),
            send_timeout: secs60(),
            shutdown_timeout: secs30(),
            allow_prefixes: MASTODON_PREFIXES.iter().map(|p| p.to_string()).collect(),
            cache_buster_header: None,
            cache_buster_secret_file: None,
            access_log: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLocal {
    #[serde(default)]
    pub(super) roots: Vec<PathBuf>,
    #[serde(default = "local_open_files")]
    pub(super) open_files: usize,
}

impl Default for FileLocal {
    fn default() -> Self {
        FileLocal {
            open_files: local_open_files(),
            roots: vec![PathBuf::from("./public/system")],
        }
    }
}

#[derive(Deserialize)]
// Missing keys take the values of `Default` below: one list of defaults, not two.
#[serde(default, deny_unknown_fields)]
pub(super) struct FileCache {
    pub(super) dir: PathBuf,
    pub(super) max_size: SizeValue,
    pub(super) max_object_size: Option<SizeValue>,
    pub(super) background_fills: usize,
    pub(super) inactive: DurationValue,
    pub(super) ttl_ok: DurationValue,
    pub(super) ttl_error: DurationValue,
    pub(super) lock_timeout: DurationValue,
    pub(super) open_files: usize,
    pub(super) tombstone_ttl: DurationValue,
}

impl Default for FileCache {
    fn default() -> Self {
        FileCache {
            dir: default_cache_dir(),
            max_size: default_max_size(),
            max_object_size: None,
            background_fills: 8,
            inactive: days90(),
            ttl_ok: days90(),
            ttl_error: secs300(),
            lock_timeout: secs5(),
            open_files: 10_000,
            tombstone_ttl: DurationValue(Duration::from_secs(180 * 86400)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    pub(super) name: Option<String>,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) url: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) bucket: Option<String>,
    pub(super) region: Option<String>,
    #[serde(default = "yes")]
    pub(super) path_style: bool,
    #[serde(default)]
    pub(super) prefix: String,
    pub(super) access_key_id: Option<String>,
    pub(super) secret_access_key: Option<String>,
    pub(super) secret_access_key_file: Option<PathBuf>,
    pub(super) reads: Option<String>,
    pub(super) acl: Option<String>,
    #[serde(default)]
    pub(super) copy_missing: bool,
    #[serde(default = "secs5")]
    pub(super) connect_timeout: DurationValue,
    #[serde(default = "secs10")]
    pub(super) first_byte_timeout: DurationValue,
    #[serde(default = "secs30")]
    pub(super) read_timeout: DurationValue,
}

/// `30s`, `5m`, `90d`: parsed by humantime so admins can also write `1h 30m`.
#[derive(Clone, Copy)]
pub(super) struct DurationValue(pub(super) Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(DurationValue)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write e.g. \"30s\", \"5m\", \"90d\""
                ))
            })
    }
}

/// `256MiB`, `20GiB`, or a plain number of bytes.
#[derive(Clone, Copy)]
pub(super) struct SizeValue(pub(super) u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(SizeValue(n)),
            Raw::Str(s) => s
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| SizeValue(b.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid size {s:?} ({e}); write e.g. \"256MiB\", \"20GiB\""
                    ))
                }),
        }
    }
}

/// An address as `listen` takes it, or an error that shows the value and the form expected.
fn address<E: serde::de::Error>(text: &str) -> Result<SocketAddr, E> {
    text.parse().map_err(|_| {
        E::custom(format!(
            "{text:?} is not an address: write an IP and a port, as \"127.0.0.1:8080\" or \"[::]:8080\""
        ))
    })
}

fn addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let texts = <Vec<String> as serde::Deserialize>::deserialize(d)?;
    texts.iter().map(|t| address(t)).collect()
}

fn optional_address<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = <Option<String> as serde::Deserialize>::deserialize(d)?;
    text.as_deref().map(address).transpose()
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 8080))]
}
fn local_open_files() -> usize {
    10_000
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("./cache")
}
fn default_max_size() -> SizeValue {
    SizeValue(20 << 30)
}
fn secs5() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}
fn secs10() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}
fn secs30() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}
fn secs60() -> DurationValue {
    DurationValue(Duration::from_secs(60))
}
fn secs300() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}
fn days90() -> DurationValue {
    DurationValue(Duration::from_secs(90 * 86400))
}
fn yes() -> bool {
    true
}
