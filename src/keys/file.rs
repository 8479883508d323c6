//! Keys from a file or stdin: one per line; blank lines and `#` comments skipped; a URL or a path with a
//! leading `/` is reduced to its path (query dropped, `path_prefix` stripped) and parsed exactly as the
//! proxy parses a request; anything else is taken as a key as stored. A line that is no valid key is
//! reported with its number, not copied.

use std::path::PathBuf;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Entry, Item, Keys, KeysError, Mark};
use crate::key::{self, Key, KeyError};

/// `path` `None` is stdin.
pub fn file(path: Option<PathBuf>, path_prefix: String, resume: Option<Mark>) -> Keys {
    let skip = match resume {
        Some(Mark::Line { line }) => line,
        _ => 0,
    };
    let what = path
        .as_ref()
        .map_or("standard input".to_string(), |p| p.display().to_string());
    let stream = async_stream(path, what, path_prefix, skip);
    Box::pin(stream)
}

fn async_stream(
    path: Option<PathBuf>,
    what: String,
    path_prefix: String,
    skip: u64,
) -> impl futures_util::Stream<Item = Result<Entry, KeysError>> + Send {
    enum Input {
        Start(Option<PathBuf>),
        Lines(
            tokio::io::Lines<BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>>,
            u64,
        ),
        Done,
    }
    futures_util::stream::unfold(Input::Start(path), move |input| {
        let what = what.clone();
        let path_prefix = path_prefix.clone();
        async move {
            let (mut lines, mut n) = match input {
                Input::Done => return None,
                Input::Start(path) => {
                    let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match path {
                        None => Box::new(tokio::io::stdin()),
                        Some(p) => match tokio::fs::File::open(&p).await {
                            Ok(f) => Box::new(f),
                            Err(source) => {
                                return Some((Err(KeysError::Read { what, source }), Input::Done))
                            }
                        },
                    };
                    (BufReader::new(reader).lines(), 0)
                }
                Input::Lines(lines, n) => (lines, n),
            };
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(line)) => line,
                    Ok(None) => return None,
                    Err(source) => {
                        return Some((Err(KeysError::Read { what, source }), Input::Done))
                    }
                };
                n += 1;
                let text = line.trim();
                if n <= skip || text.is_empty() || text.starts_with('#') {
                    continue;
                }
                let entry = match to_key(text, &path_prefix) {
                    Ok(key) => Entry::Key(Item {
                        key,
                        size: None,
                        mark: Mark::Line { line: n },
                    }),
                    Err(e) => Entry::Invalid {
                        line: n,
                        text: text.to_string(),
                        why: e.to_string(),
                    },
                };
                return Some((Ok(entry), Input::Lines(lines, n)));
            }
        }
    })
}

/// A line as the proxy would see it.
pub fn to_key(text: &str, path_prefix: &str) -> Result<Key, KeyError> {
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let url = url::Url::parse(text).map_err(|_| KeyError::BadEncoding)?;
        return key::parse(url.path(), path_prefix);
    }
    if text.starts_with('/') {
        let path = text.split(['?', '#']).next().unwrap_or(text);
        return key::parse(path, path_prefix);
    }
    key::from_raw(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_paths_and_keys_become_keys() {
        let k = "media_attachments/files/1/original/a b.png";
        assert_eq!(to_key(k, "").unwrap().as_str(), k);
        assert_eq!(
            to_key(
                "https://files.example.org/media_attachments/files/1/original/a%20b.png?x=1",
                ""
            )
            .unwrap()
            .as_str(),
            k
        );
        assert_eq!(
            to_key(
                "https://example.org/storage/media_attachments/files/1/original/a%20b.png",
                "/storage"
            )
            .unwrap()
            .as_str(),
            k
        );
        assert_eq!(
            to_key("/media_attachments/files/1/original/a%20b.png?v=2", "")
                .unwrap()
                .as_str(),
            k
        );
        assert!(to_key("../etc/passwd", "").is_err());
        assert!(to_key("https://x.org/storage/a", "/other").is_err());
        assert!(to_key("a//b", "").is_err());
    }
}
