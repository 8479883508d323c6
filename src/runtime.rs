//! Everything a request needs, built from one config: the unit a reload swaps atomically.
//!
//! A request takes one snapshot (`Arc<Runtime>`) at its start and keeps it to its end, so a SIGHUP that
//! reorders upstreams never changes the rules under a response already in flight.

use std::sync::Arc;

use crate::cache::{Cache, Policy};
use crate::config::Config;
use crate::copy::Copier;
use crate::key::Key;
use crate::local::Roots;
use crate::metrics::Metrics;
use crate::upstream::{Upstream, UpstreamError};

pub struct Runtime {
    pub config: Config,
    pub roots: Roots,
    /// In config order: the first one that has a key serves it.
    pub upstreams: Vec<Upstream>,
    /// Where Mastodon writes (and deletes): the `copy_missing` upstream, else the first. A tombstoned
    /// key is asked of this one only.
    pub write_upstream: usize,
    /// Shared across reloads so counters keep counting.
    pub metrics: Arc<Metrics>,
    /// Opened once per process and shared across reloads (fills in flight, the index).
    pub cache: Arc<Cache>,
    /// The lazy-copy queue, shared across reloads too (its workers read the runtime in force).
    pub copier: Arc<Copier>,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream {name:?}: {source}")]
pub struct RuntimeError {
    name: String,
    source: UpstreamError,
}

impl Runtime {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        cache: Arc<Cache>,
        copier: Arc<Copier>,
    ) -> Result<Runtime, RuntimeError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                Upstream::new(u).map_err(|source| RuntimeError {
                    name: u.name.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let write_upstream = config
            .upstreams
            .iter()
            .position(|u| u.copy_missing)
            .unwrap_or(0);
        Ok(Runtime {
            write_upstream,
            roots: Roots::new(&config.local.roots, config.local.open_files),
            config,
            upstreams,
            metrics,
            cache,
            copier,
        })
    }

    /// The upstreams to ask for `key`, in order: all of them, or only the write upstream while Mastodon's
    /// bust of the key stands (an older bucket may still hold what Mastodon deleted or hid).
    pub fn chain(&self, key: &Key) -> &[Upstream] {
        self.chain_of(key, &self.upstreams)
    }

    /// The same choice over another set of clients of the same upstreams (the copy thread's).
    pub fn chain_of<'a>(&self, key: &Key, upstreams: &'a [Upstream]) -> &'a [Upstream] {
        if upstreams.len() > 1
            && self
                .cache
                .tombstoned(key.as_str(), self.config.cache.tombstone_ttl)
        {
            let w = self.write_upstream;
            return &upstreams[w..=w];
        }
        upstreams
    }

    /// The `copy_missing` upstream, if one is configured.
    pub fn copy_target(&self) -> Option<&Upstream> {
        let w = self.write_upstream;
        self.config
            .upstreams
            .get(w)
            .is_some_and(|u| u.copy_missing)
            .then(|| &self.upstreams[w])
    }

    pub fn policy(&self) -> Policy {
        Policy {
            ttl_ok: self.config.cache.ttl_ok,
            ttl_error: self.config.cache.ttl_error,
        }
    }
}
