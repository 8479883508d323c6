//! The object reader against real sockets on loopback: each server below writes its answers byte for
//! byte, as a bucket (or a broken one) would, and counts the connections it accepted.

use super::*;
use crate::upstream::UpstreamError;
use futures_util::StreamExt;
use http::StatusCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(5);

/// A server that answers each request it reads with the next of `answers`, each a list of pieces
/// written with a short pause between them; after the last answer of a connection (`None` in the
/// list) it closes that connection. Returns its address and the count of connections accepted.
async fn scripted(answers: Vec<Option<Vec<&'static [u8]>>>) -> (Url, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut answers = answers.into_iter();
        'conns: while let Ok((mut s, _)) = listener.accept().await {
            s.set_nodelay(true).unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            loop {
                if !read_request(&mut s).await {
                    continue 'conns;
                }
                match answers.next() {
                    Some(Some(pieces)) => {
                        for p in pieces {
                            if s.write_all(p).await.is_err() {
                                continue 'conns;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    Some(None) => continue 'conns, // close it
                    None => break 'conns,
                }
            }
        }
    });
    (url, accepted)
}

/// A server that hands each connection it accepts, numbered from 0, to `each` in a task of its own.
/// Returns its address and the count of connections accepted.
async fn serve<F, Fut>(each: F) -> (Url, Arc<AtomicUsize>)
where
    F: Fn(usize, TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(each(count.fetch_add(1, Ordering::SeqCst), s));
        }
    });
    (url, accepted)
}

/// Reads one request head; false when the connection ended first.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(T, s.read(&mut byte)).await {
            Ok(Ok(1)) => seen.push(byte[0]),
            _ => return false,
        }
    }
    true
}

/// A read that waits this long has stalled; long enough that a loaded CI machine never gets there by
/// accident (the servers here pause 5 ms between pieces).
const READ: Duration = Duration::from_secs(2);

fn client(url: &Url) -> Arc<Client> {
    Arc::new(Client::new(url, T, READ).unwrap())
}

async fn body(resp: Response) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = std::pin::pin!(resp.into_stream());
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

async fn get(c: &Arc<Client>) -> Response {
    c.send(false, "/k", Extra::default()).await.unwrap()
}

#[tokio::test]
async fn a_sized_body_is_read_whole_and_its_connection_reused() {
    let (url, accepted) = scripted(vec![
        Some(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nETag: \"e\"\r\n\r\nhello",
            b" world",
        ]),
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"]),
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nxy"]),
    ])
    .await;
    let c = client(&url);
    let first = get(&c).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["etag"], "\"e\"");
    assert_eq!(body(first).await.unwrap(), b"hello world");
    assert_eq!(body(get(&c).await).await.unwrap(), b"abc");
    assert_eq!(body(get(&c).await).await.unwrap(), b"xy");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for three GETs"
    );
    assert_eq!(c.idle_connections(), 1);
}

#[tokio::test]
async fn a_chunked_body_split_anywhere_is_decoded_and_its_trailers_skipped() {
    let (url, accepted) = scripted(vec![
        Some(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r",
            b"\nhel",
            b"lo\r\n6\r\n world\r",
            b"\n0\r\nx-trailer: 1\r\n",
            b"\r\n",
        ]),
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
    ])
    .await;
    let c = client(&url);
    assert_eq!(body(get(&c).await).await.unwrap(), b"hello world");
    assert_eq!(body(get(&c).await).await.unwrap(), b"ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_without_a_length_ends_with_its_connection_and_is_not_reused() {
    let (url, accepted) = serve(|_, mut s| async move {
        read_request(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = s.write_all(b" close").await;
    })
    .await;
    let c = client(&url);
    for _ in 0..2 {
        assert_eq!(body(get(&c).await).await.unwrap(), b"until close");
        assert_eq!(c.idle_connections(), 0);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connection_close_and_http_1_0_answers_are_not_reused() {
    let (url, accepted) = scripted(vec![
        Some(vec![
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        ]),
        Some(vec![b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"]),
        Some(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]),
    ])
    .await;
    let c = client(&url);
    for _ in 0..2 {
        assert_eq!(body(get(&c).await).await.unwrap(), b"ok");
        assert_eq!(c.idle_connections(), 0);
    }
    let _ = accepted;
}

#[tokio::test]
async fn a_connection_the_bucket_closed_while_idle_is_not_used_again() {
    let (url, accepted) = scripted(vec![
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab"]),
        None, // closes the first connection at the next request it reads
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\ncd"]),
    ])
    .await;
    let c = client(&url);
    assert_eq!(body(get(&c).await).await.unwrap(), b"ab");
    assert_eq!(c.idle_connections(), 1);
    // The reused connection is closed unanswered: the GET goes again on a new one, unseen by the caller.
    assert_eq!(body(get(&c).await).await.unwrap(), b"cd");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_closed_before_idle_check_is_skipped() {
    let (url, accepted) = serve(|n, mut s| async move {
        read_request(&mut s).await;
        if n == 0 {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx")
                .await;
            return; // as a bucket's keep-alive timeout does: closed while idle
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ny")
            .await;
        while read_request(&mut s).await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ny")
                .await;
        }
    })
    .await;
    let c = client(&url);
    assert_eq!(body(get(&c).await).await.unwrap(), b"x");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(body(get(&c).await).await.unwrap(), b"y");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_cut_short_or_stalled_is_an_error_not_an_end() {
    let (url, _) = scripted(vec![
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]),
        None,
    ])
    .await;
    let c = client(&url);
    let resp = get(&c).await;
    // The server closes this connection only when it reads another request: the read times out.
    let e = body(resp).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");

    let (url, _) = scripted(vec![Some(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabc",
    ])])
    .await;
    let c = client(&url);
    let resp = get(&c).await;
    let e = body(resp).await.unwrap_err(); // the server's task ends: the connection closes
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    assert_eq!(c.idle_connections(), 0);
}

#[tokio::test]
async fn head_answers_have_no_body_and_interim_answers_are_skipped() {
    let (url, accepted) = scripted(vec![
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n"]),
        Some(vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\ncontent-length: 1\r\ncontent-range: bytes 0-0/9\r\n\r\nz"]),
    ])
    .await;
    let c = client(&url);
    let head = c.send(true, "/k", Extra::default()).await.unwrap();
    assert_eq!(head.headers["content-length"], "5000");
    assert_eq!(
        c.idle_connections(),
        1,
        "a HEAD answer leaves its connection idle at once"
    );
    drop(head);
    let range = HeaderValue::from_static("bytes=0-0");
    let part = c
        .send(
            false,
            "/k",
            Extra {
                range: Some(&range),
                if_match: Some(&HeaderValue::from_static("\"e\"")),
            },
        )
        .await
        .unwrap();
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body(part).await.unwrap(), b"z");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dropped_body_closes_its_connection_and_bad_framing_is_refused() {
    let (url, accepted) = scripted(vec![
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab"]),
        Some(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        ]),
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab"]),
        Some(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nabEXTRA"]),
    ])
    .await;
    let c = client(&url);
    drop(get(&c).await);
    assert_eq!(c.idle_connections(), 0);
    let e = match c.send(false, "/k", Extra::default()).await {
        Err(e) => e,
        Ok(_) => panic!("two Content-Lengths accepted"),
    };
    assert!(e.contains("Content-Length"), "{e}");
    assert_eq!(body(get(&c).await).await.unwrap(), b"ab");
    // Bytes past the body: the connection is out of step and not kept.
    assert_eq!(body(get(&c).await).await.unwrap(), b"ab");
    assert_eq!(c.idle_connections(), 0);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn names_are_resolved_per_connection_and_failures_say_what_failed() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/", closed.local_addr().unwrap())).unwrap();
    drop(closed);
    let e = match client(&url).send(false, "/", Extra::default()).await {
        Err(e) => e,
        Ok(_) => panic!("a closed port answered"),
    };
    assert!(e.contains("tcp connect error"), "{e}");
    assert_eq!(UpstreamError::Request(e).reason(), "connect");

    let url = Url::parse("http://bucket-host.invalid/").unwrap();
    let e = match client(&url).send(false, "/", Extra::default()).await {
        Err(e) => e,
        Ok(_) => panic!("an .invalid name resolved"),
    };
    assert!(e.contains("dns error"), "{e}");
    assert_eq!(UpstreamError::Request(e).reason(), "dns");
}

#[tokio::test]
async fn https_checks_the_certificate_and_reuses_its_connection() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = rustls_pki_types::CertificateDer::from(cert.cert.der().to_vec());
    let key = rustls_pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![der.clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                loop {
                    let mut seen = Vec::new();
                    while !seen.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    assert!(seen.starts_with(b"GET /media/k HTTP/1.1\r\nhost: localhost:"));
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecret")
                        .await;
                }
            });
        }
    });
    let url = Url::parse(&format!("https://localhost:{port}/media/k")).unwrap();

    // The bundled roots do not know this certificate.
    let e = match client(&url).send(false, "/", Extra::default()).await {
        Err(e) => e,
        Ok(_) => panic!("a self-signed certificate was trusted"),
    };
    assert!(e.contains("tls handshake failed"), "{e}");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let c = Arc::new(Client::with_roots(&url, roots, T).unwrap());
    for _ in 0..3 {
        let resp = c.send(false, "/media/k", Extra::default()).await.unwrap();
        assert_eq!(body(resp).await.unwrap(), b"secret");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one refused, one for three GETs"
    );
}

#[tokio::test]
async fn an_idle_connection_is_known_closed_or_out_of_step_without_a_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut open = Conn::Plain(TcpStream::connect(addr).await.unwrap());
    let (mut server_side, _) = listener.accept().await.unwrap();
    assert!(open.is_idle_and_open());
    // The bucket wrote something nobody asked for: out of step, not to be reused.
    server_side
        .write_all(b"HTTP/1.1 408 \r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!open.is_idle_and_open());

    let mut closed = Conn::Plain(TcpStream::connect(addr).await.unwrap());
    drop(listener.accept().await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!closed.is_idle_and_open());
}

#[tokio::test]
async fn a_chunked_body_split_at_every_byte_is_decoded_the_same() {
    const MSG: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0000a\r\n0123456789\r\n0\r\nt: 1\r\n\r\n";
    let head = MSG.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let (url, _) = serve(move |_, mut s| async move {
        s.set_nodelay(true).unwrap();
        for at in head..MSG.len() {
            if !read_request(&mut s).await {
                return;
            }
            s.write_all(&MSG[..at]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
            s.write_all(&MSG[at..]).await.unwrap();
        }
    })
    .await;
    let c = client(&url);
    for at in head..MSG.len() {
        let got = body(get(&c).await).await;
        assert_eq!(got.unwrap(), b"abc0123456789", "split at byte {at}");
    }
    assert_eq!(c.idle_connections(), 1, "one connection throughout");
}

#[tokio::test]
async fn framing_is_read_as_strictly_as_hyper_reads_it() {
    let refused = [
        &b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 5 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    ];
    for answer in refused {
        let (url, _) = scripted(vec![Some(vec![answer])]).await;
        let c = client(&url);
        assert!(
            c.send(false, "/k", Extra::default()).await.is_err(),
            "{}",
            String::from_utf8_lossy(answer)
        );
        assert_eq!(c.idle_connections(), 0);
    }
    let bad_bodies = [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000001\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    ];
    for answer in bad_bodies {
        let (url, _) = scripted(vec![Some(vec![answer])]).await;
        let c = client(&url);
        let e = body(get(&c).await).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
    // The last coding of all lines decides: chunked then gzip is not chunked, and ends with the
    // connection (which is then not kept).
    let (url, _) = serve(|_, mut s| async move {
        read_request(&mut s).await;
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n0\r\n\r\nmore";
        let _ = s.write_all(answer).await;
    })
    .await;
    let c = client(&url);
    assert_eq!(body(get(&c).await).await.unwrap(), b"0\r\n\r\nmore");
    assert_eq!(c.idle_connections(), 0);
}

#[tokio::test]
async fn endless_trailers_are_an_error_not_a_hang() {
    let (url, _) = serve(|_, mut s| async move {
        read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n")
            .await;
        for _ in 0..100_000 {
            if s.write_all(b"x-t: 1\r\n").await.is_err() {
                return;
            }
        }
    })
    .await;
    let c = client(&url);
    let e = tokio::time::timeout(T, body(get(&c).await))
        .await
        .expect("bounded")
        .unwrap_err();
    assert!(e.to_string().contains("trailers"), "{e}");
}

#[tokio::test]
async fn a_reused_connection_that_began_an_answer_is_not_asked_again() {
    let (url, accepted) = serve(|n, mut s| async move {
        read_request(&mut s).await;
        if n > 0 {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\ncd")
                .await;
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab")
            .await;
        read_request(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let c = client(&url);
    assert_eq!(body(get(&c).await).await.unwrap(), b"ab");
    // A 100 came, then the connection closed: an answer had begun, so the GET is not sent again
    // behind the caller's back.
    let sent = tokio::time::timeout(T, c.send(false, "/k", Extra::default())).await;
    assert!(
        matches!(sent, Ok(Err(_))),
        "{:?}",
        sent.map(|r| r.map(|r| r.status))
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

proptest::proptest! {
    /// Check-in times oldest first, at any ages and around the limit: the expired prefix is exactly
    /// the times `IDLE` or more ago, as asking each its age says.
    #[test]
    fn the_expired_prefix_is_exactly_the_check_ins_idle_too_long(
        mut ages in proptest::collection::vec(proptest::prop_oneof![0u64..120_000, 59_995u64..60_005], 0..40),
    ) {
        let now = Instant::now() + Duration::from_secs(200);
        ages.sort_unstable_by(|a, b| b.cmp(a));
        let since: Vec<Instant> = ages.iter().map(|&ms| now - Duration::from_millis(ms)).collect();
        let expired = expired_prefix(&since, |s| *s, now);
        let by_age = since.iter().filter(|s| now.duration_since(**s) >= IDLE).count();
        proptest::prop_assert_eq!(expired, by_age);
    }
}

#[tokio::test]
async fn a_check_in_closes_the_connections_idle_too_long_and_keeps_the_others() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let url = Url::parse(&format!("http://{addr}/")).unwrap();
    let c = client(&url);
    let conn = || async { Conn::Plain(TcpStream::connect(addr).await.unwrap()) };
    let now = Instant::now();
    {
        let mut pooled = Vec::new();
        // Oldest first, as check-ins leave them: three past the limit, two within it.
        for age in [90, 75, 61, 59, 1] {
            pooled.push(Idle {
                conn: conn().await,
                since: now
                    .checked_sub(Duration::from_secs(age))
                    .expect("up for 90 s"),
            });
        }
        *c.idle.lock().unwrap() = pooled;
    }
    c.checkin(conn().await);
    let ages: Vec<u64> = c
        .idle
        .lock()
        .unwrap()
        .iter()
        .map(|i| i.since.elapsed().as_secs())
        .collect();
    assert_eq!(ages.len(), 3, "the two within the limit and the new one");
    assert!(ages[0] >= 59 && ages[1] >= 1 && ages[2] < 1, "{ages:?}");
    accept.abort();
}
