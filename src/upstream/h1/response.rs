//! An answer's head, parsed with httparse, and its body, framed by Content-Length, chunked coding or
//! the end of the connection (RFC 9112 §6.3), read from the socket only as the caller asks for it.
//!
//! A body read to its end gives its connection back to the client's pool at once, before the last
//! chunk is handed over, so a reader that stops at the length it was told still leaves a reusable
//! connection. A body dropped before its end closes the connection, as nginx does: draining an unknown
//! remainder could cost more than a new connection.

use std::io;
use std::sync::Weak;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::AsyncReadExt;

use super::{Client, Conn, Exchange};

/// Bytes asked of the socket per read: a 30–80 KB object comes in one or two reads.
const READ: usize = 64 * 1024;
/// A head larger than this is not an object's: nginx's default `proxy_buffer_size` is 4–8 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed per answer; S3 sends ~15, and user metadata adds a few.
const MAX_HEADERS: usize = 128;
/// A chunk-size line or a trailer line longer than this is not HTTP.
const MAX_LINE: usize = 4096;

/// The headers anything reads from an object's answer (framing, and what `Upstream::to_object` keeps).
/// The rest (request ids, `Server`, `Date`, user metadata) is dropped: each kept value is an allocation.
const KEPT: [HeaderName; 9] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::header::CONTENT_RANGE,
    http::header::CONTENT_TYPE,
    http::header::LAST_MODIFIED,
    http::header::ETAG,
    http::header::CACHE_CONTROL,
    http::header::CONTENT_DISPOSITION,
];

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Body,
}

struct Body {
    conn: Option<Conn>,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    read_timeout: Duration,
    client: Weak<Client>,
    /// Bytes of trailer lines seen, bounded like a head.
    trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
    /// A read failed: the stream has ended with that error.
    Failed,
}

/// What one step of chunked decoding made of the buffer.
enum Step {
    Data(Bytes),
    /// A line or CRLF consumed: decode on.
    Moved,
    /// A line not all here yet: read more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// Reads the head of the answer to a request just written on `conn`.
pub(super) async fn read_head(
    mut conn: Conn,
    head_request: bool,
    read_timeout: Duration,
    client: Weak<Client>,
) -> Result<Response, Exchange> {
    let mut buf = BytesMut::with_capacity(READ);
    // Whether any byte of an answer came (an interim one counts): only a request that got none may be
    // sent again.
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = parsed.code.unwrap_or(0);
                    // An interim answer (100 Continue, 103 Early Hints): the real one follows.
                    if (100..200).contains(&code) && code != 101 {
                        buf.advance(len);
                        continue;
                    }
                    if code == 101 {
                        // Nobody asked to switch protocols: the connection is no longer HTTP.
                        return Err(Exchange::Failed("an unasked-for 101".into()));
                    }
                    let status = StatusCode::from_u16(code)
                        .map_err(|_| Exchange::Failed(format!("unusable status {code}")))?;
                    let mut map = HeaderMap::with_capacity(KEPT.len());
                    for h in parsed.headers.iter() {
                        let kept = KEPT
                            .iter()
                            .find(|k| h.name.eq_ignore_ascii_case(k.as_str()));
                        if let (Some(name), Ok(value)) = (kept, HeaderValue::from_bytes(h.value)) {
                            map.append(name.clone(), value);
                        }
                    }
                    let http11 = parsed.version == Some(1);
                    buf.advance(len);
                    let framing = framing(status, head_request, http11, &map)?;
                    let keep_alive = http11 && framing != Framing::UntilClose && !closes(&map);
                    let mut body = Body {
                        conn: Some(conn),
                        buf,
                        framing,
                        keep_alive,
                        read_timeout,
                        client,
                        trailers: 0,
                    };
                    if body.framing == Framing::Length(0) {
                        body.framing = Framing::Done;
                    }
                    if body.framing == Framing::Done {
                        body.finish();
                    }
                    return Ok(Response {
                        status,
                        headers: map,
                        body,
                    });
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(Exchange::Failed("a response head over 64 KiB".into()))
                }
                Err(e) => return Err(Exchange::Failed(format!("unusable response head: {e}"))),
            }
        }
        let empty = !answered && buf.is_empty();
        if buf.capacity() - buf.len() < READ / 4 {
            buf.reserve(READ);
        }
        match tokio::time::timeout(read_timeout, conn.read_buf(&mut buf)).await {
            Ok(Ok(0)) if empty => {
                return Err(Exchange::Unanswered(
                    "connection closed before an answer".into(),
                ))
            }
            Ok(Ok(0)) => return Err(Exchange::Failed("connection closed in the answer".into())),
            Ok(Ok(_)) => answered = true,
            Ok(Err(e)) if empty => {
                return Err(Exchange::Unanswered(format!("connection error: {e}")))
            }
            Ok(Err(e)) => return Err(Exchange::Failed(format!("connection error: {e}"))),
            Err(_) => return Err(Exchange::Failed("timed out waiting for the answer".into())),
        }
    }
}

/// How the body's end is known (RFC 9112 §6.3), as strictly as hyper reads it: the last coding of all
/// `Transfer-Encoding` lines, none on HTTP/1.0, one Content-Length of digits only.
fn framing(
    status: StatusCode,
    head: bool,
    http11: bool,
    h: &HeaderMap,
) -> Result<Framing, Exchange> {
    if head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Done);
    }
    if let Some(last) = h
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        if !http11 {
            return Err(Exchange::Failed("Transfer-Encoding on HTTP/1.0".into()));
        }
        let last = last.to_str().unwrap_or("").rsplit(',').next().unwrap_or("");
        return Ok(if last.trim().eq_ignore_ascii_case("chunked") {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut lengths = h.get_all(http::header::CONTENT_LENGTH).iter();
    match lengths.next() {
        None => Ok(Framing::UntilClose),
        Some(v) => {
            let n = digits(v.as_bytes().trim_ascii(), 10);
            match n {
                // Two different lengths would make the body's end a guess (a smuggling shape).
                Some(n) if lengths.all(|o| o == v) => Ok(Framing::Length(n)),
                _ => Err(Exchange::Failed("an unusable Content-Length".into())),
            }
        }
    }
}

/// A number of ASCII digits only (no sign, no space inside), in `radix` 10 or 16, that fits a u64.
fn digits(s: &[u8], radix: u32) -> Option<u64> {
    let ok = !s.is_empty()
        && s.iter().all(|&b| match radix {
            16 => b.is_ascii_hexdigit(),
            _ => b.is_ascii_digit(),
        });
    ok.then(|| u64::from_str_radix(std::str::from_utf8(s).ok()?, radix).ok())
        .flatten()
}

fn closes(h: &HeaderMap) -> bool {
    h.get_all(http::header::CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    })
}

impl Response {
    /// The body as chunks, each as large as what one read brought (up to 64 KiB).
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold(self.body, |mut body| async move {
            body.next_chunk().await.map(|chunk| (chunk, body))
        })
    }

    /// Up to about `max` bytes of the body (an error document), lossily as text.
    pub async fn text_prefix(mut self, max: usize) -> String {
        let mut text = Vec::new();
        while text.len() < max {
            match self.body.next_chunk().await {
                Some(Ok(chunk)) => text.extend_from_slice(&chunk),
                _ => break,
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Body {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            match self.framing {
                Framing::Done | Framing::Failed => return None,
                Framing::Length(n) if !self.buf.is_empty() => {
                    let take = n.min(self.buf.len() as u64);
                    let chunk = self.buf.split_to(take as usize).freeze();
                    self.framing = Framing::Length(n - take);
                    if n == take {
                        self.framing = Framing::Done;
                        self.finish();
                    }
                    return Some(Ok(chunk));
                }
                Framing::UntilClose if !self.buf.is_empty() => {
                    return Some(Ok(self.buf.split().freeze()));
                }
                Framing::Chunked(state) if !self.buf.is_empty() => match self.chunked(state) {
                    Ok(Step::Data(chunk)) => return Some(Ok(chunk)),
                    Ok(Step::Moved) => continue,
                    Ok(Step::NeedMore) => {}
                    Err(e) => return Some(Err(self.fail(e))),
                },
                _ => {}
            }
            if let Err(e) = self.read().await {
                return Some(Err(self.fail(e)));
            }
        }
    }

    /// One step of chunked decoding over what is buffered.
    fn chunked(&mut self, state: Chunk) -> io::Result<Step> {
        match state {
            Chunk::Data(n) => {
                let take = n.min(self.buf.len() as u64);
                let chunk = self.buf.split_to(take as usize).freeze();
                self.framing = Framing::Chunked(if n == take {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take)
                });
                Ok(Step::Data(chunk))
            }
            Chunk::DataEnd => {
                if self.buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &self.buf[..2] != b"\r\n" {
                    return Err(bad("no CRLF after a chunk"));
                }
                self.buf.advance(2);
                self.framing = Framing::Chunked(Chunk::Size);
                Ok(Step::Moved)
            }
            Chunk::Size | Chunk::Trailers => {
                let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                    return if self.buf.len() > MAX_LINE {
                        Err(bad("a chunk line over 4 KiB"))
                    } else {
                        Ok(Step::NeedMore)
                    };
                };
                if end > MAX_LINE {
                    return Err(bad("a chunk line over 4 KiB"));
                }
                let line = self.buf.split_to(end + 2);
                let line = &line[..end];
                self.framing = if state == Chunk::Trailers {
                    self.trailers += line.len() + 2;
                    if self.trailers > MAX_HEAD {
                        return Err(bad("trailers over 64 KiB"));
                    }
                    if line.is_empty() {
                        Framing::Done
                    } else {
                        Framing::Chunked(Chunk::Trailers)
                    }
                } else {
                    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = digits(hex.trim_ascii(), 16)
                        .ok_or_else(|| bad("an unusable chunk size"))?;
                    Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    })
                };
                if self.framing == Framing::Done {
                    self.finish();
                }
                Ok(Step::Moved)
            }
        }
    }

    async fn read(&mut self) -> io::Result<()> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| bad("the connection is gone"))?;
        if self.buf.capacity() - self.buf.len() < READ / 4 {
            let want = match self.framing {
                Framing::Length(n) => (n as usize).clamp(READ / 4, READ),
                _ => READ,
            };
            self.buf.reserve(want);
        }
        match tokio::time::timeout(self.read_timeout, conn.read_buf(&mut self.buf)).await {
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out: no body bytes for {:?}", self.read_timeout),
            )),
            Ok(Err(e)) => Err(e),
            Ok(Ok(0)) if self.framing == Framing::UntilClose => {
                self.keep_alive = false;
                self.framing = Framing::Done;
                self.conn = None;
                Ok(())
            }
            Ok(Ok(0)) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before the body's end",
            )),
            Ok(Ok(_)) => Ok(()),
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.framing = Framing::Failed;
        self.conn = None;
        e
    }

    /// The body is read to its end: the connection goes back to the pool if it may be reused.
    fn finish(&mut self) {
        let conn = self.conn.take();
        // Bytes past the body's end mean the bucket and we disagree on where it ended.
        if let (Some(conn), true, true) = (conn, self.keep_alive, self.buf.is_empty()) {
            if let Some(client) = self.client.upgrade() {
                client.checkin(conn);
            }
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}
