//! Process life as systemd drives it: graceful stop, reload, slow clients, TLS and HTTP/2.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::common::*;

const KEY: &str = "media_attachments/files/1/2/3/original/v.mp4";

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_responses_then_exits_0() {
    let s3 = S3Server::start(&["media"], true).await;
    let data = pattern(20 << 20, 3);
    s3.put("media", KEY, data.clone(), "video/mp4").await;
    let mut proxy = Proxy::start(&s3.s3_upstream("b", "media"));
    let r = client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(proxy.addr).is_err(),
        "stops accepting at once"
    );
    let mut got = first.len();
    while let Some(c) = stream.next().await {
        got += c.unwrap().len();
    }
    assert_eq!(got, data.len(), "the in-flight response completes");
    let code = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reorders_upstreams_and_a_bad_file_keeps_the_old_config() {
    let s3 = S3Server::start(&["old", "new"], true).await;
    s3.put("old", KEY, b"old".to_vec(), "video/mp4").await;
    s3.put("new", KEY, b"new".to_vec(), "video/mp4").await;
    // ttl_ok = 0s: every read goes to the upstreams, so the order in force is what answers.
    let no_cache = "[cache]\ndir = \"{dir}/cache\"\nttl_ok = \"0s\"\n\n";
    let proxy = Proxy::start(&format!(
        "{no_cache}{}{}",
        s3.s3_upstream("old", "old"),
        s3.s3_upstream("new", "new")
    ));
    let get = || async {
        client()
            .get(proxy.url(&format!("/{KEY}")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert_eq!(get().await, "old");

    proxy.rewrite_config(&format!(
        "{no_cache}{}{}",
        s3.s3_upstream("new", "new"),
        s3.s3_upstream("old", "old")
    ));
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get().await != "new" {
        assert!(Instant::now() < deadline, "reload did not take effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.rewrite_config("[[upstream]]\nname = \"x\"\ntype = \"s3\"\nbukket = \"typo\"\n");
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.log().contains("reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload error logged:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        proxy.log().contains("bukket"),
        "the log names the key at fault"
    );
    assert_eq!(get().await, "new", "old config keeps serving");
}

#[tokio::test]
async fn slow_client_cannot_hold_a_connection() {
    let proxy = Proxy::start_with_server("", "header_read_timeout = \"1s\"");
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n").unwrap(); // never finishes the headers
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connection held {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn client_that_stops_reading_is_disconnected() {
    let root = mastodon_root();
    let data = pattern(40 << 20, 9);
    write_file(root.path(), KEY, &data);
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        "send_timeout = \"1s\"",
    );
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    write!(s, "GET /{KEY} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(4)); // read nothing: socket buffers fill, writes stall
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got < data.len(),
        "the whole body arrived ({got} bytes): the stalled connection was kept"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "closed, not just idle"
    );
}

#[tokio::test]
async fn tls_and_http2() {
    let root = mastodon_root();
    write_file(root.path(), KEY, b"over tls");
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    // Relative to the config file (in a sibling temp dir), as secret files are: not to the working
    // directory the proxy was started in.
    let sibling = dir.path().file_name().unwrap().to_str().unwrap();
    let server =
        format!("[server.tls]\ncert = \"../{sibling}/cert.pem\"\nkey = \"../{sibling}/key.pem\"\n");
    // [server.tls] must follow [server]'s keys; local comes after it.
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        &server,
    );
    let ca = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let c = client_builder().tls_certs_only([ca]).build().unwrap();
    let url = format!("https://localhost:{}/{KEY}", proxy.addr.port());
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN negotiates h2");
    assert_eq!(r.text().await.unwrap(), "over tls");

    // Plain HTTP/2 (prior knowledge) on a cleartext listener too.
    let plain = Proxy::start(&format!(
        "[local]\nroots = [\"{}\"]\n",
        root.path().display()
    ));
    let c = client_builder().http2_prior_knowledge().build().unwrap();
    let r = c.get(plain.url(&format!("/{KEY}"))).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "over tls");
}

#[tokio::test]
async fn admin_listener_serves_health_and_metrics() {
    let root = mastodon_root();
    write_file(root.path(), KEY, b"x");
    let admin_port = closed_port();
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
    );
    client()
        .get(proxy.url(&format!("/{KEY}")))
        .send()
        .await
        .unwrap();
    client().get(proxy.url("/nope/x")).send().await.unwrap();
    let h = client()
        .get(format!("http://127.0.0.1:{admin_port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let m = metrics(admin_port).await;
    assert!(
        m.contains("mediaproxy_requests_total{status=\"200\",x_cache=\"LOCAL\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("mediaproxy_requests_total{status=\"404\",x_cache=\"\"} 1"),
        "{m}"
    );
    // The public port does not serve them.
    assert_eq!(
        client()
            .get(proxy.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn a_reload_takes_a_renewed_certificate_and_names_what_needs_a_restart() {
    let root = mastodon_root();
    write_file(root.path(), KEY, b"over tls");
    let dir = tempfile::tempdir().unwrap();
    let issue = || {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), c.key_pair.serialize_pem()).unwrap();
        reqwest::Certificate::from_pem(c.cert.pem().as_bytes()).unwrap()
    };
    let trusting = |ca: &reqwest::Certificate| {
        client_builder()
            .tls_certs_only([ca.clone()])
            .build()
            .unwrap()
    };
    let old_ca = issue();
    let server = format!(
        "[server.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
        dir.path().display()
    );
    let body = format!("[local]\nroots = [\"{}\"]\n", root.path().display());
    let proxy = Proxy::start_with_server(&body, &server);
    let url = format!("https://localhost:{}/{KEY}", proxy.addr.port());
    assert_eq!(
        trusting(&old_ca).get(&url).send().await.unwrap().status(),
        200
    );

    // certbot renews the certificate in place and runs `systemctl reload`.
    let new_ca = issue();
    proxy.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = trusting(&new_ca).get(&url).send().await;
    assert_eq!(r.expect("the renewed certificate is served").status(), 200);
    assert!(
        trusting(&old_ca).get(&url).send().await.is_err(),
        "the old one is not"
    );

    // A key only a restart can change is named in the log.
    std::fs::write(
        &proxy.config_path,
        std::fs::read_to_string(&proxy.config_path)
            .unwrap()
            .replace("[cache]\n", "[cache]\nmax_size = \"1GiB\"\n"),
    )
    .unwrap();
    proxy.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = proxy.log();
    assert!(
        log.contains("cache.max_size") && log.contains("only after a restart"),
        "{log}"
    );
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    // A copy of the units whose ExecStart is the binary just built (verify fails on a missing one).
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = tempfile::tempdir().unwrap();
    for name in ["mediaproxy.service", "mediaproxy.socket"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        let text = text.replace(
            "/usr/local/bin/mediaproxy",
            env!("CARGO_BIN_EXE_mediaproxy"),
        );
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(["mediaproxy.socket", "mediaproxy.service"])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (Debian's systemd package; .ci/run installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Bad values are only warnings to systemd: any line about our units fails the test.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("mediaproxy"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_access_log_line_per_request_unless_turned_off() {
    let s3 = S3Server::start(&["media"], true).await;
    let key = "media_attachments/files/000/000/001/original/a.jpg";
    s3.put("media", key, pattern(12_345, 1), "image/jpeg").await;
    let proxy = Proxy::start(&s3.s3_upstream("bucket", "media"));
    assert_eq!(get(&proxy, key).await.1, "MISS");
    wait_hit(&proxy, key).await;
    let log = proxy.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mediaproxy::access"))
        .collect();
    let miss = lines
        .iter()
        .find(|l| l.contains(" MISS "))
        .unwrap_or_else(|| panic!("no access line for the miss:\n{log}"));
    for part in [
        "127.0.0.1:",
        &format!("\"GET /{key}\""),
        " 200 MISS 12345 ",
        "upstream=bucket",
    ] {
        assert!(miss.contains(part), "{part:?} in {miss}");
    }
    assert!(lines
        .iter()
        .any(|l| l.contains(" 200 HIT 12345 ") && l.contains("upstream=-")));

    let quiet = Proxy::start_with_server(&s3.s3_upstream("bucket", "media"), "access_log = false");
    assert_eq!(get(&quiet, key).await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !quiet.log().contains("mediaproxy::access"),
        "{}",
        quiet.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_fit_journald_no_colours_and_debug_means_ours() {
    let s3 = S3Server::start(&["media"], true).await;
    let key = "media_attachments/files/000/000/001/original/a.jpg";
    s3.put("media", key, b"jpeg".to_vec(), "image/jpeg").await;
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        render(
            dir.path(),
            format!("127.0.0.1:{port}").parse().unwrap(),
            "",
            &s3.s3_upstream("bucket", "media"),
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    // stderr is a file here, as under journald: no escape codes.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("MEDIAPROXY_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/{key}");
    let up = eventually(Duration::from_secs(10), || async {
        client()
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    // Log lines leave through a writer thread: wait for them before stopping the process.
    let written = eventually(Duration::from_secs(5), || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("DEBUG mediaproxy"))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(up && written, "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI escape codes in a file:\n{text}"
    );
    assert!(
        text.contains("DEBUG mediaproxy"),
        "MEDIAPROXY_LOG=debug shows mediaproxy's debug"
    );
    for dep in ["hyper", "reqwest", "rustls", "h2::"] {
        assert!(
            !text.lines().any(|l| l.contains("DEBUG") && l.contains(dep)),
            "no {dep} debug lines:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stderr_nobody_reads_does_not_stall_the_proxy() {
    // journald reading slowly, or a pipe nobody reads: the access log must not block the workers.
    let root = mastodon_root();
    write_file(root.path(), KEY, b"x");
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let admin = closed_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        render(
            dir.path(),
            format!("127.0.0.1:{port}").parse().unwrap(),
            &format!("admin_listen = \"127.0.0.1:{admin}\""),
            &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("MEDIAPROXY_LOG", "info")
        .stderr(std::process::Stdio::piped()) // never read: fills at 64 KiB
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/{KEY}");
    let up = eventually(Duration::from_secs(10), || async {
        client().get(&url).send().await.is_ok()
    })
    .await;
    assert!(up);
    let c = client_builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut ok = 0;
    for _ in 0..1500 {
        if c.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            ok += 1;
        }
    }
    let healthz = c
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ok, 1500, "every request answered with stderr full");
    assert_eq!(healthz.ok(), Some(200));
}
