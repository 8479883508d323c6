//! Lazy copy through the real binary: objects read from the old bucket land in the new one, against
//! two real S3 servers (one per bucket, so each bucket's requests are counted on their own).

use std::time::Duration;

use tempfile::TempDir;

use crate::common::*;

const PHOTO: &str = "media_attachments/files/109/383/759/229/326/700/original/photo.jpg";
const VIDEO: &str = "media_attachments/files/109/383/759/229/326/702/original/clip.mp4";

/// The copy target as an admin might first get it wrong: an address nothing answers at, so copies
/// stay queued (retrying) while reads go on from the old bucket.
fn unreachable_target() -> String {
    format!(
        "[[upstream]]\nname = \"new\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"new\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\ncopy_missing = true\nconnect_timeout = \"200ms\"\n\n",
        refused_port()
    )
}

/// Waits for the copy of `key` into `bucket` on `s3` (a copy normally lands within seconds).
async fn copied(s3: &S3Server, bucket: &str, key: &str) -> Option<(Vec<u8>, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if s3.object(bucket, key).await.is_some() {
            // s3s-fs renames the body into place before it writes the object's attributes: read
            // again once they are surely there.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return s3.object(bucket, key).await;
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_only_in_the_old_bucket_is_copied_with_its_bytes_type_and_acl() {
    let (new, old) = two_buckets().await;
    let data = pattern(70_000, 1);
    // As Mastodon uploads it.
    let immutable = "public, max-age=315576000, immutable";
    let disposition = "inline; filename=\"photo.jpg\"";
    old.put_with_headers(
        "old",
        PHOTO,
        data.clone(),
        &[
            ("content-type", "image/jpeg"),
            ("cache-control", immutable),
            ("content-disposition", disposition),
        ],
    )
    .await;
    let admin = closed_port();
    let cfg = format!(
        "{}{}",
        new.s3_target("new", "new", "acl = \"public-read\""),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    let (st, xc, body) = get(&proxy, PHOTO).await;
    assert_eq!((st, xc.as_str()), (200, "MISS"));
    assert_eq!(body, data);
    let (bytes, ctype) = copied(&new, "new", PHOTO).await.expect("copied into new");
    assert_eq!(bytes, data);
    assert_eq!(ctype, "image/jpeg");
    assert_eq!(new.acl("new", PHOTO).as_deref(), Some("public-read"));
    let head = new.head("new", PHOTO).await;
    assert_eq!(head["cache-control"], immutable);
    assert_eq!(head["content-disposition"], disposition);
    assert_eq!(
        old.count("GET"),
        1,
        "the copy read the cache entry, not the old bucket"
    );
    let ok = eventually(Duration::from_secs(5), || async {
        metric_value(&metrics(admin).await, "mediaproxy_copy_copied_total") == 1
    })
    .await;
    let m = metrics(admin).await;
    assert!(ok, "{m}");
    assert_eq!(metric_value(&m, "mediaproxy_copy_queued_total"), 1);
    assert_eq!(metric_value(&m, "mediaproxy_copy_bytes_total"), 70_000);
    assert_eq!(metric_value(&m, "mediaproxy_copy_queue_depth"), 0);
    // Later reads are hits on an entry whose copy is done: nothing more is queued.
    for _ in 0..3 {
        assert_eq!(get(&proxy, PHOTO).await.1, "HIT");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric_value(&metrics(admin).await, "mediaproxy_copy_queued_total"),
        1
    );
    assert_eq!(new.count("PUT"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_reads_cost_one_old_get_and_one_put() {
    let (new, old) = two_buckets().await;
    let data = pattern(300_000, 2);
    old.put("old", PHOTO, data.clone(), "image/jpeg").await;
    let cfg = format!(
        "{}{}",
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start(&cfg);
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let url = proxy.url(&format!("/{PHOTO}"));
            tokio::spawn(async move {
                client()
                    .get(url)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.unwrap(), data);
    }
    assert_eq!(copied(&new, "new", PHOTO).await.unwrap().0, data);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(old.count("GET"), 1, "one GET from the old bucket");
    assert_eq!(new.count("PUT"), 1, "one PUT to the new one");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_range_read_copies_the_whole_object() {
    let (new, old) = two_buckets().await;
    let data = pattern(2_000_000, 3);
    old.put("old", VIDEO, data.clone(), "video/mp4").await;
    let cfg = format!(
        "{}{}",
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start(&cfg);
    let r = client()
        .get(proxy.url(&format!("/{VIDEO}")))
        .header("range", "bytes=1500000-1500999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &data[1_500_000..1_501_000]);
    let (bytes, ctype) = copied(&new, "new", VIDEO).await.expect("copied");
    assert!(bytes == data, "the whole object, byte for byte");
    assert_eq!(ctype, "video/mp4");
    assert_eq!(new.count("PUT"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_queues_a_copy_too_and_the_target_gets_back_what_it_lost() {
    let (new, old) = two_buckets().await;
    old.put("old", PHOTO, b"in both".to_vec(), "image/jpeg")
        .await;
    new.put("new", PHOTO, b"in both".to_vec(), "image/jpeg")
        .await;
    // A "desynchronized" bucket: the object vanished from the new bucket behind the proxy's back.
    new.delete("new", PHOTO).await;
    let cfg = format!(
        "{}{}",
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start(&cfg);
    let head = client()
        .head(proxy.url(&format!("/{PHOTO}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(copied(&new, "new", PHOTO).await.unwrap().0, b"in both");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_warmed_before_the_switch_is_copied_on_the_next_hit_and_never_overwrites() {
    let (new, old) = two_buckets().await;
    old.put("old", PHOTO, b"old bytes".to_vec(), "image/jpeg")
        .await;
    old.put("old", VIDEO, b"video".to_vec(), "video/mp4").await;
    let cache = TempDir::new().unwrap();
    let cache_cfg = format!("[cache]\ndir = \"{}\"\n\n", cache.path().display());
    // Before the switch: the old bucket alone, cache warm.
    let before = Proxy::start(&format!("{cache_cfg}{}", old.s3_upstream("media", "old")));
    assert_eq!(get(&before, PHOTO).await.1, "MISS");
    assert_eq!(get(&before, VIDEO).await.1, "MISS");
    // The entries are published just after the last byte is sent: wait for them before stopping.
    for key in [PHOTO, VIDEO] {
        wait_hit(&before, key).await;
    }
    drop(before);
    // Meanwhile something else wrote other bytes to the new bucket under one key.
    new.put("new", VIDEO, b"not to be overwritten".to_vec(), "video/mp4")
        .await;
    // The switch: the new bucket first, copy_missing on; the old one renamed too.
    let cfg = format!(
        "{cache_cfg}{}{}",
        new.s3_target("fresh", "new", ""),
        old.s3_upstream("legacy", "old")
    );
    let proxy = Proxy::start(&cfg);
    assert_eq!(get(&proxy, PHOTO).await.1, "HIT");
    assert_eq!(get(&proxy, VIDEO).await.1, "HIT");
    assert_eq!(copied(&new, "new", PHOTO).await.unwrap().0, b"old bytes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        new.object("new", VIDEO).await.unwrap().0,
        b"not to be overwritten"
    );
    assert_eq!(
        new.count("PUT"),
        2,
        "the test's own PUT and the photo's copy"
    );
    assert_eq!(
        old.count("GET"),
        2,
        "one GET per key before the switch; both copies read the cache entries"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_never_overwrites_an_existing_object() {
    // The engine's own guarantee, for the race a HEAD cannot close (two proxies, or migrate, at once).
    let s3 = S3Server::start(&["new"], true).await;
    s3.put("new", PHOTO, b"first".to_vec(), "image/jpeg").await;
    let cfg =
        mediaproxy::config::Config::parse(&s3.s3_upstream("new", "new"), std::path::Path::new("."))
            .unwrap();
    let up = mediaproxy::upstream::Upstream::new(&cfg.upstreams[0]).unwrap();
    let key = mediaproxy::key::parse(&format!("/{PHOTO}"), "").unwrap();
    let body = b"second".to_vec();
    let md5: [u8; 16] = {
        use md5::Digest;
        md5::Md5::digest(&body).into()
    };
    let req = mediaproxy::upstream::PutRequest {
        key: &key,
        len: body.len() as u64,
        md5,
        content_type: Some("image/jpeg"),
        cache_control: None,
        content_disposition: None,
        acl: None,
    };
    let put = up.put(&req, body.clone().into()).await.unwrap();
    assert_eq!(put, mediaproxy::upstream::Put::AlreadyThere);
    assert_eq!(s3.object("new", PHOTO).await.unwrap().0, b"first");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tombstoned_key_is_never_copied() {
    let (new, old) = two_buckets().await;
    old.put("old", PHOTO, b"deleted".to_vec(), "image/jpeg")
        .await;
    old.put("old", VIDEO, b"kept".to_vec(), "video/mp4").await;
    let secrets = TempDir::new().unwrap();
    std::fs::write(secrets.path().join("bust"), "s3cret").unwrap();
    let server = format!(
        "cache_buster_header = \"X-Bust\"\ncache_buster_secret_file = \"{}\"",
        secrets.path().join("bust").display()
    );
    let cache = TempDir::new().unwrap();
    let cache_cfg = format!("[cache]\ndir = \"{}\"\n\n", cache.path().display());
    // The target is down while the key is read: its copy stays queued, retrying.
    let down = format!(
        "{cache_cfg}{}{}",
        unreachable_target(),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start_with_server(&down, &server);
    assert_eq!(get(&proxy, PHOTO).await.0, 200);
    assert_eq!(get(&proxy, VIDEO).await.0, 200);
    // Mastodon deletes it and busts the URL; then the target comes back.
    let bust = client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            proxy.url(&format!("/{PHOTO}")),
        )
        .header("X-Bust", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(bust.status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await; // journaled
    proxy.signal("TERM");
    drop(proxy);
    let up = format!(
        "{cache_cfg}{}{}",
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start_with_server(&up, &server);
    assert_eq!(copied(&new, "new", VIDEO).await.unwrap().0, b"kept");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        new.object("new", PHOTO).await.is_none(),
        "the busted key was not copied"
    );
    assert_eq!(get(&proxy, PHOTO).await.0, 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(new.count("PUT"), 1, "the other key's copy only");
}

/// A target that is down (a closed port) while keys are read, then up after a restart.
async fn queued_keys_survive(stop: &str) {
    let (new, old) = two_buckets().await;
    let keys: Vec<String> = (0..5)
        .map(|i| format!("media_attachments/files/000/000/00{i}/original/{i}.png"))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        old.put("old", k, pattern(5_000, i as u64), "image/png")
            .await;
    }
    let cache = TempDir::new().unwrap();
    let cache_cfg = format!("[cache]\ndir = \"{}\"\n\n", cache.path().display());
    let down = format!(
        "{cache_cfg}{}{}",
        unreachable_target(),
        old.s3_upstream("old", "old")
    );
    let mut proxy = Proxy::start(&down);
    for k in &keys {
        assert_eq!(
            get(&proxy, k).await.0,
            200,
            "served while the target is down"
        );
    }
    match stop {
        "TERM" => {
            proxy.signal("TERM");
            assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
        }
        _ => {
            tokio::time::sleep(Duration::from_millis(1_000)).await; // queued keys are journaled within 1 s
            drop(proxy); // SIGKILL
        }
    }
    let up = format!(
        "{cache_cfg}{}{}",
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    let _proxy = Proxy::start(&up);
    for (i, k) in keys.iter().enumerate() {
        let (bytes, _) = copied(&new, "new", k)
            .await
            .unwrap_or_else(|| panic!("{k} copied after the restart"));
        assert_eq!(bytes, pattern(5_000, i as u64));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_keys_are_copied_after_sigterm_and_restart() {
    queued_keys_survive("TERM").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_keys_are_copied_after_kill_9_and_restart() {
    queued_keys_survive("KILL").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_refusing_puts_changes_nothing_for_clients_and_counts_failures() {
    let (new, old) = two_buckets().await;
    let data = pattern(40_000, 9);
    old.put("old", PHOTO, data.clone(), "image/jpeg").await;
    let admin = closed_port();
    let wrong_key = new
        .s3_target("new", "new", "")
        .replace(SECRET_KEY, "not-the-secret");
    let cfg = format!("{wrong_key}{}", old.s3_upstream("old", "old"));
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    let (st, xc, body) = get(&proxy, PHOTO).await;
    assert_eq!((st, xc.as_str()), (200, "MISS"));
    assert_eq!(body, data);
    let failed = eventually(Duration::from_secs(10), || async {
        metric_value(&metrics(admin).await, "mediaproxy_copy_failed_total") == 1
    })
    .await;
    assert!(failed, "{}", metrics(admin).await);
    assert!(proxy.log().contains("copy failed"), "{}", proxy.log());
    assert!(!proxy.log().contains(SECRET_KEY));
    assert_eq!(
        get(&proxy, PHOTO).await.2,
        data,
        "and the next read is a plain hit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_never_blocks_a_request() {
    let old = S3Server::start(&["old"], true).await;
    let keys: Vec<String> = (0..40)
        .map(|i| format!("media_attachments/files/000/001/{i:03}/original/{i}.png"))
        .collect();
    for k in &keys {
        old.put("old", k, b"png".to_vec(), "image/png").await;
    }
    let admin = closed_port();
    // One worker, a queue of 2, and a target that never answers: every copy waits out its retries.
    let cfg = format!(
        "[copy]\nworkers = 1\nqueue = 2\n\n{}{}",
        unreachable_target(),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    let started = std::time::Instant::now();
    for k in &keys {
        assert_eq!(get(&proxy, k).await.0, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "40 reads took {:?}",
        started.elapsed()
    );
    let m = metrics(admin).await;
    assert_eq!(metric_value(&m, "mediaproxy_copy_queued_total"), 40, "{m}");
    assert!(
        metric_value(&m, "mediaproxy_copy_dropped_total") >= 37,
        "{m}"
    );
    assert!(metric_value(&m, "mediaproxy_copy_queue_depth") <= 2, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_copy_killed_midway_leaves_no_object_and_no_open_upload() {
    let (new, old) = two_buckets().await;
    let data = pattern(12 << 20, 11);
    old.put("old", VIDEO, data.clone(), "video/mp4").await;
    let cache = TempDir::new().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\n\n[copy]\nmultipart_threshold = \"5MiB\"\npart_size = \"5MiB\"\n\n{}{}",
        cache.path().display(),
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    // A slow uplink: each part takes a while, so the kill lands mid-upload.
    new.set_part_delay(Duration::from_millis(700));
    let proxy = Proxy::start(&cfg);
    assert!(get(&proxy, VIDEO).await.2 == data);
    let started = eventually(Duration::from_secs(10), || async {
        new.open_uploads() == 1
    })
    .await;
    assert!(started, "a multipart upload started");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(proxy); // kill -9 in the middle of the parts
    assert!(
        new.object("new", VIDEO).await.is_none(),
        "no partial object"
    );
    assert_eq!(new.open_uploads(), 1);

    new.set_part_delay(Duration::ZERO);
    let _proxy = Proxy::start(&cfg);
    let (bytes, ctype) = copied(&new, "new", VIDEO)
        .await
        .expect("copied after the restart");
    assert!(bytes == data, "whole and byte-exact");
    assert_eq!(ctype, "video/mp4");
    let aborted = eventually(Duration::from_secs(10), || async {
        new.open_uploads() == 0
    })
    .await;
    assert!(aborted, "the upload the crash left open was aborted");
}

/// Writes a cache entry as the release before lazy copy did: no record of the bucket that filled it.
fn legacy_entry(cache_dir: &std::path::Path, key: &str, body: &[u8], content_type: &str) {
    use mediaproxy::cache::store::Store;
    use mediaproxy::unix_time::now_ms as unix_now_ms;
    let store = Store::open(cache_dir).unwrap();
    let mut w = store.writer().unwrap();
    w.write(body).unwrap();
    let meta = mediaproxy::cache::EntryMeta {
        key: key.to_string(),
        status: 200,
        len: body.len() as u64,
        content_type: Some(content_type.to_string()),
        etag: None,
        last_modified: None,
        stored_at_ms: unix_now_ms(),
        origin: None,
        cache_control: None,
        content_disposition: None,
    };
    w.seal(&store, &meta).unwrap().publish().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_from_an_earlier_release_queue_one_copy_check_each() {
    let (new, old) = two_buckets().await;
    // One key was already migrated (by rclone, say); the other was not.
    new.put("new", PHOTO, b"migrated".to_vec(), "image/jpeg")
        .await;
    old.put("old", PHOTO, b"migrated".to_vec(), "image/jpeg")
        .await;
    old.put("old", VIDEO, b"not yet".to_vec(), "video/mp4")
        .await;
    let cache = TempDir::new().unwrap();
    legacy_entry(cache.path(), PHOTO, b"migrated", "image/jpeg");
    legacy_entry(cache.path(), VIDEO, b"not yet", "video/mp4");
    let admin = closed_port();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\n\n{}{}",
        cache.path().display(),
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start_with_server(&cfg, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    for _ in 0..3 {
        assert_eq!(get(&proxy, PHOTO).await.1, "HIT");
        assert_eq!(get(&proxy, VIDEO).await.1, "HIT");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(copied(&new, "new", VIDEO).await.unwrap().0, b"not yet");
    let settled = eventually(Duration::from_secs(5), || async {
        metric_value(&metrics(admin).await, "mediaproxy_copy_skipped_total") == 1
    })
    .await;
    let m = metrics(admin).await;
    assert!(settled, "{m}");
    assert_eq!(
        metric_value(&m, "mediaproxy_copy_queued_total"),
        2,
        "once per key: {m}"
    );
    assert_eq!(metric_value(&m, "mediaproxy_copy_copied_total"), 1, "{m}");
    assert_eq!(new.count("PUT"), 2, "the test's own PUT and one copy");
    assert_eq!(old.count("GET"), 0, "copied from the entry");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_the_target_applies_to_queued_keys() {
    let (new, old) = two_buckets().await;
    old.put("old", PHOTO, b"queued".to_vec(), "image/jpeg")
        .await;
    // Queued while the configured target is a wrong address: retrying with backoff.
    let wrong = format!("{}{}", unreachable_target(), old.s3_upstream("old", "old"));
    let proxy = Proxy::start(&wrong);
    assert_eq!(get(&proxy, PHOTO).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The admin fixes the endpoint and reloads: the queued key goes to the fixed target.
    proxy.rewrite_config(&format!(
        "{}{}",
        new.s3_target("new", "new", ""),
        old.s3_upstream("old", "old")
    ));
    proxy.signal("HUP");
    assert_eq!(copied(&new, "new", PHOTO).await.unwrap().0, b"queued");
}
