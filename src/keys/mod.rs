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

pub use file::file;
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
