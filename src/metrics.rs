//! Prometheus counters, kept outside the reloadable runtime so a SIGHUP does not reset them.

use http::{HeaderValue, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    status: u16,
    x_cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
    result: String,
}

/// Cache failures an admin should alert on; handed to the cache, which knows nothing else of metrics.
#[derive(Clone, Default, Debug)]
pub struct CacheCounters {
    pub write_errors: Counter,
    pub corrupt: Counter,
    pub fills_cancelled: Counter,
    pub verifications: Counter,
    pub evictions: Counter,
    /// Fills by how they ended: `stored` (a new entry), `failed` (upstream or disk), `voided` (busted).
    pub fills: Family<ResultLabel, Counter>,
    bytes: Gauge,
    entries: Gauge,
    open_files: Gauge,
    tombstones: Gauge,
}

impl CacheCounters {
    pub fn fill(&self, result: &'static str) {
        self.fills.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn set_usage(&self, bytes: u64, entries: u64, open_files: usize, tombstones: usize) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.bytes.set(clamp(bytes));
        self.entries.set(clamp(entries));
        self.open_files.set(clamp(open_files as u64));
        self.tombstones.set(clamp(tombstones as u64));
    }
}

/// The lazy copy's counters, handed to the copier.
#[derive(Clone, Default, Debug)]
pub struct CopyCounters {
    pub queued: Counter,
    pub copied: Counter,
    pub skipped: Counter,
    pub failed: Counter,
    pub dropped: Counter,
    pub bytes: Counter,
    pub depth: Gauge,
}

pub struct Metrics {
    registry: Registry,
    pub cache: CacheCounters,
    pub copy: CopyCounters,
    requests: Family<RequestLabels, Counter>,
    /// The series of 200s served LOCAL, HIT and MISS, once each has been counted: nearly every request
    /// is one of them, and finding a series in the family takes a lock and a hash of its labels.
    ok_requests: [std::sync::OnceLock<Counter>; 3],
    upstream: Family<UpstreamLabels, Counter>,
    busts: Family<ResultLabel, Counter>,
    /// For the one-line status systemd shows: requests, and cache hits and misses among them.
    totals: [std::sync::atomic::AtomicU64; 3],
    lost: Family<UpstreamOnly, Counter>,
    upstream_seconds: Family<UpstreamOnly, Histogram>,
    sent_bytes: Counter,
    upstream_errors: Family<UpstreamReason, Counter>,
    reload_ok: Gauge,
    reload_at: Gauge,
    /// What `/readyz` says, fed by the same events as the counters.
    pub health: crate::health::Health,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamReason {
    upstream: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamOnly {
    upstream: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mediaproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "requests",
            "Responses sent, by status and X-Cache",
            requests.clone(),
        );
        registry.register(
            "upstream_requests",
            "Questions asked of each upstream, by result (found, not_found, error)",
            upstream.clone(),
        );
        let busts = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cache_busts",
            "Mastodon cache-buster requests: ok (purged and tombstoned), refused (wrong secret: served as a read), error (tombstone not saved)",
            busts.clone(),
        );
        let lost = Family::<UpstreamOnly, Counter>::default();
        registry.register(
            "upstream_lost_objects",
            "404s from an upstream for keys it had served before (its cache entry says so): a bucket losing objects",
            lost.clone(),
        );
        let upstream_seconds = Family::<UpstreamOnly, Histogram>::new_with_constructor(|| {
            // 5 ms to about 10 s.
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register(
            "upstream_request_duration_seconds",
            "Time from asking an upstream to its response headers (or error), by upstream",
            upstream_seconds.clone(),
        );
        let build = Family::<Version, Gauge>::default();
        build
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the running version is the label",
            build,
        );
        let upstream_errors = Family::<UpstreamReason, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by reason: dns, connect, timeout, transfer, http_4xx, http_5xx, http_other, credentials, no_such_bucket, protocol",
            upstream_errors.clone(),
        );
        let (reload_ok, reload_at) = (Gauge::default(), Gauge::default());
        reload_ok.set(1);
        reload_at.set(i64::try_from(crate::unix_time::now()).unwrap_or(0));
        registry.register(
            "config_last_reload_successful",
            "1 if the last config load (the start, or a SIGHUP) succeeded; 0 if the previous config is still serving",
            reload_ok.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (Unix time)",
            reload_at.clone(),
        );
        registry.register(
            "sendfile_bytes",
            "Response body bytes sent with sendfile, straight from the page cache (plain HTTP/1.1 file bodies)",
            crate::zerocopy::SENT.clone(),
        );
        let sent_bytes = Counter::default();
        registry.register(
            "sent_bytes",
            "Response body bytes sent to clients (all sources)",
            sent_bytes.clone(),
        );
        let cache = CacheCounters::default();
        registry.register(
            "cache_evictions",
            "Entries deleted to keep cache.max_size or because cache.inactive passed",
            cache.evictions.clone(),
        );
        registry.register(
            "cache_fills",
            "Cache fills by how they ended: stored, failed (upstream or disk), voided (busted meanwhile)",
            cache.fills.clone(),
        );
        registry.register(
            "cache_write_errors",
            "Cache fills that could not be written (disk full, I/O error); clients were still served",
            cache.write_errors.clone(),
        );
        registry.register(
            "cache_fills_cancelled",
            "Fills not cached: no client read them and cache.background_fills were all in use, or fills in flight already held half of cache.max_size",
            cache.fills_cancelled.clone(),
        );
        registry.register(
            "cache_verifications",
            "Large entries checksummed end to end before their first hit by this process (concurrent first hits share one pass)",
            cache.verifications.clone(),
        );
        registry.register(
            "cache_corrupt_entries",
            "Cache entries that failed their checksum and were dropped",
            cache.corrupt.clone(),
        );
        registry.register(
            "cache_bytes",
            "Disk space the cache index accounts for (4 KiB blocks; entries on disk are counted once the index has loaded)",
            cache.bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Entries in the cache index, negative (404) entries included",
            cache.entries.clone(),
        );
        registry.register(
            "cache_open_files",
            "Small cache entries whose descriptor is kept open between hits (cache.open_files)",
            cache.open_files.clone(),
        );
        registry.register(
            "tombstones",
            "Keys Mastodon busted within cache.tombstone_ttl: asked only of the write upstream, never copied",
            cache.tombstones.clone(),
        );
        let copy = CopyCounters::default();
        for (name, help, counter) in [
            ("copy_queued", "Keys queued for a copy into the copy_missing upstream", &copy.queued),
            ("copy_copied", "Objects copied into the copy_missing upstream", &copy.copied),
            ("copy_skipped", "Queued keys the target already had (nothing written)", &copy.skipped),
            ("copy_failed", "Copies that failed for good (after retries); each is logged with its key and error code", &copy.failed),
            ("copy_dropped", "Queued keys dropped because the queue was full (copy.queue)", &copy.dropped),
            ("copy_bytes", "Bytes written by copies", &copy.bytes),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "copy_queue_depth",
            "Keys waiting to be copied",
            copy.depth.clone(),
        );
        Metrics {
            registry,
            cache,
            copy,
            requests,
            ok_requests: Default::default(),
            upstream,
            busts,
            totals: Default::default(),
            lost,
            upstream_seconds,
            sent_bytes,
            upstream_errors,
            reload_ok,
            reload_at,
            health: Default::default(),
        }
    }

    pub fn upstream_duration(&self, upstream: &str, seconds: f64) {
        self.upstream_seconds
            .get_or_create(&UpstreamOnly {
                upstream: upstream.to_string(),
            })
            .observe(seconds);
    }

    pub fn sent(&self, bytes: u64) {
        self.sent_bytes.inc_by(bytes);
    }

    /// `upstream` answered 404 for `key`, which it had served before.
    pub fn lost_object(&self, upstream: &str, key: &str) {
        self.lost
            .get_or_create(&UpstreamOnly {
                upstream: upstream.to_string(),
            })
            .inc();
        if self.health.lost(upstream, key) {
            tracing::warn!(
                upstream,
                key,
                "the upstream lost an object it served before (404 now)"
            );
        }
    }

    /// Requests answered, cache hits (`HIT`) and misses (`MISS`, `STALE`) since the start.
    pub fn totals(&self) -> (u64, u64, u64) {
        let [r, h, m] = &self.totals;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        (get(r), get(h), get(m))
    }

    pub fn request(&self, status: StatusCode, x_cache: Option<&HeaderValue>) {
        // Static labels: this runs on every request, and an allocation per label showed up in profiles.
        let x_cache = match x_cache.map(HeaderValue::as_bytes) {
            Some(b"LOCAL") => "LOCAL",
            Some(b"HIT") => "HIT",
            Some(b"MISS") => "MISS",
            Some(b"STALE") => "STALE",
            _ => "",
        };
        let bump = |i: usize| self.totals[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bump(0);
        match x_cache {
            "HIT" => drop(bump(1)),
            "MISS" | "STALE" => drop(bump(2)),
            _ => {}
        }
        let series = || {
            self.requests
                .get_or_create(&RequestLabels {
                    status: status.as_u16(),
                    x_cache,
                })
                .clone()
        };
        let kept = match (status, x_cache) {
            (StatusCode::OK, "LOCAL") => Some(0),
            (StatusCode::OK, "HIT") => Some(1),
            (StatusCode::OK, "MISS") => Some(2),
            _ => None,
        };
        match kept {
            Some(i) => self.ok_requests[i].get_or_init(series).inc(),
            None => series().inc(),
        };
    }

    pub fn upstream_result(&self, upstream: &str, result: &str) {
        self.upstream
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// An upstream failed: counted by its reason.
    pub fn upstream_error(&self, upstream: &str, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamReason {
                upstream: upstream.to_string(),
                reason,
            })
            .inc();
    }

    /// A SIGHUP's outcome: the gauges Prometheus itself exports for its own config reloads.
    pub fn reloaded(&self, ok: bool) {
        self.reload_ok.set(i64::from(ok));
        if ok {
            self.reload_at
                .set(i64::try_from(crate::unix_time::now()).unwrap_or(0));
        }
    }

    pub fn bust(&self, result: &'static str) {
        self.busts.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests;
