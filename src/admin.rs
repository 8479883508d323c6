//! The admin listener: `/healthz` (the process runs), `/readyz` (it serves: listeners bound, config
//! loaded, not stopping; one line per upstream), `/metrics` for Prometheus. Kept off the public port so
//! media clients can never read operational data. Bound before anything else, so `/readyz` answers 503
//! while the proxy starts rather than refusing the connection.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::copy::Copier;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// What the admin listener reads once the proxy has started.
pub struct Parts {
    pub cache: Arc<Cache>,
    pub copier: Arc<Copier>,
    pub runtime: Arc<ArcSwap<Runtime>>,
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, parts: Arc<OnceLock<Parts>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let parts = parts.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                let parts = parts.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, parts.get(), &req)) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer<B>(metrics: &Metrics, parts: Option<&Parts>, req: &Request<B>) -> Response<Full<Bytes>> {
    // HEAD answers like GET (hyper sends the headers and drops the body).
    let method = match *req.method() {
        Method::HEAD => Method::GET,
        ref m => m.clone(),
    };
    let (status, ctype, body) = match (&method, req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => {
            let names: Vec<String> = parts
                .map(|p| {
                    p.runtime
                        .load()
                        .upstreams
                        .iter()
                        .map(|u| u.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            let (ready, body) = metrics.health.render(&names);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain", body)
        }
        (&Method::GET, "/metrics") => {
            // Gauges are read when scraped rather than kept up to date on every hit.
            if let Some(Parts { cache, copier, .. }) = parts {
                let (bytes, entries) = cache.usage();
                metrics.cache.set_usage(
                    bytes,
                    entries,
                    cache.open_files(),
                    cache.tombstone_count(),
                );
                metrics
                    .copy
                    .depth
                    .set(i64::try_from(copier.depth()).unwrap_or(i64::MAX));
            }
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
