//! URL path → object key: the one gate every request passes before anything touches a disk or a bucket.
//!
//! A key is what Mastodon wrote to the bucket (`media_attachments/files/109/…/original/x.png`), so it is
//! also a relative path under a local root. Everything that could make it mean something else — `..`,
//! encoded traversal, NUL, backslashes, empty segments, a trailing `/` that would ask for a listing — is
//! refused here, as a pure function, so the property tests below can cover it exhaustively.

use std::fmt;

use percent_encoding::percent_decode_str;

/// S3's own limit on key length, in bytes.
const MAX_KEY_LEN: usize = 1024;

/// A validated object key: relative, `/`-separated, no empty, `.` or `..` segment, no NUL or backslash.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `server.allow_prefixes` lets this key be served: it starts with one of `prefixes` (each
    /// ending in `/`; an empty one allows everything), directly or under Mastodon's `cache/` (remote
    /// media). Mastodon keeps private objects in the same bucket (`backups/`, `imports/`), so what is
    /// not listed is never served, from any source.
    pub fn is_allowed(&self, prefixes: &[String]) -> bool {
        let rest = self.0.strip_prefix("cache/").unwrap_or(&self.0);
        prefixes
            .iter()
            .any(|p| self.0.starts_with(p.as_str()) || rest.starts_with(p.as_str()))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Outside `path_prefix`, the bare root, or a directory listing: there is simply nothing there.
    #[error("no such object")]
    NotFound,
    #[error("malformed percent-encoding or not UTF-8")]
    BadEncoding,
    #[error("forbidden character in key")]
    BadCharacter,
    #[error("empty, `.` or `..` path segment")]
    BadSegment,
    #[error("key too long")]
    TooLong,
}

impl KeyError {
    pub fn status(self) -> u16 {
        match self {
            KeyError::NotFound => 404,
            _ => 400,
        }
    }
}

/// `path` is the request URI's path, still percent-encoded; `prefix` is `server.path_prefix`.
pub fn parse(path: &str, prefix: &str) -> Result<Key, KeyError> {
    let rest = if prefix.is_empty() {
        path
    } else {
        path.strip_prefix(prefix)
            .filter(|r| r.starts_with('/'))
            .ok_or(KeyError::NotFound)?
    };
    let encoded = rest.strip_prefix('/').ok_or(KeyError::NotFound)?;
    if encoded.is_empty() || encoded.ends_with('/') {
        return Err(KeyError::NotFound);
    }
    // Nearly every request: nothing to decode, and a `&str` is UTF-8 already.
    if !encoded.contains('%') {
        validate(encoded)?;
        return Ok(Key(encoded.to_string()));
    }
    if !valid_escapes(encoded) {
        return Err(KeyError::BadEncoding);
    }
    let decoded = percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| KeyError::BadEncoding)?;
    validate(&decoded)?;
    Ok(Key(decoded.into_owned()))
}

/// A key as stored in a bucket (a listing, a database row, a path under a local root): nothing to
/// decode, the same refusals.
pub fn from_raw(raw: &str) -> Result<Key, KeyError> {
    if raw.is_empty() {
        return Err(KeyError::NotFound);
    }
    validate(raw)?;
    Ok(Key(raw.to_string()))
}

fn validate(decoded: &str) -> Result<(), KeyError> {
    if decoded.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    // A decoded trailing slash (`%2F` at the end) is a listing too.
    if decoded.ends_with('/') {
        return Err(KeyError::NotFound);
    }
    if has_control_or_backslash(decoded) {
        return Err(KeyError::BadCharacter);
    }
    // By bytes too: `/` is ASCII, so it never occurs inside another character's UTF-8 encoding.
    if decoded
        .as_bytes()
        .split(|&b| b == b'/')
        .any(|seg| seg.is_empty() || seg == b"." || seg == b"..")
    {
        return Err(KeyError::BadSegment);
    }
    Ok(())
}

/// Whether `s` holds a control character (Unicode's `Cc`: U+0000-U+001F, U+007F, U+0080-U+009F, as
/// [`char::is_control`]) or a backslash. By bytes, as it runs on every request: in UTF-8 the first
/// two ranges are those bytes themselves, and U+0080-U+009F is 0xC2 followed by 0x80-0x9F.
fn has_control_or_backslash(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c < 0x20
            || c == 0x7f
            || c == b'\\'
            || (c == 0xc2 && b.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)))
    })
}

/// `percent_decode_str` passes a stray `%` through; a hostile client should get a 400 instead.
fn valid_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (b.get(i + 1), b.get(i + 2)) {
                (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => i += 3,
                _ => return false,
            }
        } else {
            i += 1;
        }
    }
    true
}

#[cfg(test)]
mod tests;
