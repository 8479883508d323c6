//! HTTP/2 clients that hold streams without reading them, or connections without using them: a raw
//! client (the `h2` crate) sets the windows and the pace.

use std::time::{Duration, Instant};

use crate::common::*;

const KEY: &str = "media_attachments/files/000/000/001/original/big.mp4";

/// A raw HTTP/2 connection to the proxy: the handle to send requests and the connection's driver,
/// which answers PINGs (a hostile client does) and finishes when the server closes the connection.
async fn connect(
    proxy: &Proxy,
    window: u32,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

async fn closed_within(driver: &mut tokio::task::JoinHandle<()>, within: Duration) -> bool {
    tokio::time::timeout(within, driver).await.is_ok()
}

#[tokio::test]
async fn streams_that_never_open_their_window_are_closed_after_send_timeout() {
    let root = mastodon_root();
    write_file(root.path(), KEY, &pattern(1 << 20, 1));
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        "send_timeout = \"1s\"\nheader_read_timeout = \"30s\"",
    );
    let (send, mut driver) = connect(&proxy, 0).await;
    let mut send = send.ready().await.unwrap();
    let mut responses = Vec::new();
    for _ in 0..20 {
        let req = http::Request::get(format!("http://127.0.0.1/{KEY}"))
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        responses.push(resp);
        send = send.ready().await.unwrap();
    }
    // Kept, not dropped: dropping a response's body resets its stream, which a hostile client does not.
    let mut held = Vec::new();
    for resp in responses {
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200, "headers are not flow-controlled");
        held.push(resp);
    }
    let started = Instant::now();
    assert!(
        closed_within(&mut driver, Duration::from_secs(8)).await,
        "20 streams with a shut window still held after 8 s (send_timeout = 1s)"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before send_timeout"
    );
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_ok(),
        "the proxy still serves"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_even_when_it_answers_pings() {
    let root = mastodon_root();
    write_file(root.path(), KEY, b"small");
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        "header_read_timeout = \"1s\"",
    );
    let (send, mut driver) = connect(&proxy, 65_535).await;
    // One request first: the limit runs from the last stream's end, not from the connection's start.
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://127.0.0.1/{KEY}"))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    assert!(
        closed_within(&mut driver, Duration::from_secs(6)).await,
        "an HTTP/2 connection with no stream for 6 s is still open (idle limit 1s)"
    );
}

#[tokio::test]
async fn a_slow_but_reading_http2_client_gets_the_whole_body() {
    // Progress is not a stall: a 1 MiB body read a frame at a time, pausing after each, for longer
    // than send_timeout in all, arrives whole.
    let body = pattern(1 << 20, 3);
    let root = mastodon_root();
    write_file(root.path(), KEY, &body);
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        "send_timeout = \"1s\"\nheader_read_timeout = \"1s\"",
    );
    let (send, _driver) = connect(&proxy, 65_535).await;
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("http://127.0.0.1/{KEY}"))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let mut stream = resp.await.unwrap().into_body();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk.unwrap_or_else(|e| {
            panic!(
                "the body is cut at {} after {:?}: {e}\n{}",
                got.len(),
                t0.elapsed(),
                proxy.log()
            )
        });
        got.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = stream.flow_control().release_capacity(chunk.len());
    }
    assert!(
        t0.elapsed() > Duration::from_secs(1),
        "read for longer than send_timeout"
    );
    assert_eq!(got.len(), body.len());
    assert!(got == body);
}

#[tokio::test]
async fn many_streams_sharing_a_slow_connection_are_not_cut() {
    // Ten 256 KiB bodies on one connection read steadily but slowly: each stream alone moves less than
    // 64 KiB per send_timeout (2 s), the connection as a whole keeps moving: none is cut.
    let root = mastodon_root();
    for i in 0..10 {
        write_file(
            root.path(),
            &format!("media_attachments/files/000/000/00{i}/original/v.mp4"),
            &pattern(256 * 1024, i),
        );
    }
    let proxy = Proxy::start_with_server(
        &format!("[local]\nroots = [\"{}\"]\n", root.path().display()),
        "send_timeout = \"2s\"",
    );
    let (send, _driver) = connect(&proxy, 65_535).await;
    let mut send = send.ready().await.unwrap();
    let mut bodies = Vec::new();
    for i in 0..10 {
        let req = http::Request::get(format!(
            "http://127.0.0.1/media_attachments/files/000/000/00{i}/original/v.mp4"
        ))
        .body(())
        .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        bodies.push(resp);
        send = send.ready().await.unwrap();
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for resp in bodies {
        tasks.push(tokio::spawn(async move {
            let mut body = resp.await.unwrap().into_body();
            let mut got = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| format!("cut at {got}: {e}"))?;
                got += chunk.len();
                // About 20 KiB/s per stream.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Ok::<_, String>(got)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(256 * 1024));
    }
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "slower than send_timeout per stream"
    );
}
