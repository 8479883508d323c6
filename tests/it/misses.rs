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
