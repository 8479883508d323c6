//! Ordered upstreams against a real S3 server (SigV4 enforced) and misbehaving raw HTTP servers.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::common::*;

const KEY: &str = "media_attachments/files/109/383/759/229/326/700/original/photo.jpg";

#[tokio::test(flavor = "multi_thread")]
async fn s3_server_enforces_sigv4() {
    // Guards the fixture: if unsigned requests were accepted, the signing tests below would prove nothing.
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"signed only".to_vec(), "image/jpeg")
        .await;
    let r = client()
        .get(format!("{}/media/{KEY}", s3.endpoint()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn ordered_upstreams_first_that_has_it_serves_it() {
    let s3 = S3Server::start(&["new", "old"], true).await;
    let public = S3Server::start(&["legacy"], false).await;
    s3.put(
        "new",
        "accounts/avatars/000/000/001/original/both.png",
        b"new copy".to_vec(),
        "image/png",
    )
    .await;
    s3.put(
        "old",
        "accounts/avatars/000/000/001/original/both.png",
        b"old copy".to_vec(),
        "image/png",
    )
    .await;
    s3.put("old", KEY, b"only in old".to_vec(), "image/jpeg")
        .await;
    public
        .put(
            "legacy",
            "custom_emojis/images/000/000/009/original/e.gif",
            b"GIF89a".to_vec(),
            "image/gif",
        )
        .await;

    let cfg = format!(
        "{}{}{}",
        s3.s3_upstream("new", "new"),
        s3.s3_upstream("old", "old"),
        public.http_upstream("legacy", "legacy")
    );
    let proxy = Proxy::start(&cfg);
    let c = client();

    let r = c
        .get(proxy.url("/accounts/avatars/000/000/001/original/both.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.text().await.unwrap(), "new copy");

    let r = c.get(proxy.url(&format!("/{KEY}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert!(r.headers()["etag"].to_str().unwrap().starts_with('"'));
    assert_eq!(r.text().await.unwrap(), "only in old");

    let r = c
        .get(proxy.url("/custom_emojis/images/000/000/009/original/e.gif"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "anonymous http upstream");
    assert_eq!(r.text().await.unwrap(), "GIF89a");

    let r = c
        .get(proxy.url("/accounts/avatars/000/000/404/original/missing.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // HEAD for a key not read before: answered from the first bucket that has it, and filled like a GET
    // (nginx's proxy_cache_convert_head), so the next request is a hit.
    s3.put(
        "old",
        "accounts/avatars/000/000/002/original/head.png",
        b"headonly".to_vec(),
        "image/png",
    )
    .await;
    let r = c
        .head(proxy.url("/accounts/avatars/000/000/002/original/head.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "8");
    wait_hit(&proxy, "accounts/avatars/000/000/002/original/head.png").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_root_wins_over_upstreams() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"bucket".to_vec(), "image/jpeg").await;
    let root = mastodon_root();
    write_file(root.path(), KEY, b"local");
    let cfg = format!(
        "[local]\nroots = [\"{}\"]\n\n{}",
        root.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "LOCAL");
    assert_eq!(r.text().await.unwrap(), "local");
    assert_eq!(s3.count("GET"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn range_is_forwarded_and_byte_exact() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(1_000_000, 11);
    let specs = [
        ("bytes=0-99", 0usize, 99usize),
        ("bytes=500000-", 500_000, 999_999),
        ("bytes=-1000", 999_000, 999_999),
        ("bytes=999999-2000000", 999_999, 999_999),
    ];
    for i in 0..specs.len() {
        s3.put(
            "media",
            &format!("media_attachments/r/{i}.mp4"),
            data.clone(),
            "video/mp4",
        )
        .await;
    }
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let c = client();
    // Each on a key of its own, so each is a miss answered from the bucket.
    for (i, (spec, s, e)) in specs.into_iter().enumerate() {
        let r = c
            .get(proxy.url(&format!("/media_attachments/r/{i}.mp4")))
            .header("range", spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{spec}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {s}-{e}/1000000").as_str()
        );
        assert_eq!(r.headers()["x-cache"], "MISS");
        assert_eq!(&r.bytes().await.unwrap()[..], &data[s..=e], "{spec}");
    }
    let url = proxy.url(&format!("/{KEY}"));
    let r = c
        .get(&url)
        .header("range", "bytes=2000000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000000");
    // Conditional requests are answered by the responder from the upstream's validators.
    let etag = c.get(&url).send().await.unwrap().headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    let r = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_upstreams_are_skipped_and_all_failing_is_502() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"survivor".to_vec(), "image/jpeg")
        .await;
    let dead = refused_port();
    let cfg = format!(
        "[[upstream]]\nname = \"dead\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{dead}\"\nconnect_timeout = \"2s\"\n\n{}",
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "survivor");
    // Missing in the live bucket, and the dead one could not say: not a 404 anyone should believe.
    let r = client()
        .get(proxy.url("/accounts/avatars/000/000/001/original/x.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(proxy.log().contains("upstream failed"), "failure is logged");

    let only_dead = Proxy::start(&format!(
        "[[upstream]]\nname = \"dead\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{dead}\"\n"
    ));
    let r = client()
        .get(only_dead.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_and_silence_count_as_failures_not_absence() {
    let broken = RawUpstream::start(Behaviour::Respond {
        status: 503,
        headers: vec![],
        body: b"slow down".to_vec(),
    })
    .await;
    let silent = RawUpstream::start(Behaviour::Silent).await;
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"third time lucky".to_vec(), "image/jpeg")
        .await;
    let cfg = format!(
        "{}{}{}",
        broken.http_upstream("broken"),
        silent.http_upstream("silent"),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    let started = Instant::now();
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "third time lucky");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "first_byte_timeout (1s) bounds the silent upstream"
    );
    assert_eq!(broken.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(silent.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_a_failure_not_a_404() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"x".to_vec(), "image/jpeg").await;
    // A wrong secret, then an access key the provider does not know (s3s says NotSignedUp).
    for (from, to, code) in [
        (SECRET_KEY, "wrong-secret", "SignatureDoesNotMatch"),
        (ACCESS_KEY, "AKIANOBODY", "NotSignedUp"),
    ] {
        let cfg = s3.s3_upstream("b", "media").replace(from, to);
        let proxy = Proxy::start(&cfg);
        let r = client()
            .get(proxy.url(&format!("/{KEY}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{code}");
        let log = proxy.log();
        assert!(log.contains(code), "{log}");
        assert!(
            !log.contains(SECRET_KEY) && !log.contains("wrong-secret"),
            "secret in the log"
        );
        assert!(!log.contains("X-Amz-Signature"), "signed URL in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_headers_do_not_leak() {
    let up = RawUpstream::start(Behaviour::Respond {
        status: 200,
        headers: vec![
            ("Set-Cookie".into(), "session=abc".into()),
            ("x-amz-request-id".into(), "REQ123".into()),
            ("x-amz-meta-owner".into(), "alice".into()),
            ("Server".into(), "AmazonS3".into()),
            ("Content-Type".into(), "image/webp".into()),
            ("ETag".into(), "\"abc123\"".into()),
        ],
        body: b"webp".to_vec(),
    })
    .await;
    let proxy = Proxy::start(&up.http_upstream("public"));
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert!(!h.contains_key("set-cookie"));
    assert!(h.keys().all(|k| !k.as_str().starts_with("x-amz-")), "{h:?}");
    assert_eq!(h["content-type"], "image/webp");
    assert_eq!(h["etag"], "\"abc123\"");
    assert!(h["cache-control"].to_str().unwrap().contains("immutable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_dying_mid_body_aborts_the_client() {
    let up = RawUpstream::start(Behaviour::DieMidBody {
        len: 10_000_000,
        sent: 1_000_000,
    })
    .await;
    let proxy = Proxy::start(&up.http_upstream("flaky"));
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "10000000");
    let mut got = 0usize;
    let mut stream = r.bytes_stream();
    let mut errored = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert!(
        errored,
        "a short body must not end cleanly (got {got} bytes)"
    );
    assert!(got < 10_000_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn unresolvable_upstream_host_does_not_stop_start_or_local_serving() {
    let root = mastodon_root();
    write_file(root.path(), KEY, b"local still works");
    let cfg = format!(
        "[local]\nroots = [\"{}\"]\n\n[[upstream]]\nname = \"nxdomain\"\ntype = \"s3\"\nendpoint = \"https://bucket-host.invalid\"\nbucket = \"media\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"3s\"\n",
        root.path().display()
    );
    let proxy = Proxy::start(&cfg);
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "local still works");
    let r = client()
        .get(proxy.url("/accounts/avatars/1/2/3/original/x.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "DNS failure is a failed upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_50mb_with_flat_memory() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(50 << 20, 5);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let root = mastodon_root();
    write_file(
        root.path(),
        "media_attachments/files/1/1/1/original/local.mp4",
        &data,
    );
    let cfg = format!(
        "[local]\nroots = [\"{}\"]\n\n{}",
        root.path().display(),
        s3.s3_upstream("b", "media")
    );
    let proxy = Proxy::start(&cfg);
    let idle = proxy.peak_rss_kib();
    for path in [
        format!("/{KEY}"),
        "/media_attachments/files/1/1/1/original/local.mp4".to_string(),
    ] {
        // Read slowly-ish in chunks, comparing as we go, without holding the body.
        let r = client().get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut offset = 0usize;
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            assert_eq!(
                &chunk[..],
                &data[offset..offset + chunk.len()],
                "{path} at {offset}"
            );
            offset += chunk.len();
        }
        assert_eq!(offset, data.len());
    }
    let peak = proxy.peak_rss_kib();
    eprintln!("proxy RSS: idle peak {idle} KiB, after two 50 MiB bodies {peak} KiB");
    assert!(
        peak < idle + 20 * 1024,
        "peak RSS grew by {} KiB streaming 50 MiB",
        peak - idle
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_pooled() {
    let s3 = S3Server::start(&["media"], true).await;
    for i in 0..20 {
        s3.put(
            "media",
            &format!("media_attachments/pool/{i}.png"),
            vec![i as u8; 1000],
            "image/png",
        )
        .await;
    }
    let before = s3.connections();
    let proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    for i in 0..20 {
        let (st, body) = {
            let r = client()
                .get(proxy.url(&format!("/media_attachments/pool/{i}.png")))
                .send()
                .await
                .unwrap();
            (r.status(), r.bytes().await.unwrap())
        };
        assert_eq!(st, 200);
        assert_eq!(&body[..], &vec![i as u8; 1000][..]);
    }
    let used = s3.connections() - before;
    assert!(
        used <= 2,
        "20 sequential misses opened {used} connections to the bucket"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bucket_is_a_failure_never_a_cached_404() {
    let s3 = S3Server::start(&["media"], true).await;
    // A typo in the bucket name.
    let proxy = Proxy::start(&s3.s3_upstream("typo", "medai"));
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "NoSuchBucket is not \"no such key\"");
    assert!(proxy.log().contains("NoSuchBucket"), "{}", proxy.log());
    // Nothing negative was cached: once the bucket exists and has the key, it is served.
    std::fs::create_dir_all(s3.root.path().join("medai")).unwrap();
    s3.put("medai", KEY, b"found".to_vec(), "image/jpeg").await;
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_answered_416_without_a_length_does_not_loop() {
    let up = RawUpstream::start(Behaviour::Respond {
        status: 416,
        headers: vec![],
        body: Vec::new(),
    })
    .await;
    let proxy = Proxy::start(&up.http_upstream("odd"));
    let started = Instant::now();
    let r = client()
        .head(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A HEAD fills like a GET: the GET's 416 asks a HEAD for the length, whose 416 ends it.
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "asked twice, not in a loop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_upstream_is_logged_once_per_interval_not_per_request() {
    let proxy = Proxy::start(&format!(
        "[[upstream]]\nname = \"down\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{}\"\n\n",
        refused_port()
    ));
    for i in 0..20 {
        let (status, _, _) = get(&proxy, &format!("media_attachments/files/{i}/a.png")).await;
        assert_eq!(status, 502);
    }
    let log = proxy.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("upstream failed"))
        .count();
    assert_eq!(
        warnings, 1,
        "one line for 20 failures of the same upstream:\n{log}"
    );
}
