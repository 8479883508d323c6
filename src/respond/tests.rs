use http::HeaderMap;

use super::range::RangeSpec;
use super::*;
use crate::object::{Meta, Source};

#[test]
fn range_parsing() {
    assert_eq!(
        RangeSpec::parse("bytes=0-99"),
        Some(RangeSpec::FromTo(0, 99))
    );
    assert_eq!(RangeSpec::parse("bytes=10-"), Some(RangeSpec::From(10)));
    assert_eq!(RangeSpec::parse("bytes=-5"), Some(RangeSpec::Suffix(5)));
    assert_eq!(
        RangeSpec::parse(" bytes = 1-2 "),
        None,
        "space inside the unit is invalid"
    );
    for bad in [
        "bytes=5-3",
        "bytes=-",
        "bytes=a-b",
        "items=0-1",
        "bytes=0-1,3-4",
        "bytes=+1-2",
        "bytes=1--2",
    ] {
        assert_eq!(RangeSpec::parse(bad), None, "{bad}");
    }
}

#[test]
fn range_resolution() {
    assert_eq!(RangeSpec::FromTo(0, 99).resolve(50), Some((0, 49)));
    assert_eq!(RangeSpec::FromTo(50, 60).resolve(50), None);
    assert_eq!(RangeSpec::From(49).resolve(50), Some((49, 49)));
    assert_eq!(RangeSpec::Suffix(100).resolve(50), Some((0, 49)));
    assert_eq!(RangeSpec::Suffix(0).resolve(50), None);
    assert_eq!(RangeSpec::From(0).resolve(0), None);
}

fn object(body: &'static [u8]) -> Object {
    let stream = futures_util::stream::once(async move { Ok(Bytes::from_static(body)) });
    Object {
        meta: Meta {
            len: Some(body.len() as u64),
            content_type: Some("image/png".into()),
            last_modified: Some(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            ),
            etag: Some("\"abc\"".into()),
            source: Source::Miss,
            origin: Some("s3:u".into()),
            cache_control: None,
            content_disposition: None,
        },
        body: Body::Stream {
            stream: Box::pin(stream),
            offset: 0,
        },
    }
}

async fn run(
    obj: Object,
    method: Method,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let resp = build(
        obj,
        &RequestInfo {
            method: &method,
            headers: &h,
        },
    );
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (parts.status, parts.headers, bytes)
}

#[tokio::test]
async fn full_range_and_head() {
    let (s, h, b) = run(object(b"0123456789"), Method::GET, &[]).await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"0123456789"[..]));
    assert_eq!(h["x-cache"], "MISS");
    assert_eq!(h["content-length"], "10");
    let (s, h, b) = run(
        object(b"0123456789"),
        Method::GET,
        &[("range", "bytes=2-4")],
    )
    .await;
    assert_eq!((s, &b[..]), (StatusCode::PARTIAL_CONTENT, &b"234"[..]));
    assert_eq!(h["content-range"], "bytes 2-4/10");
    let (s, h, _) = run(
        object(b"0123456789"),
        Method::GET,
        &[("range", "bytes=10-")],
    )
    .await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(h["content-range"], "bytes */10");
    let (s, h, b) = run(
        object(b"0123456789"),
        Method::HEAD,
        &[("range", "bytes=2-4")],
    )
    .await;
    assert_eq!((s, b.len()), (StatusCode::OK, 0));
    assert_eq!(h["content-length"], "10");
}

#[tokio::test]
async fn conditionals() {
    let (s, _, b) = run(object(b"x"), Method::GET, &[("if-none-match", "\"abc\"")]).await;
    assert_eq!((s, b.len()), (StatusCode::NOT_MODIFIED, 0));
    let (s, _, _) = run(object(b"x"), Method::GET, &[("if-none-match", "*")]).await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    let ims = httpdate::fmt_http_date(
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
    );
    let (s, _, _) = run(object(b"x"), Method::GET, &[("if-modified-since", &ims)]).await;
    assert_eq!(s, StatusCode::NOT_MODIFIED);
    // If-None-Match wins over If-Modified-Since.
    let (s, _, _) = run(
        object(b"x"),
        Method::GET,
        &[("if-none-match", "\"zzz\""), ("if-modified-since", &ims)],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn short_source_is_an_error_not_a_clean_end() {
    let mut obj = object(b"abc");
    obj.meta.len = Some(10);
    let resp = build(
        obj,
        &RequestInfo {
            method: &Method::GET,
            headers: &HeaderMap::new(),
        },
    );
    assert!(resp.into_body().collect().await.is_err());
}

#[tokio::test]
async fn upstream_applied_range_is_not_applied_twice() {
    let mut obj = object(b"234");
    obj.meta.len = Some(10);
    obj.body = match obj.body {
        Body::Stream { stream, .. } => Body::Stream { stream, offset: 2 },
        b => b,
    };
    let (s, _, b) = run(obj, Method::GET, &[("range", "bytes=2-4")]).await;
    assert_eq!((s, &b[..]), (StatusCode::PARTIAL_CONTENT, &b"234"[..]));
}

#[tokio::test]
async fn dates_httpdate_cannot_format_are_left_out() {
    let mut obj = object(b"x");
    obj.meta.last_modified = Some(SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(1));
    let (s, h, _) = run(obj, Method::GET, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!h.contains_key("last-modified"));
}

#[tokio::test]
async fn a_part_of_unknown_size_is_never_a_200() {
    let mut obj = object(b"part");
    obj.meta.len = None;
    obj.body = match obj.body {
        Body::Stream { stream, .. } => Body::Stream { stream, offset: 10 },
        b => b,
    };
    let (s, _, _) = run(obj, Method::GET, &[]).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
}

#[test]
fn last_modified_reads_as_rfc_9110_says() {
    assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(&imf_fixdate(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
    assert_eq!(
        &imf_fixdate(253_402_300_799),
        b"Fri, 31 Dec 9999 23:59:59 GMT"
    );
}

proptest::proptest! {
    #[test]
    fn last_modified_is_what_httpdate_writes(secs in 0u64..253_402_300_800) {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let ours = imf_fixdate(secs);
        proptest::prop_assert_eq!(std::str::from_utf8(&ours).unwrap(), httpdate::fmt_http_date(t));
    }
}
