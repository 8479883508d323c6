//! Multipart uploads in flight, journaled in `cache.dir/copy-uploads`, so that the parts of an upload a
//! crash left open are aborted at the next start instead of lying in the bucket (and on its bill).
//!
//! Lines are `+ORIGIN<TAB>UPLOAD_ID<TAB>KEY` when an upload starts (synced before its first part) and
//! `-UPLOAD_ID` when it is completed or aborted. An upload whose `-` line a crash lost is aborted once
//! more at the next start, which S3 answers with a harmless 404.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use crate::key::{self, Key};

/// An upload a previous process left open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The target's origin (`Upstream::origin`), which outlives a rename.
    pub origin: String,
    pub id: String,
    pub key: Key,
}

pub struct Uploads {
    state: Mutex<(File, HashMap<String, Open>)>,
}

impl Uploads {
    /// Replays the journal; returns it with the uploads left open, which stay journaled until `ended`.
    pub fn open(dir: &Path) -> io::Result<(Uploads, Vec<Open>)> {
        Self::open_named(dir, "copy-uploads")
    }

    /// A journal of its own (`migrate` runs beside a proxy that owns `copy-uploads`).
    pub fn open_named(dir: &Path, name: &str) -> io::Result<(Uploads, Vec<Open>)> {
        let path = dir.join(name);
        let mut open: HashMap<String, Open> = HashMap::new();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let whole = text.rfind('\n').map_or("", |end| &text[..end]);
                for line in whole.lines() {
                    if let Some(id) = line.strip_prefix('-') {
                        open.remove(id);
                    } else if let Some(rest) = line.strip_prefix('+') {
                        let mut parts = rest.splitn(3, '\t');
                        let (Some(origin), Some(id), Some(raw)) =
                            (parts.next(), parts.next(), parts.next())
                        else {
                            continue;
                        };
                        if let Ok(key) = key::parse(&format!("/{raw}"), "") {
                            let origin = origin.to_string();
                            open.insert(
                                id.to_string(),
                                Open {
                                    origin,
                                    id: id.to_string(),
                                    key,
                                },
                            );
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tmp = path.with_extension("tmp");
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        for u in open.values() {
            out.write_all(line(u).as_bytes())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        let left: Vec<Open> = open.values().cloned().collect();
        Ok((
            Uploads {
                state: Mutex::new((file, open)),
            },
            left,
        ))
    }

    /// Records an upload before its first part is sent. Blocking (one small append and fdatasync).
    pub fn started(&self, upload: Open) -> io::Result<()> {
        let mut s = self.state.lock().expect("uploads lock");
        s.0.write_all(line(&upload).as_bytes())?;
        s.0.sync_data()?;
        s.1.insert(upload.id.clone(), upload);
        Ok(())
    }

    /// The upload was completed or aborted; rewrites the journal once nothing is open.
    pub fn ended(&self, id: &str) {
        let mut s = self.state.lock().expect("uploads lock");
        if s.1.remove(id).is_none() {
            return;
        }
        let written = if s.1.is_empty() {
            // Appends go to the end of an O_APPEND file, wherever that now is.
            s.0.set_len(0)
        } else {
            s.0.write_all(format!("-{id}\n").as_bytes())
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not journal the end of a multipart upload; it will be aborted again at the next start");
        }
    }
}

fn line(u: &Open) -> String {
    format!("+{}\t{}\t{}\n", u.origin, u.id, u.key.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(id: &str) -> Open {
        Open {
            origin: "s3 http://127.0.0.1:9 new/".into(),
            id: id.into(),
            key: key::parse("/media_attachments/files/1/original/v.mp4", "").unwrap(),
        }
    }

    #[test]
    fn uploads_left_open_by_a_crash_are_returned_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (u, left) = Uploads::open(dir.path()).unwrap();
        assert!(left.is_empty());
        u.started(open("a")).unwrap();
        u.started(open("b")).unwrap();
        u.ended("a");
        drop(u); // a crash: "b" was never completed nor aborted
        let (u, left) = Uploads::open(dir.path()).unwrap();
        assert_eq!(left, vec![open("b")]);
        u.ended("b");
        drop(u);
        let (_, left) = Uploads::open(dir.path()).unwrap();
        assert!(left.is_empty());
    }
}
