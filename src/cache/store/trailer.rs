//! The end of an entry file: `<meta JSON><u32 meta_len><u32 crc32c><magic>`, read before any byte of
//! the body is trusted.

use std::fs::File;

use bytes::Bytes;

use super::{EntryMeta, StoreError, MAGIC, MAGIC_V1, TRAILER};
use crate::object::read_at;

pub(super) struct Trailer {
    pub(super) meta: EntryMeta,
    meta_bytes: Bytes,
    pub(super) crc: u32,
    pub(super) body_len: u64,
    covers_meta: bool,
}

impl Trailer {
    /// The entry's checksum, given the CRC of its body.
    pub(super) fn checksum(&self, body_crc: u32) -> u32 {
        if self.covers_meta {
            crate::checksum::crc32c_append(body_crc, &self.meta_bytes)
        } else {
            body_crc
        }
    }
}

/// `buf` holds at least the trailer at its end; for small entries it is the whole file.
pub(super) fn parse_trailer(buf: &[u8], size: u64, file: &File) -> Result<Trailer, StoreError> {
    let t = &buf[buf.len() - TRAILER as usize..];
    let covers_meta = match &t[8..16] {
        m if m == MAGIC => true,
        m if m == MAGIC_V1 => false,
        _ => return Err(StoreError::Corrupt("bad magic")),
    };
    let meta_len = u32::from_le_bytes(t[0..4].try_into().expect("4 bytes")) as u64;
    // Our metadata is a few hundred bytes; a corrupt length must not become a huge allocation.
    if meta_len > 64 * 1024 {
        return Err(StoreError::Corrupt("metadata length out of range"));
    }
    let crc = u32::from_le_bytes(t[4..8].try_into().expect("4 bytes"));
    let body_len = size
        .checked_sub(TRAILER + meta_len)
        .ok_or(StoreError::Corrupt("metadata longer than the file"))?;
    let meta_bytes = if buf.len() as u64 == size {
        Bytes::copy_from_slice(&buf[body_len as usize..(body_len + meta_len) as usize])
    } else {
        read_at(file, body_len, meta_len as usize)?
    };
    let meta: EntryMeta = serde_json::from_slice(&meta_bytes)
        .map_err(|_| StoreError::Corrupt("unreadable metadata"))?;
    if meta.len != body_len {
        return Err(StoreError::Corrupt("length mismatch"));
    }
    Ok(Trailer {
        meta,
        meta_bytes,
        crc,
        body_len,
        covers_meta,
    })
}

/// Two keys sharing a 128-bit hash prefix is practically impossible, but a file must never be served
/// for a key it was not written for.
pub(super) fn check_key(meta: &EntryMeta, key: &str) -> Result<(), StoreError> {
    if meta.key == key {
        Ok(())
    } else {
        Err(StoreError::Corrupt("entry belongs to another key"))
    }
}
