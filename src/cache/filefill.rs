//! Fills of bodies too large to hold in memory (or past [`super::memfill::BUDGET`]): written to the
//! entry's file as they arrive, at the upstream's pace, whatever the client does.
//!
//! Each batch of what the upstream has ready goes to the file on the blocking pool (a slow disk delays
//! this fill, not the async workers serving hits), then to the leader's client through a short queue;
//! a client that falls behind reads back from the file ([`super::growing`]), so it neither slows the
//! fill nor holds the key's lock. If the disk write fails, the fill stops being one (followers are
//! released) and the client gets the rest of the body straight from the upstream, at its own pace.

use std::time::Instant;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::fill::{may_go_on_unread, seal_and_publish, Prepared};
use super::flights::Status;
use super::store::EntryWriter;
use crate::object::CHUNK;

/// What a trip to the blocking pool with a batch left behind.
enum Written {
    More(EntryWriter),
    /// The last batch, written with the trailer: the entry was sealed and published (`true`), or
    /// that failed (logged).
    Published(bool),
}

/// How a batch of the upstream's body ended.
enum Next {
    More,
    /// The upstream's body ended: complete if every byte came.
    End,
    Failed,
}

/// The fill task: upstream → file (→ the client's queue), then the commit that makes the entry visible.
/// `client`: the leader's client's queue; `permit`: a background-fill permit taken beforehand (a seek's
/// fill), or taken here when the client leaves.
pub(super) async fn run(
    p: Prepared,
    writer: EntryWriter,
    mut client: Option<mpsc::Sender<(u64, Bytes)>>,
    mut permit: Option<OwnedSemaphorePermit>,
) {
    let Prepared {
        guard,
        mut upstream,
        entry,
        reserved,
    } = p;
    let cache = guard.cache.clone();
    let mut guard = Some(guard);
    let mut reserved = Some(reserved);
    let mut writer = Some(writer);
    let mut left_at = client.is_none().then(Instant::now);
    let mut pos = 0u64;
    // Set once the last batch's trip sealed and published the entry (whether it was stored).
    let mut published: Option<bool> = None;
    let complete = loop {
        // One chunk, then whatever else the upstream already has, up to one CHUNK: one trip to the
        // blocking pool per batch.
        let mut batch = Vec::new();
        let mut size = 0;
        let mut next = Next::More;
        match upstream.next().await {
            Some(Ok(chunk)) => {
                size += chunk.len();
                batch.push(chunk);
            }
            Some(Err(_)) => break false,
            None => break pos == entry.len,
        }
        while size < CHUNK {
            match upstream.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    size += chunk.len();
                    batch.push(chunk);
                }
                Some(Some(Err(_))) => {
                    next = Next::Failed;
                    break;
                }
                Some(None) => {
                    next = Next::End;
                    break;
                }
                None => break, // the batch is what is ready now
            }
        }
        if let Some(w) = writer.take() {
            let chunks = batch.clone();
            // The last batch of a complete body is sealed and published in the same trip to the
            // blocking pool: a cold miss of a small object then costs two trips, not three.
            let last = matches!(next, Next::End) && pos + size as u64 == entry.len;
            let publish = match (&guard, last) {
                (Some(g), true) => Some((cache.clone(), g.hash, g.shared.clone(), entry.clone())),
                _ => None,
            };
            // Released before the entry is published, which counts its real size.
            let release = reserved.take_if(|_| publish.is_some());
            let written = tokio::task::spawn_blocking(move || {
                let mut w = w;
                // Dropping `w` on an error deletes the partial file, here off the workers.
                Ok(match publish {
                    Some((c, hash, shared, entry)) => {
                        drop(release);
                        // The batch goes with the trailer, in one write.
                        Written::Published(seal_and_publish(&c, w, &chunks, hash, &shared, &entry))
                    }
                    None => {
                        chunks.iter().try_for_each(|c| w.write(c))?;
                        Written::More(w)
                    }
                })
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match written {
                Ok(Written::More(w)) => {
                    writer = Some(w);
                    if let Some(g) = &guard {
                        let end = pos + size as u64;
                        g.shared.progress.send_modify(|p| p.written = end);
                    }
                }
                Ok(Written::Published(true)) => {
                    published = Some(true);
                    if let Some(g) = &guard {
                        let end = pos + size as u64;
                        g.shared.progress.send_modify(|p| p.written = end);
                    }
                }
                // The last write or the rename failed (logged): as for any failed write, followers
                // resume from the upstreams and the client gets this batch from memory.
                Ok(Written::Published(false)) => guard = None,
                Err(e) => {
                    cache.write_failed(&entry.key, &e);
                    guard = None; // followers: failed; they resume from the upstreams themselves
                }
            }
        }
        for chunk in batch {
            let offset = pos;
            pos += chunk.len() as u64;
            let Some(tx) = &client else { continue };
            let gone = if writer.is_some() || published.is_some() {
                // Behind is fine: what the queue cannot take, the client reads back from the file.
                matches!(
                    tx.try_send((offset, chunk)),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            } else {
                // Nothing on disk from here on: the client gets every chunk, at its own pace.
                tx.send((offset, chunk)).await.is_err()
            };
            if gone {
                client = None;
                left_at = Some(Instant::now());
            }
        }
        if published.is_some() {
            break true;
        }
        if let Some(left) = left_at {
            if writer.is_none() {
                break false;
            }
            // Followers still streaming it from the file: it has clients, whoever left.
            if guard
                .as_ref()
                .is_some_and(|g| g.shared.progress.receiver_count() > 0)
            {
                left_at = Some(Instant::now());
            } else if !may_go_on_unread(&cache, &entry.key, left, &mut permit) {
                break false;
            }
        }
        match next {
            Next::More => {}
            Next::End => break pos == entry.len,
            Next::Failed => break false,
        }
    };
    // Released before the entry is published, which counts its real size.
    drop(reserved);
    if !complete || (writer.is_none() && published.is_none()) {
        cache.counters.fill("failed");
    }
    if complete {
        let stored = match (published, writer.take(), guard.as_ref()) {
            (Some(stored), _, _) => Some(stored),
            (None, Some(w), Some(g)) => {
                let (c, hash, shared) = (cache.clone(), g.hash, g.shared.clone());
                let entry = entry.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    seal_and_publish(&c, w, &[], hash, &shared, &entry)
                })
                .await;
                Some(stored.unwrap_or(false))
            }
            _ => None,
        };
        if let (Some(stored), Some(g)) = (stored, guard.as_mut()) {
            if stored && g.shared.voided() {
                cache.counters.fill("voided");
            } else if stored {
                cache.counters.fill("stored");
                g.status = Status::Done;
            } else {
                cache.counters.fill("failed");
            }
        }
    }
    // Order matters: the client, seeing its queue closed, finishes from the file or learns the fill
    // failed from the status the guard leaves. A failed fill's file is deleted off the workers.
    drop(client);
    drop(guard);
    if let Some(w) = writer {
        tokio::task::spawn_blocking(move || drop(w));
    }
}
