//! `mediaproxy cache stats|purge|clear` run from a shell beside a running proxy, as an admin does after
//! a takedown: the entries go, the proxy refetches, and its `/metrics` agree with the directory.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// Runs `mediaproxy cache ARGS --config <the proxy's config>`; it must succeed. Its stdout.
fn cache_command(proxy: &Proxy, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .arg("cache")
        .args(args)
        .arg("--config")
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_command_stats_purge_clear_on_a_running_proxy() {
    let s3 = S3Server::start(&["media"], true).await;
    for i in 0..3 {
        s3.put(
            "media",
            &format!("media_attachments/p/{i}.png"),
            pattern(10_000, i),
            "image/png",
        )
        .await;
    }
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    for i in 0..3 {
        get(&proxy, &format!("media_attachments/p/{i}.png")).await;
        // A hit keeps the entry's descriptor open: purge and clear must still take effect.
        assert_eq!(
            get(&proxy, &format!("media_attachments/p/{i}.png")).await.1,
            "HIT"
        );
    }
    let run = |args: &[&str]| cache_command(&proxy, args);
    let stats = run(&["stats"]);
    assert!(stats.contains("entries  3"), "{stats}");
    assert!(stats.contains("oldest"), "{stats}");
    let purged = run(&[
        "purge",
        "media_attachments/p/0.png",
        "/media_attachments/p/9.png",
    ]);
    assert!(
        purged.contains("purged     media_attachments/p/0.png")
            && purged.contains("not cached media_attachments/p/9.png"),
        "{purged}"
    );
    assert_eq!(
        get(&proxy, "media_attachments/p/0.png").await.1,
        "MISS",
        "purge works on a running proxy"
    );
    assert_eq!(get(&proxy, "media_attachments/p/1.png").await.1, "HIT");
    // A media URL as copied from a browser, query and all.
    let url = proxy.url("/media_attachments/p/2.png?1700000000");
    assert!(run(&["purge", &url]).contains("purged     media_attachments/p/2.png"));
    assert_eq!(get(&proxy, "media_attachments/p/2.png").await.1, "MISS");
    // A takedown: everything under a prefix.
    for k in [
        "accounts/avatars/000/000/042/original/a.png",
        "accounts/avatars/000/000/042/small/a.png",
        "accounts/avatars/000/000/043/original/b.png",
    ] {
        s3.put("media", k, b"png".to_vec(), "image/png").await;
        assert_eq!(get(&proxy, k).await.1, "MISS");
        wait_hit(&proxy, k).await;
    }
    let out = run(&["purge", "--prefix", "accounts/avatars/000/000/042/"]);
    assert!(
        out.contains("2 entries under accounts/avatars/000/000/042/"),
        "{out}"
    );
    assert_eq!(
        get(&proxy, "accounts/avatars/000/000/042/small/a.png")
            .await
            .1,
        "MISS"
    );
    wait_hit(&proxy, "accounts/avatars/000/000/042/small/a.png").await;
    assert_eq!(
        get(&proxy, "accounts/avatars/000/000/043/original/b.png")
            .await
            .1,
        "HIT"
    );
    let cleared = run(&["clear"]);
    assert!(cleared.contains("removed 5"), "{cleared}");
    assert_eq!(get(&proxy, "media_attachments/p/1.png").await.1, "MISS");
    assert!(run(&["stats"]).contains("entries  1"));
}

/// Entries purged from a shell are never looked up again by the proxy (nobody asks for a taken-down
/// avatar): the proxy must still stop counting them, or `/metrics` shows a cache that is not there and
/// eviction makes room for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_proxy_stops_counting_what_the_cache_command_deleted() {
    let s3 = S3Server::start(&["media"], true).await;
    let keys = [
        "accounts/avatars/000/000/042/original/a.png",
        "accounts/avatars/000/000/042/small/a.png",
        "media_attachments/files/000/000/001/original/x.png",
        "media_attachments/files/000/000/002/original/y.png",
    ];
    for (i, k) in keys.iter().enumerate() {
        s3.put("media", k, pattern(5_000, i as u64), "image/png")
            .await;
    }
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &s3.s3_upstream("b", "media"),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    for k in keys {
        get(&proxy, k).await;
        wait_hit(&proxy, k).await;
    }
    let entries = |n: u64| async move {
        eventually(Duration::from_secs(5), || async {
            let m = metrics(admin).await;
            metric_value(&m, "mediaproxy_cache_entries ") == n
                && metric_value(&m, "mediaproxy_cache_bytes ") == n * 8192
        })
        .await
    };
    assert!(entries(4).await, "{}", metrics(admin).await);

    // A full media URL, as copied from a post.
    let url = proxy.url(&format!("/{}?1700000000", keys[2]));
    assert!(cache_command(&proxy, &["purge", &url]).contains("purged"));
    assert!(entries(3).await, "{}", metrics(admin).await);

    // A takedown by prefix.
    let out = cache_command(
        &proxy,
        &["purge", "--prefix", "accounts/avatars/000/000/042/"],
    );
    assert!(out.contains("2 entries under"), "{out}");
    assert!(entries(1).await, "{}", metrics(admin).await);

    assert!(cache_command(&proxy, &["clear"]).contains("removed 1"));
    assert!(entries(0).await, "{}", metrics(admin).await);
    // And the proxy still fills and counts as before.
    assert_eq!(get(&proxy, keys[3]).await.1, "MISS");
    wait_hit(&proxy, keys[3]).await;
    assert!(entries(1).await, "{}", metrics(admin).await);
    assert!(
        std::fs::read_dir(proxy.dir.path().join("cache/notices"))
            .unwrap()
            .next()
            .is_none(),
        "notices are deleted once read"
    );
}

/// Where `key`'s entry file is under `layout` (`v1/ab/cd/<hash>` or `v2/ab/c/<hash>`).
fn entry_path(cache: &std::path::Path, layout: &str, key: &str) -> std::path::PathBuf {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(key.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let second = if layout == "v1" {
        &hex[2..4]
    } else {
        &hex[2..3]
    };
    cache.join(layout).join(&hex[..2]).join(second).join(&hex)
}

/// An upgrade keeps a cache made by a release before the `v2` layout: its entries (under
/// `v1/ab/cd/`) are served without a GET, new fills go beside them, and the offline tools work on it.
/// A new cache uses `v2/ab/c/` (4,096 directories instead of 65,536).
#[tokio::test(flavor = "multi_thread")]
async fn a_cache_made_by_an_earlier_release_keeps_serving_after_the_upgrade() {
    let s3 = S3Server::start(&["media"], true).await;
    let keys = [
        "media_attachments/l/0.png",
        "media_attachments/l/1.png",
        "media_attachments/l/2.png",
    ];
    for (i, key) in keys.iter().enumerate() {
        s3.put("media", key, pattern(20_000, i as u64), "image/png")
            .await;
    }
    let cache = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\n\n{}",
        cache.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    for key in &keys[..2] {
        assert_eq!(get(&proxy, key).await.1, "MISS");
        wait_hit(&proxy, key).await;
        assert!(
            entry_path(cache.path(), "v2", key).is_file(),
            "a new cache is v2"
        );
    }
    assert!(!cache.path().join("v1").exists());
    drop(proxy);

    // Made into what an earlier release left: the same files under v1/ab/cd/, no v2/.
    for key in &keys[..2] {
        let to = entry_path(cache.path(), "v1", key);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(entry_path(cache.path(), "v2", key), to).unwrap();
    }
    std::fs::remove_dir_all(cache.path().join("v2")).unwrap();
    s3.delete("media", keys[0]).await;
    s3.reset_counts();

    let proxy = Proxy::start(&cfg);
    let (st, xc, body) = get(&proxy, keys[0]).await;
    assert_eq!((st, xc.as_str()), (200, "HIT"), "gone from the bucket");
    assert_eq!(body, pattern(20_000, 0));
    assert_eq!(s3.count("GET"), 0);
    assert_eq!(get(&proxy, keys[2]).await.1, "MISS");
    wait_hit(&proxy, keys[2]).await;
    assert!(
        entry_path(cache.path(), "v1", keys[2]).is_file(),
        "new fills keep the cache's layout"
    );
    assert!(!cache.path().join("v2").exists());

    let stats = cache_command(&proxy, &["stats"]);
    assert!(stats.contains("entries  3"), "{stats}");
    let purged = cache_command(&proxy, &["purge", keys[0]]);
    assert!(
        purged.contains(&format!("purged     {}", keys[0])),
        "{purged}"
    );
    assert!(!entry_path(cache.path(), "v1", keys[0]).exists());
    let lost = eventually(Duration::from_secs(5), || async {
        get(&proxy, keys[0]).await.0 == 404
    })
    .await;
    assert!(lost, "a purged entry is not served");
    // Two entries and the 404 the purged key now has (a negative entry).
    let cleared = cache_command(&proxy, &["clear"]);
    assert!(cleared.contains("removed 3"), "{cleared}");
    assert!(cache_command(&proxy, &["stats"]).contains("entries  0"));
    assert_eq!(get(&proxy, keys[1]).await.1, "MISS");
}
