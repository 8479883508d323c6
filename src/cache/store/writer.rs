//! Writing one entry: body chunks as they stream, then the trailer, then the atomic rename.

use std::fs::{self, File};
use std::io::{self, IoSlice, Write};

use bytes::Bytes;
use std::path::PathBuf;

use super::{hash_key, EntryMeta, Store, MAGIC};

/// A body being written; nothing is visible until [`EntryWriter::commit`]. Dropping it deletes the file.
pub struct EntryWriter {
    pub(super) file: Option<File>,
    pub(super) path: PathBuf,
    pub(super) crc: u32,
    pub(super) written: u64,
}

impl EntryWriter {
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("writer already failed"))?;
        file.write_all(chunk)?;
        self.crc = crate::checksum::crc32c_append(self.crc, chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Another descriptor of the file being written, for a client that reads back what it missed;
    /// it stays readable after the rename (or the unlink of a failed fill).
    pub fn reader(&self) -> io::Result<File> {
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::other("writer already failed"))?
            .try_clone()
    }

    /// Appends the trailer and renames the file into place, replacing an older entry for the key.
    #[cfg(test)]
    pub fn commit(self, store: &Store, meta: &EntryMeta) -> io::Result<u64> {
        self.seal(store, meta)?.publish()
    }

    /// Appends the trailer: the entry is complete but not yet visible.
    pub fn seal(self, store: &Store, meta: &EntryMeta) -> io::Result<Sealed> {
        self.seal_with(store, meta, &[])
    }

    /// Writes `rest`, the last of the body (for a small fill held in memory, all of it), and the
    /// trailer in one vectored write, then is sealed as by [`EntryWriter::seal`].
    pub fn seal_with(
        mut self,
        store: &Store,
        meta: &EntryMeta,
        rest: &[Bytes],
    ) -> io::Result<Sealed> {
        for chunk in rest {
            self.crc = crate::checksum::crc32c_append(self.crc, chunk);
            self.written += chunk.len() as u64;
        }
        if meta.len != self.written {
            return Err(io::Error::other("body length differs from the metadata"));
        }
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("writer already failed"))?;
        let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
        let crc = crate::checksum::crc32c_append(self.crc, &json);
        let mut trailer = json;
        trailer.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        trailer.extend_from_slice(&crc.to_le_bytes());
        trailer.extend_from_slice(MAGIC);
        let mut slices: Vec<IoSlice<'_>> = rest.iter().map(|c| IoSlice::new(c)).collect();
        slices.push(IoSlice::new(&trailer));
        write_all_vectored(&mut file, &mut slices)?;
        Ok(Sealed {
            path: std::mem::take(&mut self.path),
            dest: store.path(hash_key(&meta.key)),
            size: self.written + trailer.len() as u64,
            published: false,
        })
    }
}

/// `write_all` for several buffers: as few `writev` calls as the kernel allows (std caps each at
/// `IOV_MAX` buffers).
fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A complete entry in `tmp/`, one rename away from being served. Dropping it deletes the file.
pub struct Sealed {
    path: PathBuf,
    dest: PathBuf,
    size: u64,
    published: bool,
}

impl Sealed {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The atomic rename into the layout's directory; returns the entry's size on disk. The rename is tried first and
    /// the directories made only if it says they are missing, as nginx does: once `v2/ab/c/` exist
    /// (after the first few thousand entries), a publish is one syscall instead of three.
    pub fn publish(mut self) -> io::Result<u64> {
        match fs::rename(&self.path, &self.dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(self.dest.parent().expect("entry paths have parents"))?;
                fs::rename(&self.path, &self.dest)?;
            }
            done => done?,
        }
        self.published = true;
        Ok(self.size)
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        // Empty once sealed: the `Sealed` owns the file from then on.
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}
