//! The access log, on by default like nginx's (`[server] access_log = false` turns it off): one line
//! per request on stderr, so journald keeps it, written when the response ends, with the bytes that
//! actually left: client address, method, path, status, `X-Cache`, bytes, duration, upstream.

use std::net::SocketAddr;
use std::time::Instant;

use http::{Method, Response};

use crate::proxy::ServedBy;

pub struct Entry {
    client: Option<SocketAddr>,
    method: Method,
    path: String,
    started: Instant,
    status: u16,
    x_cache: String,
    upstream: Option<String>,
    pub bytes: u64,
}

impl Entry {
    pub fn new(client: Option<SocketAddr>, method: &Method, path: &str) -> Entry {
        Entry {
            client,
            method: method.clone(),
            path: path.to_string(),
            started: Instant::now(),
            status: 0,
            x_cache: String::new(),
            upstream: None,
            bytes: 0,
        }
    }

    /// The response's status, `X-Cache` and upstream, once it is built.
    pub fn answered<B>(&mut self, resp: &Response<B>) {
        self.status = resp.status().as_u16();
        self.x_cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        self.upstream = resp.extensions().get::<ServedBy>().map(|s| s.0.clone());
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let client = self
            .client
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        tracing::info!(
            target: "mediaproxy::access",
            "{client} \"{} {}\" {} {} {} {:.1}ms upstream={}",
            self.method,
            self.path,
            // nginx's 499: the client left before the response was ready.
            if self.status == 0 { 499 } else { self.status },
            if self.x_cache.is_empty() { "-" } else { &self.x_cache },
            self.bytes,
            self.started.elapsed().as_secs_f64() * 1000.0,
            self.upstream.as_deref().unwrap_or("-"),
        );
    }
}
