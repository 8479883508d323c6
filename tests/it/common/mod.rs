//! Real parts for the integration tests: an in-process S3 server (s3s + s3s-fs, SigV4 enforced), the
//! real `mediaproxy` binary on loopback, and small raw-socket upstreams that misbehave on purpose.

#![allow(dead_code)]

mod acl;
pub mod pg;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use s3s::service::S3ServiceBuilder;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const ACCESS_KEY: &str = "AKIAMEDIAPROXYTEST";
pub const SECRET_KEY: &str = "test-secret-do-not-log-9f8e7d";

/// A real S3 server on 127.0.0.1 storing to a temp dir. Counts requests per method (what the bucket's
/// bill would count).
pub struct S3Server {
    stop: tokio::sync::watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    pub addr: SocketAddr,
    pub root: TempDir,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
    signed: bool,
    acls: acl::Acls,
    ignore_if_none_match: Arc<std::sync::atomic::AtomicBool>,
    read_only: Arc<std::sync::atomic::AtomicBool>,
    no_list: Arc<std::sync::atomic::AtomicBool>,
    no_reads: Arc<std::sync::atomic::AtomicBool>,
    open_uploads: Arc<Mutex<std::collections::HashSet<String>>>,
    part_delay: Arc<Mutex<Duration>>,
    slow_down_every: Arc<AtomicUsize>,
}

impl S3Server {
    /// `signed`: enforce SigV4 with [`ACCESS_KEY`]/[`SECRET_KEY`], except for anonymous GET/HEAD of
    /// `public-read` objects (S3's ACLs); otherwise anonymous for everything (a public bucket).
    pub async fn start(buckets: &[&str], signed: bool) -> S3Server {
        let root = tempfile::tempdir().unwrap();
        for b in buckets {
            std::fs::create_dir_all(root.path().join(b)).unwrap();
        }
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let acls = acl::Acls::default();
        let ignore_if_none_match = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let read_only = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let no_list = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let no_reads = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open_uploads: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let part_delay: Arc<Mutex<Duration>> = Arc::default();
        let slow_down_every: Arc<AtomicUsize> = Arc::default();
        let service = if signed {
            let mut builder = S3ServiceBuilder::new(acl::AclFs {
                fs,
                root: root.path().to_owned(),
                acls: acls.clone(),
                ignore_if_none_match: ignore_if_none_match.clone(),
                read_only: read_only.clone(),
                no_list: no_list.clone(),
                no_reads: no_reads.clone(),
                open_uploads: open_uploads.clone(),
                part_delay: part_delay.clone(),
                slow_down_every: slow_down_every.clone(),
                gets: Arc::default(),
            });
            builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            builder.set_access(acl::AnonymousReads);
            builder.build()
        } else {
            S3ServiceBuilder::new(fs).build()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let c = counts.clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                stream.set_nodelay(true).unwrap();
                acc.fetch_add(1, Ordering::SeqCst);
                let service = service.clone();
                let c = c.clone();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            *c.lock()
                                .unwrap()
                                .entry(req.method().to_string())
                                .or_default() += 1;
                            let service = service.clone();
                            async move { hyper::service::Service::call(&service, req).await }
                        },
                    );
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    // Dropping the server closes its kept-alive connections too: a real outage.
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        S3Server {
            stop,
            accepted,
            addr,
            root,
            counts,
            task,
            signed,
            acls,
            ignore_if_none_match,
            read_only,
            no_list,
            no_reads,
            open_uploads,
            part_delay,
            slow_down_every,
        }
    }

    /// From now on every `n`-th GetObject answers 503 SlowDown (0: never).
    pub fn slow_down_every(&self, n: usize) {
        self.slow_down_every.store(n, Ordering::SeqCst);
    }

    /// Multipart uploads neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.open_uploads.lock().unwrap().len()
    }

    /// Each UploadPart waits this long first (a slow uplink).
    pub fn set_part_delay(&self, delay: Duration) {
        *self.part_delay.lock().unwrap() = delay;
    }

    /// Refuses PUTs from now on, as a bucket does for a key without write permission.
    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::SeqCst);
    }

    /// The access key loses (or regains) `s3:ListBucket`.
    pub fn set_no_list(&self, on: bool) {
        self.no_list.store(on, Ordering::SeqCst);
    }

    /// The access key loses (or regains) `s3:GetObject`.
    pub fn set_no_reads(&self, on: bool) {
        self.no_reads.store(on, Ordering::SeqCst);
    }

    /// From now on PUTs ignore `If-None-Match` (overwrite), as many S3-compatible providers do.
    pub fn ignore_conditional_puts(&self) {
        self.ignore_if_none_match.store(true, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn bucket(&self, name: &str) -> Bucket {
        Bucket::new(
            self.endpoint().parse().unwrap(),
            UrlStyle::Path,
            name.to_string(),
            "us-east-1",
        )
        .unwrap()
    }

    fn creds(&self) -> Option<Credentials> {
        self.signed
            .then(|| Credentials::new(ACCESS_KEY, SECRET_KEY))
    }

    /// Uploads through the S3 API, as Mastodon would (so ETag and Content-Type are stored), with no ACL
    /// header (S3's default: private).
    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>, content_type: &str) {
        self.put_with_acl(bucket, key, body, content_type, None)
            .await
    }

    /// Uploads with `x-amz-acl: acl` (signed, as AWS requires), as Mastodon does with `S3_PERMISSION`.
    pub async fn put_with_acl(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        acl: Option<&str>,
    ) {
        let mut headers = vec![("content-type", content_type)];
        headers.extend(acl.map(|a| ("x-amz-acl", a)));
        self.put_with_headers(bucket, key, body, &headers).await
    }

    /// Uploads with these headers, all signed (`content-type`, `cache-control`, `x-amz-acl`, …).
    pub async fn put_with_headers(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) {
        let b = self.bucket(bucket);
        let creds = self.creds();
        let mut action = b.put_object(creds.as_ref(), key);
        for (name, value) in headers {
            action.headers_mut().insert(*name, value.to_string());
        }
        let url = action.sign(Duration::from_secs(60));
        let mut req = client().put(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.body(body).send().await.unwrap();
        let status = resp.status();
        assert!(
            status.is_success(),
            "PUT {key}: {status} {}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// The object as stored (signed GET): body and Content-Type; `None` when the bucket lacks it.
    pub async fn object(&self, bucket: &str, key: &str) -> Option<(Vec<u8>, String)> {
        let b = self.bucket(bucket);
        let creds = self.creds();
        let url = b
            .get_object(creds.as_ref(), key)
            .sign(Duration::from_secs(60));
        let resp = client().get(url).send().await.unwrap();
        if resp.status() == 404 {
            return None;
        }
        assert!(resp.status().is_success(), "GET {key}: {}", resp.status());
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        Some((resp.bytes().await.unwrap().to_vec(), ctype))
    }

    /// The headers a signed HEAD of the object answers with.
    pub async fn head(&self, bucket: &str, key: &str) -> reqwest::header::HeaderMap {
        let b = self.bucket(bucket);
        let creds = self.creds();
        let url = b
            .head_object(creds.as_ref(), key)
            .sign(Duration::from_secs(60));
        client().head(url).send().await.unwrap().headers().clone()
    }

    /// The canned ACL the object was stored with, as the server keeps it.
    pub fn acl(&self, bucket: &str, key: &str) -> Option<String> {
        self.acls
            .lock()
            .unwrap()
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
    }

    /// Changes an object's canned ACL, as Mastodon's suspension (private) and unsuspension (public-read) do.
    pub fn set_acl(&self, bucket: &str, key: &str, acl: &str) {
        self.acls
            .lock()
            .unwrap()
            .insert((bucket.to_string(), key.to_string()), acl.to_string());
    }

    pub async fn delete(&self, bucket: &str, key: &str) {
        let b = self.bucket(bucket);
        let creds = self.creds();
        let url = b
            .delete_object(creds.as_ref(), key)
            .sign(Duration::from_secs(60));
        let resp = client().delete(url).send().await.unwrap();
        assert!(
            resp.status().is_success(),
            "DELETE {key}: {}",
            resp.status()
        );
    }

    pub fn count(&self, method: &str) -> usize {
        self.counts
            .lock()
            .unwrap()
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn reset_counts(&self) {
        self.counts.lock().unwrap().clear();
    }

    /// TOML for an `[[upstream]]` of type s3 pointing at `bucket` here.
    pub fn s3_upstream(&self, name: &str, bucket: &str) -> String {
        format!(
            "[[upstream]]\nname = \"{name}\"\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{bucket}\"\nregion = \"us-east-1\"\npath_style = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n\n",
            self.endpoint()
        )
    }

    /// TOML for an `[[upstream]]` of type s3 whose reads are unsigned (`reads = "anonymous"`).
    pub fn s3_upstream_anonymous(&self, name: &str, bucket: &str) -> String {
        self.s3_upstream(name, bucket)
            .replacen("\n\n", "\nreads = \"anonymous\"\n\n", 1)
    }

    /// TOML for the `copy_missing` target: an s3 upstream with `copy_missing = true` and `extra` lines.
    pub fn s3_target(&self, name: &str, bucket: &str, extra: &str) -> String {
        self.s3_upstream(name, bucket).replacen(
            "\n\n",
            &format!("\ncopy_missing = true\n{extra}\n\n"),
            1,
        )
    }

    /// TOML for an anonymous `type = "http"` upstream on this (public) server's bucket.
    pub fn http_upstream(&self, name: &str, bucket: &str) -> String {
        format!(
            "[[upstream]]\nname = \"{name}\"\ntype = \"http\"\nurl = \"{}/{bucket}\"\n\n",
            self.endpoint()
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// A client builder for the tests, environment proxies off. reqwest brings no crypto provider of its
/// own: install *ring*, as the proxy does, before any client is built. No roots unless a test adds its
/// own: reqwest would otherwise load the host's store on every build (slow, and fails without one).
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only(std::iter::empty())
}

pub fn client() -> reqwest::Client {
    client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Two S3 servers (SigV4), one bucket each: `new` and `old`, counted apart.
pub async fn two_buckets() -> (S3Server, S3Server) {
    (
        S3Server::start(&["new"], true).await,
        S3Server::start(&["old"], true).await,
    )
}

/// Waits (up to 5 s) until `key` is a cache HIT: a fill publishes its entry just after the last byte
/// went to the client, so a test that stops the proxy right after a MISS must wait for it.
pub async fn wait_hit(proxy: &Proxy, key: &str) {
    let hit = eventually(Duration::from_secs(5), || async {
        get(proxy, key).await.1 == "HIT"
    })
    .await;
    assert!(hit, "{key} never became a cache hit");
}

/// GET `/key` through the proxy: status, `X-Cache`, body.
pub async fn get(proxy: &Proxy, key: &str) -> (u16, String, Vec<u8>) {
    let r = client()
        .get(proxy.url(&format!("/{key}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let xc = r
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, xc, r.bytes().await.unwrap().to_vec())
}

/// Runs `mediaproxy ARGS --config CONFIG` off the async runtime: (exit code, stdout, stderr).
pub async fn mediaproxy(config: &Path, args: &[&str]) -> (i32, String, String) {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
            .args(&args)
            .arg("--config")
            .arg(&config)
            .env("MEDIAPROXY_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// The Prometheus text served on the admin listener at `port`.
pub async fn metrics(port: u16) -> String {
    client()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first metric line starting with `line_start` (0 when absent).
pub fn metric_value(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls `check` every 50 ms until it holds or `within` has passed; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port nothing listens on (bound, then released): free for a server the test starts on it. Not for
/// an upstream that must stay dead: another test's server may be given the port meanwhile (see
/// [`refused_port`]).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A port that refuses connections for as long as the tests run: bound and never listened on (a
/// connection gets a reset), and held, so no other test's server can be given it.
pub fn refused_port() -> u16 {
    use rustix::net::{bind, getsockname, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(
        &fd,
        &std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
    )
    .unwrap();
    let addr = std::net::SocketAddrV4::try_from(getsockname(&fd).unwrap()).unwrap();
    std::mem::forget(fd);
    addr.port()
}

/// The real binary, on loopback, with a config written to a temp dir. Killed on drop.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub config_path: PathBuf,
    log: PathBuf,
}

impl Proxy {
    /// `body` is the config after `[server]`'s listen line: `[local]`, `[[upstream]]`… (the cache dir
    /// defaults into the temp dir). `{dir}` is replaced by the proxy's temp dir.
    pub fn start(body: &str) -> Proxy {
        Self::start_with_server(body, "")
    }

    /// `server_extra` goes into the `[server]` table.
    pub fn start_with_server(body: &str, server_extra: &str) -> Proxy {
        Self::start_with_env(body, server_extra, &[])
    }

    /// With these environment variables set for the proxy (`TOKIO_WORKER_THREADS`…).
    pub fn start_with_env(body: &str, server_extra: &str, env: &[(&str, &str)]) -> Proxy {
        let mut dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = closed_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let text = render(dir.path(), addr, server_extra, body);
            let config_path = dir.path().join("proxy.toml");
            std::fs::write(&config_path, text).unwrap();
            let log = dir.path().join("proxy.log");
            let child = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
                .args(["serve", "--config"])
                .arg(&config_path)
                .env("MEDIAPROXY_LOG", "info,mediaproxy=debug")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut proxy = Proxy {
                child,
                addr,
                dir,
                config_path,
                log,
            };
            if proxy.wait_listening(Duration::from_secs(20)) {
                return proxy;
            }
            let _ = proxy.child.kill();
            let _ = proxy.child.wait();
            dir = std::mem::replace(&mut proxy.dir, tempfile::tempdir().unwrap());
        }
        panic!("proxy did not start");
    }

    fn wait_listening(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// The proxy's stderr so far. Its log lines leave through a writer thread, a moment after the
    /// event: read once the file has stopped growing (up to 1 s).
    pub fn log(&self) -> String {
        let mut last = std::fs::read_to_string(&self.log).unwrap_or_default();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = std::fs::read_to_string(&self.log).unwrap_or_default();
            if now.len() == last.len() {
                return now;
            }
            last = now;
        }
        last
    }

    /// Rewrites the config file (same listen address) for a SIGHUP reload.
    pub fn rewrite_config(&self, body: &str) {
        std::fs::write(
            &self.config_path,
            render(self.dir.path(), self.addr, "", body),
        )
        .unwrap();
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

pub fn render(dir: &Path, addr: SocketAddr, server_extra: &str, body: &str) -> String {
    let body = body.replace("{dir}", &dir.display().to_string());
    let cache = if body.contains("[cache]") {
        String::new()
    } else {
        format!("[cache]\ndir = \"{}/cache\"\n\n", dir.display())
    };
    let local = if body.contains("[local]") {
        String::new()
    } else {
        "[local]\nroots = []\n\n".to_string()
    };
    format!("[server]\nlisten = [\"{addr}\"]\n{server_extra}\n\n{local}{cache}{body}")
}

fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local root shaped like Mastodon's `public/system`.
pub fn mastodon_root() -> TempDir {
    tempfile::tempdir().unwrap()
}

pub fn write_file(root: &Path, key: &str, body: &[u8]) {
    let path = root.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

/// Deterministic pseudo-random bytes, so byte-exact comparisons catch offset mistakes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A raw HTTP/1.1 upstream that sends exactly what the test wants, byte by byte. Counts connections.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
pub enum Behaviour {
    /// Headers promising `len` bytes, then `sent` bytes, then close.
    DieMidBody { len: usize, sent: usize },
    /// Accept and never answer.
    Silent,
    /// Answer 200 with `body` after `delay` (a bucket slow to its first byte).
    SlowHeaders { delay: Duration, body: Vec<u8> },
    /// A media server on a slow link: a GET gets `body` paced `chunk` bytes per `pace`, and dies after
    /// `die_after` bytes when set; `Range: bytes=N-` gets the rest at once (206). One request per connection.
    Paced {
        body: Vec<u8>,
        chunk: usize,
        pace: Duration,
        die_after: Option<usize>,
        /// Sent with the whole body; and with ranges, unless `replaced_by` is set.
        etag: Option<String>,
        /// The object was replaced right after the whole-body GET started: ranged requests see this
        /// body and ETag, and `If-Match` on the old ETag gets 412.
        replaced_by: Option<(Vec<u8>, String)>,
    },
    /// A full response with these extra header lines.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

impl RawUpstream {
    pub async fn start(b: Behaviour) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                h.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    match b {
                        Behaviour::DieMidBody { len, sent } => {
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: video/mp4\r\n\r\n");
                            let _ = s.write_all(head.as_bytes()).await;
                            let _ = s.write_all(&pattern(sent, 7)).await;
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            // dropped: the connection closes with the body incomplete
                        }
                        Behaviour::Silent => tokio::time::sleep(Duration::from_secs(120)).await,
                        Behaviour::SlowHeaders { delay, body } => {
                            tokio::time::sleep(delay).await;
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: video/mp4\r\nConnection: close\r\n\r\n", body.len());
                            let _ = s.write_all(head.as_bytes()).await;
                            let _ = s.write_all(&body).await;
                        }
                        Behaviour::Paced {
                            body,
                            chunk,
                            pace,
                            die_after,
                            etag,
                            replaced_by,
                        } => {
                            let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
                            let from = head
                                .split("range: bytes=")
                                .nth(1)
                                .and_then(|r| r.split('-').next())
                                .and_then(|n| n.parse::<usize>().ok());
                            if let Some(from) = from {
                                let (body, etag) = match &replaced_by {
                                    Some((b, e)) => (b.clone(), Some(e.clone())),
                                    None => (body.clone(), etag.clone()),
                                };
                                let if_match = head
                                    .split("if-match: ")
                                    .nth(1)
                                    .and_then(|v| v.split("\r\n").next())
                                    .map(str::to_string);
                                if if_match.is_some_and(|m| {
                                    Some(m) != etag.as_ref().map(|e| e.to_ascii_lowercase())
                                }) {
                                    let _ = s.write_all(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                                    return;
                                }
                                let etag_line =
                                    etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
                                let head = format!(
                                    "HTTP/1.1 206 Partial\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Type: video/mp4\r\n{etag_line}Connection: close\r\n\r\n",
                                    body.len() - from,
                                    body.len() - 1,
                                    body.len()
                                );
                                let _ = s.write_all(head.as_bytes()).await;
                                let _ = s.write_all(&body[from..]).await;
                                return;
                            }
                            let etag_line =
                                etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: video/mp4\r\n{etag_line}Connection: close\r\n\r\n", body.len());
                            let _ = s.write_all(head.as_bytes()).await;
                            let stop = die_after.unwrap_or(body.len());
                            for part in body[..stop].chunks(chunk) {
                                if s.write_all(part).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(pace).await;
                            }
                        }
                        Behaviour::Respond {
                            status,
                            headers,
                            body,
                        } => {
                            let mut head = format!(
                                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n",
                                body.len()
                            );
                            for (k, v) in headers {
                                head.push_str(&format!("{k}: {v}\r\n"));
                            }
                            head.push_str("Connection: close\r\n\r\n");
                            let _ = s.write_all(head.as_bytes()).await;
                            let _ = s.write_all(&body).await;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, hits, task }
    }

    pub fn http_upstream(&self, name: &str) -> String {
        format!("[[upstream]]\nname = \"{name}\"\ntype = \"http\"\nurl = \"http://{}\"\nfirst_byte_timeout = \"1s\"\n\n", self.addr)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
