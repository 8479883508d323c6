//! Keys from the local roots: every regular file under each root (symlinks are not followed, so no key
//! leads outside a root), root by root, each walked in per-segment byte order (one directory's names
//! in memory at a time) so that a resumed run can skip what it did. A key also present in an earlier
//! root is skipped there (the earlier root is the one the proxy serves).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc::Sender;

use super::{Entry, Item, Keys, KeysError, Mark};
use crate::key;

/// Keys queued between the walking thread and the copy: the walk waits when the copy is behind.
const AHEAD: usize = 1024;

pub fn local(roots: Vec<PathBuf>, resume: Option<Mark>) -> Keys {
    let (start_root, after) = match resume {
        Some(Mark::Local { root, after }) => (root, Some(after)),
        _ => (0, None),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(AHEAD);
    std::thread::spawn(move || {
        for (i, root) in roots.iter().enumerate().skip(start_root) {
            let walker = Walker {
                roots: &roots,
                index: i,
                after: if i == start_root {
                    after.as_deref()
                } else {
                    None
                },
                tx: &tx,
            };
            if let Err(e) = walker.walk(root, "") {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    let _ = tx.blocking_send(Err(KeysError::Read {
                        what: root.display().to_string(),
                        source: e,
                    }));
                }
                return;
            }
        }
        let _ = tx.blocking_send(Ok(None));
    });
    super::received(rx, "the local roots")
}

struct Walker<'a> {
    roots: &'a [PathBuf],
    index: usize,
    after: Option<&'a str>,
    tx: &'a Sender<Result<Option<Entry>, KeysError>>,
}

impl Walker<'_> {
    fn walk(&self, dir: &Path, rel: &str) -> std::io::Result<()> {
        let mut entries: Vec<(String, std::fs::FileType)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            // Not UTF-8: no request could name it.
            if let Some(name) = entry.file_name().to_str() {
                entries.push((name.to_string(), entry.file_type()?));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in entries {
            let key = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if kind.is_dir() {
                // Skip a whole directory that lies before the resume point.
                if self.after.is_some_and(|a| before_subtree(&key, a)) {
                    continue;
                }
                match self.walk(&dir.join(&name), &key) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(e),
                    // One unreadable directory must not stop the walk (nor every resumed one).
                    Err(e) => {
                        tracing::warn!(dir = %dir.join(&name).display(), error = %e, "unreadable directory skipped")
                    }
                    Ok(()) => {}
                }
            } else if kind.is_file() {
                if self
                    .after
                    .is_some_and(|a| key.split('/').cmp(a.split('/')) != Ordering::Greater)
                {
                    continue;
                }
                if self.roots[..self.index]
                    .iter()
                    .any(|r| r.join(&key).is_file())
                {
                    continue;
                }
                let Ok(k) = key::from_raw(&key) else {
                    continue;
                };
                let item = Item {
                    key: k,
                    size: None,
                    mark: Mark::Local {
                        root: self.index,
                        after: key,
                    },
                };
                if self.tx.blocking_send(Ok(Some(Entry::Key(item)))).is_err() {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
            }
        }
        Ok(())
    }
}

/// Whether every key under directory `dir` sorts before `after` (per segment).
fn before_subtree(dir: &str, after: &str) -> bool {
    let mut a = after.split('/');
    for seg in dir.split('/') {
        match a.next() {
            Some(x) if x == seg => continue,
            Some(x) => return seg < x,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn walks_in_order_resumes_and_prefers_the_first_root() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for (root, k) in [
            (a.path(), "accounts/avatars/1/original/x.png"),
            (a.path(), "media_attachments/files/2/original/y.png"),
            (a.path(), "media_attachments/files/10/original/z.png"),
            (b.path(), "media_attachments/files/2/original/y.png"),
            (b.path(), "site_uploads/files/1/original/logo.png"),
        ] {
            let p = root.join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        std::os::unix::fs::symlink("/etc", a.path().join("etc")).unwrap();
        let roots = vec![a.path().to_owned(), b.path().to_owned()];
        let all = collect(local(roots.clone(), None)).await;
        assert_eq!(
            all.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(),
            [
                "accounts/avatars/1/original/x.png",
                "media_attachments/files/10/original/z.png",
                "media_attachments/files/2/original/y.png",
                "site_uploads/files/1/original/logo.png",
            ]
        );
        let rest = collect(local(roots, Some(all[1].mark.clone()))).await;
        assert_eq!(rest.len(), 2);
        assert_eq!(
            rest[0].key.as_str(),
            "media_attachments/files/2/original/y.png"
        );
    }

    async fn collect(keys: Keys) -> Vec<Item> {
        keys.filter_map(|e| async move {
            match e.unwrap() {
                Entry::Key(i) => Some(i),
                Entry::Invalid { .. } => None,
            }
        })
        .collect()
        .await
    }
}
