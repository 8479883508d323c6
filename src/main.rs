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
    /// Validate the config and probe every upstream (DNS, connect, a signed request); exit 1 on any failure.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEDIAPROXY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mediaproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            println!("config {}: ok", config.display());
            let lines = rt.block_on(mediaproxy::check::probe_all(&cfg));
            if lines.is_empty() {
                println!("no upstreams configured");
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
