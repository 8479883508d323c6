//! `mediaproxy check`: is every upstream reachable and do its credentials work — asked before a
//! reload rather than learned from 502s after it.

use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::net::{lookup_host, TcpStream};

use crate::config::Config;
use crate::key;
use crate::upstream::{Put, PutRequest, Upstream, WriteError, CREDENTIAL_CODES};

const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A key nobody uploads, asked with a one-byte GET as the proxy would ask: found or not, a clean answer
/// proves DNS, TCP, TLS and the signature, and an error answer carries S3's code. Under the first
/// `allow_prefixes` entry, so a policy that grants reads on Mastodon's prefixes only is judged fairly.
const PROBE_NAME: &str = "mediaproxy-check/probe.txt";

pub struct ProbeLine {
    pub name: String,
    pub kind: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// What can be known without the network (`check --offline`, and before the probes): the local roots
/// exist and can be read by this user, the cache directory exists or can be created and is writable,
/// and the listeners do not collide.
pub fn local_checks(config: &Config) -> Vec<ProbeLine> {
    let mut lines = Vec::new();
    let mut line = |name: String, ok: bool, detail: String| {
        lines.push(ProbeLine {
            name,
            kind: "local",
            ok,
            detail,
        })
    };
    for root in &config.local.roots {
        let name = format!("root {}", root.display());
        match std::fs::read_dir(root) {
            Ok(_) => line(name, true, "readable".into()),
            Err(e) => line(name, false, format!("local.roots: cannot read it: {e}")),
        }
    }
    // The directory, or the nearest existing parent the proxy would create it in: checked with a
    // file written and deleted, never created here.
    let dir = &config.cache.dir;
    let name = format!("cache {}", dir.display());
    let existing = dir
        .ancestors()
        .find(|d| d.as_os_str().is_empty() || d.exists())
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .unwrap_or(Path::new("."));
    let probe = existing.join(format!(".mediaproxy-check-{}", std::process::id()));
    let writable = if existing.is_dir() {
        std::fs::write(&probe, b"check").and_then(|()| std::fs::remove_file(&probe))
    } else {
        Err(std::io::Error::other("it is not a directory"))
    };
    match (writable, existing == dir.as_path()) {
        (Ok(()), true) => line(name, true, "writable".into()),
        (Ok(()), false) => line(
            name,
            true,
            format!("will be created in {}", existing.display()),
        ),
        (Err(e), _) => line(
            name,
            false,
            format!("cache.dir: cannot write in {}: {e}", existing.display()),
        ),
    }
    if let Some(admin) = config.server.admin_listen {
        let clash = config.server.listen.iter().find(|l| {
            l.port() == admin.port()
                && (l.ip() == admin.ip() || l.ip().is_unspecified() || admin.ip().is_unspecified())
        });
        match clash {
            Some(l) => line(
                "listeners".into(),
                false,
                format!("server.admin_listen {admin} collides with server.listen {l}"),
            ),
            None => line(
                "listeners".into(),
                true,
                "listen and admin_listen differ".into(),
            ),
        }
    }
    lines
}

pub async fn probe_all(config: &Config) -> Vec<ProbeLine> {
    let prefix = config
        .server
        .allow_prefixes
        .first()
        .map(|p| p.trim_start_matches('/'))
        .unwrap_or("");
    let probe_key = key::parse(&format!("/{prefix}{PROBE_NAME}"), "").expect("probe key is valid");
    let mut lines = Vec::new();
    for cfg in &config.upstreams {
        let (ok, detail) = match Upstream::new(cfg) {
            Ok(up) => match probe(&up, &probe_key).await {
                (true, read) if cfg.copy_missing => match probe_writes(&up).await {
                    Ok(write) => (true, format!("{read}; {write}")),
                    Err(write) => (false, format!("{read}; {write}")),
                },
                other => other,
            },
            Err(e) => (false, e.to_string()),
        };
        lines.push(ProbeLine {
            name: cfg.name.clone(),
            kind: cfg.kind.type_name(),
            ok,
            detail,
        });
    }
    lines
}

async fn probe(up: &Upstream, probe_key: &key::Key) -> (bool, String) {
    let (host, port) = up.authority();
    let start = Instant::now();
    let addrs: Vec<_> =
        match tokio::time::timeout(STEP_TIMEOUT, lookup_host((host.as_str(), port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return (false, format!("DNS: cannot resolve {host}: {e}")),
            Err(_) => {
                return (
                    false,
                    format!("DNS: no answer for {host} within {STEP_TIMEOUT:?}"),
                )
            }
        };
    let Some(addr) = addrs.first() else {
        return (false, format!("DNS: {host} has no address"));
    };
    match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return (false, format!("connect {addr}: {e}")),
        Err(_) => {
            return (
                false,
                format!("connect {addr}: no answer within {STEP_TIMEOUT:?}"),
            )
        }
    }
    let ms = |s: Instant| s.elapsed().as_millis();
    match read_verdict(up, probe_key).await {
        Ok(note) => (
            true,
            format!("ok: {addr}, answered in {} ms{note}", ms(start)),
        ),
        Err(why) => (false, why),
    }
}

/// Asks the bucket (HeadBucket) and a key nobody uploads (a one-byte GET, as the proxy would ask), and
/// reads the two answers together: `Ok(note)` when reads work, `Err(why)` naming S3's error code.
///
/// A signed GET of a missing key answers 404 when the access key may list the bucket, and 403
/// AccessDenied when it may not (S3 will not say whether a key exists to someone who cannot list): so
/// an AccessDenied is a missing `s3:GetObject` only when HeadBucket (which needs `s3:ListBucket`)
/// succeeded.
async fn read_verdict(up: &Upstream, key: &key::Key) -> Result<String, String> {
    let bucket = match up.head_bucket().await {
        Ok(status) => status,
        Err(e) => return Err(format!("HeadBucket: {e}")),
    };
    if bucket == Some(StatusCode::NOT_FOUND) {
        return Err(
            "NoSuchBucket: the bucket does not exist here (check bucket, endpoint, path_style)"
                .into(),
        );
    }
    let probed = up.probe_get(key).await.map_err(|e| e.to_string())?;
    let code = probed.code.as_deref().unwrap_or("");
    match probed.status {
        s if s.is_success() || s == StatusCode::RANGE_NOT_SATISFIABLE => Ok(String::new()),
        StatusCode::NOT_FOUND if code == "NoSuchBucket" => Err(
            "NoSuchBucket: the bucket does not exist here (check bucket, endpoint, path_style)"
                .into(),
        ),
        StatusCode::NOT_FOUND => Ok(String::new()),
        StatusCode::FORBIDDEN if CREDENTIAL_CODES.contains(&code) => Err(format!(
            "credentials refused ({code}): check access_key_id and the secret"
        )),
        StatusCode::FORBIDDEN if !up.reads_signed() => Ok(
            "; reads unverified: 403 for a missing key, which a public bucket that hides its listing says, and so does a private one (then every request would be a 404): check with a real media URL"
                .into(),
        ),
        StatusCode::FORBIDDEN if code == "AccessDenied" && bucket.is_some_and(|s| s.is_success()) => {
            Err("AccessDenied: the access key may list the bucket but not read its objects (s3:GetObject)".into())
        }
        StatusCode::FORBIDDEN if code == "AccessDenied" => Ok(
            "; reads unverified: without s3:ListBucket S3 answers 403 AccessDenied for a missing key (read as not found), and so it does for a key that may not read at all: check with a real media URL".into(),
        ),
        s => Err(format!(
            "a GET of {} answered HTTP {}{}",
            key.as_str(),
            s.as_u16(),
            if code.is_empty() {
                String::new()
            } else {
                format!(" ({code})")
            }
        )),
    }
}

/// The copy target must accept PUTs, or every lazy copy fails: PUT a small probe object (under
/// `mediaproxy-check/`, which the proxy never serves), PUT it again to learn whether the bucket honours
/// `If-None-Match: *`, then DELETE it.
async fn probe_writes(up: &Upstream) -> Result<String, String> {
    use md5::{Digest, Md5};
    let name = format!(
        "/mediaproxy-check/write-probe-{}-{}.txt",
        std::process::id(),
        crate::unix_time::now_ms()
    );
    let key = key::parse(&name, "").expect("probe key is valid");
    let body = b"mediaproxy check: safe to delete\n".to_vec();
    let req = PutRequest {
        key: &key,
        len: body.len() as u64,
        md5: Md5::digest(&body).into(),
        content_type: Some("text/plain"),
        cache_control: None,
        content_disposition: None,
        // With the ACL copies will send: a bucket with ACLs disabled refuses it, and should fail here.
        acl: up.acl.as_deref(),
    };
    let refused = |e: WriteError| format!("copy target refuses writes: PUT {}: {e}", key.as_str());
    up.put(&req, body.clone().into()).await.map_err(refused)?;
    let second = up.put(&req, body.into()).await.map_err(refused);
    let deleted = up.delete(&key).await;
    let conditional = match second? {
        Put::AlreadyThere => "honours If-None-Match: copies never overwrite",
        Put::Created(_) => "IGNORES If-None-Match: copies HEAD first, which narrows but cannot close a race between two writers",
    };
    match deleted {
        Ok(()) => Ok(format!(
            "writable (PUT and DELETE of {}); {conditional}",
            key.as_str()
        )),
        Err(e) => Ok(format!(
            "writable; {conditional}; could not delete the probe object {} ({e}): delete it by hand",
            key.as_str()
        )),
    }
}
