//! `mediaproxy verify`: prove nothing is missing before the old bucket is deleted. For every key (from
//! a file, or the listing of `--against`), a HEAD on `--upstream`; with `--against`, sizes are compared,
//! and ETags when both are plain MD5s. Flat memory whatever the number of keys.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{drive, is_s3, upstream, Pace, Source, Usage};
use crate::config::Config;
use crate::key::Key;
use crate::upstream::{Fetched, Head, Method, Upstream, WriteError};

pub struct Args {
    pub upstream: String,
    pub against: Option<String>,
    pub keys_from: Option<Option<PathBuf>>,
    pub prefix: String,
    pub concurrency: usize,
    pub max_rps: Option<u32>,
    pub db: super::DbArgs,
}

#[derive(Default)]
struct Counts {
    keys: AtomicU64,
    ok: AtomicU64,
    missing: AtomicU64,
    differ: AtomicU64,
    /// In neither bucket (with `--against`), or a derived style missing (without): nothing was lost.
    absent: AtomicU64,
    failed: AtomicU64,
}

/// Exit code: 0 every key is there (and alike), 1 otherwise.
pub async fn run(config: Config, args: Args) -> Result<u8, Usage> {
    let checked = upstream(&config, &args.upstream, "--upstream")?;
    let against = args
        .against
        .as_deref()
        .map(|name| upstream(&config, name, "--against"))
        .transpose()?;
    if let Some(Some(path)) = &args.keys_from {
        std::fs::File::open(path)
            .map_err(|e| Usage(format!("--keys-from {}: {e}", path.display())))?;
    }
    // Credentials or a name that do not work are bad usage, not a million "unchecked" lines.
    let probe = crate::key::from_raw("mediaproxy-check/verify-probe").expect("valid");
    // (The read path's own probe: a 403 is told apart into a missing key or refused credentials.)
    if let Err(e) = checked.fetch(Method::Head, &probe, None).await {
        return Err(Usage(format!(
            "--upstream {:?} cannot be asked: {e}",
            checked.name
        )));
    }
    let db = args.db.source().await?;
    let source = match (&args.keys_from, &against) {
        (None, _) if db.is_some() => db.expect("checked"),
        (Some(path), _) => Source::File(path.clone()),
        (None, Some(a)) if is_s3(&config, &a.name) => Source::Listing(a.clone()),
        (None, Some(a)) => {
            return Err(Usage(format!(
                "--against {:?} is an http upstream, which has no listing: give --keys-from FILE",
                a.name
            )))
        }
        (None, None) => {
            return Err(Usage(
                "give --keys-from FILE, --mastodon-db URL, or --against NAME to verify every key NAME lists".into(),
            ))
        }
    };
    if let Source::Listing(up) = &source {
        up.list_page(&args.prefix, None, None)
            .await
            .map_err(|e| Usage(format!("--against {:?} cannot be listed: {e}", up.name)))?;
    }
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let keys = source.keys(&config, &args.prefix, None);
    let work = {
        let (checked, against, counts) = (checked.clone(), against.clone(), counts.clone());
        move |item: crate::keys::Item| {
            let (checked, against, counts) = (checked.clone(), against.clone(), counts.clone());
            async move {
                one(&checked, against.as_deref(), &item.key, &counts).await;
                true
            }
        }
    };
    let pace = Pace {
        concurrency: args.concurrency,
        max_rps: args.max_rps,
    };
    let report = Arc::new(super::Report::new("verify"));
    let r = report.clone();
    let invalid = move |line: u64, text: &str, why: &str| {
        r.note(format!("line {line}: {text:?} is no key ({why}); skipped"));
    };
    let (c, r) = (counts.clone(), report.clone());
    let tick = move || r.show(summary(&c, started));
    let every = report.every();
    let result = drive(keys, &pace, None, work, invalid, (every, tick)).await;
    report.done();
    println!("{}", summary(&counts, started));
    if let Err(e) = result {
        eprintln!("verify: stopped: {e}");
        return Ok(1);
    }
    let bad = counts.missing.load(Ordering::Relaxed)
        + counts.differ.load(Ordering::Relaxed)
        + counts.failed.load(Ordering::Relaxed);
    Ok(u8::from(bad > 0))
}

fn summary(c: &Counts, started: Instant) -> String {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    format!(
        "{} keys: {} present, {} missing, {} differ, {} absent (derived styles never made, or in neither bucket), {} could not be checked, in {:.1} s",
        get(&c.keys),
        get(&c.ok),
        get(&c.missing),
        get(&c.differ),
        get(&c.absent),
        get(&c.failed),
        started.elapsed().as_secs_f64()
    )
}

async fn one(checked: &Upstream, against: Option<&Upstream>, key: &Key, c: &Counts) {
    c.keys.fetch_add(1, Ordering::Relaxed);
    let here = match head(checked, key).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            if let Some(other) = against {
                if let Ok(None) = head(other, key).await {
                    c.absent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            } else if !super::is_original(key) {
                // A derived style a record may never have had (Mastodon derives from today's code).
                c.absent.fetch_add(1, Ordering::Relaxed);
                println!("absent {key} (not an original)");
                return;
            }
            c.missing.fetch_add(1, Ordering::Relaxed);
            println!("missing {key}");
            return;
        }
        Err(e) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            println!("unchecked {key} ({e})");
            return;
        }
    };
    if let Some(other) = against {
        match head(other, key).await {
            Ok(Some(there)) => {
                let md5 = |h: &Head| h.etag.as_deref().and_then(crate::copy::plain_md5);
                let etags_differ =
                    matches!((md5(&here), md5(&there)), (Some(a), Some(b)) if a != b);
                if here.len != there.len || etags_differ {
                    c.differ.fetch_add(1, Ordering::Relaxed);
                    println!(
                        "differs {key} ({} bytes {:?} vs {} bytes {:?})",
                        here.len, here.etag, there.len, there.etag
                    );
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                println!("unchecked {key} ({e})");
                return;
            }
        }
    }
    c.ok.fetch_add(1, Ordering::Relaxed);
}

/// Signed for an `s3` upstream (private objects count), a plain HEAD for an `http` one.
async fn head(up: &Upstream, key: &Key) -> Result<Option<Head>, WriteError> {
    match up.head_signed(key).await {
        Err(WriteError::NotWritable) => match up.fetch(Method::Head, key, None).await {
            Ok(Fetched::Found(obj)) => Ok(Some(Head {
                len: obj.meta.len.unwrap_or(0),
                etag: obj.meta.etag,
            })),
            Ok(Fetched::NotFound) => Ok(None),
            Err(e) => Err(WriteError::Transport(e.to_string())),
        },
        other => other,
    }
}
