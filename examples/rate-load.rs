//! An open-loop HTTP/1.1 load at a fixed rate, for comparing latency percentiles of two servers under
//! the same offered load (the side-by-side bench's fixed-rate phase).
//!
//! wrk sends the next request as soon as the last answer arrives, so its percentiles are taken at
//! whatever rate the pair of client and server reaches; with wrk at 100 % of its core (as on hits here)
//! they describe the client as much as the server, and a faster server gets a busier client. Here each
//! request has a scheduled send time (`rate` per second over all connections, in turn). When the
//! connection is still busy with the last answer at that time, latency counts from the scheduled time,
//! not from when the request could be sent: a server that stalls is charged for the requests queued
//! behind the stall, as wrk2 does. Otherwise it counts from the send itself.
//!
//!   rate-load URL PATHS_FILE RATE SECONDS CONNECTIONS
//!
//! Prints one line: `answered failed p50_ms p90_ms p99_ms p999_ms max_ms answered_per_s` (the
//! percentiles are of the answered requests). Every request has a 5 s timeout, and the whole run stops
//! at SECONDS plus that: what is left to send then counts as failed.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: rate-load URL PATHS_FILE RATE SECONDS CONNECTIONS");
        std::process::exit(2);
    }
    let url = args[1].trim_end_matches('/');
    let host = url
        .strip_prefix("http://")
        .expect("an http:// URL")
        .to_string();
    let paths: Vec<String> = std::fs::read_to_string(&args[2])
        .expect("the paths file")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    assert!(!paths.is_empty(), "no paths");
    let rate: f64 = args[3].parse().expect("RATE");
    let seconds: f64 = args[4].parse().expect("SECONDS");
    let conns: usize = args[5].parse().expect("CONNECTIONS");
    assert!(
        rate >= 1.0 && seconds > 0.0 && conns > 0,
        "RATE ≥ 1, SECONDS > 0 and CONNECTIONS > 0"
    );
    let total = (rate * seconds) as usize;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (lat, errors, wall) = rt.block_on(async {
        let start = Instant::now() + Duration::from_millis(100);
        let paths = std::sync::Arc::new(paths);
        let tasks: Vec<_> = (0..conns)
            .map(|c| {
                let (host, paths) = (host.clone(), paths.clone());
                tokio::spawn(async move {
                    connection(c, conns, total, rate, start, &host, &paths).await
                })
            })
            .collect();
        let mut lat = Vec::with_capacity(total);
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.unwrap();
            lat.extend(l);
            errors += e;
        }
        (lat, errors, start.elapsed())
    });
    let mut lat = lat;
    lat.sort_unstable();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    println!(
        "{} {} {:.3} {:.3} {:.3} {:.3} {:.3} {:.0}",
        lat.len(),
        errors,
        q(0.50),
        q(0.90),
        q(0.99),
        q(0.999),
        q(1.0),
        lat.len() as f64 / wall.as_secs_f64()
    );
}

/// Connection `c` sends requests `c`, `c + conns`, `c + 2 conns`… each at its scheduled time (or at
/// once, if the previous answer came late). Returns their latencies and how many failed.
async fn connection(
    c: usize,
    conns: usize,
    total: usize,
    rate: f64,
    start: Instant,
    host: &str,
    paths: &[String],
) -> (Vec<Duration>, usize) {
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(256 * 1024);
    let mut free_at = start;
    let end = start + Duration::from_secs_f64(total as f64 / rate) + TIMEOUT;
    for i in (c..total).step_by(conns) {
        if Instant::now() >= end {
            errors += (c..total).step_by(conns).filter(|j| *j >= i).count();
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        // tokio's timer has a 1 ms grain, which would send each millisecond's requests in one burst:
        // it wakes us up to 2 ms early, and the rest is spent yielding (the client's core is its own).
        if let Some(early) = due.checked_sub(Duration::from_millis(2)) {
            tokio::time::sleep_until(early.into()).await;
        }
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        // A send after `due` because the last answer came after it is the server's delay and counts; one
        // after `due` only because the client was busy is the client's, and does not.
        let from = if free_at > due { due } else { Instant::now() };
        let path = &paths[i % paths.len()];
        let limit = (Instant::now() + TIMEOUT).min(end);
        let done = tokio::time::timeout_at(limit.into(), async {
            if stream.is_none() {
                let s = TcpStream::connect(host).await?;
                s.set_nodelay(true)?;
                stream = Some(s);
            }
            exchange(stream.as_mut().unwrap(), host, path, &mut buf).await
        })
        .await;
        free_at = Instant::now();
        match done {
            Ok(Ok(())) => lat.push(free_at - from),
            _ => {
                errors += 1;
                stream = None;
            }
        }
    }
    (lat, errors)
}

/// One GET and its whole answer (a 200 with a Content-Length).
async fn exchange(
    s: &mut TcpStream,
    host: &str,
    path: &str,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    buf.clear();
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let (head, len) = loop {
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("closed before the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf).map_err(|_| bad("bad head"))? {
            if resp.code != Some(200) {
                return Err(bad("not a 200"));
            }
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .ok_or_else(|| bad("no Content-Length"))?;
            break (head, len);
        }
    };
    let mut have = buf.len() - head;
    let mut chunk = vec![0u8; 64 * 1024];
    while have < len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("closed mid-body"));
        }
        have += n;
    }
    if have != len {
        return Err(bad("more than the Content-Length"));
    }
    Ok(())
}
