//! File bodies go to a plain HTTP/1.1 socket with `sendfile` from a mapping of the file (see
//! `src/zerocopy.rs`): what a client gets must not change, and a local file rewritten in place while
//! it is being sent (Mastodon regenerating a thumbnail) must end that one response, never the process.

use crate::common::*;

const KEY: &str = "media_attachments/files/000/000/001/original/big.mp4";

#[tokio::test(flavor = "multi_thread")]
async fn a_local_file_truncated_while_sent_aborts_that_response_only() {
    let root = mastodon_root();
    let proxy = Proxy::start(&format!(
        "[local]\nroots = [\"{}\"]\n",
        root.path().display()
    ));
    let h2 = client_builder().http2_prior_knowledge().build().unwrap();
    for (name, client) in [("HTTP/1.1", client()), ("HTTP/2", h2)] {
        write_file(root.path(), KEY, &pattern(48 << 20, 1));
        let mut resp = client
            .get(proxy.url(&format!("/{KEY}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        let mut got = resp.chunk().await.unwrap().unwrap().len();
        // Cut in place, as rewriting the file with `File::create` does, while the response is mid-body
        // (socket buffers hold a few MiB of the 48).
        std::fs::OpenOptions::new()
            .write(true)
            .open(root.path().join(KEY))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let failed = loop {
            match resp.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert!(
            failed && got < 48 << 20,
            "{name}: a body cut short is an error, not a short body that looks whole ({got} bytes)"
        );
        // The process is still there and serves the file as it is now.
        let r = client
            .get(proxy.url(&format!("/{KEY}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.bytes().await.unwrap().len(), 1 << 20, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn file_bodies_are_byte_exact_over_http1_and_http2() {
    let root = mastodon_root();
    let s3 = S3Server::start(&["media"], true).await;
    let local = pattern(300_000, 2);
    let cached = pattern(200_000, 3);
    write_file(root.path(), "media_attachments/l/a.png", &local);
    s3.put(
        "media",
        "media_attachments/c/b.png",
        cached.clone(),
        "image/png",
    )
    .await;
    let admin = closed_port();
    let proxy = Proxy::start_with_server(
        &format!(
            "[local]\nroots = [\"{}\"]\n\n{}",
            root.path().display(),
            s3.s3_upstream("b", "media")
        ),
        &format!("admin_listen = \"127.0.0.1:{admin}\""),
    );
    get(&proxy, "media_attachments/c/b.png").await;
    wait_hit(&proxy, "media_attachments/c/b.png").await;
    let sent = || async { metric_value(&metrics(admin).await, "mediaproxy_sendfile_bytes_total ") };
    let h2 = client_builder().http2_prior_knowledge().build().unwrap();
    for (n, client) in [client(), h2].into_iter().enumerate() {
        let before = sent().await;
        for (key, body) in [
            ("media_attachments/l/a.png", &local),
            ("media_attachments/c/b.png", &cached),
        ] {
            // Twice: a cache entry is served from its kept mapping from the second hit on.
            for _ in 0..2 {
                let r = client
                    .get(proxy.url(&format!("/{key}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(&r.bytes().await.unwrap()[..], &body[..], "{key}");
            }
            let r = client
                .get(proxy.url(&format!("/{key}")))
                .header("Range", "bytes=1000-150999")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            assert_eq!(&r.bytes().await.unwrap()[..], &body[1000..151_000], "{key}");
        }
        let by_sendfile = sent().await - before;
        if n == 0 {
            // HTTP/1.1: the local file twice, the cache entry once (its first hit after the fill may be
            // read to verify it), and both ranges, all from the page cache.
            let least = 2 * 300_000 + 200_000 + 2 * 150_000;
            assert!(
                by_sendfile >= least,
                "HTTP/1.1 bodies went with sendfile: {by_sendfile} bytes"
            );
        } else {
            assert_eq!(by_sendfile, 0, "HTTP/2 frames its bodies itself");
        }
    }
}
