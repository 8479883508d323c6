//! The admin commands that walk many keys (`migrate`, `verify`), one file each, thin over `keys` and
//! `copy`; this file holds what they share: naming upstreams, choosing the key source, and the driver
//! that runs a bounded number of keys at once, at a bounded rate, saving where it got to.

pub mod init;
pub mod migrate;
mod report;
pub mod verify;

pub use report::Report;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::config::{Config, UpstreamKind};
use crate::keys::{self, Entry, Item, Keys, Mark};
use crate::upstream::Upstream;

/// Exit 2: the command line or the config asks for something that cannot be (an unknown upstream, a
/// target that is not `s3`, a source that cannot be reached at start).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// `name` among the configured upstreams.
pub fn upstream(config: &Config, name: &str, flag: &str) -> Result<Arc<Upstream>, Usage> {
    let cfg = config
        .upstreams
        .iter()
        .find(|u| u.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
            Usage(format!(
                "{flag} {name:?}: no such upstream in the config (there are: {})",
                names.join(", ")
            ))
        })?;
    Upstream::new(cfg)
        .map(Arc::new)
        .map_err(|e| Usage(format!("{flag} {name:?}: {e}")))
}

pub fn is_s3(config: &Config, name: &str) -> bool {
    config
        .upstreams
        .iter()
        .any(|u| u.name == name && matches!(u.kind, UpstreamKind::S3 { .. }))
}

/// Where the keys come from, in the order of preference the CLI documents.
pub enum Source {
    File(Option<PathBuf>),
    Listing(Arc<Upstream>),
    Local(Vec<PathBuf>),
    Mastodon(Box<keys::Db>),
}

/// `--mastodon-db URL` or `--mastodon-env FILE` (Mastodon's `.env.production`), with `--since`/`--until`.
pub struct DbArgs {
    pub url: Option<String>,
    pub env: Option<PathBuf>,
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl DbArgs {
    /// `Ok(None)` when neither is given; exit 2 for a value that cannot be used, or a database that
    /// does not answer.
    pub async fn source(&self) -> Result<Option<Source>, Usage> {
        let config = match (&self.url, &self.env) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(Usage(
                    "give --mastodon-db or --mastodon-env, not both".into(),
                ))
            }
            (Some(url), None) => url
                .parse::<tokio_postgres::Config>()
                .map_err(|e| Usage(format!("--mastodon-db: not a PostgreSQL URL ({e})")))?,
            (None, Some(path)) => from_env_file(path)?,
        };
        let db = keys::Db {
            config,
            since: self.since,
            until: self.until,
        };
        db.check()
            .await
            .map_err(|e| Usage(format!("cannot reach Mastodon's database: {e}")))?;
        Ok(Some(Source::Mastodon(Box::new(db))))
    }
}

/// Mastodon's `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`, `DB_PASS` (a standard install: a Unix socket
/// in `/var/run/postgresql`, peer authentication, no password: run as the `mastodon` user).
fn from_env_file(path: &Path) -> Result<tokio_postgres::Config, Usage> {
    let vars = crate::envfile::read(path)
        .map_err(|e| Usage(format!("--mastodon-env {}: {e}", path.display())))?;
    let get = |k: &str, default: &str| {
        vars.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let mut config = tokio_postgres::Config::new();
    let host = get("DB_HOST", "/var/run/postgresql");
    if host.starts_with('/') {
        config.host_path(&host);
    } else {
        config.host(&host);
    }
    let port = get("DB_PORT", "5432");
    config.port(port.parse().map_err(|_| {
        Usage(format!(
            "--mastodon-env: DB_PORT {port:?} is not a port number"
        ))
    })?);
    config.dbname(get("DB_NAME", "mastodon_production"));
    config.user(get("DB_USER", "mastodon"));
    if let Some(pass) = vars.get("DB_PASS").filter(|p| !p.is_empty()) {
        config.password(pass);
    }
    Ok(config)
}

impl Source {
    /// Names the source in the state file, so a state is only resumed by the same kind of run.
    pub fn describe(&self, prefix: &str) -> String {
        match self {
            Source::File(Some(p)) => {
                // Another file at the same path is another run.
                let id = std::fs::metadata(p).map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    format!("{} {} {}", m.len(), m.mtime(), m.ino())
                });
                format!("file {} {}", p.display(), id.unwrap_or_default())
            }
            Source::File(None) => "stdin".into(),
            Source::Listing(up) => format!("listing {} {prefix}", up.origin),
            Source::Local(roots) => format!("local {roots:?}"),
            Source::Mastodon(db) => format!(
                "mastodon {:?} {:?} {:?} {:?} {:?}",
                db.config.get_hosts(),
                db.config.get_dbname(),
                db.config.get_ports(),
                db.since,
                db.until
            ),
        }
    }

    pub fn keys(&self, config: &Config, prefix: &str, resume: Option<Mark>) -> Keys {
        match self {
            Source::File(path) => {
                keys::file(path.clone(), config.server.path_prefix.clone(), resume)
            }
            Source::Listing(up) => keys::listing(up.clone(), prefix.to_string(), resume),
            Source::Local(roots) => keys::local(roots.clone(), resume),
            Source::Mastodon(db) => keys::mastodon_db((**db).clone(), resume),
        }
    }
}

/// What a run saved: where its source got to (every key before it is done).
#[derive(Serialize, Deserialize)]
struct State {
    source: String,
    mark: Option<Mark>,
}

pub fn state_path(explicit: Option<PathBuf>, config: &Config, what: &str) -> PathBuf {
    explicit.unwrap_or_else(|| {
        let id = crate::keyset::id_of(what);
        config.cache.dir.join(format!("migrate-{id:016x}.state"))
    })
}

/// Resumes from `path` when it holds a run of the same `source` (never standard input: it is
/// another stream each time).
fn load_state(path: &Path, source: &str) -> Option<Mark> {
    if source.contains(" stdin") {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let state: State = serde_json::from_str(&text).ok()?;
    (state.source == source).then_some(state.mark).flatten()
}

fn save_state(path: &Path, source: &str, mark: &Option<Mark>) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(&State {
        source: source.to_string(),
        mark: mark.clone(),
    })
    .map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Marks completions, which come in any order, and knows the last mark before which all are done.
/// A failed key pins the saved position before it, so a rerun after a kill tries it again (what was
/// done after it is found "already there" by one HEAD each).
#[derive(Default)]
struct Progress {
    next: u64,
    marks: BTreeMap<u64, Mark>,
    done: BTreeSet<u64>,
    upto: Option<Mark>,
    first_undone: u64,
    pinned: bool,
}

impl Progress {
    fn start(&mut self, mark: Mark) -> u64 {
        let seq = self.next;
        self.next += 1;
        if !self.pinned {
            self.marks.insert(seq, mark);
        }
        seq
    }

    fn finish(&mut self, seq: u64, ok: bool) {
        if !ok {
            self.pinned = true;
        }
        if self.pinned {
            self.marks.clear();
            self.done.clear();
            return;
        }
        self.done.insert(seq);
        while self.done.remove(&self.first_undone) {
            self.upto = self.marks.remove(&self.first_undone);
            self.first_undone += 1;
        }
    }

    /// Keys started but not yet behind the saved position (bounds the marks kept in memory).
    fn open(&self) -> u64 {
        if self.pinned {
            0
        } else {
            self.next - self.first_undone
        }
    }
}

/// At most this many keys (times the concurrency) between the oldest unfinished one and the newest:
/// one slow object cannot make the kept marks grow with the number of keys.
const AHEAD_PER_SLOT: u64 = 64;

/// How the driver runs: at most `concurrency` keys at once, at most `max_rps` started a second.
pub struct Pace {
    pub concurrency: usize,
    pub max_rps: Option<u32>,
}

/// Runs `work` on every key of `keys` (it answers false for a key that failed and must be tried again
/// by a rerun); `invalid` on every line that is no key. Saves the position to
/// `state` at least once a second and at the end (not after a fatal error of the source, which is
/// returned). `tick` is called every `tick_every` for progress output.
pub async fn drive<W, F>(
    keys: Keys,
    pace: &Pace,
    state: Option<(&Path, &str)>,
    work: W,
    mut invalid: impl FnMut(u64, &str, &str),
    (tick_every, mut tick): (Duration, impl FnMut()),
) -> Result<(), keys::KeysError>
where
    W: Fn(Item) -> F + Send + Sync + 'static,
    F: Future<Output = bool> + Send + 'static,
{
    let work = Arc::new(work);
    let slots = Arc::new(Semaphore::new(pace.concurrency.max(1)));
    let progress = Arc::new(Mutex::new(Progress::default()));
    let mut rate = pace.max_rps.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r.max(1))));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut saved = Instant::now();
    let mut ticked = Instant::now();
    let save = |progress: &Mutex<Progress>| {
        if let Some((path, source)) = state {
            let mark = progress.lock().expect("progress").upto.clone();
            if mark.is_some() {
                if let Err(e) = save_state(path, source, &mark) {
                    tracing::warn!(state = %path.display(), error = %e, "could not save progress");
                }
            }
        }
    };
    let mut keys = keys;
    let mut failure = None;
    while let Some(entry) = keys.next().await {
        let item = match entry {
            Ok(Entry::Key(item)) => item,
            Ok(Entry::Invalid { line, text, why }) => {
                invalid(line, &text, &why);
                continue;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if let Some(r) = rate.as_mut() {
            r.tick().await;
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let ahead = AHEAD_PER_SLOT * pace.concurrency.max(1) as u64;
        while progress.lock().expect("progress").open() > ahead {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seq = progress.lock().expect("progress").start(item.mark.clone());
        let (work, progress2) = (work.clone(), progress.clone());
        tokio::spawn(async move {
            let ok = work(item).await;
            progress2.lock().expect("progress").finish(seq, ok);
            drop(permit);
        });
        if saved.elapsed() >= Duration::from_secs(1) {
            save(&progress);
            saved = Instant::now();
        }
        if ticked.elapsed() >= tick_every {
            tick();
            ticked = Instant::now();
        }
    }
    // Wait for the keys in flight.
    let all = u32::try_from(pace.concurrency.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    if let Some(e) = failure {
        save(&progress);
        return Err(e);
    }
    save(&progress);
    Ok(())
}

/// A style other than `original` may be missing for good reasons (derived by a newer Mastodon than the
/// one that stored the record); a missing `original` is a lost file.
pub fn is_original(key: &crate::key::Key) -> bool {
    key.as_str().rsplit('/').nth(1) == Some("original")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_the_last_mark_before_which_everything_finished() {
        let mut p = Progress::default();
        let m = |n: u64| Mark::Line { line: n };
        let a = p.start(m(1));
        let b = p.start(m(2));
        let c = p.start(m(3));
        p.finish(b, true);
        assert_eq!(p.upto, None, "key 1 is still running");
        p.finish(a, true);
        assert_eq!(p.upto, Some(m(2)));
        p.finish(c, true);
        assert_eq!(p.upto, Some(m(3)));
        // A failed key pins the position before it, whatever finishes later.
        let d = p.start(m(4));
        let e = p.start(m(5));
        p.finish(e, true);
        p.finish(d, false);
        let f = p.start(m(6));
        p.finish(f, true);
        assert_eq!(p.upto, Some(m(3)));
        assert_eq!(p.open(), 0);
    }
}
