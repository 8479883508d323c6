//! `mediaproxy init --mastodon-env FILE`: a commented config from what Mastodon already knows, mapping
//! its variables as `config/initializers/paperclip.rb` reads them, so the proxy asks the bucket exactly
//! where Mastodon writes and answers exactly the URLs Mastodon hands out.
//!
//! Secrets never go into the config: each is written to a 0600 file beside it. Nothing is written
//! over an existing file without `--force` (the config and the secret files alike), and nothing at all
//! when one of them exists.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::Usage;

pub struct InitArgs {
    pub env: PathBuf,
    pub output: PathBuf,
    pub force: bool,
}

/// What `init` wrote, for the summary it prints.
pub struct Written {
    pub config: PathBuf,
    pub secrets: Vec<PathBuf>,
}

/// The config and its secret files, derived from Mastodon's variables.
struct Plan {
    config: String,
    /// (file name beside the config, contents)
    secrets: Vec<(&'static str, String)>,
}

pub fn run(args: &InitArgs) -> Result<Written, Usage> {
    let vars = crate::envfile::read(&args.env)
        .map_err(|e| Usage(format!("--mastodon-env {}: {e}", args.env.display())))?;
    let root = args
        .env
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("public/system")))
        .unwrap_or_else(|| PathBuf::from("/home/mastodon/live/public/system"));
    let dir = args
        .output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let plan = plan(&vars, &root, &dir, &args.env)?;
    let secret_paths: Vec<PathBuf> = plan.secrets.iter().map(|(n, _)| dir.join(n)).collect();
    if !args.force {
        for path in std::iter::once(&args.output).chain(&secret_paths) {
            if path.exists() {
                return Err(Usage(format!(
                    "{} exists; nothing written (--force replaces it)",
                    path.display()
                )));
            }
        }
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Usage(format!("cannot create {}: {e}", dir.display())))?;
    for ((_, secret), path) in plan.secrets.iter().zip(&secret_paths) {
        write_private(path, secret)?;
    }
    std::fs::write(&args.output, &plan.config)
        .map_err(|e| Usage(format!("cannot write {}: {e}", args.output.display())))?;
    Ok(Written {
        config: args.output.clone(),
        secrets: secret_paths,
    })
}

/// 0600 from the first byte: the secret is never readable by others, not even for a moment.
fn write_private(path: &Path, text: &str) -> Result<(), Usage> {
    let _ = std::fs::remove_file(path); // --force: a fresh file, with fresh permissions
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Usage(format!("cannot write {}: {e}", path.display())))?;
    writeln!(f, "{text}").map_err(|e| Usage(format!("cannot write {}: {e}", path.display())))
}

fn plan(
    vars: &HashMap<String, String>,
    root: &Path,
    dir: &Path,
    env_path: &Path,
) -> Result<Plan, Usage> {
    let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
    if get("S3_ENABLED") != Some("true") {
        return Err(Usage(format!(
            "{}: S3_ENABLED is not true, so Mastodon keeps media in public/system: run `mediaproxy serve` with [local] roots only (no bucket to put behind it)",
            env_path.display()
        )));
    }
    let missing: Vec<&str> = ["S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        .into_iter()
        .filter(|k| get(k).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Usage(format!(
            "{}: missing {} (Mastodon needs them too with S3_ENABLED=true)",
            env_path.display(),
            missing.join(", ")
        )));
    }
    let bucket = get("S3_BUCKET").unwrap_or_default();
    let region = get("S3_REGION").unwrap_or("us-east-1");
    // As paperclip.rb: S3_ENDPOINT means path style unless S3_OVERRIDE_PATH_STYLE=true. Without it
    // Mastodon's reads and writes go through the AWS SDK to the region's endpoint, virtual-host style
    // (S3_PROTOCOL and S3_HOSTNAME only shape the URLs it hands out).
    let (endpoint, path_style) = match get("S3_ENDPOINT") {
        Some(e) => (
            e.trim_end_matches('/').to_string(),
            get("S3_OVERRIDE_PATH_STYLE") != Some("true"),
        ),
        None => (format!("https://s3.{region}.amazonaws.com"), false),
    };
    // Mastodon's default is public-read; an empty S3_PERMISSION means no ACL header at all.
    let permission = match vars.get("S3_PERMISSION") {
        Some(p) => p.as_str(),
        None => "public-read",
    };
    let key_prefix = get("S3_KEY_PREFIX").map(|p| p.trim_matches('/').to_string());
    let alias = get("S3_ALIAS_HOST").or_else(|| get("S3_CLOUDFRONT_HOST"));
    let alias_path = alias
        .map(|a| {
            let a = a.split_once("://").map_or(a, |(_, rest)| rest);
            a.split_once('/')
                .map(|(_, p)| p.trim_matches('/').to_string())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    // The alias URL carries the whole key, S3_KEY_PREFIX included.
    let path_prefix: String = [alias_path.as_str(), key_prefix.as_deref().unwrap_or("")]
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| format!("/{s}"))
        .collect();

    let mut secrets = vec![(
        "s3.secret",
        get("AWS_SECRET_ACCESS_KEY").unwrap_or_default().to_string(),
    )];
    let buster = match (get("CACHE_BUSTER_SECRET_HEADER"), get("CACHE_BUSTER_SECRET")) {
        (Some(header), Some(secret)) => {
            secrets.push(("cache-buster.secret", secret.to_string()));
            format!(
                "cache_buster_header = {}\ncache_buster_secret_file = {}\n",
                toml_str(header),
                toml_str(&dir.join("cache-buster.secret").display().to_string())
            )
        }
        _ => "# Mastodon's cache buster (CACHE_BUSTER_ENABLED=true): CACHE_BUSTER_SECRET_HEADER and\n# CACHE_BUSTER_SECRET were not both set.\n# cache_buster_header = \"X-Cache-Buster\"\n# cache_buster_secret_file = \"/etc/mediaproxy/cache-buster.secret\"\n".to_string(),
    };
    // Anonymous reads only when the objects are public: then a private one (suspended, deleted) is
    // served by nobody. With a private ACL anonymous reads would find nothing at all.
    let acl = if permission.is_empty() {
        "# acl: S3_PERMISSION is empty, so Mastodon sends no ACL and neither do copies.\n"
            .to_string()
    } else {
        format!("acl = {}\n", toml_str(permission))
    };
    let reads = if permission.starts_with("public-read") {
        "anonymous"
    } else {
        "signed"
    };
    let alias_note = match alias {
        Some(a) => format!("S3_ALIAS_HOST = {a}: point it (or its path) at this listener"),
        None => "no S3_ALIAS_HOST: Mastodon links the bucket itself; set S3_ALIAS_HOST to this proxy's address".to_string(),
    };
    let config = format!(
        r#"# mediaproxy config written by `mediaproxy init` from {env}.
# Check it with `mediaproxy check --config <this file>`; reload with `systemctl reload mediaproxy`.

[server]
listen = ["127.0.0.1:8080"]        # nginx (or Caddy) in front proxies {alias_note}
admin_listen = "127.0.0.1:9901"    # GET /healthz, /readyz, /metrics
path_prefix = {path_prefix}
{buster}
[local]
# Files Mastodon wrote before S3 (and anything still on disk) are served first.
{roots}

[cache]
dir = "/var/cache/mediaproxy"      # the unit's CacheDirectory=
max_size = "20GiB"

[[upstream]]
name = {name}
type = "s3"
endpoint = {endpoint}
bucket = {bucket}
region = {region}
path_style = {path_style}
prefix = {prefix}
access_key_id = {key_id}
secret_access_key_file = {secret}
# With public ACLs (S3_PERMISSION=public-read), Mastodon makes suspended and deleted media private:
# anonymous reads then get 403 and serve nothing, as Mastodon intends. Otherwise reads are signed.
reads = "{reads}"
{acl}"#,
        env = env_path.display(),
        path_prefix = toml_str(&path_prefix),
        roots = if root.is_dir() {
            format!("roots = [{}]", toml_str(&root.display().to_string()))
        } else {
            // A root that does not exist would fail `check` (and so every reload).
            format!(
                "# {} does not exist (media went to S3 from the start):\nroots = []",
                root.display()
            )
        },
        name = toml_str(bucket),
        endpoint = toml_str(&endpoint),
        bucket = toml_str(bucket),
        region = toml_str(region),
        prefix = toml_str(key_prefix.as_deref().unwrap_or("")),
        key_id = toml_str(get("AWS_ACCESS_KEY_ID").unwrap_or_default()),
        secret = toml_str(&dir.join("s3.secret").display().to_string()),
    );
    Ok(Plan { config, secrets })
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
