//! Restarts and reloads under load lose nothing: the listening socket is held the way systemd holds it
//! (socket activation), so connections wait in its backlog while one process finishes and the next
//! starts.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tempfile::TempDir;

use crate::common::*;

/// The proxy under a systemd-style socket: the test binds it and keeps it; each process gets it as
/// fd 3 with `LISTEN_FDS=1` and its own pid in `LISTEN_PID`.
struct Activated {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    dir: TempDir,
    config_path: PathBuf,
    child: Option<Child>,
    generation: usize,
    /// `[server] listen` in the file: another port, which socket activation must leave unbound.
    listen: SocketAddr,
    /// The `NOTIFY_SOCKET` systemd would listen on: every process reports here, and a thread reads
    /// it at once, as systemd does, into `messages` (in order, with when each arrived).
    notify_path: PathBuf,
    messages: Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    /// How many of `messages` the test has looked at.
    read: usize,
    /// `WATCHDOG_USEC` for the processes started from now on.
    watchdog_usec: Option<u64>,
}

impl Activated {
    fn start(body: &str) -> Activated {
        Self::start_with(body, None)
    }

    fn start_with(body: &str, watchdog_usec: Option<u64>) -> Activated {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxy.toml");
        // `listen` names another port: with socket activation it must not be bound.
        let listen: SocketAddr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
        std::fs::write(
            &config_path,
            render(dir.path(), listen, "shutdown_timeout = \"60s\"", body),
        )
        .unwrap();
        let notify_path = dir.path().join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let messages = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::downgrade(&messages);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends once the harness is gone.
            while let Some(sink) = sink.upgrade() {
                if let Ok(n) = notify.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    sink.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
        let mut a = Activated {
            listener,
            addr,
            dir,
            config_path,
            child: None,
            generation: 0,
            listen,
            notify_path,
            messages,
            read: 0,
            watchdog_usec,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let fd = self.listener.as_raw_fd();
        self.generation += 1;
        let log = self
            .dir
            .path()
            .join(format!("proxy-{}.log", self.generation));
        let watchdog = self
            .watchdog_usec
            .map(|u| format!("WATCHDOG_USEC={u} WATCHDOG_PID=$$ "))
            .unwrap_or_default();
        // bash: dash takes single-digit descriptors only in `3<&N`.
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!(
                "exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 {watchdog}exec \"$0\" serve --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_mediaproxy"))
            .arg(&self.config_path)
            .env("MEDIAPROXY_LOG", "info,mediaproxy=debug")
            .env("NOTIFY_SOCKET", &self.notify_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        // SAFETY: between fork and exec only an fcntl on a descriptor this process owns.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().unwrap());
        // As systemd does for Type=notify: the start is complete at READY=1.
        self.wait_for("READY=1", Duration::from_secs(20));
    }

    /// Waits for a notification carrying `line` among those not looked at yet (panics after
    /// `within`).
    fn wait_for(&mut self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let messages = self.messages.lock().unwrap().clone();
            for (n, (_, m)) in messages.iter().enumerate().skip(self.read) {
                if m.lines().any(|l| l == line) {
                    self.read = n + 1;
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {line} within {within:?}: {messages:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The notifications that arrive within `d` from now.
    fn collect_for(&mut self, d: Duration) -> Vec<(Instant, String)> {
        std::thread::sleep(d);
        let messages = self.messages.lock().unwrap().clone();
        let new = messages[self.read..].to_vec();
        self.read = messages.len();
        new
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// `systemctl restart`: SIGTERM, wait for the exit, start the next process on the same socket.
    fn restart(&mut self) -> Duration {
        let started = Instant::now();
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "process {} exits cleanly: {status}\n{}",
                    self.generation,
                    self.logs()
                );
                break;
            }
            assert!(Instant::now() < deadline, "the old process did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.spawn();
        started.elapsed()
    }

    fn logs(&self) -> String {
        (1..=self.generation)
            .map(|g| {
                std::fs::read_to_string(self.dir.path().join(format!("proxy-{g}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
}

/// One client's loop for `until`: GET a key, check the whole body arrived with the right length.
/// `keep_alive: false` opens a connection per request, so no failure is excusable; with keep-alive a
/// request that fails before any response byte is retried once, as browsers retry a request on a
/// reused connection that the server had closed as idle.
async fn client_loop(
    base: String,
    keys: Arc<Vec<(String, usize)>>,
    seed: usize,
    keep_alive: bool,
    until: Instant,
    tally: Arc<Tally>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
) {
    // A hung response is a failure too, reported with its key.
    let mut builder = client_builder().timeout(Duration::from_secs(30));
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    let c = builder.build().unwrap();
    // The retry goes out on a new connection, as browsers retry a request whose reused connection
    // the server had closed as idle.
    let fresh = client_builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut i = seed;
    while Instant::now() < until {
        let (key, len) = &keys[i % keys.len()];
        i += 7;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = if attempt == 1 { &c } else { &fresh };
            let r = match client.get(format!("{base}/{key}")).send().await {
                Ok(r) => r,
                Err(e) if keep_alive && attempt == 1 => {
                    let _ = e;
                    tally.retried.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    let how = if keep_alive {
                        "keep-alive, then retried"
                    } else {
                        "new connection"
                    };
                    errors.lock().unwrap().push(format!("{key} ({how}): {e:?}"));
                    break;
                }
            };
            let status = r.status();
            let mut got = 0usize;
            let mut body = r.bytes_stream();
            let mut broken = None;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => got += c.len(),
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
            if status == 200 && got == *len && broken.is_none() {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                tally.bytes.fetch_add(got as u64, Ordering::Relaxed);
            } else {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{key}: {status}, {got}/{len} bytes, {broken:?}"));
            }
            break;
        }
    }
}

async fn load_while<F: FnMut(u32)>(
    a: &Activated,
    keys: Vec<(String, usize)>,
    secs: u64,
    mut event: F,
    at: &[u64],
) -> (Arc<Tally>, Vec<String>) {
    let keys = Arc::new(keys);
    let tally = Arc::new(Tally::default());
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let base = format!("http://{}", a.addr);
    let tasks: Vec<_> = (0..32)
        .map(|n| {
            tokio::spawn(client_loop(
                base.clone(),
                keys.clone(),
                n * 13,
                n % 2 == 0,
                until,
                tally.clone(),
                errors.clone(),
            ))
        })
        .collect();
    for (n, &t) in at.iter().enumerate() {
        let when = started + Duration::from_secs(t);
        tokio::time::sleep_until(when.into()).await;
        event(n as u32);
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("a client loop is bounded")
            .unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    (tally, errors)
}

fn media_keys(root: &std::path::Path) -> Vec<(String, usize)> {
    let mut keys = Vec::new();
    for i in 0..20 {
        let key = format!("media_attachments/files/000/000/{i:03}/small/s.jpg");
        let len = 30_000 + i * 2_500;
        write_file(root, &key, &pattern(len, i as u64));
        keys.push((key, len));
    }
    let big = "media_attachments/files/000/000/999/original/big.mp4".to_string();
    write_file(root, &big, &pattern(50 << 20, 99));
    // One large object for every ten small ones.
    for _ in 0..2 {
        keys.push((big.clone(), 50 << 20));
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_restarts_under_load_lose_no_request() {
    let root = mastodon_root();
    let keys = media_keys(root.path());
    let mut a = Activated::start(&format!(
        "[local]\nroots = [\"{}\"]\n",
        root.path().display()
    ));
    let a_ptr: *mut Activated = &mut a;
    let mut pauses = Vec::new();
    let (tally, errors) = load_while(
        &a,
        keys,
        20,
        |_| {
            // SAFETY: the test's own value, used by one thread; `load_while` only reads `addr`.
            let a = unsafe { &mut *a_ptr };
            pauses.push(tokio::task::block_in_place(|| a.restart()));
        },
        &[4, 9, 14],
    )
    .await;
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "restarts {pauses:?}: {ok} complete responses ({} MiB), {} failed, {} retried on a reused connection",
        tally.bytes.load(Ordering::Relaxed) >> 20,
        tally.failed.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed)
    );
    assert_eq!(pauses.len(), 3);
    assert!(
        std::net::TcpStream::connect(a.listen).is_err(),
        "with socket activation, server.listen is not bound"
    );
    assert!(ok > 1000, "the load ran: {ok} responses");
    assert!(
        errors.is_empty(),
        "failed requests across three restarts: {errors:?}\n{}",
        a.logs()
    );
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_status_reload_and_stop() {
    let root = mastodon_root();
    write_file(root.path(), "media_attachments/files/1/a.png", b"png");
    let dir = root.path().display().to_string();
    let mut a = Activated::start_with(&format!("[local]\nroots = [\"{dir}\"]\n"), Some(200_000));
    let r = client()
        .get(format!("http://{}/media_attachments/files/1/a.png", a.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // WATCHDOG_USEC = 200 ms: a ping at least every 100 ms, from the running process.
    let seen = a.collect_for(Duration::from_millis(1500));
    let pings: Vec<Instant> = seen
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 10, "pings in 1.5 s: {}", pings.len());
    let worst = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        worst <= Duration::from_millis(160),
        "longest gap between pings {worst:?}"
    );
    let status = seen
        .iter()
        .flat_map(|(_, m)| m.lines())
        .rfind(|l| l.starts_with("STATUS="))
        .expect("a STATUS= line")
        .to_string();
    assert!(status.contains("1 requests"), "{status}");
    assert!(status.contains("copy queue 0"), "{status}");

    a.signal("HUP");
    let seen = a.collect_for(Duration::from_millis(800));
    let lines: Vec<&str> = seen.iter().flat_map(|(_, m)| m.lines()).collect();
    let reloading = lines
        .iter()
        .position(|l| *l == "RELOADING=1")
        .expect("RELOADING=1");
    assert!(
        lines[reloading..].contains(&"READY=1"),
        "READY=1 after RELOADING=1: {lines:?}"
    );

    a.signal("TERM");
    let seen = a.collect_for(Duration::from_millis(800));
    assert!(
        seen.iter()
            .any(|(_, m)| m.lines().any(|l| l == "STOPPING=1")),
        "STOPPING=1: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_reloads_switching_the_upstream_order_under_load_lose_no_request() {
    let (new, old) = two_buckets().await;
    let staging = mastodon_root();
    let keys = media_keys(staging.path());
    let mut seen = std::collections::HashSet::new();
    for (key, _) in &keys {
        if seen.insert(key.clone()) {
            let body = std::fs::read(staging.path().join(key)).unwrap();
            new.put("new", key, body.clone(), "image/jpeg").await;
            old.put("old", key, body, "image/jpeg").await;
        }
    }
    // Entries expire after a second, so the buckets keep being asked while the order flips.
    let config = |first: &str| {
        let (a, b) = (new.s3_upstream("new", "new"), old.s3_upstream("old", "old"));
        let ups = if first == "new" { a + &b } else { b + &a };
        format!("[cache]\ndir = \"{{dir}}/cache\"\nttl_ok = \"1s\"\n\n{ups}")
    };
    let a = Activated::start(&config("new"));
    let (tally, errors) = load_while(
        &a,
        keys,
        18,
        |n| {
            let first = if n % 2 == 0 { "old" } else { "new" };
            let text = render(
                a.dir.path(),
                a.listen,
                "shutdown_timeout = \"60s\"",
                &config(first),
            );
            std::fs::write(&a.config_path, text).unwrap();
            a.signal("HUP");
        },
        &[3, 6, 9, 12, 15],
    )
    .await;
    // The last reload put `old` first. The load may not have asked a bucket while `old` was first (on a
    // loaded machine all 32 clients can spend those seconds on the 50 MiB object a fill under the
    // previous order brings in), so a key nobody asked yet says which order is in force now.
    let probe = "media_attachments/files/000/000/777/small/probe.jpg";
    let body = pattern(31_000, 777);
    new.put("new", probe, body.clone(), "image/jpeg").await;
    old.put("old", probe, body.clone(), "image/jpeg").await;
    let (new_before, old_before) = (new.count("GET"), old.count("GET"));
    let got = reqwest::get(format!("http://{}/{probe}", a.addr))
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap(), body);
    assert_eq!(
        (new.count("GET") - new_before, old.count("GET") - old_before),
        (0, 1),
        "after the last reload `old` is asked first"
    );
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "five reloads: {ok} complete responses, {} failed, {} retried",
        tally.failed.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed)
    );
    let logs = a.logs();
    assert_eq!(logs.matches("config reloaded").count(), 5, "{logs}");
    assert!(ok > 500, "the load ran: {ok} responses");
    assert!(
        errors.is_empty(),
        "failed requests across five reloads: {errors:?}\n{logs}"
    );
    assert!(
        new.count("GET") > 0 && old.count("GET") > 0,
        "both orders served: {} GETs at new, {} at old, {ok} responses\n{logs}",
        new.count("GET"),
        old.count("GET")
    );
}
