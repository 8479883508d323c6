//! `Range: bytes=…` as RFC 9110 §14 has it, for one range.
//!
//! Multiple ranges are answered with the whole object (allowed by the RFC, and what nginx does for
//! cached media); a syntactically invalid header is ignored. Both `respond` (which answers) and `resolve`
//! (which decides whether a Range is worth forwarding to a bucket) use this one parser.

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=first-last` (last clamped to the end of the object).
    FromTo(u64, u64),
    /// `bytes=first-`
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl RangeSpec {
    pub fn parse(v: &str) -> Option<RangeSpec> {
        let spec = v.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let num = |s: &str| -> Option<u64> {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
        };
        match (a.trim().is_empty(), b.trim().is_empty()) {
            (true, false) => Some(RangeSpec::Suffix(num(b)?)),
            (false, true) => Some(RangeSpec::From(num(a)?)),
            (false, false) => {
                let (first, last) = (num(a)?, num(b)?);
                (first <= last).then_some(RangeSpec::FromTo(first, last))
            }
            (true, true) => None,
        }
    }

    /// Inclusive byte positions inside an object of `len` bytes, or `None` when unsatisfiable (416).
    pub fn resolve(self, len: u64) -> Option<(u64, u64)> {
        match self {
            RangeSpec::FromTo(first, last) if first < len => Some((first, last.min(len - 1))),
            RangeSpec::From(first) if first < len => Some((first, len - 1)),
            RangeSpec::Suffix(n) if n > 0 && len > 0 => Some((len.saturating_sub(n), len - 1)),
            _ => None,
        }
    }
}

/// The range to serve, if the request asks for one and `If-Range` (when present) still matches.
pub fn requested(
    h: &HeaderMap,
    etag: Option<&str>,
    last_modified: Option<SystemTime>,
) -> Option<RangeSpec> {
    let spec = RangeSpec::parse(h.get(header::RANGE)?.to_str().ok()?)?;
    match h.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => Some(spec),
        // If-Range needs a strong match (RFC 9110 §13.1.5).
        Some(ir) if ir.starts_with('"') => {
            (etag == Some(ir) && !ir.starts_with("W/")).then_some(spec)
        }
        Some(ir) => {
            let date = httpdate::parse_http_date(ir).ok()?;
            let secs = |t: SystemTime| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .ok()
            };
            (secs(last_modified?) == secs(date)).then_some(spec)
        }
    }
}

/// The Range header to pass to a bucket: only a single well-formed range without `If-Range` (which the
/// responder must judge against the object it actually gets).
pub fn forwardable_range(h: &HeaderMap) -> Option<&HeaderValue> {
    if h.contains_key(header::IF_RANGE) {
        return None;
    }
    let v = h.get(header::RANGE)?;
    RangeSpec::parse(v.to_str().ok()?).map(|_| v)
}
