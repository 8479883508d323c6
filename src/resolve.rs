//! The order in which sources are asked: local roots, then (next) the cache, then upstreams in
//! config order. Also the one place that decides what "not found" means versus "failed": a bucket
//! that answers 404 is telling the truth about itself only, so the next one is still asked; a bucket
//! that errors is skipped and remembered, so that a key nobody could confirm missing becomes a 502,
//! not a 404 that clients and caches would believe.

use http::HeaderValue;

use crate::key::Key;
use crate::object::Object;
use crate::runtime::Runtime;
use crate::upstream::{Fetched, Method};

pub enum Outcome {
    Found(Object),
    /// Every source answered, and none has it.
    NotFound,
    /// None has it, and at least one upstream could not answer.
    Failed,
}

pub async fn lookup(
    rt: &Runtime,
    key: &Key,
    method: Method,
    range: Option<&HeaderValue>,
) -> Outcome {
    if let Some(obj) = rt.roots.open(key) {
        return Outcome::Found(obj);
    }
    let mut failed = false;
    for up in &rt.upstreams {
        match up.fetch(method, key, range).await {
            Ok(Fetched::Found(obj)) => {
                rt.metrics.upstream_result(&up.name, "found");
                return Outcome::Found(obj);
            }
            Ok(Fetched::NotFound) => rt.metrics.upstream_result(&up.name, "not_found"),
            Err(e) => {
                rt.metrics.upstream_result(&up.name, "error");
                tracing::warn!(upstream = %up.name, %key, error = %e, "upstream failed, trying the next");
                failed = true;
            }
        }
    }
    if failed {
        Outcome::Failed
    } else {
        Outcome::NotFound
    }
}
