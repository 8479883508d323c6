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
