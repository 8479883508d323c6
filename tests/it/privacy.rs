//! What Mastodon deleted or made private stays so: allowed prefixes, ACL-respecting reads, and Mastodon's
//! cache buster with tombstones, through the real binary against real S3 servers (one per bucket, so
//! each bucket's requests are counted on their own).

use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::*;

const PHOTO: &str = "media_attachments/files/109/383/759/229/326/700/original/photo.jpg";
const OTHER: &str = "media_attachments/files/109/383/759/229/326/701/original/other.png";
const ARCHIVE: &str = "backups/dumps/000/000/001/original/archive-20261124120000-9f8e7d6c.zip";
const IMPORT: &str = "imports/data/000/000/002/original/following_accounts.csv";
const HEADER: &str = "X-Cache-Buster";
const SECRET: &str = "mastodon-cache-buster-secret-1b2c3d";

fn reads(s3: &S3Server) -> usize {
    s3.count("GET") + s3.count("HEAD")
}

/// A bust as Mastodon's CacheBusterWorker sends it: `method` on the media URL, with the secret header.
async fn bust(proxy: &Proxy, method: &str, key: &str, secret: Option<&str>) -> (u16, Vec<u8>) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(method, proxy.url(&format!("/{key}")));
    if let Some(secret) = secret {
        req = req.header(HEADER, secret);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// The `[server]` lines for Mastodon's cache buster; the secret file lives in `dir` (with a trailing
/// newline, as `echo` writes it).
fn buster(dir: &Path) -> String {
    let file = dir.join("buster.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    format!(
        "cache_buster_header = \"{HEADER}\"\ncache_buster_secret_file = \"{}\"",
        file.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn user_archives_and_imports_are_404_without_asking_any_bucket() {
    let s3 = S3Server::start(&["media"], true).await;
    for key in [ARCHIVE, IMPORT, &format!("cache/{ARCHIVE}")] {
        s3.put(
            "media",
            key,
            b"PK direct messages".to_vec(),
            "application/zip",
        )
        .await;
    }
    s3.put_with_acl(
        "media",
        PHOTO,
        b"jpeg".to_vec(),
        "image/jpeg",
        Some("public-read"),
    )
    .await;
    // A Mastodon on local storage keeps archives under public/system too.
    let root = mastodon_root();
    write_file(root.path(), ARCHIVE, b"PK local archive");
    let cfg = format!(
        "[local]\nroots = [\"{}\"]\n\n{}",
        root.path().display(),
        s3.s3_upstream("media", "media")
    );
    let proxy = Proxy::start(&cfg);
    for key in [ARCHIVE, IMPORT, &format!("cache/{ARCHIVE}")] {
        assert_eq!(get(&proxy, key).await.0, 404, "GET {key}");
        let head = client()
            .head(proxy.url(&format!("/{key}")))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 404, "HEAD {key}");
    }
    assert_eq!(reads(&s3), 0, "no bucket was asked for a private key");
    assert_eq!(get(&proxy, PHOTO).await.0, 200, "media is still served");

    // allow_prefixes narrows (or, with "/", widens) what is served.
    let narrow = Proxy::start_with_server(&cfg, "allow_prefixes = [\"media_attachments\"]");
    assert_eq!(get(&narrow, PHOTO).await.0, 200);
    assert_eq!(
        get(&narrow, "accounts/avatars/000/000/001/original/a.png")
            .await
            .0,
        404
    );
    let everything = Proxy::start_with_server(&cfg, "allow_prefixes = [\"/\"]");
    assert_eq!(get(&everything, ARCHIVE).await.2, b"PK local archive");
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_reads_respect_the_bucket_acl_signed_reads_do_not() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put_with_acl(
        "media",
        PHOTO,
        b"public".to_vec(),
        "image/jpeg",
        Some("public-read"),
    )
    .await;
    s3.put_with_acl(
        "media",
        OTHER,
        b"suspended".to_vec(),
        "image/png",
        Some("private"),
    )
    .await;
    let anonymous = Proxy::start(&s3.s3_upstream_anonymous("media", "media"));
    assert_eq!(get(&anonymous, PHOTO).await.0, 200);
    let (st, _, body) = get(&anonymous, OTHER).await;
    assert_eq!(st, 404, "a private object is not found for anonymous reads");
    assert!(!body.starts_with(b"suspended"));
    let signed = Proxy::start(&s3.s3_upstream("media", "media"));
    assert_eq!(
        get(&signed, OTHER).await.2,
        b"suspended",
        "signed reads see it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn suspension_and_unsuspension_are_seen_at_the_next_read_after_a_bust() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put_with_acl(
        "media",
        PHOTO,
        b"public".to_vec(),
        "image/jpeg",
        Some("public-read"),
    )
    .await;
    let secret_dir = TempDir::new().unwrap();
    let proxy = Proxy::start_with_server(
        &s3.s3_upstream_anonymous("media", "media"),
        &buster(secret_dir.path()),
    );
    assert_eq!(get(&proxy, PHOTO).await.0, 200);
    assert_eq!(get(&proxy, PHOTO).await.1, "HIT");
    // Suspension: Mastodon makes the object private, then busts its URL.
    s3.set_acl("media", PHOTO, "private");
    assert_eq!(
        get(&proxy, PHOTO).await.1,
        "HIT",
        "the cache does not know yet"
    );
    assert_eq!(bust(&proxy, "GET", PHOTO, Some(SECRET)).await.0, 200);
    assert_eq!(get(&proxy, PHOTO).await.0, 404);
    // Unsuspension: public again, busted again.
    s3.set_acl("media", PHOTO, "public-read");
    assert_eq!(bust(&proxy, "PURGE", PHOTO, Some(SECRET)).await.0, 200);
    let (st, _, body) = get(&proxy, PHOTO).await;
    assert_eq!((st, body.as_slice()), (200, &b"public"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bust_purges_the_key_and_older_upstreams_are_no_longer_asked() {
    let (new, old) = two_buckets().await;
    old.put("old", PHOTO, b"deleted by mastodon".to_vec(), "image/jpeg")
        .await;
    new.put("new", OTHER, b"in both".to_vec(), "image/png")
        .await;
    old.put("old", OTHER, b"in both".to_vec(), "image/png")
        .await;
    let secret_dir = TempDir::new().unwrap();
    let cfg = format!(
        "{}{}",
        new.s3_upstream("new", "new"),
        old.s3_upstream("old", "old")
    );
    let proxy = Proxy::start_with_server(&cfg, &buster(secret_dir.path()));
    let admin = closed_port();
    let with_admin = Proxy::start_with_server(
        &cfg,
        &format!(
            "{}\nadmin_listen = \"127.0.0.1:{admin}\"",
            buster(secret_dir.path())
        ),
    );

    // Cached from the old bucket, then busted with a GET (Mastodon's default method).
    assert_eq!(get(&proxy, PHOTO).await.1, "MISS");
    assert_eq!(get(&proxy, PHOTO).await.1, "HIT");
    let (st, body) = bust(&proxy, "GET", PHOTO, Some(SECRET)).await;
    assert_eq!(
        (st, body.len()),
        (200, 0),
        "a bust answers 200 with no body"
    );
    old.reset_counts();
    assert_eq!(get(&proxy, PHOTO).await.0, 404, "gone from the cache too");
    let head = client()
        .head(proxy.url(&format!("/{PHOTO}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    assert_eq!(reads(&old), 0, "the old bucket was not asked");

    // Deleted from the write bucket and busted with PURGE: the old copy is never served again.
    new.delete("new", OTHER).await;
    assert_eq!(bust(&proxy, "PURGE", OTHER, Some(SECRET)).await.0, 200);
    assert_eq!(get(&proxy, OTHER).await.0, 404);
    assert_eq!(reads(&old), 0);
    // Keys nobody busted still fall through to the old bucket.
    old.put(
        "old",
        "accounts/avatars/000/000/001/original/a.png",
        b"a".to_vec(),
        "image/png",
    )
    .await;
    assert_eq!(
        get(&proxy, "accounts/avatars/000/000/001/original/a.png")
            .await
            .0,
        200
    );

    // Counted in /metrics (on a second proxy, with an admin listener).
    bust(&with_admin, "PURGE", PHOTO, Some(SECRET)).await;
    bust(&with_admin, "PURGE", PHOTO, Some("wrong")).await;
    let m = metrics(admin).await;
    assert_eq!(
        metric_value(&m, "mediaproxy_cache_busts_total{result=\"ok\"}"),
        1,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "mediaproxy_cache_busts_total{result=\"refused\"}"),
        1,
        "{m}"
    );
    assert_eq!(metric_value(&m, "mediaproxy_tombstones "), 1, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bust_with_a_wrong_or_missing_secret_changes_nothing() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", PHOTO, b"stays".to_vec(), "image/jpeg")
        .await;
    let secret_dir = TempDir::new().unwrap();
    let proxy = Proxy::start_with_server(
        &s3.s3_upstream("media", "media"),
        &buster(secret_dir.path()),
    );
    assert_eq!(get(&proxy, PHOTO).await.1, "MISS");
    for secret in [
        Some("wrong"),
        Some(""),
        Some(&SECRET[..SECRET.len() - 1]),
        None,
    ] {
        let (st, body) = bust(&proxy, "GET", PHOTO, secret).await;
        assert_eq!(
            (st, body.as_slice()),
            (200, &b"stays"[..]),
            "an ordinary read"
        );
        assert_eq!(bust(&proxy, "PURGE", PHOTO, secret).await.0, 405);
        assert_eq!(
            get(&proxy, PHOTO).await.1,
            "HIT",
            "still cached after {secret:?}"
        );
    }
    // Without a configured buster, the header means nothing either.
    let plain = Proxy::start(&s3.s3_upstream("media", "media"));
    assert_eq!(bust(&plain, "GET", PHOTO, Some(SECRET)).await.1, b"stays");
    assert_eq!(bust(&plain, "PURGE", PHOTO, Some(SECRET)).await.0, 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn tombstones_survive_a_kill_and_expire_after_tombstone_ttl() {
    let (new, old) = two_buckets().await;
    old.put("old", PHOTO, b"old copy".to_vec(), "image/jpeg")
        .await;
    let secret_dir = TempDir::new().unwrap();
    let cache_dir = TempDir::new().unwrap();
    let cfg = format!(
        "[cache]\ndir = \"{}\"\nttl_error = \"1s\"\ntombstone_ttl = \"4s\"\n\n{}{}",
        cache_dir.path().display(),
        new.s3_upstream("new", "new"),
        old.s3_upstream("old", "old")
    );
    let server = buster(secret_dir.path());
    let proxy = Proxy::start_with_server(&cfg, &server);
    assert_eq!(bust(&proxy, "PURGE", PHOTO, Some(SECRET)).await.0, 200);
    let busted = Instant::now();
    drop(proxy); // SIGKILL: the tombstone was on disk before the 200
    let proxy = Proxy::start_with_server(&cfg, &server);
    old.reset_counts();
    assert_eq!(
        get(&proxy, PHOTO).await.0,
        404,
        "still tombstoned after the restart"
    );
    assert_eq!(reads(&old), 0);
    // Past tombstone_ttl (and the 1 s negative entry), the old bucket is asked again.
    let wait = Duration::from_millis(4_300).saturating_sub(busted.elapsed());
    tokio::time::sleep(wait).await;
    let (st, _, body) = get(&proxy, PHOTO).await;
    assert_eq!((st, body.as_slice()), (200, &b"old copy"[..]));
    assert_eq!(old.count("GET"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_running_during_a_bust_is_not_stored() {
    let new = S3Server::start(&["new"], true).await;
    // The old bucket is slow: the fill is still running when Mastodon's bust arrives.
    let data = pattern(1 << 20, 5);
    let old = RawUpstream::start(Behaviour::Paced {
        body: data.clone(),
        chunk: 64 * 1024,
        pace: Duration::from_millis(60),
        die_after: None,
        etag: None,
        replaced_by: None,
    })
    .await;
    let secret_dir = TempDir::new().unwrap();
    let cfg = format!(
        "{}{}",
        new.s3_upstream("new", "new"),
        old.http_upstream("old")
    );
    let proxy = Proxy::start_with_server(&cfg, &buster(secret_dir.path()));
    let url = proxy.url(&format!("/{PHOTO}"));
    let reader = tokio::spawn(async move {
        client()
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bust(&proxy, "PURGE", PHOTO, Some(SECRET)).await.0, 200);
    // The reader that was already being served gets its whole answer...
    assert_eq!(reader.await.unwrap().len(), data.len());
    // ...but what it fetched was not cached (given the fill time to commit, had it not been voided),
    // and the old bucket is not asked again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = old.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&proxy, PHOTO).await.0, 404);
    assert_eq!(old.hits.load(std::sync::atomic::Ordering::SeqCst), hits);
}
