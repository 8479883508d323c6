//! File bodies that a plain HTTP/1.1 connection sends with `sendfile(2)`, with hyper still parsing the
//! request and framing the response. The body hyper is handed is the file's bytes as a read-only shared
//! mapping ([`Mapping`]): a real, correct body wherever it goes (HTTP/2, TLS, a test). While such a body
//! is alive, its address range is registered here with the file descriptor and offset it maps; the
//! plain-TCP stream under hyper ([`crate::server::sendfile`]) looks up each slice hyper asks it to
//! write and, for a registered one, has the kernel copy the file to the socket instead. The page cache
//! then goes to the socket without passing through this process: no `pread` into a buffer, no copy of
//! that buffer into the socket (measured: those two copies were a third of a local hit's CPU).
//!
//! Safety of the mapping: a read-only `MAP_SHARED` mapping of a regular file stays valid after the
//! file is unlinked or renamed over (the cache's eviction and refills), but touching a page past the
//! end of a file truncated in place raises SIGBUS. The cache never writes an entry in place (entries
//! are written in `tmp/` and renamed into place, and only whole files are ever unlinked), so its
//! mappings are read only by `sendfile` or by writes of bytes that stay there. Local files can be
//! rewritten in place by Mastodon (a thumbnail regenerated), so they are mapped only for responses
//! whose bytes `sendfile` sends: the kernel reads the file then, and a file that shrank ends the
//! response with an error instead of a signal.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::mm::{MapFlags, ProtFlags};

/// A whole file mapped read-only; unmapped when the last body slicing it is gone.
pub struct Mapping {
    ptr: *const u8,
    len: usize,
    file: File,
}

// SAFETY: the mapping is read-only and its address never changes; `File` is Send + Sync.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file`; on failure (an empty file, a file system that cannot map,
    /// `vm.max_map_count` reached) the file comes back, to be read instead. Pages are not faulted in:
    /// `sendfile` never touches them.
    ///
    /// # Safety
    /// Reading the returned bodies in this process (anything but `sendfile`) raises SIGBUS if the file
    /// is truncated below `len` meanwhile, and sees its bytes change if it is written in place: map only
    /// files nobody writes in place, or bodies that only `sendfile` sends (see the module's text).
    pub unsafe fn new(file: File, len: usize) -> Result<Arc<Mapping>, (io::Error, File)> {
        if len == 0 {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "empty file");
            return Err((e, file));
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint), of a file held open for as long as
        // it lives; unmapped exactly once, in Drop.
        let mapped = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )
        };
        match mapped {
            Ok(ptr) => Ok(Arc::new(Mapping {
                ptr: ptr as *const u8,
                len,
                file,
            })),
            Err(e) => Err((e.into(), file)),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes `start..start + len` of the file as a body, registered for `sendfile` while it lives.
    pub fn bytes(self: &Arc<Mapping>, start: usize, len: usize) -> Bytes {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "slice within the mapping"
        );
        if len == 0 {
            return Bytes::new();
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: within the mapping (checked above).
        let at = unsafe { self.ptr.add(start) } as usize;
        regions().insert(
            (at, id),
            Region {
                len,
                fd: self.file.as_raw_fd(),
                offset: start as u64,
            },
        );
        Bytes::from_owner(Registered {
            map: self.clone(),
            at,
            id,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this address and length, not unmapped since.
        let _ = unsafe { rustix::mm::munmap(self.ptr as *mut _, self.len) };
    }
}

/// A body's share of a mapping: keeps it (and its file descriptor) alive, and its region registered.
struct Registered {
    map: Arc<Mapping>,
    at: usize,
    id: u64,
    len: usize,
}

impl AsRef<[u8]> for Registered {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `at..at + len` lies within the live mapping `map` (see `Mapping::bytes`).
        let _ = &self.map;
        unsafe { std::slice::from_raw_parts(self.at as *const u8, self.len) }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        regions().remove(&(self.at, self.id));
    }
}

struct Region {
    len: usize,
    fd: RawFd,
    /// The file offset of the region's first byte.
    offset: u64,
}

/// What to `sendfile` for a slice about to be written: `len` bytes of `fd` from `offset`. The
/// descriptor stays open while the slice's body lives, which is at least as long as the write.
pub struct FileSlice {
    pub fd: RawFd,
    pub offset: u64,
    pub len: usize,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Body bytes sent with `sendfile` (`mediaproxy_sendfile_bytes_total`).
pub static SENT: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);
static SHRINKS: AtomicU64 = AtomicU64::new(0);

/// How many times a file was found shorter than its body while being sent: kept files are checked
/// again whenever this changes.
pub fn shrinks() -> u64 {
    SHRINKS.load(Ordering::Relaxed)
}

/// A `sendfile` found the file shorter than the body being sent.
pub fn shrank() {
    SHRINKS.fetch_add(1, Ordering::Relaxed);
}
static REGIONS: Mutex<BTreeMap<(usize, u64), Region>> = Mutex::new(BTreeMap::new());

fn regions() -> std::sync::MutexGuard<'static, BTreeMap<(usize, u64), Region>> {
    REGIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The file behind `buf` if it lies wholly within a registered body (hyper may hand over a body partly
/// written: then the rest of it). A few candidates are looked at, as ranges of one entry registered by
/// concurrent responses may overlap.
pub fn lookup(buf: &[u8]) -> Option<FileSlice> {
    find(buf.as_ptr() as usize, buf.len())
}

fn find(at: usize, len: usize) -> Option<FileSlice> {
    if len == 0 {
        return None;
    }
    let regions = regions();
    regions
        .range(..=(at, u64::MAX))
        .rev()
        .take(8)
        .find(|((start, _), r)| at + len <= start + r.len)
        .map(|((start, _), r)| FileSlice {
            fd: r.fd,
            offset: r.offset + (at - start) as u64,
            len,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_mapped_body_is_the_file_and_is_found_while_it_lives() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        // SAFETY: nobody else has this file.
        let map = unsafe { Mapping::new(f, data.len()) }
            .map_err(|(e, _)| e)
            .unwrap();
        let body = map.bytes(1000, 50_000);
        assert_eq!(&body[..], &data[1000..51_000]);
        let part = body.slice(20_000..);
        let found = lookup(&part).expect("registered");
        assert_eq!((found.offset, found.len), (21_000, 30_000));
        assert_eq!(found.fd, map.file().as_raw_fd());
        let other = vec![0u8; 10];
        assert!(lookup(&other).is_none(), "heap bytes are not file slices");
        drop(body);
        assert!(
            lookup(&part).is_some(),
            "a slice keeps its body's registration"
        );
        let at = part.as_ptr() as usize;
        drop(part);
        assert!(find(at, 1).is_none(), "unregistered with its last slice");
    }
}
