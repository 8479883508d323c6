//! The command line; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mediaproxy::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "Caching media reverse proxy for Mastodon: local files, then ordered buckets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (without --config: 127.0.0.1:8080 serving ./public/system, no upstreams).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Inspect or invalidate the disk cache (of a stopped or a running proxy).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Write a commented config from Mastodon's .env.production (secrets into 0600 files beside it).
    Init {
        /// Mastodon's .env.production.
        #[arg(long, value_name = "FILE")]
        mastodon_env: PathBuf,
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/etc/mediaproxy/proxy.toml"
        )]
        output: PathBuf,
        /// Replace an existing config and its secret files.
        #[arg(long)]
        force: bool,
    },
    /// Validate the config and probe every upstream (DNS, connect, a signed request); exit 1 on any failure.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Validate the file and the local side only (roots, cache dir, listeners), like `nginx -t`:
        /// no network. The unit runs it before a reload.
        #[arg(long)]
        offline: bool,
    },
    /// Copy every object --from has and --to lacks, never overwriting; resumable; exit 1 if a key failed.
    Migrate {
        #[arg(long)]
        config: PathBuf,
        /// An upstream's name, or `local` for the local roots.
        #[arg(long)]
        from: String,
        /// An `s3` upstream's name.
        #[arg(long)]
        to: String,
        /// Keys (or media URLs), one per line; `-` for standard input. Default: list --from.
        #[arg(long, value_name = "FILE")]
        keys_from: Option<PathBuf>,
        /// Only keys under this prefix (with a listing).
        #[arg(long, default_value = "")]
        prefix: String,
        /// Keys copied at once (buckets answer in tens of ms: this hides latency, not CPU).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// At most this many keys started a second.
        #[arg(long)]
        max_rps: Option<u32>,
        /// Where progress is saved (default: under cache.dir, per source and target).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print what would be copied, copy nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        db: DbOpts,
    },
    /// Report keys missing from --upstream (and, with --against, those that differ); exit 1 if any.
    Verify {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        upstream: String,
        #[arg(long)]
        against: Option<String>,
        #[arg(long, value_name = "FILE")]
        keys_from: Option<PathBuf>,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long)]
        max_rps: Option<u32>,
        #[command(flatten)]
        db: DbOpts,
    },
}

/// Keys from Mastodon's own database: every file it references, nothing else.
#[derive(clap::Args)]
struct DbOpts {
    /// postgres://user:password@host:port/dbname (a Unix socket: postgres:///mastodon_production?host=/var/run/postgresql)
    #[arg(long, value_name = "URL")]
    mastodon_db: Option<String>,
    /// Mastodon's .env.production: DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASS.
    #[arg(long, value_name = "FILE")]
    mastodon_env: Option<PathBuf>,
    /// Only rows with an id from this one (with --mastodon-db/--mastodon-env).
    #[arg(long, value_name = "ID")]
    since: Option<i64>,
    /// Only rows with an id up to this one.
    #[arg(long, value_name = "ID")]
    until: Option<i64>,
}

impl DbOpts {
    fn into_args(self) -> mediaproxy::cmd::DbArgs {
        mediaproxy::cmd::DbArgs {
            url: self.mastodon_db,
            env: self.mastodon_env,
            since: self.since,
            until: self.until,
        }
    }
}

#[derive(Subcommand)]
enum CacheAction {
    /// Entries, bytes and the oldest entry.
    Stats {
        #[arg(long)]
        config: PathBuf,
    },
    /// Drop the entries for these keys: `media_attachments/…`, a URL path `/…` (with path_prefix), or a
    /// full media URL as copied from a browser or a post.
    Purge {
        #[arg(long)]
        config: PathBuf,
        /// Every entry whose key starts with this (after a takedown: `accounts/avatars/000/000/042/`).
        #[arg(long, value_name = "KEY_PREFIX")]
        prefix: Option<String>,
        #[arg(required_unless_present = "prefix")]
        keys: Vec<String>,
    },
    /// Drop every entry.
    Clear {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    mediaproxy::logwriter::init();
    let code = match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            mediaproxy::logwriter::drain(std::time::Duration::from_millis(500));
            eprintln!("mediaproxy: {}", once_each(&e));
            ExitCode::FAILURE
        }
    };
    mediaproxy::logwriter::drain(std::time::Duration::from_millis(500));
    code
}

/// The error and its causes, each said once: our messages often quote their cause already
/// ("cannot listen on …: Address already in use"), and the chain would repeat it.
fn once_each(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    msg
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve { config } => {
            let cfg = match &config {
                Some(path) => Config::load(path)?,
                None => {
                    tracing::info!("no --config given: using the embedded default");
                    Config::embedded_default()
                }
            };
            rt.block_on(mediaproxy::server::run(cfg, config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { action } => cache_command(action),
        Command::Migrate {
            config,
            from,
            to,
            keys_from,
            prefix,
            concurrency,
            max_rps,
            state,
            dry_run,
            db,
        } => {
            let cfg = load_or_exit_2(&config)?;
            let args = mediaproxy::cmd::migrate::Args {
                from,
                to,
                keys_from: keys_from.map(stdin_dash),
                prefix,
                concurrency,
                max_rps,
                state,
                dry_run,
                db: db.into_args(),
            };
            exit(rt.block_on(mediaproxy::cmd::migrate::run(cfg, args)))
        }
        Command::Verify {
            config,
            upstream,
            against,
            keys_from,
            prefix,
            concurrency,
            max_rps,
            db,
        } => {
            let cfg = load_or_exit_2(&config)?;
            let args = mediaproxy::cmd::verify::Args {
                db: db.into_args(),
                upstream,
                against,
                keys_from: keys_from.map(stdin_dash),
                prefix,
                concurrency,
                max_rps,
            };
            exit(rt.block_on(mediaproxy::cmd::verify::run(cfg, args)))
        }
        Command::Init {
            mastodon_env,
            output,
            force,
        } => exit(init(mastodon_env, output, force)),
        Command::Check { config, offline } => {
            let cfg = Config::load(&config)?;
            println!("config {}: ok", config.display());
            let mut lines = mediaproxy::check::local_checks(&cfg);
            if !offline {
                let probes = rt.block_on(mediaproxy::check::probe_all(&cfg));
                if probes.is_empty() {
                    println!("no upstreams configured");
                }
                lines.extend(probes);
            }
            let width = lines.iter().map(|l| l.name.len()).max().unwrap_or(0);
            for l in &lines {
                let verdict = if l.ok { "OK  " } else { "FAIL" };
                println!("{verdict} {:width$}  {:4}  {}", l.name, l.kind, l.detail);
            }
            Ok(if lines.iter().all(|l| l.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn cache_command(action: CacheAction) -> anyhow::Result<ExitCode> {
    use mediaproxy::cache;
    match action {
        CacheAction::Stats { config } => {
            let (cache_cfg, _) = Config::load_cache_only(&config)?;
            let dir = &cache_cfg.dir;
            if !dir.is_dir() {
                // Not "0 entries": a wrong path (or a proxy that never ran) is worth saying.
                anyhow::bail!(
                    "cache.dir {} does not exist (is this the config the proxy runs with?)",
                    dir.display()
                );
            }
            let s = cache::stats(dir).with_context(|| format!("reading {}", dir.display()))?;
            println!("cache    {}", dir.display());
            println!("entries  {}", s.entries);
            println!(
                "bytes    {} ({} of max_size {})",
                s.bytes,
                bytesize::ByteSize(s.bytes).display().iec(),
                bytesize::ByteSize(cache_cfg.max_size).display().iec()
            );
            match s.oldest {
                Some(t) => println!(
                    "oldest   {} ({} ago)",
                    httpdate::fmt_http_date(t),
                    humantime::format_duration(std::time::Duration::from_secs(
                        t.elapsed().map(|d| d.as_secs()).unwrap_or(0)
                    ))
                ),
                None => println!("oldest   -"),
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheAction::Purge {
            config,
            prefix,
            keys,
        } => {
            let (cache_cfg, path_prefix) = Config::load_cache_only(&config)?;
            let mut parsed = Vec::new();
            for k in &keys {
                // The same reading as migrate's key files: URL, path or key.
                let key = mediaproxy::keys::to_key(k.trim(), &path_prefix);
                parsed.push(key.map_err(|e| anyhow::anyhow!("{k:?}: {e}"))?);
            }
            for (key, found) in parsed.iter().zip(cache::purge(&cache_cfg.dir, &parsed)) {
                println!("{} {key}", if found { "purged    " } else { "not cached" });
            }
            if let Some(prefix) = prefix {
                let prefix = prefix.trim_start_matches('/');
                let purged = cache::purge_prefix(&cache_cfg.dir, prefix)
                    .with_context(|| format!("reading {}", cache_cfg.dir.display()))?;
                for key in &purged {
                    println!("purged     {key}");
                }
                println!("{} entries under {prefix}", purged.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheAction::Clear { config } => {
            let (cache_cfg, _) = Config::load_cache_only(&config)?;
            let n = cache::clear(&cache_cfg.dir)
                .with_context(|| format!("clearing {}", cache_cfg.dir.display()))?;
            println!("removed {n} entries from {}", cache_cfg.dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `-` is standard input.
fn stdin_dash(p: PathBuf) -> Option<PathBuf> {
    (p.as_os_str() != "-").then_some(p)
}

/// `migrate` and `verify` exit 2 on bad usage, a broken config included.
fn load_or_exit_2(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| {
        eprintln!("mediaproxy: {e}");
        std::process::exit(2)
    })
}

fn init(env: PathBuf, output: PathBuf, force: bool) -> Result<u8, mediaproxy::cmd::Usage> {
    use mediaproxy::cmd::init::{run, InitArgs};
    let written = run(&InitArgs { env, output, force })?;
    let config = written.config.display();
    println!("wrote {config}");
    for s in &written.secrets {
        println!("wrote {} (0600, owned by you: `chown root:mastodon` and `chmod 0640` it, or chown it to the service user)", s.display());
    }
    println!("next:");
    println!("  mediaproxy check --config {config}");
    println!("  cp systemd/mediaproxy.service systemd/mediaproxy.socket /etc/systemd/system/ && systemctl daemon-reload");
    println!("  systemctl enable --now mediaproxy.socket mediaproxy");
    Ok(0)
}

fn exit(result: Result<u8, mediaproxy::cmd::Usage>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(e) => {
            eprintln!("mediaproxy: {e}");
            Ok(ExitCode::from(2))
        }
    }
}
