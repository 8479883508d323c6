//! Keys from a bucket's listing (ListObjectsV2), page by page, resumable after any key.

use std::sync::Arc;

use super::{Entry, Item, Keys, KeysError, Mark};
use crate::key;
use crate::upstream::Upstream;

/// Every key under `prefix` in `up`, after `resume` when given.
pub fn listing(up: Arc<Upstream>, prefix: String, resume: Option<Mark>) -> Keys {
    let after = match resume {
        Some(Mark::Listing { after }) => Some(after),
        _ => None,
    };
    struct State {
        up: Arc<Upstream>,
        prefix: String,
        after: Option<String>,
        token: Option<String>,
        page: std::vec::IntoIter<crate::upstream::Listed>,
        done: bool,
    }
    let state = State {
        up,
        prefix,
        after,
        token: None,
        page: Vec::new().into_iter(),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(obj) = s.page.next() {
                // A listing can hold names no request could ask for (`a//b`, `x/../y`): skip them.
                let Ok(key) = key::from_raw(&obj.key) else {
                    tracing::warn!(name = %obj.key, "object name is not a valid key; skipped");
                    continue;
                };
                let item = Item {
                    mark: Mark::Listing {
                        after: obj.key.clone(),
                    },
                    key,
                    size: Some(obj.size),
                };
                return Some((Ok(Entry::Key(item)), s));
            }
            if s.done {
                return None;
            }
            let page =
                s.up.list_page(&s.prefix, s.after.as_deref(), s.token.as_deref())
                    .await;
            match page {
                Ok(page) => {
                    s.done = page.next.is_none();
                    s.token = page.next;
                    s.page = page.objects.into_iter();
                }
                Err(e) => {
                    let err = KeysError::Listing {
                        upstream: s.up.name.clone(),
                        why: e.to_string(),
                    };
                    s.done = true;
                    s.page = Vec::new().into_iter();
                    return Some((Err(err), s));
                }
            }
        }
    }))
}
