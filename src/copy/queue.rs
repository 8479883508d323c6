//! The lazy-copy queue: bounded, deduplicated, and journaled under `cache.dir` so that queued keys
//! survive SIGTERM, `kill -9` and reloads.
//!
//! A key is a member from the moment it is queued until its copy succeeded or failed for good; while a
//! member it is not queued again, so twenty readers of one missing key cause one copy. A full queue
//! drops its oldest waiting key (counted) rather than ever making a request wait.
//!
//! The journal (`cache.dir/copy-queue`) is a text file of `+KEY` (queued) and `-KEY` (finished, dropped)
//! lines, written by [`Queue::flush`] at least once a second: keys cannot hold a newline (the key parser
//! refuses control characters). At start it is replayed and rewritten with only the members; keys still
//! being copied when the process stopped have no `-` line, so they are copied again after a restart.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::key::{self, Key};

/// Rewrite the journal once it holds this many lines more than twice the members.
const COMPACT_AFTER: u64 = 50_000;

pub struct Queue {
    path: PathBuf,
    bound: usize,
    state: Mutex<State>,
    file: Mutex<(File, u64)>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Key>,
    /// Waiting or being copied.
    members: HashSet<Key>,
    /// Being copied (popped, not finished).
    in_flight: HashSet<Key>,
    /// Journal lines not yet written.
    pending: Vec<u8>,
}

/// What [`Queue::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Already waiting or being copied.
    Member,
    /// Queued, and the oldest waiting key was dropped to make room.
    DroppedOldest(Key),
}

impl Queue {
    /// Replays `dir/copy-queue` (creating it) and rewrites it with only the members, oldest first.
    pub fn open(dir: &Path, bound: usize) -> io::Result<Queue> {
        let path = dir.join("copy-queue");
        let mut state = State::default();
        match fs::read_to_string(&path) {
            Ok(text) => {
                // A line without its newline was torn by a crash: it never counted.
                let whole = text.rfind('\n').map_or("", |end| &text[..end]);
                for line in whole.lines() {
                    let (op, raw) = line.split_at(line.len().min(1));
                    let Ok(key) = key::parse(&format!("/{raw}"), "") else {
                        continue;
                    };
                    match op {
                        "+" if state.members.insert(key.clone()) => state.waiting.push_back(key),
                        "-" => {
                            state.members.remove(&key);
                        }
                        _ => {}
                    }
                }
                // Finished keys leave `waiting` here, in one pass; a key queued again keeps its first place.
                let mut seen = HashSet::new();
                let members = &state.members;
                state
                    .waiting
                    .retain(|k| members.contains(k) && seen.insert(k.clone()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        while state.waiting.len() > bound {
            if let Some(k) = state.waiting.pop_front() {
                state.members.remove(&k);
            }
        }
        let file = rewrite(&path, state.waiting.iter())?;
        let lines = state.waiting.len() as u64;
        Ok(Queue {
            path,
            bound,
            state: Mutex::new(state),
            file: Mutex::new((file, lines)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("copy queue lock")
    }

    /// Never blocks on I/O: the journal line is written by the next [`Queue::flush`].
    pub fn push(&self, key: &Key) -> Pushed {
        let mut s = self.lock();
        if s.members.contains(key) {
            return Pushed::Member;
        }
        let mut pushed = Pushed::Queued;
        if s.waiting.len() >= self.bound {
            if let Some(old) = s.waiting.pop_front() {
                s.members.remove(&old);
                journal(&mut s.pending, '-', &old);
                pushed = Pushed::DroppedOldest(old);
            }
        }
        s.members.insert(key.clone());
        s.waiting.push_back(key.clone());
        journal(&mut s.pending, '+', key);
        pushed
    }

    /// The oldest waiting key, which stays a member until [`Queue::finish`].
    pub fn pop(&self) -> Option<Key> {
        let mut s = self.lock();
        let key = s.waiting.pop_front()?;
        s.in_flight.insert(key.clone());
        Some(key)
    }

    /// The key's copy succeeded, failed for good, or is no longer wanted.
    pub fn finish(&self, key: &Key) {
        let mut s = self.lock();
        s.in_flight.remove(key);
        if s.members.remove(key) {
            journal(&mut s.pending, '-', key);
        }
    }

    /// Keys waiting (not those being copied).
    pub fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Writes and syncs the journal lines gathered since the last flush; rewrites the file when it has
    /// grown far past the members. Blocking: run it off the async runtime.
    pub fn flush(&self) -> io::Result<()> {
        // The file lock first: two flushes (the periodic one and the one at shutdown) append in the
        // order their lines were taken.
        let mut file = self.file.lock().expect("copy journal lock");
        let (bytes, lines, members) = {
            let mut s = self.lock();
            if s.pending.is_empty() {
                return Ok(());
            }
            let bytes = std::mem::take(&mut s.pending);
            let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
            (bytes, lines, s.members.len() as u64)
        };
        let len = file.0.metadata()?.len();
        if let Err(e) = file.0.write_all(&bytes).and_then(|()| file.0.sync_data()) {
            // Cut a half-written line off and keep the lines for the next flush, in front.
            let _ = file.0.set_len(len);
            let mut s = self.lock();
            let later = std::mem::replace(&mut s.pending, bytes);
            s.pending.extend_from_slice(&later);
            return Err(e);
        }
        file.1 += lines;
        if file.1 > COMPACT_AFTER + 2 * members {
            // Under the file lock: no flush can append to the old file meanwhile. Members queued after
            // this snapshot have their `+` line in `pending`, written to the new file by the next flush.
            let snapshot: Vec<Key> = {
                let s = self.lock();
                s.in_flight
                    .iter()
                    .chain(s.waiting.iter())
                    .cloned()
                    .collect()
            };
            *file = (rewrite(&self.path, snapshot.iter())?, snapshot.len() as u64);
        }
        Ok(())
    }
}

fn journal(buf: &mut Vec<u8>, op: char, key: &Key) {
    buf.push(op as u8);
    buf.extend_from_slice(key.as_str().as_bytes());
    buf.push(b'\n');
}

/// Writes a fresh journal holding `keys` (tmp file, fsync, rename) and returns it open for appending.
fn rewrite<'a>(path: &Path, keys: impl Iterator<Item = &'a Key>) -> io::Result<File> {
    let tmp = path.with_extension("tmp");
    let mut out = io::BufWriter::new(File::create(&tmp)?);
    for k in keys {
        writeln!(out, "+{}", k.as_str())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Key {
        key::parse(&format!("/{s}"), "").unwrap()
    }

    #[test]
    fn members_are_deduplicated_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), 10).unwrap();
        assert_eq!(q.push(&k("a/1")), Pushed::Queued);
        assert_eq!(q.push(&k("a/1")), Pushed::Member);
        assert_eq!(q.pop(), Some(k("a/1")));
        assert_eq!(q.push(&k("a/1")), Pushed::Member, "still being copied");
        q.finish(&k("a/1"));
        assert_eq!(q.push(&k("a/1")), Pushed::Queued);
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), 2).unwrap();
        q.push(&k("a/1"));
        q.push(&k("a/2"));
        assert_eq!(q.push(&k("a/3")), Pushed::DroppedOldest(k("a/1")));
        assert_eq!(q.depth(), 2);
        assert_eq!(q.pop(), Some(k("a/2")));
    }

    #[test]
    fn the_journal_keeps_waiting_and_unfinished_keys_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), 10).unwrap();
        for i in 0..4 {
            q.push(&k(&format!("a/{i}")));
        }
        let first = q.pop().unwrap(); // being copied when the process dies
        let second = q.pop().unwrap();
        q.finish(&second); // copied
        q.flush().unwrap();
        q.push(&k("a/unflushed"));
        drop(q); // no flush: lost, as anything queued less than a flush interval before kill -9
        let mut raw = fs::read(dir.path().join("copy-queue")).unwrap();
        raw.extend_from_slice(b"+a/torn"); // a torn line
        fs::write(dir.path().join("copy-queue"), raw).unwrap();
        let q = Queue::open(dir.path(), 10).unwrap();
        let mut left = Vec::new();
        while let Some(key) = q.pop() {
            left.push(key.as_str().to_string());
        }
        assert_eq!(left, [first.as_str(), "a/2", "a/3"]);
    }

    #[test]
    fn the_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), 10).unwrap();
        for i in 0..(COMPACT_AFTER / 2 + 10) {
            let key = k(&format!("media_attachments/{i}"));
            q.push(&key);
            q.pop();
            q.finish(&key);
        }
        q.push(&k("a/last"));
        q.flush().unwrap();
        let text = fs::read_to_string(dir.path().join("copy-queue")).unwrap();
        assert_eq!(text, "+a/last\n");
    }
}
