//! The command line; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use mediaproxy::config::Config;

/// jemalloc, not glibc's malloc: measured 16-17 against 20-21 CPU microseconds per local hit (glibc kept
/// growing and trimming its heaps, an `mprotect` every few dozen requests), the same per cold miss,
/// and a lower peak RSS streaming (18 against 26 MiB for eight 50 MiB streams). mimalloc, tried first,
/// was as fast on hits but took 170 MiB and twice the CPU per MiB on those streams.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod args;
use args::{CacheAction, Cli, Command};

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
            let config = Config::find(config);
            let cfg = match &config {
                Some(path) => {
                    tracing::info!(config = %path.display(), "loading the config");
                    Config::load(path)?
                }
                None => {
                    let cfg = Config::embedded_default();
                    tracing::info!(
                        "no --config, no $MEDIAPROXY_CONFIG and no {}: using the embedded default",
                        mediaproxy::config::DEFAULT_PATH
                    );
                    for root in cfg.local.roots.iter().filter(|r| !r.is_dir()) {
                        tracing::warn!(root = %root.display(), "the embedded default serves this directory, which does not exist here: every request will be a 404");
                    }
                    cfg
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
            let cfg = load_or_exit_2(config)?;
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
            let cfg = load_or_exit_2(config)?;
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
            let config = config_path(config)?;
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
            let (cache_cfg, _) = Config::load_cache_only(&config_path(config)?)?;
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
            let (cache_cfg, path_prefix) = Config::load_cache_only(&config_path(config)?)?;
            let mut parsed = Vec::new();
            for k in &keys {
                // The same reading as migrate's key files: URL, path or key.
                let key = mediaproxy::keys::to_key(k.trim(), &path_prefix);
                parsed.push(key.map_err(|e| anyhow::anyhow!("{k:?}: {e}"))?);
            }
            let found = cache::purge(&cache_cfg.dir, &parsed)
                .with_context(|| format!("reading {}", cache_cfg.dir.display()))?;
            for (key, found) in parsed.iter().zip(found) {
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
            let (cache_cfg, _) = Config::load_cache_only(&config_path(config)?)?;
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
fn load_or_exit_2(given: Option<PathBuf>) -> anyhow::Result<Config> {
    let loaded = config_path(given).and_then(|path| Ok(Config::load(&path)?));
    loaded.map_err(|e| {
        eprintln!("mediaproxy: {e}");
        std::process::exit(2)
    })
}

/// `--config`, or where the config is looked for without it.
fn config_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Config::find(given).ok_or_else(|| {
        anyhow::anyhow!(
            "no --config given, $MEDIAPROXY_CONFIG is not set and {} does not exist",
            mediaproxy::config::DEFAULT_PATH
        )
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
