//! The disk cache through the real binary, against the real S3 server and real disks.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::common::*;

const KEY: &str = "media_attachments/files/109/383/759/229/326/700/original/cached.mp4";

pub(crate) fn cache_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("v1"), dir.join("v2")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn du(dir: &Path) -> u64 {
    cache_files(dir)
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn miss_then_hit_survives_bucket_loss_and_restart() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(700_000, 21);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let small = pattern(40_000, 22);
    s3.put(
        "media",
        "accounts/avatars/1/2/3/original/s.png",
        small.clone(),
        "image/png",
    )
    .await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\n\n{}",
        cache_dir.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);

    for (key, body) in [
        (KEY, &data),
        ("accounts/avatars/1/2/3/original/s.png", &small),
    ] {
        let (st, xc, b) = get(&proxy, key).await;
        assert_eq!((st, xc.as_str()), (200, "MISS"));
        assert_eq!(&b, body);
        let (st, xc, b) = get(&proxy, key).await;
        assert_eq!((st, xc.as_str()), (200, "HIT"));
        assert_eq!(&b, body, "identical bytes from the cache");
    }
    assert_eq!(s3.count("GET"), 2, "one GET per key");

    // The bucket "desynchronizes": the objects vanish. The cache keeps serving them.
    s3.delete("media", KEY).await;
    let (st, xc, b) = get(&proxy, KEY).await;
    assert_eq!((st, xc.as_str()), (200, "HIT"));
    assert_eq!(b, data);

    // Range and conditional requests on a HIT behave as on any source.
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(&r.bytes().await.unwrap()[..], &data[100..200]);
    let etag = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap()
        .headers()["etag"]
        .clone();
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // A restart on the same cache directory serves at once.
    drop(proxy);
    let started = Instant::now();
    let proxy = Proxy::start(&cfg);
    let (st, xc, b) = get(&proxy, KEY).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((st, xc.as_str()), (200, "HIT"));
    assert_eq!(b, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_requests_cost_one_upstream_get() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(2_000_000, 23);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let mut misses = 0;
    for (st, xc, b) in burst(&proxy, KEY, 50).await {
        assert_eq!(st, 200);
        assert!(b == data, "a client got different bytes");
        misses += usize::from(xc == "MISS");
    }
    assert_eq!(s3.count("GET"), 1, "counted at the S3 server");
    assert_eq!(misses, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn negative_cache_costs_one_request_per_ttl_error() {
    let s3 = S3Server::start(&["media"], true).await;
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nttl_error = \"2s\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    let missing = "accounts/avatars/000/000/404/original/gone.png";
    let (st, xc, _) = get(&proxy, missing).await;
    assert_eq!((st, xc.as_str()), (404, "MISS"));
    for _ in 0..200 {
        let (st, xc, _) = get(&proxy, missing).await;
        assert_eq!((st, xc.as_str()), (404, "HIT"));
    }
    assert_eq!(s3.count("GET"), 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // Expired: asked again; meanwhile the object was uploaded (a bucket catching up).
    s3.put("media", missing, b"now here".to_vec(), "image/png")
        .await;
    let (st, xc, b) = get(&proxy, missing).await;
    assert_eq!((st, xc.as_str(), &b[..]), (200, "MISS", &b"now here"[..]));
    assert_eq!(s3.count("GET"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_the_directory_under_max_size() {
    let s3 = S3Server::start(&["media"], true).await;
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nmax_size = \"1MiB\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    for i in 0..30 {
        s3.put(
            "media",
            &format!("media_attachments/m/{i}.jpg"),
            pattern(100_000, i),
            "image/jpeg",
        )
        .await;
    }
    let proxy = Proxy::start(&cfg);
    let dir = proxy.dir.path().join("cache");
    let mut peak = 0;
    for i in 0..30 {
        let (st, _, b) = get(&proxy, &format!("media_attachments/m/{i}.jpg")).await;
        assert_eq!(st, 200);
        assert_eq!(b, pattern(100_000, i));
        // Read again: a hit keeps the descriptor open, which must not pin an evicted file's blocks.
        assert_eq!(
            get(&proxy, &format!("media_attachments/m/{i}.jpg")).await.2,
            b
        );
        peak = peak.max(du(&dir));
    }
    let pinned: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.to_string_lossy().ends_with(" (deleted)"))
        .collect();
    assert!(
        pinned.is_empty(),
        "evicted files still held open: {pinned:?}"
    );
    // Slack: one entry being filled beyond the cap, plus KiB rounding.
    assert!(
        peak <= (1 << 20) + 110_000,
        "cache dir peaked at {peak} bytes"
    );
    assert!(cache_files(&dir).len() < 30, "something was evicted");
    // The most recent is still there; the first was evicted and comes back from the bucket.
    let (_, xc, _) = get(&proxy, "media_attachments/m/29.jpg").await;
    assert_eq!(xc, "HIT");
    let (st, xc, b) = get(&proxy, "media_attachments/m/0.jpg").await;
    assert_eq!((st, xc.as_str()), (200, "MISS"));
    assert_eq!(b, pattern(100_000, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_when_every_upstream_fails() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(60_000, 24);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nttl_ok = \"1s\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(get(&proxy, KEY).await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(s3); // the bucket's port closes
    let (st, xc, b) = get(&proxy, KEY).await;
    assert_eq!((st, xc.as_str()), (200, "STALE"));
    assert_eq!(b, data);
    // Never cached: 502, not a 404.
    let (st, _, _) = get(&proxy, "accounts/avatars/9/9/9/original/never.png").await;
    assert_eq!(st, 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_entry_refreshes_from_the_bucket() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"v1".to_vec(), "video/mp4").await;
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nttl_ok = \"1s\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(get(&proxy, KEY).await.2, b"v1");
    s3.put("media", KEY, b"v2".to_vec(), "video/mp4").await;
    assert_eq!(get(&proxy, KEY).await.2, b"v1", "fresh entry served");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, xc, b) = get(&proxy, KEY).await;
    assert_eq!((xc.as_str(), &b[..]), ("MISS", &b"v2"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_entry_is_dropped_and_refetched() {
    let s3 = S3Server::start(&["media"], true).await;
    let small = pattern(50_000, 25);
    let large = pattern(3_000_000, 26);
    s3.put(
        "media",
        "media_attachments/c/small.png",
        small.clone(),
        "image/png",
    )
    .await;
    s3.put(
        "media",
        "media_attachments/c/large.mp4",
        large.clone(),
        "video/mp4",
    )
    .await;
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let dir = proxy.dir.path().join("cache");
    for (key, body) in [
        ("media_attachments/c/small.png", &small),
        ("media_attachments/c/large.mp4", &large),
    ] {
        assert_eq!(&get(&proxy, key).await.2, body);
        // A verified HIT: later hits may skip the checksum, but not once the file has been written to.
        assert_eq!(get(&proxy, key).await.1, "HIT");
    }
    // Flip one byte in the middle of every entry's body.
    for f in cache_files(&dir) {
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[20_000] ^= 0xff;
        std::fs::write(&f, bytes).unwrap();
    }
    for (key, body) in [
        ("media_attachments/c/small.png", &small),
        ("media_attachments/c/large.mp4", &large),
    ] {
        let (st, xc, b) = get(&proxy, key).await;
        assert_eq!(
            (st, xc.as_str()),
            (200, "MISS"),
            "{key}: corrupt entry not served"
        );
        assert_eq!(&b, body);
        assert_eq!(get(&proxy, key).await.1, "HIT");
    }
    assert_eq!(s3.count("GET"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn range_on_a_miss_is_answered_and_the_whole_object_cached() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(4_000_000, 27);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    s3.put(
        "media",
        "media_attachments/v/zero.mp4",
        data.clone(),
        "video/mp4",
    )
    .await;
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let c = client();
    // A seek deep into the video: the bytes at once, the whole object filled beside it.
    let r = c
        .get(proxy.url(&format!("/{KEY}")))
        .header("range", "bytes=3000000-3000099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &data[3_000_000..3_000_100]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, xc, b) = get(&proxy, KEY).await;
        assert_eq!(b, data);
        if xc == "HIT" {
            break;
        }
        assert!(Instant::now() < deadline, "never cached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gets_for_seek = s3.count("GET");
    assert!(gets_for_seek <= 3, "{gets_for_seek} GETs");

    // A player's first probe (bytes=0-1): one full GET, sliced; the rest is filled after the client left.
    s3.reset_counts();
    let r = c
        .get(proxy.url("/media_attachments/v/zero.mp4"))
        .header("range", "bytes=0-1")
        .send()
        .await
        .unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], &data[..2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&proxy, "media_attachments/v/zero.mp4").await.1 != "HIT" {
        assert!(Instant::now() < deadline, "never cached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s3.count("GET"),
        1,
        "the probe's fill went on after the client left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_fill_never_serves_wrong_bytes() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(30_000_000, 28);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let cfg = s3.s3_upstream("b", "media");
    let mut proxy = Proxy::start(&cfg);
    let cache_dir = proxy.dir.path().join("cache");
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let _ = stream.next().await; // the fill is under way, driven by this (now stalled) client
    proxy.child.kill().unwrap(); // SIGKILL
    proxy.child.wait().unwrap();
    drop(stream);
    let leftovers = std::fs::read_dir(cache_dir.join("tmp")).unwrap().count();
    let cfg2 = format!("[cache]\ndir = \"{}\"\n\n{cfg}", cache_dir.display());
    let proxy2 = Proxy::start(&cfg2);
    let (st, _, b) = get(&proxy2, KEY).await;
    assert_eq!(st, 200);
    assert!(
        b == data,
        "wrong bytes after a crash (tmp files left by the kill: {leftovers})"
    );
    assert_eq!(
        std::fs::read_dir(cache_dir.join("tmp")).unwrap().count(),
        0,
        "restart cleaned tmp/"
    );
    assert_eq!(get(&proxy2, KEY).await.2, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_still_serves_the_client() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(3_000_000, 29);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let mnt = Tmpfs::mount("1m");
    let admin = closed_port();
    let cfg = format!(
        "[cache]\ndir = \"{}/cache\"\n\n{}",
        mnt.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    for _ in 0..3 {
        let (st, xc, b) = get(&proxy, KEY).await;
        assert_eq!((st, xc.as_str()), (200, "MISS"));
        assert!(b == data, "full body despite the full disk");
    }
    // Concurrent clients: followers streaming the fill when the disk fills up are resumed from the
    // bucket, so every one of them still gets the whole body.
    for (st, _, b) in burst(&proxy, KEY, 4).await {
        assert_eq!(st, 200);
        assert!(
            b == data,
            "full body for every concurrent client despite the full disk"
        );
    }
    let small = b"fits".to_vec();
    s3.put(
        "media",
        "media_attachments/s/small.png",
        small.clone(),
        "image/png",
    )
    .await;
    assert_eq!(get(&proxy, "media_attachments/s/small.png").await.2, small);
    let m = metrics(admin).await;
    let line = m
        .lines()
        .find(|l| l.starts_with("mediaproxy_cache_write_errors_total"))
        .unwrap_or_default();
    let n: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(n >= 3.0, "write errors counted: {line}");
    assert!(proxy.log().contains("cache write failed"));
    assert_eq!(
        std::fs::read_dir(mnt.path().join("cache/tmp"))
            .unwrap()
            .count(),
        0,
        "no partial files"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_cache_size_entries_and_open_files() {
    let s3 = S3Server::start(&["media"], true).await;
    for i in 0..3 {
        s3.put(
            "media",
            &format!("media_attachments/g/{i}.png"),
            pattern(5_000, i),
            "image/png",
        )
        .await;
    }
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &s3.s3_upstream("b", "media"),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    for i in 0..3 {
        get(&proxy, &format!("media_attachments/g/{i}.png")).await;
    }
    assert_eq!(get(&proxy, "media_attachments/g/0.png").await.1, "HIT");
    assert_eq!(get(&proxy, "media_attachments/g/missing.png").await.0, 404);
    let m = metrics(admin).await;
    // Three 5,000-byte objects (two 4 KiB blocks each with their metadata) and one negative entry (one
    // block); one entry was read as a hit, so one descriptor is kept.
    for line in [
        "mediaproxy_cache_entries 4",
        "mediaproxy_cache_bytes 28672",
        "mediaproxy_cache_open_files 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_does_not_hold_the_fill() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(24 << 20, 40);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nlock_timeout = \"60s\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    // The leader asks, then reads nothing: a paused video, a phone gone into a tunnel. Loopback socket
    // buffers hold a few MiB of the 24 MiB; the rest must still reach the cache at the bucket's pace.
    let addr = proxy.url("").trim_start_matches("http://").to_string();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(
        &mut stalled,
        format!("GET /{KEY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (st, xc, body) = get(&proxy, KEY).await;
    assert_eq!(st, 200);
    assert!(body == data, "follower got the right bytes");
    assert_eq!(xc, "HIT", "the follower was served from the fill");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the follower waited {:?} behind a stalled client",
        started.elapsed()
    );
    assert_eq!(s3.count("GET"), 1, "one upstream GET");
    // The stalled client, once it reads, still gets every byte in order (from the file it fell behind on).
    let mut reader = std::io::BufReader::new(stalled);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = vec![0u8; data.len()];
    std::io::Read::read_exact(&mut reader, &mut rest).unwrap();
    assert!(rest == data, "the slow client's bytes differ");
}

#[tokio::test(flavor = "multi_thread")]
async fn last_read_survives_a_restart_for_inactive() {
    let s3 = S3Server::start(&["media"], true).await;
    for k in [
        "media_attachments/r/read.png",
        "media_attachments/r/idle.png",
    ] {
        s3.put("media", k, pattern(20_000, 50), "image/png").await;
    }
    let cache_dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\ninactive = \"2h\"\nttl_ok = \"30d\"\n\n{}",
        cache_dir.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    for k in [
        "media_attachments/r/read.png",
        "media_attachments/r/idle.png",
    ] {
        assert_eq!(get(&proxy, k).await.1, "MISS");
        wait_hit(&proxy, k).await;
    }
    // Both were stored, and last read, three hours ago...
    let three_hours_ago = std::time::SystemTime::now() - Duration::from_secs(3 * 3600);
    for f in cache_files(cache_dir.path()) {
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_accessed(three_hours_ago)
                    .set_modified(three_hours_ago),
            )
            .unwrap();
    }
    // ...and one is read now (the read is recorded in the background, before the restart).
    assert_eq!(get(&proxy, "media_attachments/r/read.png").await.1, "HIT");
    let recorded = eventually(Duration::from_secs(5), || async {
        cache_files(cache_dir.path()).iter().any(|f| {
            let read = std::fs::metadata(f).unwrap().accessed().unwrap();
            read.elapsed().unwrap_or_default() < Duration::from_secs(600)
        })
    })
    .await;
    assert!(recorded, "the read was recorded in the entry's atime");
    drop(proxy);

    // After a restart, `inactive` (2h) drops the idle one only: the read is remembered on disk.
    let proxy = Proxy::start(&cfg);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache_files(cache_dir.path()).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "expected only the idle entry dropped; {} entries left",
            cache_files(cache_dir.path()).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&proxy, "media_attachments/r/read.png").await.1, "HIT");
    assert_eq!(get(&proxy, "media_attachments/r/idle.png").await.1, "MISS");
}

/// `n` concurrent GETs of `key`; returns (status, X-Cache, body) for each.
async fn burst(proxy: &Proxy, key: &str, n: usize) -> Vec<(u16, String, Vec<u8>)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = proxy.url(&format!("/{key}"));
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                let xc = r.headers()["x-cache"].to_str().unwrap().to_string();
                let st = r.status().as_u16();
                (
                    st,
                    xc,
                    r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
                )
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A slow upstream for `body`: 64 KiB every 20 ms; a full GET dies after `die_after` bytes when set.
async fn paced(body: &[u8], die_after: Option<usize>) -> RawUpstream {
    RawUpstream::start(Behaviour::Paced {
        body: body.to_vec(),
        chunk: 64 << 10,
        pace: Duration::from_millis(20),
        die_after,
        etag: None,
        replaced_by: None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_stream_a_fill_longer_than_lock_timeout_with_one_upstream_get() {
    // 3 MiB at 64 KiB per 20 ms: about a second, well past the 200 ms lock timeout. nginx's waiters
    // would each go to the upstream after the timeout; here they stream the fill.
    let body = pattern(3 << 20, 60);
    let up = paced(&body, None).await;
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nlock_timeout = \"200ms\"\n\n{}",
        up.http_upstream("slow")
    ));
    let results = burst(&proxy, "media_attachments/v/slow.mp4", 10).await;
    for (st, _, b) in &results {
        assert_eq!(*st, 200);
        assert!(*b == body, "a client got different bytes");
    }
    let misses = results.iter().filter(|r| r.1 == "MISS").count();
    assert_eq!(misses, 1, "one leader, nine followers served from the fill");
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream GET"
    );
    assert_eq!(get(&proxy, "media_attachments/v/slow.mp4").await.1, "HIT");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_dies_part_way_is_resumed_for_every_client() {
    // The upstream's full GETs die after 1 MiB of 3 MiB; a ranged GET from there succeeds.
    let body = pattern(3 << 20, 61);
    let up = paced(&body, Some(1 << 20)).await;
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\n\n{}",
        up.http_upstream("flaky")
    ));
    for (st, _, b) in burst(&proxy, "media_attachments/v/flaky.mp4", 5).await {
        assert_eq!(st, 200);
        assert_eq!(b.len(), body.len(), "a client was cut off");
        assert!(b == body, "a resumed body differs");
    }
    assert!(
        cache_files(&proxy.dir.path().join("cache")).is_empty(),
        "a failed fill is never cached"
    );
    assert!(proxy.log().contains("the rest comes from the upstreams"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_larger_than_max_object_size_streams_through_uncached() {
    let s3 = S3Server::start(&["media"], true).await;
    let big = pattern(2 << 20, 61);
    let small = pattern(100_000, 62);
    s3.put("media", KEY, big.clone(), "video/mp4").await;
    s3.put(
        "media",
        "media_attachments/files/1/original/s.png",
        small.clone(),
        "image/png",
    )
    .await;
    // max_size 8 MiB: objects over 1 MiB (an eighth) are not stored.
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nmax_size = \"8MiB\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    for _ in 0..2 {
        let (st, xc, body) = get(&proxy, KEY).await;
        assert_eq!((st, xc.as_str()), (200, "MISS"), "never cached");
        assert!(body == big);
    }
    assert_eq!(s3.count("GET"), 2);
    get(&proxy, "media_attachments/files/1/original/s.png").await;
    assert_eq!(
        get(&proxy, "media_attachments/files/1/original/s.png")
            .await
            .1,
        "HIT"
    );
    assert_eq!(
        cache_files(&proxy.dir.path().join("cache")).len(),
        1,
        "only the small one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_answers_without_upstreams_and_no_stale_404s() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"kept".to_vec(), "video/mp4").await;
    let cache = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\nttl_ok = \"1s\"\nttl_error = \"1s\"\n\n{}",
        cache.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(get(&proxy, KEY).await.1, "MISS");
    wait_hit(&proxy, KEY).await;
    let missing = "media_attachments/files/2/original/gone.png";
    assert_eq!(get(&proxy, missing).await.0, 404);
    drop(proxy);
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // Every bucket removed from the config: the expired copy is still served.
    let none = Proxy::start(&format!(
        "[cache]\ndir = \"{}\"\nttl_ok = \"1s\"\n\n",
        cache.path().display()
    ));
    let (st, xc, body) = get(&none, KEY).await;
    assert_eq!(
        (st, xc.as_str(), body.as_slice()),
        (200, "STALE", &b"kept"[..])
    );
    drop(none);

    // The bucket fails: an expired 404 is not an answer (502), an expired object is (STALE).
    let port = s3.addr.port();
    drop(s3);
    let failing = Proxy::start(&format!(
        "[cache]\ndir = \"{}\"\nttl_ok = \"1s\"\nttl_error = \"1s\"\n\n[[upstream]]\nname = \"b\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/media\"\n",
        cache.path().display()
    ));
    assert_eq!(get(&failing, missing).await.0, 502);
    assert_eq!(get(&failing, KEY).await.1, "STALE");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_is_resumed_only_from_the_same_object() {
    // The object is replaced in its bucket while a fill of it runs, and the fill dies part-way; the
    // other bucket has another object of the same length. Stitching either would give mixed bytes.
    let original = pattern(3 << 20, 81);
    let replaced = pattern(3 << 20, 82);
    let elsewhere = pattern(3 << 20, 83);
    let first = RawUpstream::start(Behaviour::Paced {
        body: original.clone(),
        chunk: 64 << 10,
        pace: Duration::from_millis(20),
        die_after: Some(1 << 20),
        etag: Some("\"v1\"".into()),
        replaced_by: Some((replaced, "\"v2\"".into())),
    })
    .await;
    let second = RawUpstream::start(Behaviour::Paced {
        body: elsewhere,
        chunk: 64 << 10,
        pace: Duration::from_millis(1),
        die_after: None,
        etag: Some("\"other\"".into()),
        replaced_by: None,
    })
    .await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        first.http_upstream("first"),
        second.http_upstream("second")
    ));
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    let mut stream = r.bytes_stream();
    let mut aborted = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => {
                aborted = true;
                break;
            }
        }
    }
    assert!(
        aborted,
        "the client's connection is aborted rather than given mixed bytes"
    );
    assert!(got.len() < original.len());
    assert_eq!(
        got[..],
        original[..got.len()],
        "what it got is the original's start"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seek_that_joins_a_running_fill_is_answered_at_once() {
    let data = pattern(6 << 20, 91);
    // 64 KiB every 20 ms: the whole body takes about 2 s.
    let up = paced(&data, None).await;
    let proxy = Proxy::start(&up.http_upstream("slow"));
    let url = proxy.url(&format!("/{KEY}"));
    let leader = tokio::spawn({
        let url = url.clone();
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from = data.len() - 100_000;
    let started = Instant::now();
    let r = client()
        .get(&url)
        .header("range", format!("bytes={from}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &data[from..]);
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the seek waited {:?} for the fill",
        started.elapsed()
    );
    assert!(leader.await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn fills_nobody_reads_are_bounded_by_background_fills() {
    // Ten clients ask for ten large keys, read the headers and hang up.
    let data = pattern(3 << 20, 71);
    let up = paced(&data, None).await;
    let admin = closed_port();
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nbackground_fills = 2\n\n{}",
        up.http_upstream("slow")
    );
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    for i in 0..10 {
        let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("GET /media_attachments/files/9/original/{i}.mp4 HTTP/1.1\r\nHost: x\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut head = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut head);
        drop(s);
    }
    let settled = eventually(Duration::from_secs(5), || async {
        metric_value(
            &metrics(admin).await,
            "mediaproxy_cache_fills_cancelled_total",
        ) >= 8
    })
    .await;
    assert!(settled, "{}", metrics(admin).await);
    let tmp = std::fs::read_dir(proxy.dir.path().join("cache/tmp"))
        .unwrap()
        .count();
    assert!(tmp <= 2, "{tmp} fills still running");
}

/// A slow upstream for a small body (under 512 KiB, so the fill holds it in memory until whole):
/// 64 KiB every 100 ms; a full GET dies after `die_after` bytes when set.
async fn paced_small(body: &[u8], die_after: Option<usize>) -> RawUpstream {
    RawUpstream::start(Behaviour::Paced {
        body: body.to_vec(),
        chunk: 64 << 10,
        pace: Duration::from_millis(100),
        die_after,
        etag: Some("\"small\"".into()),
        replaced_by: None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_stream_a_small_fill_from_memory_as_it_arrives() {
    // 448 KiB over about 700 ms, with a 200 ms lock timeout: followers that waited for the end
    // would each give up and ask the upstream. They stream what has arrived instead.
    let body = pattern(448 << 10, 63);
    let up = paced_small(&body, None).await;
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nlock_timeout = \"200ms\"\n\n{}",
        up.http_upstream("slow")
    ));
    let key = "media_attachments/files/1/original/small.png";
    let results = burst(&proxy, key, 8).await;
    for (st, _, b) in &results {
        assert_eq!(*st, 200);
        assert!(*b == body, "a client got different bytes");
    }
    assert_eq!(results.iter().filter(|r| r.1 == "MISS").count(), 1);
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream GET for the leader and its seven followers"
    );
    wait_hit(&proxy, key).await;
    assert_eq!(get(&proxy, key).await.2, body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_fill_that_dies_part_way_is_resumed_and_not_cached() {
    let body = pattern(448 << 10, 64);
    let up = paced_small(&body, Some(128 << 10)).await;
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\n\n{}",
        up.http_upstream("flaky")
    ));
    for (st, _, b) in burst(&proxy, "media_attachments/files/1/original/cut.png", 4).await {
        assert_eq!(st, 200);
        assert_eq!(b.len(), body.len(), "a client was cut off");
        assert!(b == body, "a resumed body differs");
    }
    assert!(
        cache_files(&proxy.dir.path().join("cache")).is_empty(),
        "a failed fill is never cached"
    );
    assert!(proxy.log().contains("the rest comes from the upstreams"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_fill_goes_on_when_its_only_client_leaves() {
    let body = pattern(448 << 10, 65);
    let up = paced_small(&body, None).await;
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\n\n{}",
        up.http_upstream("paced")
    ));
    let key = "media_attachments/files/1/original/left.png";
    let mut resp = client()
        .get(proxy.url(&format!("/{key}")))
        .send()
        .await
        .unwrap();
    assert!(
        resp.chunk().await.unwrap().is_some(),
        "the first bytes came"
    );
    drop(resp); // leaves with most of the body still to come
                // No request meanwhile: one would follow the fill and keep it going for its own sake.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (st, xc, got) = get(&proxy, key).await;
    assert_eq!(
        (st, xc.as_str()),
        (200, "HIT"),
        "the fill went on and was stored"
    );
    assert!(got == body);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_still_serves_a_small_object_and_its_followers() {
    // A small fill is held in memory and written once whole: when that write finds the disk full,
    // the leader and the followers already have every byte, and nothing partial stays behind.
    let body = pattern(448 << 10, 66);
    let up = paced_small(&body, None).await;
    let mnt = Tmpfs::mount("1m");
    // Leaves less room than the body needs.
    std::fs::write(mnt.path().join("ballast"), vec![0u8; 800 << 10]).unwrap();
    let admin = closed_port();
    let cfg = format!(
        "[cache]\ndir = \"{}/cache\"\n\n{}",
        mnt.path().display(),
        up.http_upstream("paced")
    );
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    let key = "media_attachments/files/1/original/full.png";
    for (st, _, b) in burst(&proxy, key, 4).await {
        assert_eq!(st, 200);
        assert!(b == body, "every client gets the whole body");
    }
    let (st, xc, b) = get(&proxy, key).await;
    assert_eq!((st, xc.as_str()), (200, "MISS"), "nothing was stored");
    assert!(b == body);
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one GET per fill"
    );
    let errors = metric_value(&metrics(admin).await, "mediaproxy_cache_write_errors_total");
    assert!(errors >= 2, "write errors counted: {errors}");
    assert_eq!(
        std::fs::read_dir(mnt.path().join("cache/tmp"))
            .unwrap()
            .count(),
        0,
        "no partial files"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_has_a_small_body_finds_its_entry_on_disk() {
    // A small fill is written once whole; its last bytes reach the client only after that write, so a
    // restart (or `mediaproxy cache stats`) right after a response never misses the entry.
    let s3 = S3Server::start(&["media"], true).await;
    let keys: Vec<String> = (0..20)
        .map(|i| format!("media_attachments/files/{i}/original/at-once.png"))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        s3.put(
            "media",
            k,
            pattern(30_000 + i * 1000, 70 + i as u64),
            "image/png",
        )
        .await;
    }
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\n\n{}",
        s3.s3_upstream("b", "media")
    ));
    let cache_dir = proxy.dir.path().join("cache");
    for (i, k) in keys.iter().enumerate() {
        let (st, xc, _) = get(&proxy, k).await;
        assert_eq!((st, xc.as_str()), (200, "MISS"));
        assert_eq!(
            cache_files(&cache_dir).len(),
            i + 1,
            "the entry for {k} was on disk when its client had the body"
        );
    }
}

/// A small tmpfs (needs root), for a disk that fills up; unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "this test needs root to mount a {size} tmpfs"
        );
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}
