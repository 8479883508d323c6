//! `mediaproxy migrate`: copy every object the source has and the target lacks, through the same
//! engine as lazy copy (HEAD first, so a second run reads no body; never overwrite; verify), from keys
//! of a listing, a file, or the local roots. Resumable after a kill (a state file), idempotent.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{drive, is_original, is_s3, state_path, upstream, Pace, Source, Usage};
use crate::config::Config;
use crate::copy::{Copied, CopyError, Engine, From, Uploads};
use crate::key::Key;
use crate::keyset::{self, KeySet};
use crate::local::Roots;
use crate::upstream::Upstream;

pub struct Args {
    pub from: String,
    pub to: String,
    /// `Some(None)`: stdin.
    pub keys_from: Option<Option<PathBuf>>,
    pub prefix: String,
    pub concurrency: usize,
    pub max_rps: Option<u32>,
    pub state: Option<PathBuf>,
    pub dry_run: bool,
    pub db: super::DbArgs,
}

#[derive(Default)]
struct Counts {
    keys: AtomicU64,
    copied: AtomicU64,
    already: AtomicU64,
    missing: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    bytes: AtomicU64,
}

/// Pauses before retrying a copy that failed in a way worth retrying (S3's 5xx, 429, SlowDown…).
const RETRIES: [u64; 4] = [1, 2, 4, 8];

/// Returns the exit code: 0 nothing failed, 1 some key failed.
pub async fn run(config: Config, args: Args) -> Result<u8, Usage> {
    if !is_s3(&config, &args.to) {
        upstream(&config, &args.to, "--to")?;
        return Err(Usage(format!(
            "--to {:?} is not of type \"s3\": copies are signed PUTs",
            args.to
        )));
    }
    let target = upstream(&config, &args.to, "--to")?;
    if args.from == args.to {
        return Err(Usage("--from and --to name the same upstream".into()));
    }
    let source_up = (args.from != "local")
        .then(|| upstream(&config, &args.from, "--from"))
        .transpose()?;
    if let Some(Some(path)) = &args.keys_from {
        std::fs::File::open(path)
            .map_err(|e| Usage(format!("--keys-from {}: {e}", path.display())))?;
    }
    let db = args.db.source().await?;
    let source = match (&args.keys_from, &source_up) {
        (Some(_), _) if db.is_some() => {
            return Err(Usage(
                "give one key source: --keys-from or the Mastodon database".into(),
            ))
        }
        (None, _) if db.is_some() => db.expect("checked"),
        (Some(path), _) => Source::File(path.clone()),
        (None, None) => Source::Local(config.local.roots.clone()),
        (None, Some(up)) if is_s3(&config, &args.from) => Source::Listing(up.clone()),
        (None, Some(_)) => {
            return Err(Usage(format!(
                "--from {:?} is an http upstream, which has no listing: give --keys-from FILE or --mastodon-db URL",
                args.from
            )))
        }
    };
    if !args.prefix.is_empty() && !matches!(source, Source::Listing(_)) {
        return Err(Usage("--prefix applies to a listing only".into()));
    }
    // The source must answer before anything starts: a wrong name or key is exit 2, not 10,000 failures.
    if let Source::Listing(up) = &source {
        up.list_page(&args.prefix, None, None)
            .await
            .map_err(|e| Usage(format!("--from {:?} cannot be listed: {e}", args.from)))?;
    }
    target
        .head_signed(&crate::key::from_raw("mediaproxy-check/migrate-probe").expect("valid"))
        .await
        .map_err(|e| Usage(format!("--to {:?} cannot be reached: {e}", args.to)))?;

    let dir = config.cache.dir.clone();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Usage(format!("cache.dir {}: {e}", dir.display())))?;
    // Per process: several migrations (other targets, other id ranges) may share a cache.dir.
    let spool = dir.join(format!("migrate-tmp-{}", std::process::id()));
    std::fs::create_dir_all(&spool).map_err(|e| Usage(format!("{}: {e}", spool.display())))?;
    let what = format!(
        "migrate {} -> {} {}{}",
        source_up
            .as_ref()
            .map_or("local".to_string(), |u| u.origin.to_string()),
        target.origin,
        source.describe(&args.prefix),
        if args.dry_run { " dry-run" } else { "" }
    );
    let state = state_path(args.state.clone(), &config, &what);
    let resume = super::load_state(&state, &what);
    if let Some(mark) = &resume {
        eprintln!(
            "migrate: resuming after {mark:?} (state {})",
            state.display()
        );
    }
    let failed_list = state.with_extension("failed.txt");
    let list = std::fs::OpenOptions::new()
        .create(true)
        .append(resume.is_some())
        .write(true)
        .truncate(resume.is_none())
        .open(&failed_list)
        .map_err(|e| Usage(format!("{}: {e}", failed_list.display())))?;
    let list = Arc::new(Mutex::new(list));
    // Keys Mastodon deleted since the switch: a listing of the old bucket still has them.
    let tombstones =
        KeySet::read_only(&dir, "tombstones", config.cache.tombstone_ttl).unwrap_or_default();
    // Beside the state: a rerun of the same migration aborts what its killed predecessor left open.
    let uploads_name = format!(
        "{}.uploads",
        state
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("migrate")
    );
    let state_dir = state.parent().unwrap_or(&dir).to_path_buf();
    let (uploads, left_open) = Uploads::open_named(&state_dir, &uploads_name)
        .map_err(|e| Usage(format!("{}: {e}", state_dir.display())))?;
    for open in left_open {
        match target.abort_multipart(&open.key, &open.id).await {
            Ok(()) => uploads.ended(&open.id),
            Err(e) => eprintln!(
                "migrate: could not abort an upload a crash left open ({}): {e}",
                open.key
            ),
        }
    }

    let counts = Arc::new(Counts::default());
    let report = Arc::new(super::Report::new("migrate"));
    let shared = Arc::new(Shared {
        report: report.clone(),
        target: target.clone(),
        source_up,
        roots: Roots::new(&config.local.roots, config.local.open_files),
        spool,
        uploads: Arc::new(uploads),
        multipart_threshold: config.copy.multipart_threshold,
        part_size: config.copy.part_size,
        list: list.clone(),
        counts: counts.clone(),
        tombstones,
        dry_run: args.dry_run,
    });
    let started = Instant::now();
    let keys = source.keys(&config, &args.prefix, resume);
    let pace = Pace {
        concurrency: args.concurrency,
        max_rps: args.max_rps,
    };
    let work = {
        let shared = shared.clone();
        move |item: crate::keys::Item| {
            let shared = shared.clone();
            async move { shared.one(item.key, item.size).await }
        }
    };
    let invalid_list = list.clone();
    let r = report.clone();
    let invalid = move |line: u64, text: &str, why: &str| {
        r.note(format!("line {line}: {text:?} is no key ({why}); skipped"));
        let _ = writeln!(
            invalid_list.lock().expect("list"),
            "# invalid line {line}: {text}"
        );
    };
    let (c, r) = (counts.clone(), report.clone());
    let tick = move || r.show(line(&c, started.elapsed()));
    let every = report.every();
    let result = drive(
        keys,
        &pace,
        Some((&state, &what)),
        work,
        invalid,
        (every, tick),
    )
    .await;
    report.done();
    let _ = list.lock().expect("list").flush();
    let _ = std::fs::remove_dir(&shared.spool);
    if let Err(e) = &result {
        eprintln!("migrate: stopped: {e}; run it again to resume");
    }
    println!("{}", line(&counts, started.elapsed()));
    let failed = counts.failed.load(Ordering::Relaxed) + counts.missing.load(Ordering::Relaxed);
    if failed > 0 {
        println!("failed and missing keys: {}", failed_list.display());
    }
    if result.is_ok() {
        // A complete walk leaves no state: the next run starts over, finds what is there with one
        // HEAD each, and tries the failed keys again.
        let _ = std::fs::remove_file(&state);
    }
    if result.is_ok() && counts.failed.load(Ordering::Relaxed) == 0 {
        Ok(0)
    } else {
        Ok(1)
    }
}

fn line(c: &Counts, elapsed: Duration) -> String {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(0.001);
    format!(
        "{} keys: copied {}, already there {}, missing {}, failed {}, skipped (busted) {}; {} bytes in {:.1} s ({:.1} keys/s, {:.1} MiB/s)",
        get(&c.keys),
        get(&c.copied),
        get(&c.already),
        get(&c.missing),
        get(&c.failed),
        get(&c.skipped),
        get(&c.bytes),
        secs,
        get(&c.keys) as f64 / secs,
        get(&c.bytes) as f64 / secs / f64::from(1 << 20)
    )
}

struct Shared {
    report: Arc<super::Report>,
    target: Arc<Upstream>,
    source_up: Option<Arc<Upstream>>,
    roots: Roots,
    spool: PathBuf,
    uploads: Arc<Uploads>,
    multipart_threshold: u64,
    part_size: u64,
    list: Arc<Mutex<std::fs::File>>,
    counts: Arc<Counts>,
    tombstones: keyset::Memory,
    dry_run: bool,
}

impl Shared {
    /// False when the key failed (a rerun must try it again).
    async fn one(&self, key: Key, size: Option<u64>) -> bool {
        let c = &self.counts;
        c.keys.fetch_add(1, Ordering::Relaxed);
        if self.tombstones.contains(keyset::id_of(key.as_str())) {
            c.skipped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if self.dry_run {
            match self.target.head_signed(&key).await {
                Ok(Some(_)) => c.already.fetch_add(1, Ordering::Relaxed),
                _ => {
                    println!(
                        "would copy {key}{}",
                        size.map(|s| format!(" ({s} bytes)")).unwrap_or_default()
                    );
                    c.bytes.fetch_add(size.unwrap_or(0), Ordering::Relaxed);
                    c.copied.fetch_add(1, Ordering::Relaxed)
                }
            };
            return true;
        }
        let engine = Engine {
            target: &self.target,
            spool_dir: self.spool.clone(),
            multipart_threshold: self.multipart_threshold,
            part_size: self.part_size,
            uploads: self.uploads.clone(),
            target_lacks: false,
        };
        let from = match &self.source_up {
            Some(up) => From::Upstream(up),
            None => From::Local(&self.roots),
        };
        let mut result = engine.copy(&from, &key).await;
        for pause in RETRIES {
            match &result {
                Err(e) if e.retryable() => {
                    tokio::time::sleep(Duration::from_secs(pause)).await;
                    result = engine.copy(&from, &key).await;
                }
                _ => break,
            }
        }
        match result {
            Ok(Copied::Copied { bytes }) => {
                c.copied.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Ok(Copied::AlreadyThere) => {
                c.already.fetch_add(1, Ordering::Relaxed);
            }
            Err(CopyError::SourceGone) if !is_original(&key) => {
                c.missing.fetch_add(1, Ordering::Relaxed);
                self.record(
                    "missing",
                    &key,
                    "not in the source (a style this record may never have had)",
                );
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                self.report.note(format!("{key}: {e}"));
                self.record("failed", &key, &e.to_string());
                return false;
            }
        }
        true
    }

    /// A `#` line saying why, then the bare key: the list can be fed back with `--keys-from`.
    fn record(&self, what: &str, key: &Key, why: &str) {
        let _ = writeln!(self.list.lock().expect("list"), "# {what}: {why}\n{key}");
    }
}
