//! A light background probe of every upstream, for `/readyz`: a HEAD of a key nobody uploads, every
//! 30 s, so an idle proxy still knows whether its buckets answer (real traffic updates the same state
//! in between). A 404 (or S3's 403 without `s3:ListBucket`) is a healthy answer.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::key;
use crate::runtime::Runtime;
use crate::upstream::Method;

const EVERY: Duration = Duration::from_secs(30);
const PROBE_KEY: &str = "/mediaproxy-check/probe.txt";

pub fn spawn(shared: Arc<ArcSwap<Runtime>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let key = key::parse(PROBE_KEY, "").expect("probe key is valid");
        // The first after EVERY, not at start: the first requests tell the same sooner, and a proxy
        // restarted in a loop must not add a request per upstream per start.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The upstreams in force now (a reload may have changed them).
            let rt = shared.load_full();
            for up in &rt.upstreams {
                // Bounded by the upstream's own timeouts.
                match up.fetch(Method::Head, &key, None).await {
                    Ok(_) => rt.metrics.health.answered(&up.name),
                    Err(e) => rt.metrics.health.failed(&up.name, &e),
                }
            }
        }
    })
}
