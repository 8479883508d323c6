//! The command line as clap reads it (the binary's alone: the library never sees clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Caching media reverse proxy for Mastodon: local files, then ordered buckets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy. Without --config: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml, else an
    /// embedded default (127.0.0.1:8080 serving ./public/system, no upstreams).
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
        /// Default: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Validate the file and the local side only (roots, cache dir, listeners), like `nginx -t`:
        /// no network. The unit runs it before a reload.
        #[arg(long)]
        offline: bool,
    },
    /// Copy every object --from has and --to lacks, never overwriting; resumable; exit 1 if a key failed.
    Migrate {
        /// Default: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml.
        #[arg(long)]
        config: Option<PathBuf>,
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
        /// Default: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml.
        #[arg(long)]
        config: Option<PathBuf>,
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
pub struct DbOpts {
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
    pub fn into_args(self) -> mediaproxy::cmd::DbArgs {
        mediaproxy::cmd::DbArgs {
            url: self.mastodon_db,
            env: self.mastodon_env,
            since: self.since,
            until: self.until,
        }
    }
}

#[derive(Subcommand)]
pub enum CacheAction {
    /// Entries, bytes and the oldest entry.
    Stats {
        /// Default: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Drop the entries for these keys: `media_attachments/…`, a URL path `/…` (with path_prefix), or a
    /// full media URL as copied from a browser or a post.
    Purge {
        /// Default: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Every entry whose key starts with this (after a takedown: `accounts/avatars/000/000/042/`).
        #[arg(long, value_name = "KEY_PREFIX")]
        prefix: Option<String>,
        #[arg(required_unless_present = "prefix")]
        keys: Vec<String>,
    },
    /// Drop every entry.
    Clear {
        /// Default: $MEDIAPROXY_CONFIG, else /etc/mediaproxy/proxy.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}
