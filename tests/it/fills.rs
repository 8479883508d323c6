//! Fills under pressure: clients that leave early, strangers that start many large transfers, and a
//! burst of first hits after a restart.

use std::time::Duration;

use crate::common::*;

const KEY: &str = "media_attachments/files/000/000/001/original/clip.mp4";

#[tokio::test(flavor = "multi_thread")]
async fn followers_do_not_stampede_when_the_leaders_client_leaves_before_headers() {
    let body = pattern(300_000, 41);
    let up = RawUpstream::start(Behaviour::SlowHeaders {
        delay: Duration::from_millis(700),
        body: body.clone(),
    })
    .await;
    let proxy = Proxy::start(&up.http_upstream("slow"));
    let url = proxy.url(&format!("/{KEY}"));
    // The leader's client gives up long before the bucket's first byte.
    let leader = {
        let url = url.clone();
        tokio::spawn(async move {
            client()
                .get(url)
                .timeout(Duration::from_millis(200))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(60)).await;
    let followers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
            })
        })
        .collect();
    assert!(
        leader.await.unwrap().is_err(),
        "the leader's client timed out"
    );
    for f in followers {
        let (status, got) = f.await.unwrap();
        assert_eq!(status, 200);
        assert!(got == body, "followers get the whole object");
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one GET for the leader and its four followers, though the leader's client left"
    );
    let (status, xc, got) = get(&proxy, KEY).await;
    assert_eq!((status, xc.as_str()), (200, "HIT"), "the fill completed");
    assert!(got == body);
}

#[tokio::test(flavor = "multi_thread")]
async fn fills_in_flight_never_hold_more_than_half_of_max_size() {
    // Six strangers start 3 MiB transfers of distinct keys at once against a 8 MiB cache: at most
    // 4 MiB may be in tmp/ at any time; the fills beyond that stream through uncached, counted.
    let body = pattern(3 << 20, 42);
    let up = RawUpstream::start(Behaviour::Paced {
        body: body.clone(),
        chunk: 128 * 1024,
        pace: Duration::from_millis(25),
        die_after: None,
        etag: None,
        replaced_by: None,
    })
    .await;
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &format!(
            "[cache]\ndir = \"{{dir}}/cache\"\nmax_size = \"8MiB\"\nmax_object_size = \"4MiB\"\n\n{}",
            up.http_upstream("paced")
        ),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    let tmp = proxy.dir.path().join("cache").join("tmp");
    let mut tasks = Vec::new();
    for i in 0..6 {
        let url = proxy.url(&format!(
            "/media_attachments/files/000/000/00{i}/original/v.mp4"
        ));
        tasks.push(tokio::spawn(async move {
            let r = client().get(url).send().await.unwrap();
            r.bytes().await.unwrap().len()
        }));
    }
    let mut peak = 0u64;
    while !tasks.iter().all(|t| t.is_finished()) {
        let in_tmp: u64 = std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        peak = peak.max(in_tmp);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            body.len(),
            "every client gets the whole body"
        );
    }
    assert!(peak > 0, "fills did use tmp/");
    assert!(
        peak <= 4 << 20,
        "tmp/ peaked at {peak} bytes, over half of max_size"
    );
    let m = metrics(admin).await;
    assert!(
        metric_value(&m, "mediaproxy_cache_fills_cancelled_total") >= 4,
        "the fills beyond the bound are counted:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_hits_after_a_restart_share_one_checksum_pass() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(8 << 20, 43);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\n\n{}",
        cache_dir.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    let (status, xc, _) = get(&proxy, KEY).await;
    assert_eq!((status, xc.as_str()), (200, "MISS"));
    wait_hit(&proxy, KEY).await;
    drop(proxy);

    let admin = closed_port();
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    let hits: Vec<_> = (0..6)
        .map(|_| {
            let url = proxy.url(&format!("/{KEY}"));
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                let xc = r.headers()["x-cache"].to_str().unwrap().to_string();
                (xc, r.bytes().await.unwrap())
            })
        })
        .collect();
    for h in hits {
        let (xc, got) = h.await.unwrap();
        assert_eq!(xc, "HIT");
        assert!(got[..] == data[..]);
    }
    let m = metrics(admin).await;
    assert_eq!(
        metric_value(&m, "mediaproxy_cache_verifications_total"),
        1,
        "six first hits, one end-to-end checksum:\n{m}"
    );
}

/// An ext4 image loop-mounted for one test, so it can be frozen (`fsfreeze`): writes to it then block
/// in the kernel, as on a disk that stopped answering. Needs root; `None` (the test says so) without.
pub(crate) struct FreezableDisk {
    pub(crate) mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl FreezableDisk {
    pub(crate) fn mount() -> Option<FreezableDisk> {
        use std::process::Command;
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("disk.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        std::fs::File::create(&img).ok()?.set_len(64 << 20).ok()?;
        let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.ext4").arg("-q").arg(&img))
            || !ok(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt))
        {
            return None;
        }
        Some(FreezableDisk { mnt, _dir: dir })
    }

    /// Frozen until the guard drops: declared after the proxy, so that a failing test thaws the disk
    /// before it kills the proxy (a process blocked on a frozen disk cannot die until it thaws).
    pub(crate) fn frozen(&self) -> Thaw<'_> {
        self.freeze(true);
        Thaw(self)
    }

    fn freeze(&self, frozen: bool) {
        let flag = if frozen { "-f" } else { "-u" };
        let _ = std::process::Command::new("fsfreeze")
            .arg(flag)
            .arg(&self.mnt)
            .status();
    }
}

pub(crate) struct Thaw<'a>(&'a FreezableDisk);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.freeze(false);
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        self.freeze(false);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_cache_disk_stalls_neither_local_files_nor_hits() {
    let Some(disk) = FreezableDisk::mount() else {
        eprintln!("SKIPPED: needs root, mkfs.ext4, a loop device and fsfreeze");
        return;
    };
    let body = pattern(2 << 20, 44);
    let up = RawUpstream::start(Behaviour::Paced {
        body: body.clone(),
        chunk: 64 * 1024,
        pace: Duration::from_millis(20),
        die_after: None,
        etag: None,
        replaced_by: None,
    })
    .await;
    let root = mastodon_root();
    let local = "accounts/avatars/000/000/001/original/me.png";
    write_file(root.path(), local, b"local avatar");
    let proxy = Proxy::start(&format!(
        "[local]\nroots = [\"{}\"]\n\n[cache]\ndir = \"{}/cache\"\n\n{}",
        root.path().display(),
        disk.mnt.display(),
        up.http_upstream("paced")
    ));
    // An entry stored and last read two hours ago: its next hit records the read (a metadata write).
    let warm = "media_attachments/files/000/000/009/original/warm.mp4";
    assert_eq!(get(&proxy, warm).await.1, "MISS");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for f in super::cache::cache_files(&disk.mnt.join("cache")) {
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_accessed(two_hours_ago)
                    .set_modified(two_hours_ago),
            )
            .unwrap();
    }
    // Fills in progress, more of them than the proxy has async workers (two cores here).
    let fills: Vec<_> = (0..4)
        .map(|i| {
            let url = proxy.url(&format!(
                "/media_attachments/files/000/000/00{i}/original/v.mp4"
            ));
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                r.bytes().await.map(|b| b.len())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let thaw = disk.frozen();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The cache's disk no longer completes writes; a local file is another disk's business.
    for _ in 0..10 {
        let r = tokio::time::timeout(Duration::from_secs(2), get(&proxy, local)).await;
        let (status, xc, got) = r.expect("a local file waited more than 2 s on the cache's disk");
        assert_eq!(
            (status, xc.as_str(), &got[..]),
            (200, "LOCAL", &b"local avatar"[..])
        );
    }
    let r = tokio::time::timeout(Duration::from_secs(2), get(&proxy, warm)).await;
    let (status, xc, got) = r.expect("a cache hit waited more than 2 s to record its read");
    assert_eq!((status, xc.as_str()), (200, "HIT"));
    assert!(got == body);
    drop(thaw);
    for f in fills {
        let got = tokio::time::timeout(Duration::from_secs(20), f).await;
        assert_eq!(
            got.unwrap().unwrap().unwrap(),
            body.len(),
            "the fills finish once the disk is back"
        );
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn small_fills_on_a_stalled_cache_disk_hold_up_no_worker() {
    let Some(disk) = FreezableDisk::mount() else {
        eprintln!("SKIPPED: needs root, mkfs.ext4, a loop device and fsfreeze");
        return;
    };
    let body = pattern(40_000, 46);
    let up = RawUpstream::start(Behaviour::Respond {
        status: 200,
        headers: vec![("Content-Type".into(), "image/jpeg".into())],
        body: body.clone(),
    })
    .await;
    let root = mastodon_root();
    let local = "accounts/avatars/000/000/001/original/me.png";
    write_file(root.path(), local, b"local avatar");
    // Small stores go to the blocking pool, never a worker: with stores on the workers (tried, with
    // one at a time), the worker blocked in a store had last polled for I/O and the others stayed
    // parked, so nothing was served at all, with one worker or three.
    for (workers, n) in [("2", 0), ("1", 1)] {
        let cache = disk.mnt.join(format!("cache{n}"));
        let proxy = Proxy::start_with_env(
            &format!(
                "[local]\nroots = [\"{}\"]\n\n[cache]\ndir = \"{}\"\n\n{}",
                root.path().display(),
                cache.display(),
                up.http_upstream("bucket")
            ),
            "",
            &[("TOKIO_WORKER_THREADS", workers)],
        );
        let key = |i: usize| format!("media_attachments/files/000/00{n}/{i:03}/small/s.jpg");
        assert_eq!(get(&proxy, &key(999)).await.1, "MISS");
        let thaw = disk.frozen();
        // More small misses than workers, each ending in a store the frozen disk does not complete.
        let fills: Vec<_> = (0..6)
            .map(|i| {
                let url = proxy.url(&format!("/{}", key(i)));
                tokio::spawn(async move {
                    let r = client().get(url).send().await.unwrap();
                    r.bytes().await.map(|b| b.to_vec())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..10 {
            let r = tokio::time::timeout(Duration::from_secs(2), get(&proxy, local)).await;
            let (status, xc, got) = r.unwrap_or_else(|_| {
                panic!("with {workers} worker(s), a local file waited more than 2 s on stores to a frozen disk")
            });
            assert_eq!(
                (status, xc.as_str(), &got[..]),
                (200, "LOCAL", &b"local avatar"[..])
            );
        }
        drop(thaw);
        for f in fills {
            let got = tokio::time::timeout(Duration::from_secs(20), f).await;
            assert!(
                got.unwrap().unwrap().unwrap() == body,
                "the small fills finish once the disk is back"
            );
        }
        drop(proxy);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_eviction_on_a_stalled_cache_disk_stalls_neither_local_files_nor_hits() {
    let Some(disk) = FreezableDisk::mount() else {
        eprintln!("SKIPPED: needs root, mkfs.ext4, a loop device and fsfreeze");
        return;
    };
    let body = pattern(1_500_000, 45);
    let up = RawUpstream::start(Behaviour::Respond {
        status: 200,
        headers: vec![("Content-Type".into(), "video/mp4".into())],
        body: body.clone(),
    })
    .await;
    let root = mastodon_root();
    let local = "accounts/avatars/000/000/001/original/me.png";
    write_file(root.path(), local, b"local avatar");
    let proxy = Proxy::start(&format!(
        "[local]\nroots = [\"{}\"]\n\n[cache]\ndir = \"{}/cache\"\nmax_size = \"4MiB\"\nmax_object_size = \"2MiB\"\n\n{}",
        root.path().display(),
        disk.mnt.display(),
        up.http_upstream("raw")
    ));
    let key = |i: u32| format!("media_attachments/files/000/000/00{i}/original/v.mp4");
    // The cache is full: the next miss evicts.
    for i in 0..2 {
        assert_eq!(get(&proxy, &key(i)).await.1, "MISS");
        wait_hit(&proxy, &key(i)).await;
    }
    let thaw = disk.frozen();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let miss = {
        let url = proxy.url(&format!("/{}", key(2)));
        tokio::spawn(async move { client().get(url).send().await.unwrap().bytes().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_secs(2), get(&proxy, local)).await;
        let (status, xc, _) = r.expect("a local file waited on an eviction on the frozen disk");
        assert_eq!((status, xc.as_str()), (200, "LOCAL"));
        let r = tokio::time::timeout(Duration::from_secs(2), get(&proxy, &key(1))).await;
        let (status, _, got) = r.expect("a hit waited on an eviction on the frozen disk");
        assert_eq!(status, 200);
        assert!(got == body);
    }
    drop(thaw);
    let got = tokio::time::timeout(Duration::from_secs(20), miss).await;
    assert_eq!(got.unwrap().unwrap().unwrap().len(), body.len());
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_keep_a_fill_going_when_its_first_client_leaves() {
    // The one background-fill place is taken (a seek's fill of another key): a fill whose first
    // client leaves still has followers streaming it, so it goes on, and they cost the bucket nothing.
    let body = pattern(2 << 20, 46);
    let up = RawUpstream::start(Behaviour::Paced {
        body: body.clone(),
        chunk: 64 * 1024,
        pace: Duration::from_millis(40),
        die_after: None,
        etag: Some("\"v1\"".into()),
        replaced_by: None,
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nbackground_fills = 1\n\n{}",
        up.http_upstream("paced")
    ));
    let other = proxy.url("/media_attachments/files/000/000/009/original/other.mp4");
    let seek = client()
        .get(&other)
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(seek.status(), 206);
    drop(seek);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = up.hits.load(std::sync::atomic::Ordering::SeqCst);

    let url = proxy.url(&format!("/{KEY}"));
    let first = client().get(&url).send().await.unwrap();
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client().get(url).send().await.unwrap().bytes().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(first); // the first client leaves mid-body
    for f in followers {
        let got = f.await.unwrap().expect("followers get their whole body");
        assert!(got[..] == body[..]);
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst) - before,
        1,
        "one GET for the fill, none for its followers"
    );
}
