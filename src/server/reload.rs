//! SIGHUP: re-read the config file and apply everything it can (upstreams, TTLs, the copy target, TLS
//! certificates, timeouts), naming each key that only a restart changes. A file that does not load,
//! or a certificate that does not, keeps the whole previous config serving.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::Conn;
use crate::cache::Cache;
use crate::config::Config;
use crate::copy::Copier;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

pub(super) fn reload(
    shared: &ArcSwap<Runtime>,
    conns: &ArcSwap<Conn>,
    path: Option<&std::path::Path>,
    started_with: &Config,
    metrics: &Arc<Metrics>,
    (cache, copier): (&Arc<Cache>, &Arc<Copier>),
) {
    let Some(path) = path else {
        tracing::warn!(
            "SIGHUP ignored: running on the embedded default config, there is no file to re-read"
        );
        return;
    };
    super::notify::reloading();
    let result = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|cfg| {
            let conn = Conn::new(&cfg.server).map_err(|e| e.to_string())?;
            let rt = Runtime::new(cfg, metrics.clone(), cache.clone(), copier.clone())
                .map_err(|e| e.to_string())?;
            Ok((rt, conn))
        });
    match result {
        Ok((rt, conn)) => {
            for key in restart_only(started_with, &rt.config) {
                tracing::warn!(key, "changed in the file, but applies only after a restart; the rest of the new config is in force");
            }
            let names: Vec<&str> = rt.upstreams.iter().map(|u| u.name.as_str()).collect();
            tracing::info!(config = %path.display(), upstreams = ?names, "config reloaded");
            conns.store(Arc::new(conn));
            shared.store(Arc::new(rt));
            metrics.reloaded(true);
        }
        Err(e) => {
            metrics.reloaded(false);
            tracing::error!(config = %path.display(), error = %e, "config reload failed; the previous config keeps serving")
        }
    }
    super::notify::ready();
}

/// The keys whose new value differs from the one the process started with and that a running process
/// cannot take: sockets, the cache's layout and sizes, the copier's sizes.
fn restart_only(was: &Config, now: &Config) -> Vec<&'static str> {
    let (s, c, p) = (&now.server, &now.cache, &now.copy);
    let (ws, wc, wp) = (&was.server, &was.cache, &was.copy);
    [
        ("server.listen", s.listen != ws.listen),
        ("server.admin_listen", s.admin_listen != ws.admin_listen),
        ("cache.dir", c.dir != wc.dir),
        ("cache.max_size", c.max_size != wc.max_size),
        (
            "cache.max_object_size",
            c.max_object_size != wc.max_object_size,
        ),
        ("cache.inactive", c.inactive != wc.inactive),
        ("cache.open_files", c.open_files != wc.open_files),
        ("copy.workers", p.workers != wp.workers),
        ("copy.queue", p.queue != wp.queue),
        ("copy.remember", p.remember != wp.remember),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}
