//! Local roots and the responder, through the real binary over loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

const AVATAR: &str = "accounts/avatars/109/383/759/229/326/700/original/a1b2c3.png";

fn roots_config(roots: &[&std::path::Path]) -> String {
    let list: Vec<String> = roots
        .iter()
        .map(|r| format!("\"{}\"", r.display()))
        .collect();
    format!("[local]\nroots = [{}]\n\n", list.join(", "))
}

/// Sends raw bytes (no client-side normalization of the path) and returns the status code.
fn raw_status(addr: std::net::SocketAddr, request_line_path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {request_line_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn raw_response(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn serves_local_file_with_the_header_contract() {
    let root = mastodon_root();
    let body = pattern(50_000, 1);
    write_file(root.path(), AVATAR, &body);
    let proxy = Proxy::start(&roots_config(&[root.path()]));

    let resp = client()
        .get(proxy.url(&format!("/{AVATAR}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-cache"], "LOCAL");
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-length"], "50000");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h["cache-control"].to_str().unwrap().contains("immutable"));
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    assert!(h.contains_key("etag") && h.contains_key("last-modified"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &body[..]);
}

#[tokio::test]
async fn range_on_local_files_is_byte_exact() {
    let root = mastodon_root();
    let small = pattern(70_000, 2);
    let big = pattern(3_000_000, 3); // above the one-read threshold: exercises the chunked reader
    write_file(
        root.path(),
        "media_attachments/files/1/2/3/original/s.mp4",
        &small,
    );
    write_file(
        root.path(),
        "media_attachments/files/1/2/3/original/b.mp4",
        &big,
    );
    let proxy = Proxy::start(&roots_config(&[root.path()]));
    let c = client();
    for (key, data) in [("s.mp4", &small), ("b.mp4", &big)] {
        let url = proxy.url(&format!("/media_attachments/files/1/2/3/original/{key}"));
        let len = data.len() as u64;
        for (spec, start, end) in [
            ("bytes=0-0".to_string(), 0, 0),
            ("bytes=100-1099".to_string(), 100, 1099),
            (format!("bytes={}-", len - 10), len - 10, len - 1),
            ("bytes=-500".to_string(), len - 500, len - 1),
            (format!("bytes=5-{}", len + 1000), 5, len - 1),
            (
                format!("bytes=262140-{}", 262144 * 3 + 7),
                262140,
                (262144 * 3 + 7).min(len - 1),
            ),
        ] {
            if start >= len {
                continue;
            }
            let resp = c.get(&url).header("range", &spec).send().await.unwrap();
            assert_eq!(resp.status(), 206, "{key} {spec}");
            assert_eq!(
                resp.headers()["content-range"],
                format!("bytes {start}-{end}/{len}").as_str()
            );
            let got = resp.bytes().await.unwrap();
            assert_eq!(
                &got[..],
                &data[start as usize..=end as usize],
                "{key} {spec}"
            );
        }
        let resp = c
            .get(&url)
            .header("range", format!("bytes={len}-"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 416);
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes */{len}").as_str()
        );
        // Multiple ranges: the whole object (RFC 9110 allows ignoring Range).
        let resp = c
            .get(&url)
            .header("range", "bytes=0-1,5-6")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap().len(), data.len());
    }
}

#[tokio::test]
async fn conditional_head_and_options() {
    let root = mastodon_root();
    write_file(root.path(), AVATAR, b"png bytes");
    let proxy = Proxy::start(&roots_config(&[root.path()]));
    let c = client();
    let url = proxy.url(&format!("/{AVATAR}"));
    let first = c.get(&url).send().await.unwrap();
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    let lm = first.headers()["last-modified"]
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
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    let r = c
        .get(&url)
        .header("if-none-match", "\"other\", W/".to_string() + &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304, "weak comparison for If-None-Match");
    let r = c
        .get(&url)
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(&url)
        .header("if-modified-since", &lm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = c
        .get(&url)
        .header("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // If-Range with a stale validator: the whole object, not a range of a changed one.
    let r = c
        .get(&url)
        .header("range", "bytes=0-1")
        .header("if-range", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(&url)
        .header("range", "bytes=0-1")
        .header("if-range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "9");
    assert_eq!(r.headers()["x-cache"], "LOCAL");

    let r = c
        .request(reqwest::Method::OPTIONS, &url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("GET"));
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let root = mastodon_root();
    write_file(root.path(), AVATAR, b"x");
    let proxy = Proxy::start(&roots_config(&[root.path()]));
    for m in ["POST", "PUT", "DELETE", "PATCH", "PROPFIND"] {
        let r = client()
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                proxy.url(&format!("/{AVATAR}")),
            )
            .body("data")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{m}");
        assert_eq!(r.headers()["allow"], "GET, HEAD, OPTIONS");
    }
    // The file is untouched by the PUT/DELETE attempts.
    assert_eq!(std::fs::read(root.path().join(AVATAR)).unwrap(), b"x");
}

#[tokio::test]
async fn roots_are_tried_in_order_and_directories_are_not_listed() {
    let (a, b) = (mastodon_root(), mastodon_root());
    write_file(
        a.path(),
        "custom_emojis/images/000/000/001/original/e.png",
        b"from a",
    );
    write_file(
        b.path(),
        "custom_emojis/images/000/000/001/original/e.png",
        b"from b",
    );
    write_file(
        b.path(),
        "custom_emojis/images/000/000/002/original/f.png",
        b"only b",
    );
    let proxy = Proxy::start(&roots_config(&[a.path(), b.path()]));
    let get = |p: &str| client().get(proxy.url(p)).send();
    let r = get("/custom_emojis/images/000/000/001/original/e.png")
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "from a");
    let r = get("/custom_emojis/images/000/000/002/original/f.png")
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "only b");
    for dir in [
        "/custom_emojis",
        "/custom_emojis/images/000/000/001/original",
        "/custom_emojis/images/",
    ] {
        assert_eq!(get(dir).await.unwrap().status(), 404, "{dir}");
    }
    assert_eq!(get("/").await.unwrap().status(), 404);
}

#[tokio::test]
async fn hostile_paths_never_escape_the_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("system");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(parent.path().join("secret.txt"), b"SECRET").unwrap();
    write_file(
        &root,
        "accounts/headers/000/000/001/original/h.jpg",
        b"header",
    );
    // Symlinks that point out of the root, absolute and relative.
    std::fs::create_dir_all(root.join("accounts/evil")).unwrap();
    std::os::unix::fs::symlink(
        parent.path().join("secret.txt"),
        root.join("accounts/evil/abs.txt"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../../../secret.txt", root.join("accounts/evil/rel.txt")).unwrap();
    std::os::unix::fs::symlink(parent.path(), root.join("accounts/evil/dir")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
    // A symlink that stays inside the root is fine (admins move parts of public/system around).
    std::os::unix::fs::symlink(
        "headers/000/000/001/original/h.jpg",
        root.join("accounts/inside.jpg"),
    )
    .unwrap();

    let proxy = Proxy::start(&roots_config(&[&root]));
    let table = [
        "/../secret.txt",
        "/accounts/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/accounts/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/accounts%2f..%2f..%2fsecret.txt",
        "/%252e%252e/secret.txt",
        "/.%2e/secret.txt",
        "/accounts/./headers/000/000/001/original/h.jpg",
        "/accounts//headers/000/000/001/original/h.jpg",
        "//etc/passwd",
        "/accounts/headers/000/000/001/original/h.jpg%00.png",
        "/accounts/headers/000/000/001/original/h.jpg%00",
        "/..\\secret.txt",
        "/..%5csecret.txt",
        "/accounts%5c..%5c..%5csecret.txt",
        "/accounts/evil/abs.txt",
        "/accounts/evil/rel.txt",
        "/accounts/evil/dir/secret.txt",
        "/etc/passwd",
        "/etc/hostname",
        "/accounts/headers/",
        "/accounts/headers/000/000/001/original/",
        "/accounts/headers%2F",
        "/%",
        "/%zz/x",
        "/%c0%ae%c0%ae/secret.txt",
        "/accounts/%0a/x",
        "/?list-type=2",
        "/?prefix=accounts",
    ];
    for path in table {
        let code = raw_status(proxy.addr, path);
        assert!(matches!(code, 400 | 404), "{path} answered {code}");
    }
    // A path the server might normalize must not leak the secret either: check bodies too.
    for path in [
        "/../secret.txt",
        "/accounts/evil/abs.txt",
        "/accounts/evil/rel.txt",
    ] {
        let text = raw_response(
            proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        assert!(!text.contains("SECRET"), "{path} leaked: {text}");
    }
    assert_eq!(raw_status(proxy.addr, "/accounts/inside.jpg"), 200);
    assert_eq!(
        raw_status(proxy.addr, "/accounts/headers/000/000/001/original/h.jpg"),
        200
    );
    // Query strings are ignored, not forwarded: the key is still served.
    assert_eq!(
        raw_status(
            proxy.addr,
            "/accounts/headers/000/000/001/original/h.jpg?x=1"
        ),
        200
    );
}

#[tokio::test]
async fn percent_encoded_names_are_decoded_once() {
    let root = mastodon_root();
    write_file(
        root.path(),
        "cache/preview_cards/images/000/000/001/original/a b+c%41.png",
        b"odd",
    );
    let proxy = Proxy::start(&roots_config(&[root.path()]));
    let ok = raw_status(
        proxy.addr,
        "/cache/preview_cards/images/000/000/001/original/a%20b+c%2541.png",
    );
    assert_eq!(ok, 200);
    let double = raw_status(
        proxy.addr,
        "/cache/preview_cards/images/000/000/001/original/a%20b+c%41.png",
    );
    assert_eq!(double, 404, "decoding twice would have found it");
}

#[tokio::test]
async fn path_prefix_is_stripped_and_other_paths_404() {
    let root = mastodon_root();
    write_file(root.path(), AVATAR, b"behind a prefix");
    let proxy =
        Proxy::start_with_server(&roots_config(&[root.path()]), "path_prefix = \"/storage\"");
    let r = client()
        .get(proxy.url(&format!("/storage/{AVATAR}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "behind a prefix");
    assert_eq!(raw_status(proxy.addr, &format!("/{AVATAR}")), 404);
    assert_eq!(raw_status(proxy.addr, &format!("/storagex/{AVATAR}")), 404);
    assert_eq!(raw_status(proxy.addr, "/storage"), 404);
    assert_eq!(raw_status(proxy.addr, "/storage/"), 404);
}

#[tokio::test]
async fn fifo_in_root_does_not_hang_the_proxy() {
    let root = mastodon_root();
    std::fs::create_dir_all(root.path().join("accounts")).unwrap();
    let fifo = root.path().join("accounts/pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    write_file(root.path(), AVATAR, b"still here");
    let proxy = Proxy::start(&roots_config(&[root.path()]));
    assert_eq!(raw_status(proxy.addr, "/accounts/pipe"), 404);
    assert_eq!(raw_status(proxy.addr, &format!("/{AVATAR}")), 200);
}

/// Polls `key` until `want` says yes, for at most `within`; returns how long it took.
async fn seen_within(
    proxy: &Proxy,
    key: &str,
    within: Duration,
    want: impl Fn(u16, &[u8]) -> bool,
) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        let r = client()
            .get(proxy.url(&format!("/{key}")))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        // A file shortened in place while it was being sent aborts that one response (as nginx's
        // "file was truncated"): not an answer, ask again.
        if let Ok(body) = r.bytes().await {
            if want(status, &body) {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn a_kept_local_file_replaced_rewritten_or_deleted_is_seen_within_seconds() {
    // Hits keep a local file open (nginx's open_file_cache); a change on disk must still show within
    // about a second (nginx: `open_file_cache_valid`, 60 s by default), not after the 10-15 s a kept
    // file lives.
    let root = mastodon_root();
    write_file(root.path(), AVATAR, b"first version");
    let proxy = Proxy::start(&roots_config(&[root.path()]));
    for _ in 0..3 {
        assert_eq!(get(&proxy, AVATAR).await.2, b"first version");
    }
    let path = root.path().join(AVATAR);
    // Replaced the way tools replace files: a new file renamed over the old one.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, b"second version, longer").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let took = seen_within(&proxy, AVATAR, Duration::from_secs(4), |s, b| {
        s == 200 && b == b"second version, longer"
    })
    .await;
    assert!(
        took.is_some(),
        "a file renamed over was still served after 4 s"
    );
    for _ in 0..3 {
        assert_eq!(get(&proxy, AVATAR).await.2, b"second version, longer");
    }
    // Rewritten in place, same inode, another length.
    std::fs::write(&path, b"third").unwrap();
    let took = seen_within(&proxy, AVATAR, Duration::from_secs(4), |s, b| {
        s == 200 && b == b"third"
    })
    .await;
    assert!(
        took.is_some(),
        "a file rewritten in place was still served after 4 s"
    );
    // Deleted: with no upstream, a 404.
    std::fs::remove_file(&path).unwrap();
    let took = seen_within(&proxy, AVATAR, Duration::from_secs(4), |s, _| s == 404).await;
    assert!(took.is_some(), "a deleted file was still served after 4 s");
}
