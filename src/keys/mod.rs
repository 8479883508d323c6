//! Where `migrate` and `verify` get their keys, as one stream type over several sources: a bucket
//! listing, a file (or stdin) of keys or URLs, the local roots, Mastodon's database (`mastodon` turns a
//! row into its keys, `mastodon_db` reads the rows). Each key comes with a [`Mark`], the
//! source's own position, so a run killed at any point resumes after the last key it finished.
//!
//! Sources know nothing of copying; `cmd/migrate` and `cmd/verify` drive them.

mod file;
mod listing;
mod local;
pub mod mastodon;
mod mastodon_db;

use std::pin::Pin;

use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::key::Key;

pub use file::{file, to_key};
pub use listing::listing;
pub use local::local;
pub use mastodon_db::{mastodon_db, Db};

/// A key to work on.
#[derive(Debug, Clone)]
pub struct Item {
    pub key: Key,
    /// When the source knows it (a listing), for `--dry-run`'s total.
    pub size: Option<u64>,
    pub mark: Mark,
}

/// How far a source got: resuming starts after this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "snake_case")]
pub enum Mark {
    /// A listing (keys come in byte order): after this key.
    Listing { after: String },
    /// A file of keys: after this line (1-based).
    Line { line: u64 },
    /// The local roots (root by root, each walked in per-segment order): after this key of that root.
    Local { root: usize, after: String },
    /// Mastodon's database: after this row id of the `spec`-th table and attachment.
    Db { spec: usize, after: i64 },
}

pub enum Entry {
    Key(Item),
    /// A line of a key file that is no valid key: reported and skipped.
    Invalid {
        line: u64,
        text: String,
        why: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("listing upstream {upstream:?}: {why}")]
    Listing { upstream: String, why: String },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        source: std::io::Error,
    },
}

pub type Keys = Pin<Box<dyn Stream<Item = Result<Entry, KeysError>> + Send>>;

/// The receiving end of a source that produces in a task or thread of its own. The producer sends
/// `Ok(None)` when it has finished: a channel that closes without it (a panic) is an error, not an
/// end that would look like a complete walk (and delete a migration's saved position).
pub(crate) fn received(
    rx: tokio::sync::mpsc::Receiver<Result<Option<Entry>, KeysError>>,
    what: &'static str,
) -> Keys {
    Box::pin(futures_util::stream::unfold(
        Some(rx),
        move |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(Ok(Some(entry))) => Some((Ok(entry), Some(rx))),
                Some(Ok(None)) => None,
                Some(Err(e)) => Some((Err(e), None)),
                None => Some((
                    Err(KeysError::Read {
                        what: what.to_string(),
                        source: std::io::Error::other("the key source stopped unexpectedly"),
                    }),
                    None,
                )),
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_producer_that_dies_is_an_error_not_an_end() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let item = Item {
            key: crate::key::from_raw("a/b").unwrap(),
            size: None,
            mark: Mark::Line { line: 1 },
        };
        tx.send(Ok(Some(Entry::Key(item)))).await.unwrap();
        drop(tx); // no Ok(None): a panic, say
        let got: Vec<_> = received(rx, "test").collect().await;
        assert!(matches!(got[0], Ok(Entry::Key(_))));
        assert!(matches!(got[1], Err(KeysError::Read { .. })));

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Option<Entry>, KeysError>>(4);
        tx.send(Ok(None)).await.unwrap();
        drop(tx);
        assert_eq!(received(rx, "test").count().await, 0, "a clean end");
    }
}
