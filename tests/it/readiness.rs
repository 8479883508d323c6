//! `/readyz`: ready or not, and how each upstream is doing, including objects a bucket lost.

use std::time::Duration;

use crate::common::*;

const KEY: &str = "media_attachments/files/000/000/001/original/a.jpg";

async fn readyz(port: u16) -> (u16, String) {
    let r = client()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn line<'a>(body: &'a str, name: &str) -> &'a str {
    body.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no line for {name}: {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_each_upstream_ok_failing_or_unresolved() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, b"jpeg".to_vec(), "image/jpeg").await;
    let root = mastodon_root();
    write_file(root.path(), "accounts/avatars/1/me.png", b"local");
    let admin = closed_port();
    let body = format!(
        "[local]\nroots = [\"{}\"]\n\n[[upstream]]\nname = \"nowhere\"\ntype = \"http\"\nurl = \"http://mediaproxy-test-no-such-host.invalid\"\n\n[[upstream]]\nname = \"closed\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{}\"\n\n{}",
        root.path().display(),
        refused_port(),
        s3.s3_upstream("good", "media")
    );
    let proxy = Proxy::start_with_server(&body, &format!("admin_listen = \"127.0.0.1:{admin}\""));
    // Without a resolver for one bucket the proxy starts, serves local files and the other buckets.
    assert_eq!(get(&proxy, "accounts/avatars/1/me.png").await.1, "LOCAL");
    assert_eq!(get(&proxy, KEY).await.0, 200);
    let ok = eventually(Duration::from_secs(10), || async {
        let (status, body) = readyz(admin).await;
        status == 200
            && line(&body, "nowhere").starts_with("nowhere unresolved")
            && line(&body, "closed").starts_with("closed failing")
            && line(&body, "good") == "good ok"
    })
    .await;
    let (status, body) = readyz(admin).await;
    assert!(ok, "{status}\n{body}");
    assert!(body.starts_with("ready\n"), "{body}");
    // Why each failed, for a dashboard.
    let m = metrics(admin).await;
    for line in [
        "mediaproxy_upstream_errors_total{upstream=\"nowhere\",reason=\"dns\"}",
        "mediaproxy_upstream_errors_total{upstream=\"closed\",reason=\"connect\"}",
    ] {
        assert!(metric_value(&m, line) >= 1, "{line} in\n{m}");
    }
    assert!(!m.contains("upstream=\"good\",reason"), "{m}");
    // A load balancer's health check may use HEAD.
    for path in ["/healthz", "/readyz"] {
        let r = client()
            .head(format!("http://127.0.0.1:{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "HEAD {path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_say_whether_the_last_reload_worked_and_when() {
    let admin = closed_port();
    let proxy = Proxy::start_with_server("", &format!("admin_listen = \"127.0.0.1:{admin}\""));
    let gauges = || async {
        let m = metrics(admin).await;
        (
            metric_value(&m, "mediaproxy_config_last_reload_successful "),
            metric_value(
                &m,
                "mediaproxy_config_last_reload_success_timestamp_seconds ",
            ),
        )
    };
    let (ok, at) = gauges().await;
    assert_eq!(ok, 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - at < 60, "{at} vs {now}");

    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(&proxy.config_path, format!("{good}\nbogus = 1\n")).unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            gauges().await == (0, at)
        })
        .await,
        "{:?}",
        gauges().await
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&proxy.config_path, good).unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (ok, t) = gauges().await;
            ok == 1 && t > at
        })
        .await,
        "{:?}",
        gauges().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_stopping() {
    let up = RawUpstream::start(Behaviour::Paced {
        body: pattern(400_000, 3),
        chunk: 10_000,
        pace: Duration::from_millis(50),
        die_after: None,
        etag: None,
        replaced_by: None,
    })
    .await;
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &up.http_upstream("slow"),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    assert_eq!(readyz(admin).await.0, 200);
    // A response in flight keeps the process draining for a while after SIGTERM.
    let slow = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    proxy.signal("TERM");
    let stopping = eventually(Duration::from_secs(3), || async {
        let (status, body) = readyz(admin).await;
        status == 503 && body.starts_with("stopping\n")
    })
    .await;
    assert!(stopping, "{:?}", readyz(admin).await);
    assert_eq!(
        slow.bytes().await.unwrap().len(),
        400_000,
        "the drain finished it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_loses_an_object_is_noticed_and_healed_from_an_older_one() {
    let (new, old) = two_buckets().await;
    new.put("new", KEY, b"jpeg".to_vec(), "image/jpeg").await;
    old.put("old", KEY, b"jpeg".to_vec(), "image/jpeg").await;
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &format!(
            "[cache]\ndir = \"{{dir}}/cache\"\nttl_ok = \"1s\"\n\n{}{}",
            new.s3_target("new", "new", ""),
            old.s3_upstream("old", "old")
        ),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    assert_eq!(get(&proxy, KEY).await.1, "MISS");
    wait_hit(&proxy, KEY).await;
    // The new bucket "desynchronizes": the object it served is gone.
    new.delete("new", KEY).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, _, got) = get(&proxy, KEY).await;
    assert_eq!(
        (status, &got[..]),
        (200, &b"jpeg"[..]),
        "the old bucket still serves it"
    );
    let m = metrics(admin).await;
    assert_eq!(
        metric_value(
            &m,
            "mediaproxy_upstream_lost_objects_total{upstream=\"new\"}"
        ),
        1,
        "{m}"
    );
    let (_, body) = readyz(admin).await;
    assert!(line(&body, "new").contains("lost_objects=1"), "{body}");
    assert!(proxy.log().contains("lost an object"), "logged");
    // Lazy copy puts it back into the bucket that lost it.
    let healed = eventually(Duration::from_secs(10), || async {
        new.object("new", KEY).await.is_some()
    })
    .await;
    assert!(healed, "copied back from the old bucket");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let s3 = S3Server::start(&["media"], true).await;
    s3.put("media", KEY, pattern(10_000, 2), "image/jpeg").await;
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &s3.s3_upstream("bucket", "media"),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    assert_eq!(get(&proxy, KEY).await.1, "MISS");
    wait_hit(&proxy, KEY).await; // one or more HITs
    let missing = "media_attachments/files/000/000/002/original/none.jpg";
    assert_eq!(get(&proxy, missing).await.0, 404);
    let text = metrics(admin).await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|c| c.count).fold(0.0, f64::max)
                }
                _ => 0.0,
            })
            .sum()
    };
    let hits = value("mediaproxy_requests_total", &[("x_cache", "HIT")]);
    assert_eq!(
        value(
            "mediaproxy_requests_total",
            &[("x_cache", "MISS"), ("status", "200")]
        ),
        1.0
    );
    // The 404 asked the bucket: a MISS too.
    assert_eq!(
        value(
            "mediaproxy_requests_total",
            &[("x_cache", "MISS"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "mediaproxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0,
        "{text}"
    );
    assert!(hits >= 1.0);
    assert_eq!(
        value("mediaproxy_requests_total", &[("status", "404")]),
        1.0
    );
    assert_eq!(
        value(
            "mediaproxy_upstream_requests_total",
            &[("upstream", "bucket"), ("result", "found")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "mediaproxy_upstream_requests_total",
            &[("upstream", "bucket"), ("result", "not_found")]
        ),
        1.0
    );
    // Two questions asked of the bucket, both timed.
    assert_eq!(
        value(
            "mediaproxy_upstream_request_duration_seconds",
            &[("upstream", "bucket")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        value("mediaproxy_cache_fills_total", &[("result", "stored")]),
        1.0
    );
    assert!(value("mediaproxy_sent_bytes_total", &[]) >= 10_000.0 * (1.0 + hits));
    assert!(value("mediaproxy_cache_entries", &[]) >= 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_until_the_proxy_has_started() {
    // The cache directory sits on a frozen disk, so start-up stops at opening it; the admin listener,
    // bound first, already answers.
    let Some(disk) = super::fills::FreezableDisk::mount() else {
        eprintln!("SKIPPED: needs root, mkfs.ext4, a loop device and fsfreeze");
        return;
    };
    let root = mastodon_root();
    write_file(root.path(), "accounts/avatars/1/me.png", b"local");
    let admin = closed_port();
    let body = format!(
        "[local]\nroots = [\"{}\"]\n\n[cache]\ndir = \"{}/cache\"\n",
        root.path().display(),
        disk.mnt.display()
    );
    let thaw = disk.frozen();
    let starting = tokio::task::spawn_blocking(move || {
        Proxy::start_with_server(&body, &format!("admin_listen = \"127.0.0.1:{admin}\""))
    });
    let seen = eventually(Duration::from_secs(10), || async {
        match client()
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
        {
            Ok(r) => r.status() == 503 && r.text().await.unwrap() == "starting\n",
            Err(_) => false,
        }
    })
    .await;
    drop(thaw);
    let proxy = starting.await.unwrap();
    assert!(
        seen,
        "/readyz answered 503 starting while the proxy started"
    );
    assert_eq!(readyz(admin).await.0, 200);
    assert_eq!(get(&proxy, "accounts/avatars/1/me.png").await.1, "LOCAL");
}
