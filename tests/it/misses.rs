//! What a miss answers besides the body: a HEAD fills the cache like a GET (as nginx turns a HEAD into
//! a GET upstream), and a 404 says where it came from like every other answer.

use std::time::Duration;

use crate::common::*;

const KEY: &str = "media_attachments/files/000/000/007/original/head.jpg";

#[tokio::test(flavor = "multi_thread")]
async fn a_head_on_a_miss_fills_the_cache() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, pattern(50_000, 7), "image/jpeg").await;
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let head = client()
        .head(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-cache"], "MISS");
    assert_eq!(head.headers()["content-length"], "50000");
    assert_eq!(head.headers()["content-type"], "image/jpeg");
    // The fill goes on after the HEAD's answer (no client reads it): the next HEAD and GET are hits.
    let hit = eventually(Duration::from_secs(5), || async {
        let r = client()
            .head(proxy.url(&format!("/{KEY}")))
            .send()
            .await
            .unwrap();
        r.headers()["x-cache"] == "HIT"
    })
    .await;
    assert!(hit, "a HEAD after a HEAD miss is a HIT");
    let (status, x_cache, body) = get(&proxy, KEY).await;
    assert_eq!((status, x_cache.as_str()), (200, "HIT"));
    assert_eq!(body, pattern(50_000, 7));
    assert_eq!(s3.count("GET"), 1, "one GET filled the cache");
    assert_eq!(s3.count("HEAD"), 0, "the HEAD became that GET");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_404_says_miss_then_hit() {
    let s3 = S3Server::start(&["media"], true).await;
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let missing = "media_attachments/files/000/000/008/original/none.jpg";
    let (status, x_cache, _) = get(&proxy, missing).await;
    assert_eq!((status, x_cache.as_str()), (404, "MISS"));
    let (status, x_cache, _) = get(&proxy, missing).await;
    assert_eq!(
        (status, x_cache.as_str()),
        (404, "HIT"),
        "negatively cached"
    );
}

/// A HEAD fills only with a free `cache.background_fills` permit (no client reads that body): with every
/// permit in use it is a plain HEAD upstream, and nothing is downloaded.
#[tokio::test(flavor = "multi_thread")]
async fn a_head_with_every_background_fill_in_use_is_a_plain_head() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, pattern(50_000, 8), "image/jpeg").await;
    // Holds the one permit: a HEAD's fill from a bucket on a slow link (about 2 s).
    let slow = RawUpstream::start(Behaviour::Paced {
        body: pattern(400_000, 9),
        chunk: 10_000,
        pace: Duration::from_millis(50),
        die_after: None,
        etag: None,
        replaced_by: None,
    })
    .await;
    let cfg = format!(
        "[cache]\ndir = \"{{dir}}/cache\"\nbackground_fills = 1\n\n{}{}",
        s3.s3_upstream("b", "media"),
        slow.http_upstream("slow")
    );
    let proxy = Proxy::start(&cfg);
    let other = "media_attachments/files/000/000/009/original/slow.mp4";
    let r = client()
        .head(proxy.url(&format!("/{other}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-length"], "400000");
    s3.reset_counts();
    let r = client()
        .head(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), &r.headers()["x-cache"]),
        (200, &"MISS".parse().unwrap())
    );
    assert_eq!(s3.count("HEAD"), 1, "asked with a HEAD");
    assert_eq!(s3.count("GET"), 0, "no GET without a permit");
    assert_eq!(get(&proxy, KEY).await.1, "MISS", "nothing was filled");
}
